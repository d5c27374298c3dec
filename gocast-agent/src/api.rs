//! The HTTP API: GoCast's calls (`/register`, `/unregister`, `/info`) with the same parameters,
//! plus `/apps`, `/routes`, `/peers/{addr}/routes`, `/stats`, `/healthz` and `/metrics`.
//!
//! `/healthz` answers 503 with the reasons while the lifecycle does not turn or a supervised task
//! is down (see [`crate::supervise`]).
//!
//! A request is parsed completely into typed values first, every problem reported at once
//! (400, JSON `{"error": ...}`); only a valid request reaches the lifecycle, whose refusals map
//! to 403 (policy), 404 (unknown app) and 409 (VIP taken). A refused request changes nothing.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{FromRequest, Path, RawQuery, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::warn;

use crate::{
    app::{self, AppName, AppSpec, Monitor, NatRule, QUOTE_MAX, Source, truncated},
    bfd::BfdStatus,
    bgp::{
        Peers,
        codec::{Family, Origin},
        session::{PeerStatus, SentRoute},
    },
    messages::{LifecycleError, LifecycleHandle, Routes},
    metrics::{Exposition, Metrics},
    reload::{ReloadError, ReloadHandle},
    stats::{self, Snapshot},
    supervise::Health,
};

/// An API error: its status and a message that names the bad parameter.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            warn!(status = %self.status, error = %self.message, "request failed");
        }
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        let status = match &e {
            LifecycleError::VipConflict { .. }
            | LifecycleError::VipOverlap { .. }
            | LifecycleError::LabelConflict { .. }
            | LifecycleError::ConfigApp(_)
            | LifecycleError::ConsulApp(_)
            | LifecycleError::NameTaken { .. }
            | LifecycleError::ProtectedAddress { .. } => StatusCode::CONFLICT,
            LifecycleError::UnknownApp(_) => StatusCode::NOT_FOUND,
            LifecycleError::ExecRefused | LifecycleError::NotAllowed(_) => StatusCode::FORBIDDEN,
            LifecycleError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            LifecycleError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self {
            status,
            message: e.to_string(),
        }
    }
}

/// A BGP peer as `/info` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub address: Option<String>,
    pub asn: u32,
    pub state: String,
    pub uptime_s: Option<u64>,
    pub last_error: Option<String>,
    /// The last NOTIFICATION sent or received, e.g. `received administrative shutdown (6/2)`.
    pub last_notification: Option<String>,
    pub messages_in: u64,
    pub messages_out: u64,
    pub prefixes_advertised: usize,
    pub prefixes_received: usize,
    /// `ipv4`, `ipv6`: the families whose VIPs this peer is sent (empty unless Established).
    pub families: Vec<&'static str>,
    /// The peer's BFD session, when `bfd` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdInfo>,
}

/// A BFD session as `/info` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BfdInfo {
    #[serde(flatten)]
    pub status: BfdStatus,
    pub uptime_s: Option<u64>,
}

impl From<&PeerStatus> for PeerInfo {
    fn from(s: &PeerStatus) -> Self {
        Self {
            address: s.address.map(|a| a.to_string()),
            asn: s.asn,
            state: s.state.to_string(),
            uptime_s: s.established_at.map(|t| t.elapsed().as_secs()),
            last_error: s.last_error.clone(),
            last_notification: s.last_notification.clone(),
            messages_in: s.messages_in,
            messages_out: s.messages_out,
            prefixes_advertised: s.prefixes_advertised,
            prefixes_received: s.prefixes_received,
            families: s
                .families
                .iter()
                .map(|f| match f {
                    Family::Ipv4Unicast => "ipv4",
                    Family::Ipv6Unicast => "ipv6",
                })
                .collect(),
            bfd: s.bfd.as_ref().map(|b| BfdInfo {
                status: b.clone(),
                uptime_s: b.up_since.map(|t| t.elapsed().as_secs()),
            }),
        }
    }
}

/// What `/info` reports that does not change while the agent runs.
#[derive(Debug, Clone, Serialize)]
pub struct StaticInfo {
    pub version: &'static str,
    pub dataplane: crate::dataplane::DataplaneInfo,
}

/// Everything the handlers need; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub lifecycle: LifecycleHandle,
    pub routes: watch::Receiver<Routes>,
    /// Reads the per-VIP counters; `None` without the eBPF dataplane.
    pub stats: Option<stats::Stats>,
    pub metrics: Metrics,
    pub info: Arc<StaticInfo>,
    /// Each BGP session's status, in config order, following reloads.
    pub peers: Peers,
    /// Reloads the config file; `None` where there is no file (tests).
    pub reload: Option<ReloadHandle>,
    /// What `/healthz` checks: the lifecycle's heartbeat, the supervised tasks.
    pub health: Health,
}

/// The API's routes, apart from serving, so tests can call them directly.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/register", get(register).post(register))
        .route("/unregister", get(unregister).post(unregister))
        .route("/drain", post(drain))
        .route("/undrain", post(undrain))
        .route("/reload", post(reload))
        .route("/info", get(info))
        .route("/apps", get(apps))
        .route("/apps/{name}", get(app_by_name))
        .route("/routes", get(routes))
        .route("/peers/{addr}/routes", get(peer_routes))
        .route("/stats", get(stats))
        .route("/stats/{*vip}", get(stats_of))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Monitors one app may have: each is a task probing every interval, and one request once
/// carried 60,000.
pub const MAX_MONITORS: usize = 32;
/// NAT rules one app may have (each is a map entry or an iptables rule per address family).
pub const MAX_NATS: usize = 64;
/// Problems listed in one 400: a request of 60,000 bad values gets a short answer.
const MAX_PROBLEMS: usize = 8;

/// Query or form pairs, in order, repeated keys kept (`monitor=a&monitor=b`).
fn pairs(text: &str) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("malformed parameters: {e}")))
}

/// A JSON object's members in order, a key given twice refused (a map would keep one of them
/// silently, where the same duplicate in a query string is a 400).
struct Members(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut members: Vec<(String, Value)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if members.iter().any(|(k, _)| *k == key) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate key {:?}",
                            crate::app::truncated(&key, 64)
                        )));
                    }
                    members.push((key, map.next_value()?));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON body becomes the same pairs a query would give: strings once, arrays repeated.
fn json_pairs(body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let Members(members) = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    let mut out = Vec::new();
    for (key, value) in members {
        match value {
            Value::String(s) => out.push((key, s)),
            Value::Bool(b) => out.push((key, b.to_string())),
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::String(s) => out.push((key.clone(), s)),
                        other => {
                            return Err(ApiError::bad_request(format!(
                                "{}: expected strings, got {}",
                                truncated(&key, QUOTE_MAX),
                                truncated(&other.to_string(), QUOTE_MAX)
                            )));
                        }
                    }
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "{}: expected a string or a list of strings, got {}",
                    truncated(&key, QUOTE_MAX),
                    truncated(&other.to_string(), QUOTE_MAX)
                )));
            }
        }
    }
    Ok(out)
}

/// A call's parameters: the query's pairs, then for a POST the body's. Any other method (GET,
/// and HEAD, which axum routes to GET handlers) ignores the body.
struct Params(Vec<(String, String)>);

impl<S: Send + Sync> FromRequest<S> for Params {
    /// A body that cannot be read keeps axum's own answer (413 past the limit); bad pairs are
    /// an [`ApiError`].
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if req.method() != Method::POST {
            return pairs(req.uri().query().unwrap_or(""))
                .map(Self)
                .map_err(IntoResponse::into_response);
        }
        // Reading the body consumes the request: keep the query and the one header the body's
        // parsing needs.
        let query = req.uri().query().unwrap_or("").to_owned();
        let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
        let body = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let all = pairs(&query).and_then(|mut all| {
            all.extend(body_pairs(content_type.as_ref(), &body)?);
            Ok(all)
        });
        all.map(Self).map_err(IntoResponse::into_response)
    }
}

fn body_pairs(
    content_type: Option<&HeaderValue>,
    body: &[u8],
) -> Result<Vec<(String, String)>, ApiError> {
    let content_type = content_type.and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.starts_with("application/json") {
        json_pairs(body)
    } else {
        let text =
            std::str::from_utf8(body).map_err(|_| ApiError::bad_request("body is not UTF-8"))?;
        pairs(text)
    }
}

/// Parses one value, or notes why not under the parameter's name.
fn parse_into<T: std::str::FromStr>(key: &str, value: &str, problems: &mut Vec<String>) -> Option<T>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| problems.push(format!("{key}: {e}")))
        .ok()
}

/// Parses `/register` parameters into an app, reporting every problem at once.
pub fn parse_register(pairs: &[(String, String)]) -> Result<AppSpec, ApiError> {
    let mut problems = Vec::new();
    let name = single(pairs, "name", &mut problems)
        .and_then(|v| parse_into::<AppName>("name", v, &mut problems));
    // A well-formed VIP refused by policy (loopback, multicast, ...) is a 403, not a 400,
    // unless something else in the request is malformed too.
    let mut refused = None;
    let vip = single(pairs, "vip", &mut problems).and_then(|v| match v.parse::<app::Vip>() {
        Ok(vip) => Some(vip),
        Err(e @ app::ParseError::VipRefused { .. }) => {
            refused = Some(format!("vip: {e}"));
            None
        }
        Err(e) => {
            problems.push(format!("vip: {e}"));
            None
        }
    });
    let mut monitors = Vec::new();
    let mut nats = Vec::new();
    let mut communities = Vec::new();
    let passive_health = single_opt(pairs, "passive_health", &mut problems)
        .and_then(|v| match v {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            other => {
                problems.push(format!(
                    "passive_health: {:?} is not true or false",
                    truncated(other, QUOTE_MAX)
                ));
                None
            }
        })
        .unwrap_or(false);
    for (key, value) in pairs {
        match key.as_str() {
            "name" | "vip" | "passive_health" => {}
            "monitor" | "monitors" => {
                monitors.extend(parse_into::<Monitor>("monitor", value, &mut problems));
            }
            "nat" | "nats" => nats.extend(parse_into::<NatRule>("nat", value, &mut problems)),
            "vip_communities" => match app::parse_community_list(value) {
                Ok(c) => communities.extend(c),
                Err(e) => problems.push(format!("vip_communities: {e}")),
            },
            other => problems.push(format!(
                "{}: unknown parameter (expected name, vip, monitor, nat, vip_communities, passive_health)",
                truncated(other, QUOTE_MAX)
            )),
        }
    }
    if monitors.len() > MAX_MONITORS {
        problems.push(format!(
            "monitor: {} given, at most {MAX_MONITORS} per app",
            monitors.len()
        ));
    }
    if nats.len() > MAX_NATS {
        problems.push(format!(
            "nat: {} given, at most {MAX_NATS} per app",
            nats.len()
        ));
    }
    match (name, vip) {
        (Some(name), Some(vip)) if problems.is_empty() => Ok(AppSpec {
            name,
            vip,
            monitors,
            nats,
            communities,
            nat_dest: None,
            passive_health,
        }),
        _ => match refused {
            Some(why) if problems.is_empty() => Err(ApiError {
                status: StatusCode::FORBIDDEN,
                message: why,
            }),
            Some(why) => {
                problems.push(why);
                Err(report(&problems))
            }
            None => Err(report(&problems)),
        },
    }
}

/// A 400 listing the first [`MAX_PROBLEMS`] problems.
fn report(problems: &[String]) -> ApiError {
    let mut message = problems
        .iter()
        .take(MAX_PROBLEMS)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > MAX_PROBLEMS {
        let more = problems.len() - MAX_PROBLEMS;
        message = format!("{message}; and {more} more");
    }
    ApiError::bad_request(message)
}

/// The value of a parameter that must appear exactly once.
fn single<'a>(
    pairs: &'a [(String, String)],
    key: &str,
    problems: &mut Vec<String>,
) -> Option<&'a str> {
    if !pairs.iter().any(|(k, _)| k == key) {
        problems.push(format!("{key}: missing"));
    }
    single_opt(pairs, key, problems)
}

/// The value of an optional parameter given at most once.
fn single_opt<'a>(
    pairs: &'a [(String, String)],
    key: &str,
    problems: &mut Vec<String>,
) -> Option<&'a str> {
    let mut values = pairs
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str());
    match (values.next(), values.next()) {
        (Some(v), None) => Some(v),
        (Some(_), Some(_)) => {
            problems.push(format!("{key}: given more than once"));
            None
        }
        (None, _) => None,
    }
}

fn parse_name(pairs: &[(String, String)]) -> Result<AppName, ApiError> {
    let mut problems = Vec::new();
    single(pairs, "name", &mut problems)
        .and_then(|v| parse_into("name", v, &mut problems))
        .ok_or_else(|| report(&problems))
}

async fn register(
    State(state): State<ApiState>,
    Params(pairs): Params,
) -> Result<Response, ApiError> {
    let spec = parse_register(&pairs)?;
    let view = state.lifecycle.register(spec, Source::Http).await?;
    Ok(Json(view).into_response())
}

async fn unregister(
    State(state): State<ApiState>,
    Params(pairs): Params,
) -> Result<Response, ApiError> {
    let name = parse_name(&pairs)?;
    let view = state.lifecycle.unregister(name).await?;
    Ok(Json(json!({ "unregistered": view })).into_response())
}

/// `name=APP` drains one app; no name drains the whole host.
async fn drain_by(
    state: &ApiState,
    pairs: &[(String, String)],
    drain: bool,
) -> Result<Response, ApiError> {
    let app = if pairs.iter().any(|(k, _)| k == "name") {
        Some(parse_name(pairs)?)
    } else {
        None
    };
    let report = state.lifecycle.drain(app, drain).await?;
    Ok(Json(report).into_response())
}

async fn drain(State(state): State<ApiState>, Params(pairs): Params) -> Result<Response, ApiError> {
    drain_by(&state, &pairs, true).await
}

async fn undrain(
    State(state): State<ApiState>,
    Params(pairs): Params,
) -> Result<Response, ApiError> {
    drain_by(&state, &pairs, false).await
}

/// Reloads the config file: 200 with what changed, 400 with why nothing did.
async fn reload(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let Some(reloader) = &state.reload else {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "this agent has no config file to reload".into(),
        });
    };
    match reloader.reload().await {
        Ok(report) => Ok(Json(json!({ "reloaded": report })).into_response()),
        Err(e @ (ReloadError::Invalid(_) | ReloadError::Consul(_))) => {
            Err(ApiError::bad_request(e.to_string()))
        }
        Err(ReloadError::Lifecycle(e)) => Err(e.into()),
        Err(e @ ReloadError::ShuttingDown) => Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: e.to_string(),
        }),
    }
}

async fn info(State(state): State<ApiState>) -> Json<Value> {
    Json(json!({
        "version": state.info.version,
        "dataplane": state.info.dataplane,
        "peers": state.peers.statuses().iter().map(PeerInfo::from).collect::<Vec<_>>(),
    }))
}

async fn apps(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(state.lifecycle.apps().await?).into_response())
}

async fn app_by_name(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let name: AppName = name
        .parse()
        .map_err(|e| ApiError::bad_request(format!("name: {e}")))?;
    let apps = state.lifecycle.apps().await?;
    let app = apps
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError::from(LifecycleError::UnknownApp(name)))?;
    Ok(Json(app).into_response())
}

async fn routes(State(state): State<ApiState>) -> Json<Value> {
    let set: BTreeMap<String, Value> = state
        .routes
        .borrow()
        .iter()
        .map(|(prefix, r)| {
            (
                prefix.to_string(),
                json!({ "app": r.app, "communities": r.communities }),
            )
        })
        .collect();
    Json(json!({ "routes": set }))
}

/// One route of `GET /peers/{addr}/routes`.
#[derive(Debug, Serialize)]
struct SentRouteView {
    prefix: String,
    next_hop: String,
    as_path: Vec<u32>,
    origin: &'static str,
    med: Option<u32>,
    local_pref: Option<u32>,
    communities: Vec<String>,
    large_communities: Vec<String>,
    sent_at: String,
}

impl SentRouteView {
    fn new(prefix: &ipnet::IpNet, route: &SentRoute) -> Self {
        let a = &route.attributes;
        Self {
            prefix: prefix.to_string(),
            next_hop: route.next_hop.to_string(),
            as_path: a.as_path.clone(),
            origin: match a.origin {
                Origin::Igp => "igp",
                Origin::Egp => "egp",
                Origin::Incomplete => "incomplete",
            },
            med: a.med,
            local_pref: a.local_pref,
            communities: a
                .communities
                .iter()
                .map(|c| app::Community::Standard(*c).to_string())
                .collect(),
            large_communities: a
                .large_communities
                .iter()
                .map(|&(g, l1, l2)| app::Community::Large(g, l1, l2).to_string())
                .collect(),
            sent_at: humantime::format_rfc3339_millis(route.sent_at).to_string(),
        }
    }
}

/// What the session of the peer at `addr` has sent and not withdrawn (its Adj-RIB-Out), as the
/// session published it: 400 for something that is not an address, 404 for no such peer.
async fn peer_routes(
    State(state): State<ApiState>,
    Path(addr): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| ApiError::bad_request(format!("peer: {addr:?} is not an IP address")))?;
    let peer = state
        .peers
        .statuses()
        .into_iter()
        .find(|p| p.address == Some(ip))
        .ok_or_else(|| ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("peer: no BGP peer {ip}"),
        })?;
    let routes: Vec<SentRouteView> = peer
        .sent
        .iter()
        .map(|(prefix, route)| SentRouteView::new(prefix, route))
        .collect();
    Ok(Json(json!({
        "peer": ip.to_string(),
        "asn": peer.asn,
        "state": peer.state.to_string(),
        "routes": routes,
    })))
}

/// The `/stats` query: `interval=DURATION` (Go syntax, [`stats::INTERVAL_MIN`] to
/// [`stats::INTERVAL_MAX`]) measures the rates over that interval; without it they cover about
/// the last second.
fn parse_interval(q: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let pairs = pairs(q.unwrap_or(""))?;
    let mut problems = Vec::new();
    if let Some((key, _)) = pairs.iter().find(|(k, _)| k != "interval") {
        problems.push(format!(
            "{}: unknown parameter (expected interval)",
            truncated(key, QUOTE_MAX)
        ));
    }
    let interval = single_opt(&pairs, "interval", &mut problems).and_then(|v| {
        match crate::config::go_duration::parse(v) {
            Ok(d) if (stats::INTERVAL_MIN..=stats::INTERVAL_MAX).contains(&d) => Some(d),
            Ok(_) => {
                problems.push(format!(
                    "interval: {v:?} is out of range ({} to {})",
                    crate::config::go_duration::format(stats::INTERVAL_MIN),
                    crate::config::go_duration::format(stats::INTERVAL_MAX)
                ));
                None
            }
            Err(e) => {
                problems.push(format!("interval: {:?}: {e}", truncated(v, QUOTE_MAX)));
                None
            }
        }
    });
    if problems.is_empty() {
        Ok(interval)
    } else {
        Err(report(&problems))
    }
}

/// The counters read now (or over `interval`); without the eBPF dataplane an empty snapshot
/// that says why.
async fn read_stats(state: &ApiState, interval: Option<Duration>) -> Arc<Snapshot> {
    match (&state.stats, interval) {
        (Some(reads), None) => reads.now().await,
        (Some(reads), Some(interval)) => Arc::new(reads.over(interval).await),
        (None, _) => Arc::new(Snapshot {
            unavailable: Some(format!(
                "per-VIP counters need the eBPF dataplane; this agent runs {} ({})",
                state.info.dataplane.mode, state.info.dataplane.reason
            )),
            ..Snapshot::default()
        }),
    }
}

async fn stats(State(state): State<ApiState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let interval = parse_interval(q.as_deref())?;
    Ok(Json(&*read_stats(&state, interval).await).into_response())
}

/// One VIP, written with or without its length (`/stats/192.0.2.10` or `/stats/192.0.2.10/32`).
async fn stats_of(
    State(state): State<ApiState>,
    Path(vip): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    if vip.parse::<std::net::IpAddr>().is_err() && vip.parse::<ipnet::IpNet>().is_err() {
        return Err(ApiError::bad_request(format!(
            "vip: {:?} is not an address or prefix",
            truncated(&vip, QUOTE_MAX)
        )));
    }
    let interval = parse_interval(q.as_deref())?;
    let snapshot = read_stats(&state, interval).await;
    let found = snapshot.find(&vip).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        message: match &snapshot.unavailable {
            Some(why) => format!("no counters for vip {vip}: {why}"),
            None => format!("no counters for vip {vip}: no app of this agent has it installed"),
        },
    })?;
    Ok(Json(found).into_response())
}

/// 200 `{"status": "ok"}` (GoCast's answer) while the lifecycle turns and every supervised task
/// runs; 503 `{"status": "unhealthy", "reasons": [..]}` otherwise. Reads a few `watch` values:
/// cheap enough for a load balancer's probe every second.
async fn healthz(State(state): State<ApiState>) -> Response {
    let reasons = state.health.reasons();
    if reasons.is_empty() {
        return Json(json!({"status": "ok"})).into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "unhealthy", "reasons": reasons})),
    )
        .into_response()
}

/// `OpenMetrics`, or Prometheus 0.0.4 text for a scraper whose `Accept` asks only for that.
async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Exposition::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        state.metrics.exposition(format),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use http_body_util::BodyExt;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    use super::*;
    use crate::{
        lifecycle::tests::FakeHost,
        lifecycle::{self, Running, Settings},
        monitor,
        store::Store,
    };

    struct Api {
        router: Router,
        running: Running,
        stats: Option<stats::Stats>,
        _dir: tempfile::TempDir,
        _cancel: CancellationToken,
    }

    fn api() -> Api {
        api_with_stats(None)
    }

    fn api_with_stats(counters: Option<Fixed>) -> Api {
        api_with(counters, None)
    }

    /// The same counters at every read.
    struct Fixed(Vec<(std::net::IpAddr, gocast_common::maps::VipCounters)>);

    impl stats::CounterSource for Fixed {
        fn read(
            &mut self,
            _: &dyn Fn(std::net::IpAddr) -> bool,
        ) -> Result<
            Vec<(std::net::IpAddr, gocast_common::maps::VipCounters)>,
            crate::dataplane::ebpf::EbpfError,
        > {
            Ok(self.0.clone())
        }
    }

    /// An API over a real lifecycle; `health` replaces what `/healthz` reads (by default the
    /// lifecycle's own heartbeat and scheduler).
    fn api_with(counters: Option<Fixed>, health: Option<Health>) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            monitor_rise: 1,
            monitor_fall: 1,
            cleanup_timer: Duration::from_secs(60),
            allow_http_exec: false,
            vip_allowlist: Vec::new(),
            drain_time: Duration::from_secs(1),
            monitor: monitor::Settings {
                interval: Duration::from_millis(20),
                exec_timeout: Duration::from_secs(5),
                consul: None,
            },
            passive_health: counters.is_some(),
            passive_window: Duration::from_secs(5),
            protected: Vec::new(),
        };
        let cancel = CancellationToken::new();
        let metrics = Metrics::default();
        let running = lifecycle::spawn(
            settings,
            FakeHost::default(),
            Vec::new(),
            Store::new(dir.path().join("s.json")),
            lifecycle::Outputs {
                routes: tokio::sync::watch::channel(crate::messages::Routes::default()).0,
                owners: tokio::sync::watch::channel(crate::messages::Owners::default()).0,
                announcer: None,
                metrics: metrics.clone(),
            },
            cancel.clone(),
        );
        let reads = counters.map(|source| {
            let vip: crate::app::Vip = "192.0.2.10/32".parse().unwrap();
            let owner = crate::messages::VipOwner {
                vip,
                app: "web".parse().unwrap(),
                passive_health: false,
            };
            let owners = Arc::new(BTreeMap::from([(vip.addr(), owner)]));
            let (reads, _cadence) = stats::sampler(
                source,
                watch::channel(owners).1,
                running.handle.clone(),
                crate::config::PassiveHealthConfig {
                    window: Duration::from_secs(5),
                    min_syn: 10,
                    max_unanswered: 0.5,
                },
            );
            reads
        });
        let state = ApiState {
            lifecycle: running.handle.clone(),
            routes: running.routes.clone(),
            stats: reads,
            metrics,
            info: Arc::new(StaticInfo {
                version: "test",
                dataplane: crate::dataplane::DataplaneInfo::iptables_forced(),
            }),
            reload: None,
            peers: Peers::default(),
            health: health.unwrap_or_else(|| {
                Health::new(
                    running.pulse.clone(),
                    vec![running.monitors.clone()],
                    Vec::new(),
                )
            }),
        };
        Api {
            stats: state.stats.clone(),
            router: router(state),
            running,
            _dir: dir,
            _cancel: cancel,
        }
    }

    async fn call(api: &Api, req: axum::http::Request<Body>) -> (StatusCode, Value) {
        let resp = api.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, value)
    }

    async fn get(api: &Api, uri: &str) -> (StatusCode, Value) {
        call(
            api,
            axum::http::Request::get(uri).body(Body::empty()).unwrap(),
        )
        .await
    }

    #[tokio::test]
    async fn gocast_register_call_registers_with_every_parameter() {
        let api = api();
        let (status, body) = get(&api, "/register?name=web&vip=192.0.2.10/32&monitor=port:tcp:80&monitor=port:udp:53&nat=tcp:80:8080&nat=udp:53&vip_communities=65000:1,no-export").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["name"], "web");
        assert_eq!(body["source"], "http");
        assert_eq!(body["monitors"].as_array().unwrap().len(), 2);
        assert_eq!(
            body["nats"],
            serde_json::json!(["tcp:80:8080", "udp:53:53"])
        );
        assert_eq!(
            body["communities"],
            serde_json::json!(["65000:1", "no-export"])
        );
        let (_, apps) = get(&api, "/apps").await;
        assert_eq!(apps.as_array().unwrap().len(), 1);
        let (status, one) = get(&api, "/apps/web").await;
        assert_eq!(
            (status, &one["vip"]),
            (StatusCode::OK, &Value::from("192.0.2.10/32"))
        );
    }

    #[tokio::test]
    async fn post_with_form_or_json_body_registers_too() {
        let api = api();
        let form = axum::http::Request::post("/register")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(
                "name=a&vip=192.0.2.1%2F32&monitor=port%3Atcp%3A80",
            ))
            .unwrap();
        assert_eq!(call(&api, form).await.0, StatusCode::OK);
        let json = axum::http::Request::post("/register")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"name":"b","vip":"2001:db8::1/128","monitor":["port:tcp:80"],"vip_communities":"1:2:3"}"#))
            .unwrap();
        let (status, body) = call(&api, json).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["communities"], serde_json::json!(["1:2:3"]));
    }

    #[tokio::test]
    #[expect(
        clippy::too_many_lines,
        reason = "one table row per bad request reads best"
    )]
    async fn bad_requests_get_their_status_and_a_json_error_and_change_nothing() {
        let api = api();
        assert_eq!(
            get(
                &api,
                "/register?name=web&vip=192.0.2.10/32&monitor=port:tcp:80"
            )
            .await
            .0,
            StatusCode::OK
        );
        let before = get(&api, "/apps").await.1;
        let table: &[(&str, StatusCode, &str)] = &[
            (
                "/register?vip=192.0.2.11/32",
                StatusCode::BAD_REQUEST,
                "name: missing",
            ),
            ("/register?name=x", StatusCode::BAD_REQUEST, "vip: missing"),
            ("/register", StatusCode::BAD_REQUEST, "name: missing"),
            (
                "/register?name=x&vip=not-an-ip",
                StatusCode::BAD_REQUEST,
                "vip: invalid vip",
            ),
            (
                "/register?name=x&vip=192.0.2.11/33",
                StatusCode::BAD_REQUEST,
                "vip: invalid vip",
            ),
            (
                "/register?name=x&vip=127.0.0.1/32",
                StatusCode::FORBIDDEN,
                "loopback",
            ),
            (
                "/register?name=x&vip=0.0.0.0/0",
                StatusCode::FORBIDDEN,
                "default route",
            ),
            (
                "/register?name=x&vip=224.0.0.5/32",
                StatusCode::FORBIDDEN,
                "multicast",
            ),
            (
                "/register?name=x&vip=169.254.0.1/32",
                StatusCode::FORBIDDEN,
                "link-local",
            ),
            (
                "/register?name=x&vip=192.0.2.11/32&monitor=http:80",
                StatusCode::BAD_REQUEST,
                "monitor: invalid monitor",
            ),
            (
                "/register?name=x&vip=192.0.2.11/32&monitor=port:tcp:99999",
                StatusCode::BAD_REQUEST,
                "monitor",
            ),
            (
                "/register?name=x&vip=192.0.2.11/32&nat=tcp:80:0",
                StatusCode::BAD_REQUEST,
                "nat: invalid nat",
            ),
            (
                "/register?name=x&vip=192.0.2.11/32&nat=sctp:80",
                StatusCode::BAD_REQUEST,
                "nat",
            ),
            (
                "/register?name=x&vip=192.0.2.11/32&vip_communities=65536:1",
                StatusCode::BAD_REQUEST,
                "vip_communities",
            ),
            (
                "/register?name=x&vip=192.0.2.11/32&vip_communities=a:b",
                StatusCode::BAD_REQUEST,
                "vip_communities",
            ),
            (
                "/register?name=x&vip=192.0.2.11/32&bogus=1",
                StatusCode::BAD_REQUEST,
                "bogus: unknown parameter",
            ),
            (
                "/register?name=bad%20name&vip=192.0.2.11/32",
                StatusCode::BAD_REQUEST,
                "name: invalid app name",
            ),
            (
                "/register?name=x&name=y&vip=192.0.2.11/32",
                StatusCode::BAD_REQUEST,
                "more than once",
            ),
            (
                "/register?name=other&vip=192.0.2.10/32",
                StatusCode::CONFLICT,
                "already used by app web",
            ),
            (
                "/register?name=x&vip=192.0.2.11/32&monitor=exec:true",
                StatusCode::FORBIDDEN,
                "allow_http_exec",
            ),
            (
                "/register?name=other&vip=192.0.2.11/24",
                StatusCode::CONFLICT,
                "overlaps",
            ),
            (
                "/register?name=x&vip=127.0.0.1/32&monitor=bad",
                StatusCode::BAD_REQUEST,
                "monitor",
            ),
            (
                "/unregister?name=nope",
                StatusCode::NOT_FOUND,
                "not registered",
            ),
            ("/unregister", StatusCode::BAD_REQUEST, "name: missing"),
            (
                "/unregister?name=a/b",
                StatusCode::BAD_REQUEST,
                "invalid app name",
            ),
            ("/apps/nope", StatusCode::NOT_FOUND, "not registered"),
        ];
        for (uri, status, needle) in table {
            let (got, body) = get(&api, uri).await;
            assert_eq!(got, *status, "{uri}: {body}");
            let message = body["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{uri}: no JSON error: {body}"));
            assert!(
                message.contains(needle),
                "{uri}: {message:?} lacks {needle:?}"
            );
        }
        let bad_json = axum::http::Request::post("/register")
            .header("content-type", "application/json")
            .body(Body::from("{nope"))
            .unwrap();
        assert_eq!(call(&api, bad_json).await.0, StatusCode::BAD_REQUEST);
        // A key twice in a JSON body is a 400 naming it, as it is in a query string.
        for body in [
            r#"{"name":"dup","vip":"192.0.2.31/32","vip":"192.0.2.32/32"}"#,
            r#"{"name":"dup","name":"dup2","vip":"192.0.2.31/32"}"#,
        ] {
            let dup = axum::http::Request::post("/register")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap();
            let (status, answer) = call(&api, dup).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
            let message = answer["error"].as_str().unwrap();
            assert!(message.contains("duplicate key"), "{message}");
            assert!(
                message.contains("\"vip\"") || message.contains("\"name\""),
                "{message}"
            );
        }
        let after = get(&api, "/apps").await.1;
        assert_eq!(
            before.as_array().unwrap().len(),
            after.as_array().unwrap().len()
        );
        assert_eq!(before[0]["name"], after[0]["name"]);
        assert_eq!(before[0]["vip"], after[0]["vip"]);
    }

    fn guarded(api: &Api, scope: crate::auth::AuthScope) -> Router {
        crate::auth::guard(
            api.router.clone(),
            crate::auth::Auth {
                token: Some(crate::auth::Token::new("s3cret")),
                scope,
            },
        )
    }

    async fn status_of(router: &Router, req: axum::http::Request<Body>) -> StatusCode {
        router.clone().oneshot(req).await.unwrap().status()
    }

    fn req(method: &str, uri: &str, token: Option<&str>) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn with_a_token_writes_need_it_and_reads_stay_open() {
        let api = api();
        let router = guarded(&api, crate::auth::AuthScope::Writes);
        let register = "/register?name=web&vip=192.0.2.10/32";
        let denied = router
            .clone()
            .oneshot(req("POST", register, None))
            .await
            .unwrap();
        assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(denied.headers()["www-authenticate"], "Bearer");
        let body = denied.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
        for bad in ["wrong", "s3cre", "s3cret2", ""] {
            assert_eq!(
                status_of(&router, req("POST", register, Some(bad))).await,
                StatusCode::UNAUTHORIZED,
                "{bad:?}"
            );
        }
        // GoCast's GET /register changes state too.
        assert_eq!(
            status_of(&router, req("GET", register, None)).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(get(&api, "/apps").await.1, json!([]));
        assert_eq!(
            status_of(&router, req("POST", register, Some("s3cret"))).await,
            StatusCode::OK
        );
        for read in ["/apps", "/info", "/healthz", "/routes"] {
            assert_eq!(
                status_of(&router, req("GET", read, None)).await,
                StatusCode::OK,
                "{read}"
            );
        }
        let all = guarded(&api, crate::auth::AuthScope::All);
        assert_eq!(
            status_of(&all, req("GET", "/apps", None)).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status_of(&all, req("GET", "/apps", Some("s3cret"))).await,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn the_unix_socket_needs_no_token() {
        let api = api();
        let router = guarded(&api, crate::auth::AuthScope::All);
        let mut r = req("POST", "/register?name=web&vip=192.0.2.10/32", None);
        r.extensions_mut()
            .insert(Arc::new(crate::serve::Client::Unix {
                uid: 0,
                gid: 0,
                pid: Some(1),
            }));
        assert_eq!(status_of(&router, r).await, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_long_bad_input_is_quoted_short() {
        let api = api();
        let long = "x".repeat(10_000);
        for uri in [
            format!("/register?name={long}&vip=192.0.2.1/32"),
            format!("/register?name=a&vip={long}"),
            format!("/register?name=a&vip=192.0.2.1/32&monitor={long}"),
            format!("/register?name=a&vip=192.0.2.1/32&{long}=1"),
        ] {
            let (status, body) = get(&api, &uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            let message = body["error"].as_str().unwrap();
            assert!(message.len() < 400, "{} bytes", message.len());
            assert!(message.contains("10000 bytes"), "{message}");
        }
    }

    #[tokio::test]
    async fn too_many_monitors_or_nat_rules_are_refused() {
        let api = api();
        let monitors: String = (1..=MAX_MONITORS + 1)
            .map(|p| format!("&monitor=port:tcp:{p}"))
            .collect::<Vec<_>>()
            .concat();
        let (status, body) = get(
            &api,
            &format!("/register?name=a&vip=192.0.2.1/32{monitors}"),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"].as_str().unwrap().contains("at most 32"),
            "{body}"
        );
        let nats: String = (1..=MAX_NATS + 1)
            .map(|p| format!("&nat=tcp:{p}"))
            .collect::<Vec<_>>()
            .concat();
        let (status, body) = get(&api, &format!("/register?name=a&vip=192.0.2.1/32{nats}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"].as_str().unwrap().contains("at most 64"),
            "{body}"
        );
        let ok: String = (1..=MAX_MONITORS)
            .map(|p| format!("&monitor=port:tcp:{p}"))
            .collect::<Vec<_>>()
            .concat();
        assert_eq!(
            get(&api, &format!("/register?name=a&vip=192.0.2.1/32{ok}"))
                .await
                .0,
            StatusCode::OK
        );
        let bad: String = (0..1000).map(|_| "&monitor=bad").collect();
        let (_, body) = get(&api, &format!("/register?name=b&vip=192.0.2.2/32{bad}")).await;
        assert!(body["error"].as_str().unwrap().len() < 2000, "{body}");
    }

    #[tokio::test]
    async fn every_problem_of_a_request_is_reported_at_once() {
        let api = api();
        let (status, body) = get(&api, "/register?name=x&vip=nope&monitor=bad&nat=bad").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let message = body["error"].as_str().unwrap();
        for needle in ["vip:", "monitor:", "nat:"] {
            assert!(message.contains(needle), "{message}");
        }
    }

    #[tokio::test]
    async fn unregister_removes_the_app_and_its_route() {
        let api = api();
        get(&api, "/register?name=web&vip=192.0.2.10/32").await;
        for _ in 0..200 {
            if !api.running.routes.borrow().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, routes) = get(&api, "/routes").await;
        assert_eq!(routes["routes"]["192.0.2.10/32"]["app"], "web");
        let (status, body) = get(&api, "/unregister?name=web").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["unregistered"]["name"], "web");
        assert_eq!(get(&api, "/apps").await.1, serde_json::json!([]));
        assert_eq!(
            get(&api, "/routes").await.1,
            serde_json::json!({"routes": {}})
        );
    }

    #[tokio::test]
    async fn peer_routes_refuse_a_bad_address_and_an_unknown_peer() {
        let api = api();
        let (status, body) = get(&api, "/peers/not-an-ip/routes").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("not-an-ip"),
            "{body}"
        );
        let (status, body) = get(&api, "/peers/198.18.0.2/routes").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"], "peer: no BGP peer 198.18.0.2");
    }

    #[test]
    fn a_sent_route_shows_every_attribute_as_configured() {
        let route = SentRoute {
            next_hop: "198.18.0.1".parse().unwrap(),
            attributes: Arc::new(crate::bgp::codec::Attributes {
                origin: Origin::Igp,
                as_path: vec![65001],
                med: Some(5),
                local_pref: None,
                communities: vec![65001 << 16 | 7, 0xFFFF_FF01],
                large_communities: vec![(65001, 7, 7)],
            }),
            sent_at: std::time::UNIX_EPOCH + Duration::from_millis(1_500),
        };
        let view = SentRouteView::new(&"192.0.2.10/32".parse().unwrap(), &route);
        assert_eq!(
            serde_json::to_value(view).unwrap(),
            serde_json::json!({"prefix": "192.0.2.10/32", "next_hop": "198.18.0.1",
                "as_path": [65001], "origin": "igp", "med": 5, "local_pref": null,
                "communities": ["65001:7", "no-export"], "large_communities": ["65001:7:7"],
                "sent_at": "1970-01-01T00:00:01.500Z"})
        );
    }

    #[tokio::test]
    async fn info_healthz_and_metrics_answer() {
        let api = api();
        let (status, info) = get(&api, "/info").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(info["dataplane"]["mode"], "iptables");
        assert!(info["peers"].is_array());
        assert_eq!(get(&api, "/healthz").await.1["status"], "ok");
        get(&api, "/register?name=web&vip=192.0.2.10/32").await;
        let (status, text) = get(&api, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.as_str().unwrap().contains("gocast_app_healthy"),
            "{text}"
        );
        // The body ends in `# EOF`: a scraper told `text/plain; version=0.0.4` parses it as the
        // older format, where that line and the `_total`-less TYPE names do not fit.
        let resp = api
            .router
            .clone()
            .oneshot(
                axum::http::Request::get("/metrics")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn healthz_is_503_with_the_reason_while_the_lifecycle_does_not_turn() {
        use crate::supervise::{Liveness, Pulse};
        let (beat, last) = watch::channel(tokio::time::Instant::now());
        let pulse = Pulse::new(last, Liveness::new(None));
        let api = api_with(None, Some(Health::new(pulse, Vec::new(), Vec::new())));
        assert_eq!(
            get(&api, "/healthz").await,
            (StatusCode::OK, json!({"status": "ok"}))
        );
        tokio::time::advance(Duration::from_millis(12_300)).await;
        let (status, body) = get(&api, "/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(
            body,
            json!({"status": "unhealthy", "reasons": ["lifecycle has not turned for 12.3 s"]})
        );
        beat.send_replace(tokio::time::Instant::now());
        assert_eq!(get(&api, "/healthz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn stats_serve_every_vip_and_one_by_address_or_prefix() {
        use gocast_common::maps::VipCounters;
        let counters = VipCounters {
            packets_in: 3,
            syn_in: 1,
            ..VipCounters::default()
        };
        let api = api_with_stats(Some(Fixed(vec![("192.0.2.10".parse().unwrap(), counters)])));
        let (status, all) = get(&api, "/stats").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(all["vips"][0]["vip"], "192.0.2.10/32");
        assert_eq!(all["vips"][0]["app"], "web");
        assert_eq!(all["vips"][0]["packets_in"], 3);
        assert!(all["vips"][0]["rates"]["packets_in"].is_number());
        assert!(all["sampled_at"].is_string(), "read at the request: {all}");
        for uri in ["/stats/192.0.2.10", "/stats/192.0.2.10/32"] {
            let (status, v) = get(&api, uri).await;
            assert_eq!(status, StatusCode::OK, "{uri}");
            assert_eq!(v["syn_in"], 1, "{uri}");
        }
        let (status, v) = get(&api, "/stats/192.0.2.10?interval=100ms").await;
        assert_eq!(status, StatusCode::OK);
        let span = v["rates_interval_s"].as_f64().unwrap();
        assert!(span >= 0.1, "{v}");
        assert_eq!(v["rates"]["packets_in"], 0.0);
        assert_eq!(
            get(&api, "/stats/192.0.2.11").await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(get(&api, "/stats/nope").await.0, StatusCode::BAD_REQUEST);
        let metrics_rx = api.stats.as_ref().unwrap().snapshots();

        let metrics = Metrics::default();
        metrics.vip_stats(crate::stats::counter_source(metrics_rx));
        let text = metrics.render();
        for line in [
            "gocast_vip_packets_total{vip=\"192.0.2.10/32\",direction=\"in\"} 3",
            "gocast_vip_packets_total{vip=\"192.0.2.10/32\",direction=\"out\"} 0",
            "gocast_vip_tcp_syn_in_total{vip=\"192.0.2.10/32\"} 1",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
    }

    #[tokio::test]
    async fn stats_without_the_ebpf_dataplane_are_empty_and_say_why() {
        let api = api();
        let (status, body) = get(&api, "/stats").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["vips"], serde_json::json!([]));
        let why = body["unavailable"].as_str().unwrap_or_default();
        assert!(why.contains("need the eBPF dataplane"), "{body}");
        let (status, body) = get(&api, "/stats/192.0.2.10").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("need the eBPF dataplane"), "{body}");
    }
}
