//! The `consul` monitor's side of Consul: Consul's checks for a service, fetched by one poller
//! task for every app, and the rule that turns them (or their absence) into a monitor result.
//!
//! With a local agent (`consul_addr` containing `localhost` or `127.0.0.1`, GoCast's rule, or
//! on `[::1]`) one `GET /v1/agent/checks?filter=enable_gocast in ServiceTags` per poll serves
//! every app; otherwise each service is read with `GET /v1/health/checks/{service}`, keeping
//! only this node's checks. A service is healthy when it has at least one check and every one
//! of them is `passing` (GoCast: the first check decides; a service without checks fails, as
//! in GoCast).
//!
//! Staleness: the last answer for a service stays valid for `grace` (see
//! [`HealthView::result`]); a monitor still without a newer answer after that fails, so an
//! outage of Consul shorter than `grace` withdraws nothing.
//!
//! Contract: one poller task ([`spawn_health`]) serves every `consul` monitor. The monitor
//! scheduler tells it which services to watch and reads its verdicts through a [`HealthLink`]
//! without waiting on the network; a new service is polled at once, the others every
//! `monitor_interval`, and failures back off (never below `monitor_interval`). This side only
//! needs the [`client`](super::client); it knows nothing of discovery or the lifecycle.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::Duration,
};

use serde::Deserialize;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::client::{
    Client, ConsulError, Endpoint, MAX_BACKOFF, MIN_BACKOFF, REQUEST_TIMEOUT, WarnLimiter,
};
use crate::{
    app::AppName,
    backoff::Backoff,
    metrics::Metrics,
    supervise::{self, Supervised},
};

/// `filter=enable_gocast in ServiceTags` for `/agent/checks`, as GoCast sends it: Consul
/// answers only checks of gocast services.
pub const AGENT_CHECKS_FILTER: &str = "filter=enable_gocast%20in%20ServiceTags";

/// One health check as `/v1/agent/checks` (values of the object) and
/// `/v1/health/checks/{service}` (elements of the array) return it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Check {
    #[serde(rename = "Node", default)]
    pub node: String,
    #[serde(rename = "CheckID", default)]
    pub check_id: String,
    #[serde(rename = "Name", default)]
    pub name: String,
    /// `passing`, `warning`, `critical` (or `maintenance`).
    #[serde(rename = "Status")]
    pub status: String,
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    #[serde(rename = "ServiceName", default)]
    pub service_name: String,
}

/// Parses `/v1/agent/checks`: an object of checks by check ID.
pub fn parse_agent_checks(body: &[u8]) -> Result<Vec<Check>, serde_json::Error> {
    let map: BTreeMap<String, Check> = serde_json::from_slice(body)?;
    Ok(map.into_values().collect())
}

/// Parses `/v1/health/checks/{service}`: an array of checks of every node.
pub fn parse_health_checks(body: &[u8]) -> Result<Vec<Check>, serde_json::Error> {
    serde_json::from_slice(body)
}

/// Consul's verdict on one service from the checks that concern it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub reason: String,
}

/// All checks must pass; no check at all fails (there is nothing to say the service works).
pub fn verdict<'a>(service: &str, checks: impl IntoIterator<Item = &'a Check>) -> Verdict {
    let mut total = 0;
    let mut bad = String::new();
    for c in checks {
        total += 1;
        if c.status != "passing" {
            if !bad.is_empty() {
                bad.push_str("; ");
            }
            let _ = write!(bad, "check {:?} ({}) is {}", c.name, c.check_id, c.status);
        }
    }
    if total == 0 {
        return Verdict {
            ok: false,
            reason: format!("Consul has no checks for service {service} on this node"),
        };
    }
    if bad.is_empty() {
        Verdict {
            ok: true,
            reason: format!("{total} Consul check(s) passing"),
        }
    } else {
        Verdict {
            ok: false,
            reason: format!("Consul: {bad}"),
        }
    }
}

/// What the poller knows about one service.
#[derive(Debug, Clone)]
struct Known {
    /// The last answer and when it came.
    last: Option<(Verdict, Instant)>,
    /// The current trouble reaching Consul for this service, since when.
    trouble: Option<(String, Instant)>,
}

/// The poller's view, shared with the monitor scheduler through a watch channel.
#[derive(Debug, Clone)]
pub struct HealthView {
    grace: Duration,
    services: BTreeMap<String, Known>,
}

impl HealthView {
    /// An empty view whose answers stay valid for `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            services: BTreeMap::new(),
        }
    }

    /// How long a last answer stays valid.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Records an answer from Consul for `service`.
    pub fn answered(&mut self, service: &str, verdict: Verdict, now: Instant) {
        let k = self.entry(service);
        k.last = Some((verdict, now));
        k.trouble = None;
    }

    /// Records that Consul could not be asked about `service`; the last answer is kept.
    pub fn failed(&mut self, service: &str, error: &str, now: Instant) {
        let k = self.entry(service);
        match &mut k.trouble {
            Some((e, _)) => error.clone_into(e),
            None => k.trouble = Some((error.to_owned(), now)),
        }
    }

    /// Forgets services no app monitors any more.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.services.retain(|s, _| keep(s));
    }

    fn entry(&mut self, service: &str) -> &mut Known {
        self.services.entry(service.to_owned()).or_insert(Known {
            last: None,
            trouble: None,
        })
    }

    /// The `consul` monitor's result for `service` at `now`: the last answer while it is
    /// younger than `grace` (Consul trouble meanwhile is named in the reason), a failure after
    /// that or before any answer.
    pub fn result(&self, service: &str, now: Instant) -> Verdict {
        let Some(k) = self.services.get(service) else {
            return Verdict {
                ok: false,
                reason: "waiting for Consul's first answer".into(),
            };
        };
        let trouble = k.trouble.as_ref().map(|(e, _)| e.as_str());
        match (&k.last, trouble) {
            (None, None) => Verdict {
                ok: false,
                reason: "waiting for Consul's first answer".into(),
            },
            (None, Some(e)) => Verdict {
                ok: false,
                reason: format!("no answer from Consul yet: {e}"),
            },
            (Some((v, at)), trouble) => {
                let age = now.saturating_duration_since(*at);
                match trouble {
                    None => v.clone(),
                    Some(e) if age > self.grace => Verdict {
                        ok: false,
                        reason: format!(
                            "no answer from Consul for {:.1}s (longer than the {:?} grace): {e}",
                            age.as_secs_f64(),
                            self.grace
                        ),
                    },
                    Some(e) => Verdict {
                        ok: v.ok,
                        reason: format!(
                            "{} (Consul's answer of {:.1}s ago, kept for up to {:?}: {e})",
                            v.reason,
                            age.as_secs_f64(),
                            self.grace
                        ),
                    },
                }
            }
        }
    }
}

/// The health task's handles for the monitor scheduler.
#[derive(Debug, Clone)]
pub struct HealthLink {
    /// The poller's verdicts.
    pub view: watch::Receiver<HealthView>,
    /// The services some app monitors with `consul`; the scheduler keeps it current.
    pub services: watch::Sender<BTreeSet<String>>,
}

impl HealthLink {
    /// The `consul` monitor's result for `service` now.
    pub fn result(&self, service: &str) -> Verdict {
        self.view.borrow().result(service, Instant::now())
    }
}

/// Starts the health poller under supervision ([`supervise::spawn`], task `consul_health`);
/// the returned link goes to the monitor scheduler. Both ends of the link stay with the
/// supervisor, so a restarted poller serves the same scheduler: it reads the wanted services
/// afresh and keeps the verdicts the view already holds.
pub fn spawn_health(
    client: Client,
    metrics: Metrics,
    cancel: CancellationToken,
) -> (HealthLink, Supervised) {
    let (view_tx, view_rx) = watch::channel(HealthView::new(client.settings().grace));
    let (services_tx, services_rx) = watch::channel(BTreeSet::new());
    let supervised = supervise::spawn("consul_health", metrics, cancel, move |cancel| {
        poll_health(client.clone(), services_rx.clone(), view_tx.clone(), cancel)
    });
    let link = HealthLink {
        view: view_rx,
        services: services_tx,
    };
    (link, supervised)
}

/// Polls Consul's checks every `monitor_interval` for the services some app monitors.
async fn poll_health(
    client: Client,
    mut services: watch::Receiver<BTreeSet<String>>,
    view: watch::Sender<HealthView>,
    cancel: CancellationToken,
) {
    let s = client.settings().clone();
    let local = s.local_agent();
    // Several tries must fit in the grace, or one long backoff would outlast it.
    let mut backoff = Backoff::new(MIN_BACKOFF, (s.grace / 4).clamp(MIN_BACKOFF, MAX_BACKOFF));
    let mut warn_limit = WarnLimiter::new("consul monitor");
    loop {
        let wanted = services.borrow_and_update().clone();
        view.send_modify(|v| v.retain(|svc| wanted.contains(svc)));
        if wanted.is_empty() {
            tokio::select! {
                () = cancel.cancelled() => return,
                r = services.changed() => if r.is_err() { return },
            }
            continue;
        }
        let errors = if local {
            poll_agent(&client, &wanted, &view).await
        } else {
            poll_remote(&client, &wanted, &view).await
        };
        let delay = match errors.first() {
            None => {
                warn_limit.succeeded();
                backoff.reset();
                s.monitor_interval
            }
            Some(e) => {
                let delay = backoff.next_delay().max(s.monitor_interval);
                warn_limit.failed(e, delay);
                delay
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
            // A new service to watch is polled at once, not a monitor_interval later.
            r = services.changed() => if r.is_err() { return },
        }
    }
}

/// One `/v1/agent/checks` for every service; returns the errors.
async fn poll_agent(
    client: &Client,
    wanted: &BTreeSet<String>,
    view: &watch::Sender<HealthView>,
) -> Vec<ConsulError> {
    let url = agent_checks_url(client);
    let result = read_checks(client, Endpoint::AgentChecks, url, parse_agent_checks).await;
    let now = Instant::now();
    match result {
        Ok(checks) => {
            view.send_modify(|v| {
                for svc in wanted {
                    let mine = checks.iter().filter(|c| &c.service_name == svc);
                    v.answered(svc, verdict(svc, mine), now);
                }
            });
            Vec::new()
        }
        Err(e) => {
            let text = e.to_string();
            view.send_modify(|v| wanted.iter().for_each(|svc| v.failed(svc, &text, now)));
            vec![e]
        }
    }
}

/// One read of checks: never a blocking query, so the short [`REQUEST_TIMEOUT`] applies.
async fn read_checks(
    client: &Client,
    endpoint: Endpoint,
    url: reqwest::Url,
    parse: fn(&[u8]) -> Result<Vec<Check>, serde_json::Error>,
) -> Result<Vec<Check>, ConsulError> {
    let (checks, _index) = client.get(endpoint, url, REQUEST_TIMEOUT, parse).await?;
    Ok(checks)
}

/// `/v1/agent/checks` with GoCast's filter.
fn agent_checks_url(client: &Client) -> reqwest::Url {
    let mut url = client.url(&["agent", "checks"], &[]);
    url.set_query(Some(AGENT_CHECKS_FILTER));
    url
}

/// `/v1/health/checks/{service}` per service, concurrently; this node's checks decide.
async fn poll_remote(
    client: &Client,
    wanted: &BTreeSet<String>,
    view: &watch::Sender<HealthView>,
) -> Vec<ConsulError> {
    let node = client.settings().node.clone();
    let stale = client.settings().stale;
    let reads = wanted.iter().map(|svc| {
        let query: Vec<(&str, Option<String>)> = if stale {
            vec![("stale", None)]
        } else {
            Vec::new()
        };
        let url = client.url(&["health", "checks", svc], &query);
        async move {
            let result = read_checks(client, Endpoint::HealthChecks, url, parse_health_checks);
            (svc, result.await)
        }
    });
    let results = futures::future::join_all(reads).await;
    let now = Instant::now();
    let mut errors = Vec::new();
    view.send_modify(|v| {
        for (svc, result) in results {
            match result {
                Ok(checks) => {
                    let mine = checks.iter().filter(|c| {
                        c.node == node && (c.service_name.is_empty() || &c.service_name == svc)
                    });
                    v.answered(svc, verdict(svc, mine), now);
                }
                Err(e) => {
                    v.failed(svc, &e.to_string(), now);
                    errors.push(e);
                }
            }
        }
    });
    errors
}

/// The `consul` monitor's result for an app when Consul is not configured.
pub fn unconfigured() -> Verdict {
    Verdict {
        ok: false,
        reason: "consul monitor: agent.consul_addr is not set".into(),
    }
}

/// The app name as the service name the `consul` monitor asks about.
pub fn service_of(app: &AppName) -> &str {
    app.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        consul::client::{
            Settings,
            tests::{config, env},
        },
        metrics::Metrics,
    };

    const AGENT_CHECKS: &str = r#"{
      "serfHealth": {"Node": "node1", "CheckID": "serfHealth", "Name": "Serf Health Status",
                     "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
                     "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
                     "Definition": {}, "CreateIndex": 0, "ModifyIndex": 0},
      "service:web-1": {"Node": "node1", "CheckID": "service:web-1", "Name": "Service 'web' check",
                        "Status": "passing", "Notes": "", "Output": "HTTP GET: 200 OK",
                        "ServiceID": "web-1", "ServiceName": "web", "ServiceTags": ["enable_gocast"],
                        "Type": "http", "Definition": {}, "CreateIndex": 0, "ModifyIndex": 0},
      "web-tcp": {"Node": "node1", "CheckID": "web-tcp", "Name": "tcp", "Status": "critical",
                  "ServiceID": "web-1", "ServiceName": "web", "ServiceTags": []}
    }"#;

    #[test]
    fn agent_checks_all_of_the_service_must_pass() {
        let checks = parse_agent_checks(AGENT_CHECKS.as_bytes()).unwrap();
        assert_eq!(checks.len(), 3);
        let web: Vec<&Check> = checks.iter().filter(|c| c.service_name == "web").collect();
        let v = verdict("web", web.iter().copied());
        assert!(!v.ok);
        assert!(
            v.reason.contains("\"tcp\" (web-tcp) is critical"),
            "{}",
            v.reason
        );
        let passing: Vec<&Check> = web.into_iter().filter(|c| c.status == "passing").collect();
        assert!(verdict("web", passing).ok);
    }

    #[test]
    fn a_service_without_checks_fails() {
        let v = verdict("web", []);
        assert!(!v.ok && v.reason.contains("no checks"), "{}", v.reason);
    }

    #[test]
    fn health_checks_array_parses_and_malformed_answers_are_errors() {
        let body = r#"[{"Node": "node1", "CheckID": "service:web", "Name": "web", "Status": "warning",
                        "ServiceID": "web", "ServiceName": "web", "ServiceTags": [], "Namespace": "default"},
                       {"Node": "node2", "CheckID": "service:web", "Name": "web", "Status": "passing",
                        "ServiceID": "web", "ServiceName": "web"}]"#;
        let checks = parse_health_checks(body.as_bytes()).unwrap();
        let mine: Vec<&Check> = checks.iter().filter(|c| c.node == "node1").collect();
        let v = verdict("web", mine);
        assert!(!v.ok && v.reason.contains("warning"), "{}", v.reason);
        assert!(parse_health_checks(b"{}").is_err());
        assert!(parse_agent_checks(b"[]").is_err());
        assert!(parse_agent_checks(br#"{"x": {"Node": "n"}}"#).is_err());
        assert!(parse_agent_checks(b"nonsense").is_err());
    }

    #[test]
    fn the_last_answer_is_kept_for_the_grace_then_fails() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(30);
        let mut view = HealthView::new(grace);
        assert!(!view.result("web", t0).ok);
        view.failed("web", "connection refused", t0);
        let r = view.result("web", t0);
        assert!(
            !r.ok && r.reason.contains("connection refused"),
            "{}",
            r.reason
        );

        let ok = Verdict {
            ok: true,
            reason: "1 Consul check(s) passing".into(),
        };
        view.answered("web", ok.clone(), t0);
        assert_eq!(view.result("web", t0 + Duration::from_secs(3600)), ok);
        // Consul stops answering: the answer holds for the grace, then the monitor fails.
        view.failed("web", "HTTP 500", t0 + Duration::from_secs(5));
        let r = view.result("web", t0 + Duration::from_secs(29));
        assert!(r.ok && r.reason.contains("HTTP 500"), "{}", r.reason);
        let r = view.result("web", t0 + Duration::from_secs(31));
        assert!(
            !r.ok && r.reason.contains("no answer from Consul for 31"),
            "{}",
            r.reason
        );
        // An answer again: valid at once.
        view.answered("web", ok.clone(), t0 + Duration::from_secs(40));
        assert_eq!(view.result("web", t0 + Duration::from_secs(41)), ok);
        view.retain(|_| false);
        assert!(!view.result("web", t0).ok);
    }

    #[test]
    fn agent_checks_sends_gocasts_filter() {
        let c = config("http://127.0.0.1:8500/v1");
        let s = Settings::new(&c, Duration::from_secs(1), env(&[])).unwrap();
        let client = Client::new(s, Metrics::default()).unwrap();
        let url = agent_checks_url(&client);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8500/v1/agent/checks?filter=enable_gocast%20in%20ServiceTags"
        );
        let filter: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(
            filter,
            [(
                "filter".to_owned(),
                "enable_gocast in ServiceTags".to_owned()
            )]
        );
    }
}
