//! The Consul HTTP client and what both Consul tasks share: the [`Settings`] read from the
//! config and the environment, one [`Client`] (connection reuse, token, CA, answer size caps,
//! request metrics), the [`ConsulError`]s, blocking-query index rules ([`next_index`]) and the
//! rate-limited WARN for a failure that lasts.
//!
//! Contract: every request is a GET that either yields a parsed answer with its
//! `X-Consul-Index`, or one [`ConsulError`] naming the URL (never the token); each is counted
//! once in `gocast_consul_requests_total` by outcome. An answer over [`MAX_BODY`] is refused
//! as malformed without reading it to the end. Nothing here touches app state or knows the
//! lifecycle.

use std::{
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::catalog::TagPolicy;
use crate::{config::ConsulConfig, error_chain, metrics::Metrics};

/// Time allowed to a request that is not a blocking query.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failure; it doubles up to [`MAX_BACKOFF`], ±20 % jitter.
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// The longest retry delay after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The largest answer read from Consul. A node's catalog or checks are kilobytes; a hostile or
/// broken server streaming without end must not take the agent's memory.
pub const MAX_BODY: usize = 8 << 20;
/// The most read of a non-2xx answer: enough for Consul's one-line error message.
pub const MAX_ERROR_BODY: usize = 4 << 10;
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
pub(super) enum Endpoint {
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
    /// Builds the HTTP client: no proxy for a loopback Consul, `CONSUL_CACERT` as the only extra
    /// root (read now, so a bad file stops the start). Requests are counted in `metrics`.
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

    /// What the client was built from.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// `base` + path segments (escaped), + query.
    pub(super) fn url(&self, segments: &[&str], query: &[(&str, Option<String>)]) -> reqwest::Url {
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
    pub(super) async fn get<T>(
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
                    cause: error_chain(&e),
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

/// Rate-limited WARN for a failure that may repeat every second.
#[derive(Debug)]
pub(super) struct WarnLimiter {
    what: &'static str,
    failures: u64,
    last_warn: Option<Instant>,
}

impl WarnLimiter {
    /// `what` names the task in the log lines.
    pub(super) fn new(what: &'static str) -> Self {
        Self {
            what,
            failures: 0,
            last_warn: None,
        }
    }

    /// Counts a failure; WARNs on the first and then at most every [`WARN_EVERY`].
    pub(super) fn failed(&mut self, e: &ConsulError, retry_in: Duration) {
        self.failures += 1;
        let now = Instant::now();
        if self.last_warn.is_none_or(|t| now - t >= WARN_EVERY) {
            self.last_warn = Some(now);
            warn!(
                error = %error_chain(e),
                failures = self.failures,
                retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
                "{}: Consul request failed; keeping the last good state", self.what
            );
        } else {
            debug!(error = %error_chain(e), failures = self.failures, "{}: Consul request failed", self.what);
        }
    }

    /// Ends a run of failures, with an INFO if there was one.
    pub(super) fn succeeded(&mut self) {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::consul::catalog;

    pub(in crate::consul) fn config(addr: &str) -> ConsulConfig {
        ConsulConfig {
            addr: addr.into(),
            query_interval: Duration::from_secs(300),
            token: None,
            node: Some("cfg-node".into()),
            monitor_grace: Duration::from_secs(30),
            allow_exec: false,
        }
    }

    pub(in crate::consul) fn env<'a>(
        vars: &'a [(&'a str, &'a str)],
    ) -> impl Fn(&str) -> Option<String> + 'a {
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
}
