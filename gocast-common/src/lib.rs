//! Code shared by the agent and its kernel side, and the agent's few system-call helpers that
//! need `unsafe` (the agent itself forbids it).
//!
//! Without the `user` feature this crate is `no_std`, for the eBPF programs: `maps` (names,
//! sizes and `Pod` layouts of the eBPF maps) and `csum` (incremental checksum updates) are
//! `core`-only. With it, the map types implement `aya::Pod` for the agent's loader.

#![cfg_attr(not(any(feature = "user", test)), no_std)]

#[cfg(feature = "user")]
pub mod code;
pub mod csum;
#[cfg(feature = "user")]
pub mod heap;
pub mod maps;
#[cfg(feature = "user")]
pub mod tcp_md5;
