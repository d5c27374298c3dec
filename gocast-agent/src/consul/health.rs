//! The `consul` monitor's data: Consul's checks for a service, fetched by one poller task for
//! every app, and the rule that turns them (or their absence) into a monitor result.
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

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use serde::Deserialize;
use tokio::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
