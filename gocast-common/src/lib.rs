//! Code shared by the agent and its kernel side, and the agent's few system-call helpers that
//! need `unsafe` (the agent itself forbids it).
//!
//! Without the `user` feature this crate is `no_std`, for the eBPF programs.

#![cfg_attr(not(feature = "user"), no_std)]

#[cfg(feature = "user")]
pub mod tcp_md5;
