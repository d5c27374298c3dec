//! Consul: service discovery by tags, and the data behind the `consul` monitor.
//!
//! ```text
//!  Consul ◀─GET catalog/node/{node}?index&wait── discovery task ──SyncConsul──▶ lifecycle
//!         ◀─GET agent/checks | health/checks/{s}── health task ──HealthView (watch)──▶ monitor scheduler
//!                                                      ▲──────── services with a consul monitor ─┘
//! ```
//!
//! Neither task touches app state: discovery asks the lifecycle to make the set of Consul apps
//! equal to what a *good* catalog read says (a failed or malformed read changes nothing), and
//! the health task publishes verdicts the scheduler reads without waiting on the network.
//!
//! When Consul misbehaves (unreachable, slow, 5xx, malformed JSON) each task logs a WARN (the
//! first failure, then at most one a minute while it lasts, and an INFO when Consul answers
//! again), counts it in `gocast_consul_requests_total`, and retries after a backoff with
//! jitter; the last good state stays. An answer over [`MAX_BODY`] counts as malformed. While
//! the lifecycle refuses a service (its VIP or name held by another app), discovery reads the
//! catalog again without blocking every few seconds, so a freed VIP is taken quickly. See
//! [`health`] for how long a `consul` monitor trusts its last answer.

pub mod catalog;
pub mod health;

use std::{
    collections::BTreeSet,
    hash::{BuildHasher, RandomState},
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::{
    catalog::TagPolicy,
    health::{HealthView, Verdict},
};
use crate::{
    app::AppName,
    config::ConsulConfig,
    messages::{LifecycleError, LifecycleHandle},
    metrics::Metrics,
};

/// Consul caps a blocking query's `wait` at 10 minutes.
pub const MAX_WAIT: Duration = Duration::from_mins(10);
/// Time between two catalog reads at least: a catalog that changes all the time must not make
/// the agent hammer Consul, and changes still arrive well within a second.
pub const MIN_GAP: Duration = Duration::from_millis(200);
/// Time allowed to a request that is not a blocking query.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failure; it doubles up to [`MAX_BACKOFF`], ±20 % jitter.
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// While the lifecycle refuses a Consul service (a VIP or name held by another app), the
/// catalog is read again without blocking after this delay, doubling up to
/// [`MAX_REFUSED_RETRY`]: a VIP freed elsewhere (an HTTP app unregistered) is picked up in
/// seconds rather than at the next blocking answer, up to `consul_query_interval` away.
pub const MIN_REFUSED_RETRY: Duration = Duration::from_secs(1);
pub const MAX_REFUSED_RETRY: Duration = Duration::from_secs(15);
/// The largest answer read from Consul. A node's catalog or checks are kilobytes; a hostile or
/// broken server streaming without end must not take the agent's memory.
pub const MAX_BODY: usize = 8 << 20;
/// The most read of a non-2xx answer: enough for Consul's one-line error message.
pub const MAX_ERROR_BODY: usize = 4 << 10;
/// `filter=enable_gocast in ServiceTags` for `/agent/checks`, as GoCast sends it: Consul
/// answers only checks of gocast services.
pub const AGENT_CHECKS_FILTER: &str = "filter=enable_gocast%20in%20ServiceTags";
/// While a failure lasts, it is logged again at most this often.
pub const WARN_EVERY: Duration = Duration::from_mins(1);

/// A Consul request that failed; the message names the URL (never the token).
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("cannot read CONSUL_CACERT {path}: {source}")]
    CaCertRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CONSUL_CACERT {path} holds no usable PEM certificate: {source}")]
    CaCert {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("consul_addr {addr:?} is not a usable URL: {reason}")]
    Addr { addr: String, reason: String },
    #[error("cannot find the Consul node name: set CONSUL_NODE or agent.consul_node ({source})")]
    Node {
        #[source]
        source: std::io::Error,
    },
    #[error("building the Consul HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("GET {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("GET {url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("GET {url}: malformed answer: {source}")]
    Malformed {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("GET {url}: answer larger than {limit} bytes, refused")]
    TooLarge { url: String, limit: usize },
    #[error("GET {url}: Consul does not know node {node:?} (answer null)")]
    UnknownNode { url: String, node: String },
}

impl ConsulError {
    /// The `result` label of `gocast_consul_requests_total`.
    fn kind(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Status { status, .. } if *status >= 500 => "http_5xx",
            Self::Status { .. } => "http_4xx",
            Self::Malformed { .. } | Self::TooLarge { .. } => "malformed",
            Self::UnknownNode { .. } => "unknown_node",
            _ => "unreachable",
        }
    }
}

/// Everything the Consul tasks need, from the config and GoCast's environment variables.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `consul_addr` with its API prefix, e.g. `http://127.0.0.1:8500/v1`.
    pub base: reqwest::Url,
    pub node: String,
    /// `CONSUL_STALE=true`: any server may answer (`?stale`).
    pub stale: bool,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub query_interval: Duration,
    pub monitor_interval: Duration,
    /// How long a `consul` monitor keeps the last answer: `consul_monitor_grace`, never less
    /// than 3 × `monitor_interval` (so at least three polls fit in it).
    pub grace: Duration,
    pub policy: TagPolicy,
}

impl Settings {
    /// Reads the config and, as GoCast does, `CONSUL_NODE`, `CONSUL_STALE`, `CONSUL_TOKEN`,
    /// plus `CONSUL_HTTP_TOKEN` and `CONSUL_CACERT` as Consul's own tools do. The token is
    /// `CONSUL_TOKEN` (GoCast's, which wins over the config there too), else
    /// `agent.consul_token`, else `CONSUL_HTTP_TOKEN`. `env` is the lookup, so tests need not
    /// change the process environment.
    pub fn new(
        config: &ConsulConfig,
        monitor_interval: Duration,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConsulError> {
        let base = reqwest::Url::parse(&config.addr).map_err(|e| ConsulError::Addr {
            addr: config.addr.clone(),
            reason: e.to_string(),
        })?;
        if base.cannot_be_a_base() {
            return Err(ConsulError::Addr {
                addr: config.addr.clone(),
                reason: "not a base URL".into(),
            });
        }
        let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let node = match nonempty(env("CONSUL_NODE")).or_else(|| config.node.clone()) {
            Some(node) => node,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .map_err(|source| ConsulError::Node { source })?,
        };
        Ok(Self {
            base,
            node,
            stale: env("CONSUL_STALE").as_deref() == Some("true"),
            token: nonempty(env("CONSUL_TOKEN"))
                .or_else(|| config.token.clone())
                .or_else(|| nonempty(env("CONSUL_HTTP_TOKEN"))),
            ca_cert: nonempty(env("CONSUL_CACERT")).map(PathBuf::from),
            query_interval: config.query_interval,
            monitor_interval,
            grace: config.monitor_grace.max(monitor_interval * 3),
            policy: TagPolicy {
                allow_exec: config.allow_exec,
            },
        })
    }

    /// A local agent answers `/agent/checks` for its own node. GoCast decides so when the
    /// address *contains* `localhost` or `127.0.0.1`; so do we, and `[::1]` is the same agent.
    pub fn local_agent(&self) -> bool {
        let addr = self.base.as_str();
        addr.contains("localhost")
            || addr.contains("127.0.0.1")
            || self.host_ip() == Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
    }

    /// The host of `consul_addr` when it is an IP address.
    fn host_ip(&self) -> Option<IpAddr> {
        let host = self.base.host_str()?;
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    }

    /// Consul on a loopback address is reached directly, never through `HTTP(S)_PROXY`: Go's
    /// HTTP client (GoCast's) skips the proxy for `localhost` and loopback IPs, and a proxy
    /// elsewhere cannot reach this host's loopback anyway.
    pub fn loopback(&self) -> bool {
        self.host_ip().map_or_else(
            || {
                self.base
                    .host_str()
                    .is_some_and(|h| h.eq_ignore_ascii_case("localhost"))
            },
            |ip| ip.is_loopback(),
        )
    }
}

/// The three endpoints, as metric labels.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    CatalogNode,
    AgentChecks,
    HealthChecks,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Self::CatalogNode => "catalog_node",
            Self::AgentChecks => "agent_checks",
            Self::HealthChecks => "health_checks",
        }
    }
}

/// A 2xx answer: its body and `X-Consul-Index`.
struct Answer {
    body: bytes::Bytes,
    index: Option<u64>,
}

/// The HTTP side: one `reqwest` client (connection reuse), the base URL and the token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    settings: Settings,
    metrics: Metrics,
}

impl Client {
    pub fn new(settings: Settings, metrics: Metrics) -> Result<Self, ConsulError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("gocast/", env!("CARGO_PKG_VERSION")));
        if settings.loopback() {
            builder = builder.no_proxy();
        }
        if let Some(path) = &settings.ca_cert {
            let pem = std::fs::read(path).map_err(|source| ConsulError::CaCertRead {
                path: path.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                ConsulError::CaCert {
                    path: path.clone(),
                    source,
                }
            })?;
            if certs.is_empty() {
                // from_pem_bundle accepts a file without certificates; say so now rather than
                // at the first TLS handshake.
                return Err(ConsulError::CaCertRead {
                    path: path.clone(),
                    source: std::io::Error::other("no certificate in the file"),
                });
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: builder.build().map_err(ConsulError::Client)?,
            settings,
            metrics,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// `base` + path segments (escaped), + query.
    fn url(&self, segments: &[&str], query: &[(&str, Option<String>)]) -> reqwest::Url {
        let mut url = self.settings.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                match v {
                    Some(v) => q.append_pair(k, v),
                    None => q.append_key_only(k),
                };
            }
        }
        url
    }

    /// GETs `url` and parses the body with `parse`; counts the request once, by outcome.
    async fn get<T>(
        &self,
        endpoint: Endpoint,
        url: reqwest::Url,
        timeout: Duration,
        parse: impl FnOnce(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<(T, Option<u64>), ConsulError> {
        let shown = url.to_string();
        let result = self.fetch(&url, timeout).await.and_then(|a| {
            parse(&a.body)
                .map(|t| (t, a.index))
                .map_err(|source| ConsulError::Malformed { url: shown, source })
        });
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        self.metrics.consul_request(endpoint.label(), label);
        result
    }

    async fn fetch(&self, url: &reqwest::Url, timeout: Duration) -> Result<Answer, ConsulError> {
        let shown = url.to_string();
        let mut request = self.http.get(url.clone()).timeout(timeout);
        if let Some(token) = &self.settings.token {
            request = request.header("X-Consul-Token", token);
        }
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                ConsulError::Timeout {
                    url: shown.clone(),
                    timeout,
                }
            } else {
                ConsulError::Unreachable {
                    url: shown.clone(),
                    cause: chain(&e),
                }
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if !status.is_success() {
            // Only the start of an error answer is read: it is for the message.
            let (body, _) = read_capped(response, MAX_ERROR_BODY)
                .await
                .map_err(transport)?;
            let text = String::from_utf8_lossy(&body);
            let text: String = text.trim().chars().take(200).collect();
            return Err(ConsulError::Status {
                url: shown,
                status: status.as_u16(),
                body: text,
            });
        }
        let too_large = || ConsulError::TooLarge {
            url: shown.clone(),
            limit: MAX_BODY,
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(too_large());
        }
        let (body, complete) = read_capped(response, MAX_BODY).await.map_err(transport)?;
        if !complete {
            return Err(too_large());
        }
        Ok(Answer { body, index })
    }
}

/// Reads at most `cap` bytes of the body, chunk by chunk; `false` when there was more (the
/// rest is not read: dropping the response closes the connection).
async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<(bytes::Bytes, bool), reqwest::Error> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body.freeze(), false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), true))
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s = format!("{s}: {c}");
        }
        source = cause.source();
    }
    s
}

/// The index for the next blocking query, per Consul's rules: an index that went backwards (a
/// restored or restarted cluster) starts over at 0; 0 itself is never used to block, so it
/// becomes 1. `None`: the answer had no index, so the next read cannot block.
pub fn next_index(previous: u64, answered: Option<u64>) -> Option<u64> {
    let new = answered?;
    if new < previous {
        return Some(0);
    }
    Some(new.max(1))
}

/// Delays after failures: [`MIN_BACKOFF`] doubling to a cap, ±20 % jitter (so agents that lost
/// Consul together do not come back together).
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(cap: Duration) -> Self {
        Self::starting_at(MIN_BACKOFF, cap)
    }

    /// Starts at `min` rather than [`MIN_BACKOFF`].
    pub fn starting_at(min: Duration, cap: Duration) -> Self {
        let min = min.min(cap);
        Self {
            next: min,
            min,
            cap,
        }
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The delay before the next try; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.cap);
        // ±20 %: a random factor in [0.8, 1.2). RandomState's keys come from the OS.
        let r = RandomState::new().hash_one(0u8) % 1000;
        #[expect(clippy::cast_precision_loss, reason = "r < 1000 is exact in an f64")]
        let factor = 0.8 + 0.4 * (r as f64 / 1000.0);
        base.mul_f64(factor)
    }
}

/// Rate-limited WARN for a failure that may repeat every second.
#[derive(Debug)]
struct WarnLimiter {
    what: &'static str,
    failures: u64,
    last_warn: Option<Instant>,
}

impl WarnLimiter {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            failures: 0,
            last_warn: None,
        }
    }

    fn failed(&mut self, e: &ConsulError, retry_in: Duration) {
        self.failures += 1;
        let now = Instant::now();
        if self.last_warn.is_none_or(|t| now - t >= WARN_EVERY) {
            self.last_warn = Some(now);
            warn!(
                error = %chain(e),
                failures = self.failures,
                retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
                "{}: Consul request failed; keeping the last good state", self.what
            );
        } else {
            debug!(error = %chain(e), failures = self.failures, "{}: Consul request failed", self.what);
        }
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(
                failures = self.failures,
                "{}: Consul answers again", self.what
            );
        }
        self.failures = 0;
        self.last_warn = None;
    }
}

/// Sleeps, or returns `false` when cancelled first.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// The query and timeout of one catalog read. With an index it is a blocking query, which
/// Consul may hold up to `wait + wait/16`; without one (the first read, after an index reset,
/// a Consul without `X-Consul-Index`, a retry of refused services) Consul answers at once, so
/// the short [`REQUEST_TIMEOUT`] applies.
fn catalog_query(
    index: Option<u64>,
    wait: Duration,
    stale: bool,
) -> (Vec<(&'static str, Option<String>)>, Duration) {
    let mut query = Vec::new();
    let mut timeout = REQUEST_TIMEOUT;
    if let Some(i) = index.filter(|i| *i > 0) {
        query.push(("index", Some(i.to_string())));
        query.push(("wait", Some(format!("{}ms", wait.as_millis()))));
        timeout = wait + wait / 16 + REQUEST_TIMEOUT;
    }
    if stale {
        query.push(("stale", None));
    }
    (query, timeout)
}

/// The discovery task: follows the node's catalog with blocking queries and keeps the
/// lifecycle's Consul apps equal to it. Runs until `cancel`.
pub async fn discover(
    client: Client,
    lifecycle: LifecycleHandle,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let s = client.settings().clone();
    let wait = s.query_interval.min(MAX_WAIT);
    let mut index: Option<u64> = None;
    let mut backoff = Backoff::new(MAX_BACKOFF.min(s.query_interval.max(MIN_BACKOFF)));
    // Set while the lifecycle refuses some service: the next read does not block.
    let mut retry_refused = false;
    let mut refused_backoff = Backoff::starting_at(MIN_REFUSED_RETRY, MAX_REFUSED_RETRY);
    let mut warn_limit = WarnLimiter::new("consul discovery");
    let mut last_refusals: Vec<String> = Vec::new();
    info!(addr = %s.base, node = %s.node, stale = s.stale, "consul discovery started");
    loop {
        let started = Instant::now();
        let blocking_index = if retry_refused { None } else { index };
        let (query, timeout) = catalog_query(blocking_index, wait, s.stale);
        let url = client.url(&["catalog", "node", &s.node], &query);
        let read = tokio::select! {
            () = cancel.cancelled() => return,
            r = read_catalog(&client, url, &s.node, timeout) => r,
        };
        let (answered_index, discovered) = match read {
            Ok(r) => r,
            Err(e) => {
                let delay = backoff.next_delay();
                warn_limit.failed(&e, delay);
                if !sleep_or_cancel(delay, &cancel).await {
                    return;
                }
                continue;
            }
        };
        warn_limit.succeeded();
        backoff.reset();
        let prev = index.unwrap_or(0);
        index = next_index(prev, answered_index);
        if index == Some(0) && prev > 0 {
            info!(
                previous = prev,
                "consul index went backwards: reading the catalog afresh"
            );
        }

        let keep = discovered.keep();
        let mut refusals: Vec<String> =
            discovered.refused.iter().map(ToString::to_string).collect();
        let wanted = discovered.apps.len();
        let mut accepted = 0;
        match lifecycle.sync_consul(discovered.apps, keep).await {
            Ok(refused) => {
                accepted = wanted - refused.len();
                retry_refused = !refused.is_empty();
                refusals.extend(
                    refused
                        .iter()
                        .map(|(name, e)| format!("service {name:?}: {e}")),
                );
            }
            Err(LifecycleError::ShuttingDown) => return,
            Err(e) => {
                retry_refused = true;
                refusals.push(e.to_string());
            }
        }
        metrics.consul_discovered(accepted, refusals.len());
        refusals.sort();
        // Each refusal is logged when it appears, not on every read of an unchanged catalog.
        for r in refusals.iter().filter(|r| !last_refusals.contains(r)) {
            warn!("consul service refused, the others go on: {r}");
        }
        last_refusals = refusals;

        let pause = if retry_refused {
            // What the lifecycle refused may fit soon (a VIP freed by another app), and a
            // blocking read would only answer at the next catalog change.
            let delay = refused_backoff.next_delay();
            debug!(
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "consul services refused: reading the catalog again without blocking"
            );
            delay.min(s.query_interval.max(MIN_GAP))
        } else if index.is_none() {
            refused_backoff.reset();
            // No X-Consul-Index: this Consul cannot block, so poll at the query interval.
            s.query_interval
        } else {
            refused_backoff.reset();
            MIN_GAP.saturating_sub(started.elapsed())
        };
        if !sleep_or_cancel(pause, &cancel).await {
            return;
        }
    }
}

/// One catalog read: the answer's index and what it says, or why it cannot be used.
async fn read_catalog(
    client: &Client,
    url: reqwest::Url,
    node: &str,
    timeout: Duration,
) -> Result<(Option<u64>, catalog::Discovered), ConsulError> {
    let shown = url.to_string();
    let (parsed, index) = client
        .get(Endpoint::CatalogNode, url, timeout, catalog::parse_node)
        .await?;
    // `null`: the node is unknown. Reading that as "no services" would remove every Consul app
    // because of a Consul hiccup (a node re-registering), so it is an error: nothing changes.
    let Some(node_data) = parsed else {
        return Err(ConsulError::UnknownNode {
            url: shown,
            node: node.to_owned(),
        });
    };
    Ok((
        index,
        catalog::discover(&node_data, client.settings().policy),
    ))
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

/// Starts the health poller; the returned link goes to the monitor scheduler.
pub fn spawn_health(client: Client, cancel: CancellationToken) -> HealthLink {
    let (view_tx, view_rx) = watch::channel(HealthView::new(client.settings().grace));
    let (services_tx, services_rx) = watch::channel(BTreeSet::new());
    tokio::spawn(poll_health(client, services_rx, view_tx, cancel));
    HealthLink {
        view: view_rx,
        services: services_tx,
    }
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
    let mut backoff = Backoff::new((s.grace / 4).clamp(MIN_BACKOFF, MAX_BACKOFF));
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
    let result = client
        .get(
            Endpoint::AgentChecks,
            url,
            REQUEST_TIMEOUT,
            health::parse_agent_checks,
        )
        .await
        .map(|(checks, _)| checks);
    let now = Instant::now();
    match result {
        Ok(checks) => {
            view.send_modify(|v| {
                for svc in wanted {
                    let mine = checks.iter().filter(|c| &c.service_name == svc);
                    v.answered(svc, health::verdict(svc, mine), now);
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
            let result = client
                .get(
                    Endpoint::HealthChecks,
                    url,
                    REQUEST_TIMEOUT,
                    health::parse_health_checks,
                )
                .await
                .map(|(checks, _)| checks);
            (svc, result)
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
                    v.answered(svc, health::verdict(svc, mine), now);
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

    fn config(addr: &str) -> ConsulConfig {
        ConsulConfig {
            addr: addr.into(),
            query_interval: Duration::from_secs(300),
            token: None,
            node: Some("cfg-node".into()),
            monitor_grace: Duration::from_secs(30),
            allow_exec: false,
        }
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn index_rules_follow_consul() {
        assert_eq!(next_index(0, Some(5)), Some(5));
        assert_eq!(next_index(5, Some(5)), Some(5));
        assert_eq!(next_index(5, Some(9)), Some(9));
        // Backwards: start over without blocking.
        assert_eq!(next_index(9, Some(3)), Some(0));
        // Zero is never used to block.
        assert_eq!(next_index(0, Some(0)), Some(1));
        assert_eq!(next_index(4, None), None);
    }

    #[test]
    fn env_follows_gocast_and_consul_tools() {
        let c = config("http://127.0.0.1:8500/v1");
        let s = Settings::new(&c, Duration::from_secs(10), env(&[])).unwrap();
        assert_eq!(s.node, "cfg-node");
        assert!(!s.stale && s.token.is_none() && s.local_agent());
        let s = Settings::new(
            &c,
            Duration::from_secs(10),
            env(&[
                ("CONSUL_NODE", "env-node"),
                ("CONSUL_STALE", "true"),
                ("CONSUL_HTTP_TOKEN", "env-token"),
            ]),
        )
        .unwrap();
        assert_eq!(s.node, "env-node");
        assert!(s.stale);
        assert_eq!(s.token.as_deref(), Some("env-token"));
        let mut c2 = config("http://consul.example:8500/v1");
        c2.token = Some("cfg-token".into());
        c2.node = None;
        let s = Settings::new(
            &c2,
            Duration::from_secs(20),
            env(&[("CONSUL_HTTP_TOKEN", "x")]),
        )
        .unwrap();
        assert_eq!(s.token.as_deref(), Some("cfg-token"));
        assert!(!s.local_agent());
        assert!(!s.node.is_empty(), "hostname");
        // The grace never lets fewer than three polls fit.
        assert_eq!(s.grace, Duration::from_secs(60));
    }

    #[test]
    fn urls_escape_the_node_and_keep_the_prefix() {
        let c = config("http://127.0.0.1:8500/v1");
        let s = Settings::new(&c, Duration::from_secs(1), env(&[])).unwrap();
        let client = Client::new(s, Metrics::default()).unwrap();
        let url = client.url(
            &["catalog", "node", "a b/c"],
            &[
                ("index", Some("7".into())),
                ("wait", Some("5000ms".into())),
                ("stale", None),
            ],
        );
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8500/v1/catalog/node/a%20b%2Fc?index=7&wait=5000ms&stale"
        );
    }

    #[test]
    fn cacert_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        for path in [&missing, &junk] {
            let c = config("https://127.0.0.1:8501/v1");
            let p = path.to_string_lossy().into_owned();
            let s =
                Settings::new(&c, Duration::from_secs(1), env(&[("CONSUL_CACERT", &p)])).unwrap();
            let e = Client::new(s, Metrics::default()).unwrap_err().to_string();
            assert!(e.contains("CONSUL_CACERT") && e.contains(&p), "{e}");
        }
    }

    #[test]
    fn consul_token_wins_then_the_config_then_consul_http_token() {
        let mut c = config("http://127.0.0.1:8500/v1");
        let token = |c: &ConsulConfig, vars: &[(&str, &str)]| {
            Settings::new(c, Duration::from_secs(10), env(vars))
                .unwrap()
                .token
        };
        let both = [("CONSUL_TOKEN", "gocast"), ("CONSUL_HTTP_TOKEN", "consul")];
        assert_eq!(token(&c, &both).as_deref(), Some("gocast"));
        assert_eq!(token(&c, &both[1..]).as_deref(), Some("consul"));
        c.token = Some("cfg".into());
        assert_eq!(token(&c, &both).as_deref(), Some("gocast"));
        assert_eq!(token(&c, &both[1..]).as_deref(), Some("cfg"));
        assert_eq!(
            token(
                &c,
                &[("CONSUL_TOKEN", " "), ("CONSUL_HTTP_TOKEN", "consul")]
            )
            .as_deref(),
            Some("cfg"),
            "an empty CONSUL_TOKEN is not set"
        );
    }

    #[test]
    fn local_agent_mode_follows_gocast_substring_rule() {
        let local = |addr: &str| {
            Settings::new(&config(addr), Duration::from_secs(1), env(&[]))
                .unwrap()
                .local_agent()
        };
        for addr in [
            "http://127.0.0.1:8500/v1",
            "http://localhost:8500/v1",
            "http://[::1]:8500/v1",
            // GoCast looks for the substring anywhere in the address.
            "http://consul.localhost.example:8500/v1",
            "http://127.0.0.10:8500/v1",
        ] {
            assert!(local(addr), "{addr}");
        }
        for addr in ["http://consul.example:8500/v1", "http://198.18.0.1:8500/v1"] {
            assert!(!local(addr), "{addr}");
        }
    }

    #[test]
    fn loopback_consul_is_never_proxied() {
        let loopback = |addr: &str| {
            Settings::new(&config(addr), Duration::from_secs(1), env(&[]))
                .unwrap()
                .loopback()
        };
        for addr in [
            "http://127.0.0.1:8500/v1",
            "http://127.1.2.3:8500/v1",
            "http://LOCALHOST:8500/v1",
            "http://[::1]:8500/v1",
        ] {
            assert!(loopback(addr), "{addr}");
        }
        for addr in [
            "http://consul.example:8500/v1",
            "http://198.18.0.1:8500/v1",
            "http://[2001:db8::1]:8500/v1",
        ] {
            assert!(!loopback(addr), "{addr}");
        }
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

    /// Regression: reads without an index got the blocking-query timeout (minutes).
    #[test]
    fn only_blocking_reads_get_the_long_timeout() {
        let wait = Duration::from_secs(160);
        for index in [None, Some(0)] {
            let (query, timeout) = catalog_query(index, wait, true);
            assert_eq!(timeout, REQUEST_TIMEOUT, "{index:?}");
            assert_eq!(query, [("stale", None)]);
        }
        let (query, timeout) = catalog_query(Some(7), wait, false);
        assert_eq!(timeout, wait + Duration::from_secs(10) + REQUEST_TIMEOUT);
        assert_eq!(
            query,
            [
                ("index", Some("7".to_owned())),
                ("wait", Some("160000ms".to_owned()))
            ]
        );
    }

    /// Serves each connection on 127.0.0.1: `head` (status line and headers), then `chunk`
    /// repeated as a chunked body until the client goes away, or with `None` no body at all.
    /// Returns a client for it and its metrics.
    async fn serve(head: &'static str, chunk: Option<&'static [u8]>) -> (Client, Metrics) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    match chunk {
                        // Endless chunked body.
                        Some(data) => {
                            let frame = [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"]
                                .concat();
                            while conn.write_all(&frame).await.is_ok() {}
                        }
                        // Headers only; the promised body never comes.
                        None => tokio::time::sleep(Duration::from_secs(60)).await,
                    }
                });
            }
        });
        let c = config(&format!("http://127.0.0.1:{port}/v1"));
        let s = Settings::new(&c, Duration::from_secs(1), env(&[])).unwrap();
        let metrics = Metrics::default();
        (Client::new(s, metrics.clone()).unwrap(), metrics)
    }

    async fn get_catalog(client: &Client) -> Result<(), ConsulError> {
        let url = client.url(&["catalog", "node", "n"], &[]);
        let read = client.get(
            Endpoint::CatalogNode,
            url,
            REQUEST_TIMEOUT,
            catalog::parse_node,
        );
        tokio::time::timeout(Duration::from_secs(4), read)
            .await
            .expect("an oversized answer must be refused at once, not read to the end")
            .map(|_| ())
    }

    const DATA: &[u8] = &[b'x'; 64 << 10];

    #[tokio::test]
    async fn an_oversized_content_length_is_refused_unread() {
        let (client, metrics) = serve(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n",
            None,
        )
        .await;
        let e = get_catalog(&client).await.unwrap_err();
        assert!(
            matches!(
                e,
                ConsulError::TooLarge {
                    limit: MAX_BODY,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("larger than 8388608 bytes"), "{e}");
        let m = metrics.render();
        assert!(
            m.contains(
                r#"gocast_consul_requests_total{endpoint="catalog_node",result="malformed"} 1"#
            ),
            "{m}"
        );
    }

    #[tokio::test]
    async fn an_endless_body_is_cut_at_the_cap() {
        let (client, metrics) = serve(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            Some(DATA),
        )
        .await;
        let e = get_catalog(&client).await.unwrap_err();
        assert!(matches!(e, ConsulError::TooLarge { .. }), "{e}");
        assert!(metrics.render().contains(r#"result="malformed"} 1"#));
    }

    #[tokio::test]
    async fn an_endless_error_body_gives_a_short_message() {
        let (client, metrics) = serve(
            "HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n",
            Some(DATA),
        )
        .await;
        let e = get_catalog(&client).await.unwrap_err();
        let ConsulError::Status { status, body, .. } = &e else {
            panic!("{e}");
        };
        assert_eq!(*status, 500);
        assert!(body.starts_with("xxx") && body.len() <= 200, "{body:?}");
        assert!(metrics.render().contains(r#"result="http_5xx"} 1"#));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(4));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, base) in delays.iter().zip([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]) {
            let s = d.as_secs_f64();
            assert!(s >= base * 0.8 - 1e-9 && s < base * 1.2, "{delays:?}");
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(601));
    }
}
