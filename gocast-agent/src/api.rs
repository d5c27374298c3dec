//! The HTTP API: GoCast's calls (`/register`, `/unregister`, `/info`) with the same parameters,
//! plus `/apps`, `/routes`, `/healthz` and `/metrics`.
//!
//! A request is parsed completely into typed values first, every problem reported at once
//! (400, JSON `{"error": ...}`); only a valid request reaches the lifecycle, whose refusals map
//! to 403 (policy), 404 (unknown app) and 409 (VIP taken). A refused request changes nothing.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::warn;

use crate::{
    app::{self, AppName, AppSpec, Source},
    config::Config,
    lifecycle::{LifecycleError, LifecycleHandle, RouteSet},
    metrics::Metrics,
};

/// An API error: its status and a message that names the bad parameter.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into() }
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
            LifecycleError::VipConflict { .. } | LifecycleError::LabelConflict { .. } => StatusCode::CONFLICT,
            LifecycleError::UnknownApp(_) => StatusCode::NOT_FOUND,
            LifecycleError::ExecRefused | LifecycleError::NotAllowed(_) => StatusCode::FORBIDDEN,
            LifecycleError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            LifecycleError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self { status, message: e.to_string() }
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
    pub messages_in: u64,
    pub messages_out: u64,
    pub prefixes_advertised: usize,
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
    pub routes: watch::Receiver<RouteSet>,
    pub metrics: Metrics,
    pub info: Arc<StaticInfo>,
    /// The configured peers, shown by `/info` until the BGP speaker reports on them.
    pub peers: Arc<Vec<PeerInfo>>,
}

/// The API's routes, apart from serving, so tests can call them directly.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/register", get(register_get).post(register_post))
        .route("/unregister", get(unregister).post(unregister_post))
        .route("/info", get(info))
        .route("/apps", get(apps))
        .route("/apps/{name}", get(app_by_name))
        .route("/routes", get(routes))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Query or form pairs, in order, repeated keys kept (`monitor=a&monitor=b`).
fn pairs(text: &str) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(text).map_err(|e| ApiError::bad_request(format!("malformed parameters: {e}")))
}

/// A JSON body becomes the same pairs a query would give: strings once, arrays repeated.
fn json_pairs(body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let map: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    let mut out = Vec::new();
    for (key, value) in map {
        match value {
            Value::String(s) => out.push((key, s)),
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::String(s) => out.push((key.clone(), s)),
                        other => return Err(ApiError::bad_request(format!("{key}: expected strings, got {other}"))),
                    }
                }
            }
            other => return Err(ApiError::bad_request(format!("{key}: expected a string or a list of strings, got {other}"))),
        }
    }
    Ok(out)
}

fn body_pairs(headers: &HeaderMap, body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.starts_with("application/json") {
        json_pairs(body)
    } else {
        let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("body is not UTF-8"))?;
        pairs(text)
    }
}

/// Parses `/register` parameters into an app, reporting every problem at once.
pub fn parse_register(pairs: &[(String, String)]) -> Result<AppSpec, ApiError> {
    let mut problems = Vec::new();
    let mut name = None;
    let mut vip = None;
    let mut monitors = Vec::new();
    let mut nats = Vec::new();
    let mut communities = Vec::new();
    for (key, value) in pairs {
        match key.as_str() {
            "name" if name.is_some() => problems.push("name: given more than once".into()),
            "vip" if vip.is_some() => problems.push("vip: given more than once".into()),
            "name" => name = Some(value.parse::<AppName>().map_err(|e| problems.push(format!("name: {e}")))),
            "vip" => vip = Some(value.parse::<app::Vip>().map_err(|e| problems.push(format!("vip: {e}")))),
            "monitor" | "monitors" => match value.parse() {
                Ok(m) => monitors.push(m),
                Err(e) => problems.push(format!("monitor: {e}")),
            },
            "nat" | "nats" => match value.parse() {
                Ok(n) => nats.push(n),
                Err(e) => problems.push(format!("nat: {e}")),
            },
            "vip_communities" => match app::parse_community_list(value) {
                Ok(c) => communities.extend(c),
                Err(e) => problems.push(format!("vip_communities: {e}")),
            },
            other => problems.push(format!("{other}: unknown parameter (expected name, vip, monitor, nat, vip_communities)")),
        }
    }
    if name.is_none() {
        problems.push("name: missing".into());
    }
    if vip.is_none() {
        problems.push("vip: missing".into());
    }
    match (name, vip) {
        (Some(Ok(name)), Some(Ok(vip))) if problems.is_empty() => {
            Ok(AppSpec { name, vip, monitors, nats, communities, nat_dest: None })
        }
        _ => Err(ApiError::bad_request(problems.join("; "))),
    }
}

fn parse_name(pairs: &[(String, String)]) -> Result<AppName, ApiError> {
    let mut names = pairs.iter().filter(|(k, _)| k == "name");
    match (names.next(), names.next()) {
        (None, _) => Err(ApiError::bad_request("name: missing")),
        (Some(_), Some(_)) => Err(ApiError::bad_request("name: given more than once")),
        (Some((_, v)), None) => v.parse().map_err(|e| ApiError::bad_request(format!("name: {e}"))),
    }
}

async fn register(state: &ApiState, pairs: &[(String, String)]) -> Result<Response, ApiError> {
    let spec = parse_register(pairs)?;
    let view = state.lifecycle.register(spec, Source::Http).await?;
    Ok(Json(view).into_response())
}

async fn register_get(State(state): State<ApiState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    register(&state, &pairs(q.as_deref().unwrap_or(""))?).await
}

async fn register_post(State(state): State<ApiState>, RawQuery(q): RawQuery, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let mut all = pairs(q.as_deref().unwrap_or(""))?;
    all.extend(body_pairs(&headers, &body)?);
    register(&state, &all).await
}

async fn unregister_by(state: &ApiState, pairs: &[(String, String)]) -> Result<Response, ApiError> {
    let name = parse_name(pairs)?;
    let view = state.lifecycle.unregister(name).await?;
    Ok(Json(json!({ "unregistered": view })).into_response())
}

async fn unregister(State(state): State<ApiState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    unregister_by(&state, &pairs(q.as_deref().unwrap_or(""))?).await
}

async fn unregister_post(State(state): State<ApiState>, RawQuery(q): RawQuery, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let mut all = pairs(q.as_deref().unwrap_or(""))?;
    all.extend(body_pairs(&headers, &body)?);
    unregister_by(&state, &all).await
}

async fn info(State(state): State<ApiState>) -> Json<Value> {
    Json(json!({
        "version": state.info.version,
        "dataplane": state.info.dataplane,
        "peers": *state.peers,
    }))
}

async fn apps(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(state.lifecycle.apps().await?).into_response())
}

async fn app_by_name(State(state): State<ApiState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let name: AppName = name.parse().map_err(|e| ApiError::bad_request(format!("name: {e}")))?;
    let apps = state.lifecycle.apps().await?;
    let app = apps.into_iter().find(|a| a.name == name).ok_or_else(|| ApiError::from(LifecycleError::UnknownApp(name)))?;
    Ok(Json(app).into_response())
}

async fn routes(State(state): State<ApiState>) -> Json<Value> {
    let set: BTreeMap<String, Value> = state
        .routes
        .borrow()
        .iter()
        .map(|(prefix, r)| (prefix.to_string(), json!({ "app": r.app, "communities": r.communities })))
        .collect();
    Json(json!({ "routes": set }))
}

async fn metrics(State(state): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

/// The peers of a config as `/info` shows them before any session exists.
pub fn configured_peers(config: &Config) -> Vec<PeerInfo> {
    config
        .bgp
        .peers
        .iter()
        .map(|p| PeerInfo {
            address: p.peer_ip.map(|ip| ip.to_string()),
            asn: p.peer_as,
            state: "Idle".into(),
            uptime_s: None,
            last_error: None,
            messages_in: 0,
            messages_out: 0,
            prefixes_advertised: 0,
        })
        .collect()
}
