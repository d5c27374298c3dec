//! GoCast in Rust: health-checks the services on a host and announces their anycast VIPs.
//!
//! # Layout
//! - [`config`]: the GoCast YAML file, parsed once into typed values.
//! - [`app`]: the app model (`AppName`, `Vip`, `Monitor`, `NatRule`, `Community`).
//! - [`monitor`]: runs the health checks and reports results.
//! - [`consul`]: discovery by Consul tags, and the `consul` monitor's poller.
//! - [`lifecycle`]: owns the app registry; health → announce/withdraw → cleanup.
//! - [`host`]: the real host the lifecycle changes (netlink + dataplane).
//! - [`netlink`]: VIP addresses on `lo`, routes toward peers.
//! - [`dataplane`]: NAT (iptables).
//! - [`store`]: HTTP registrations persisted across restarts.
//! - [`api`]: the HTTP API; [`metrics`]: Prometheus text.
//! - [`cli`]: command line, shared by the binary and tests.

pub mod api;
pub mod app;
pub mod bgp;
pub mod cli;
pub mod config;
pub mod consul;
pub mod dataplane;
pub mod host;
pub mod lifecycle;
pub mod metrics;
pub mod monitor;
pub mod netlink;
pub mod store;

#[cfg(test)]
pub mod testing;
