//! Live reload of the config file (`SIGHUP`, `POST /reload`, `gocast reload`): the file is read
//! and validated again; if it is invalid nothing changes and the error says why; if it is valid,
//! only the difference is applied, each part by its owner:
//!
//! - config apps and the lifecycle's settings (rise/fall, intervals, cleanup and drain times,
//!   allowlist): the lifecycle, which syncs the config apps and never touches HTTP or Consul
//!   registrations ([`crate::messages::Request::Reload`]);
//! - `bgp:`: the speaker, which resets only peers whose session parameters changed;
//! - `agent.log_level`: the log filter;
//! - Consul settings: discovery and the `consul` monitor's poller restart with the new client.
//!
//! What cannot change while the agent runs (the API socket, the state file, the dataplane) is
//! reported as not applied, with the reason, and the rest of the reload is applied: one wrong key
//! must not block an urgent change elsewhere. docs/design.md, "Live reload", has the table.

use std::path::PathBuf;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::{
    bgp::SpeakerReload,
    config::{Config, ConfigError, NotApplied},
    consul::client::ConsulError,
    messages::{LifecycleError, SyncReport},
    systemd,
};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("config not reloaded, nothing changed: {0}")]
    Invalid(#[from] ConfigError),
    #[error("config not reloaded, nothing changed: setting up Consul: {0}")]
    Consul(#[from] ConsulError),
    #[error("config not reloaded: {0}")]
    Lifecycle(#[from] LifecycleError),
    #[error("the agent is shutting down")]
    ShuttingDown,
}

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    /// The config apps added, changed, removed and refused.
    pub apps: SyncReport,
    /// What the BGP speaker did: peers added, removed, reset, sent new attributes.
    pub bgp: SpeakerReload,
    /// The log filter now in force, if the file's changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Consul discovery and the `consul` monitor's poller were restarted with new settings.
    pub consul_restarted: bool,
    pub not_applied: Vec<NotApplied>,
}

/// Asks the reloader for a reload; the API and the signal handler hold one.
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    tx: mpsc::Sender<oneshot::Sender<Result<ReloadReport, ReloadError>>>,
}

impl ReloadHandle {
    /// Reloads and waits for the outcome.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(reply)
            .await
            .map_err(|_| ReloadError::ShuttingDown)?;
        rx.await.map_err(|_| ReloadError::ShuttingDown)?
    }
}

/// Applies a valid new config; the agent implements it over the tasks it wired.
pub trait Apply: Send + 'static {
    /// Applies `new` (already validated); `current` is what runs now. Fills `report`.
    fn apply(
        &mut self,
        current: &Config,
        new: &Config,
        report: &mut ReloadReport,
    ) -> impl Future<Output = Result<(), ReloadError>> + Send;
}

/// Starts the reloader: one reload at a time, in the order asked.
pub fn spawn<A: Apply>(path: PathBuf, current: Config, applier: A) -> ReloadHandle {
    let (tx, mut rx) = mpsc::channel::<oneshot::Sender<Result<ReloadReport, ReloadError>>>(8);
    tokio::spawn(async move {
        let mut current = current;
        let mut applier = applier;
        while let Some(reply) = rx.recv().await {
            // systemd shows "reloading" meanwhile (`Type=notify` units; nothing without it).
            systemd::notify_reloading();
            let result = reload_once(&path, &mut current, &mut applier).await;
            systemd::notify_ready();
            match &result {
                Ok(report) => info!(
                    added = report.apps.added.len(),
                    changed = report.apps.changed.len(),
                    removed = report.apps.removed.len(),
                    refused = report.apps.refused.len(),
                    not_applied = report.not_applied.len(),
                    "config reloaded"
                ),
                Err(e) => warn!(error = %e, "config reload refused"),
            }
            let _ = reply.send(result);
        }
    });
    ReloadHandle { tx }
}

async fn reload_once<A: Apply>(
    path: &std::path::Path,
    current: &mut Config,
    applier: &mut A,
) -> Result<ReloadReport, ReloadError> {
    let path = path.to_owned();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
        .await
        .map_err(|_| ReloadError::ShuttingDown)?;
    let mut new = loaded?;
    let mut report = ReloadReport {
        not_applied: keep_restart_only(current, &mut new),
        ..ReloadReport::default()
    };
    applier.apply(current, &new, &mut report).await?;
    *current = new;
    Ok(report)
}

/// Puts the running values back into `new` for keys that only a restart can change, and says
/// which of them the file changed.
fn keep_restart_only(current: &Config, new: &mut Config) -> Vec<NotApplied> {
    let mut not_applied = Vec::new();
    let mut keep = |changed: bool, key: &'static str, reason: &'static str| {
        if changed {
            warn!(
                key,
                reason, "changed in the config file; not applied until a restart"
            );
            not_applied.push(NotApplied {
                key,
                reason: reason.to_owned(),
            });
        }
    };
    keep(
        current.agent.listen_addr != new.agent.listen_addr,
        "agent.listen_addr",
        "the API socket is bound at start",
    );
    new.agent.listen_addr = current.agent.listen_addr;
    keep(
        current.agent.state_file != new.agent.state_file,
        "agent.state_file",
        "the state file is read at start",
    );
    new.agent.state_file.clone_from(&current.agent.state_file);
    keep(
        current.agent.nat_dest_ip != new.agent.nat_dest_ip,
        "agent.nat_dest_ip",
        "installed NAT rules keep their destination",
    );
    new.agent.nat_dest_ip = current.agent.nat_dest_ip;
    keep(
        current.dataplane != new.dataplane,
        "dataplane",
        "the dataplane is loaded and attached at start",
    );
    new.dataplane = current.dataplane.clone();
    not_applied
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::parse(yaml, "test.yaml").unwrap()
    }

    #[test]
    fn keys_only_a_restart_changes_keep_their_running_value_and_are_reported() {
        let current = config("agent:\n  listen_addr: 127.0.0.1:8080\n");
        let mut new = config(
            "agent:\n  listen_addr: 127.0.0.1:9090\n  monitor_interval: 2s\ndataplane:\n  mode: iptables\n",
        );
        let not_applied = keep_restart_only(&current, &mut new);
        let keys: Vec<_> = not_applied.iter().map(|n| n.key).collect();
        assert_eq!(keys, ["agent.listen_addr", "dataplane"]);
        assert_eq!(new.agent.listen_addr, current.agent.listen_addr);
        assert_eq!(new.dataplane, current.dataplane);
        // Everything else is the new file's.
        assert_eq!(
            new.agent.monitor_interval,
            std::time::Duration::from_secs(2)
        );
    }

    #[test]
    fn an_unchanged_file_reports_nothing_not_applied() {
        let current = config("agent:\n  monitor_interval: 2s\n");
        let mut new = current.clone();
        assert!(keep_restart_only(&current, &mut new).is_empty());
    }
}
