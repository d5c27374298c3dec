//! GoCast in Rust: health-checks the services on a host and announces their anycast VIPs.
//!
//! # Layout
//! - [`agent`]: the running agent: wiring of every task, signals, shutdown.
//! - [`reload`]: live reload of the config file.
//! - [`config`]: the GoCast YAML file, parsed once into typed values.
//! - [`app`]: the app model (`AppName`, `Vip`, `Monitor`, `NatRule`, `Community`).
//! - [`monitor`]: runs the health checks and reports results.
//! - [`consul`]: discovery by Consul tags, and the `consul` monitor's poller.
//! - [`lifecycle`]: owns the app registry; health → announce/withdraw → cleanup.
//! - [`messages`]: the lifecycle's contracts: its handle, requests, errors, views, routes.
//! - [`host`]: the real host the lifecycle changes (netlink + dataplane).
//! - [`bfd`]: BFD (RFC 5880/5881) on the BGP sessions: sub-second detection of a silent host.
//! - [`netlink`]: VIP addresses on `lo`, routes toward peers.
//! - [`dataplane`]: NAT and per-VIP counters (eBPF, iptables fallback).
//! - [`stats`]: samples the counters: rates for `/stats`, passive health.
//! - [`store`]: HTTP registrations persisted across restarts.
//! - [`api`]: the HTTP API; [`serve`]: its accept loop and limits; [`auth`]: its token and
//!   audit log; [`metrics`]: Prometheus text.
//! - [`supervise`]: restarts of failed tasks, the lifecycle's heartbeat, what `/healthz` checks.
//! - [`systemd`]: `sd_notify` (ready, status, watchdog, reloading, stopping); nothing without it.
//! - [`cli`]: command line, shared by the binary and tests; [`client`]: its calls to a running agent.
//! - [`timer`]: the one timer type every task uses; [`backoff`]: the one retry backoff;
//!   [`error_chain`]: errors on one line.

pub mod agent;
pub mod api;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod bfd;
pub mod bgp;
pub mod cli;
pub mod client;
pub mod config;
pub mod consul;
pub mod dataplane;
pub mod host;
pub mod lifecycle;
pub mod messages;
pub mod metrics;
pub mod monitor;
pub mod netlink;
pub mod reload;
pub mod serve;
pub mod stats;
pub mod store;
pub mod supervise;
pub mod systemd;
pub mod timer;

#[cfg(test)]
pub mod testing;

/// The error and its causes on one line, for a log field. A cause whose text the line already
/// holds (an error that prints its source in its own message) is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("reading the file")]
        Plain(#[source] std::io::Error),
        #[error("reading the file: {0}")]
        Shown(#[source] std::io::Error),
    }

    #[test]
    fn error_chain_joins_causes_once() {
        let io = || std::io::Error::other("disk on fire");
        assert_eq!(
            error_chain(&Outer::Plain(io())),
            "reading the file: disk on fire"
        );
        assert_eq!(
            error_chain(&Outer::Shown(io())),
            "reading the file: disk on fire"
        );
    }
}
