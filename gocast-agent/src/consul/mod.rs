//! Consul: service discovery by tags, and the data behind the `consul` monitor.
//!
//! ```text
//!  Consul ◀─GET catalog/node/{node}?index&wait── discovery task ──SyncConsul──▶ lifecycle
//!         ◀─GET agent/checks | health/checks/{s}── health task ──HealthView (watch)──▶ monitor scheduler
//!                                                      ▲──────── services with a consul monitor ─┘
//! ```
//!
//! # Layout
//! - [`client`]: settings, the HTTP client, errors, blocking-query index rules: what both
//!   tasks share.
//! - [`discovery`]: the catalog watch that drives the lifecycle; [`catalog`]: the catalog's
//!   JSON and GoCast's tags turned into apps.
//! - [`health`]: the `consul` monitor's poller and verdicts, read by the monitor scheduler.
//!
//! The monitor side ([`health`], [`client`]) never imports [`discovery`] or the lifecycle's
//! messages, so the monitor scheduler (below the lifecycle) can use it without a cycle.
//!
//! Neither task touches app state: discovery asks the lifecycle to make the set of Consul apps
//! equal to what a *good* catalog read says (a failed or malformed read changes nothing), and
//! the health task publishes verdicts the scheduler reads without waiting on the network.
//!
//! When Consul misbehaves (unreachable, slow, 5xx, malformed JSON) each task logs a WARN (the
//! first failure, then at most one a minute while it lasts, and an INFO when Consul answers
//! again), counts it in `gocast_consul_requests_total`, and retries after a backoff with
//! jitter; the last good state stays. An answer over [`client::MAX_BODY`] counts as malformed.
//! See [`discovery`] for services the lifecycle refuses and [`health`] for how long a `consul`
//! monitor trusts its last answer.

pub mod catalog;
pub mod client;
pub mod discovery;
pub mod health;

pub use self::{
    client::{Client, Settings},
    discovery::discover,
    health::{HealthLink, spawn_health},
};
