//! What stands in front of the API's routes: the body read within its time and size, the
//! bearer token, and one audit line per state-changing request.
//!
//! State-changing requests are `/register`, `/unregister` (GoCast sends both as GET),
//! `/drain`, `/undrain`, `/reload`, and any request that is not a GET or HEAD. With
//! `agent.api_token_file` set, each needs `Authorization: Bearer <token>` on TCP; reads stay
//! open unless `agent.api_auth: all`. The Unix socket skips the token: its file's owner, group
//! and mode decide who connects, as for BIRD's and FRR's control sockets.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use serde_json::json;
use subtle::ConstantTimeEq;
use tracing::info;

use crate::serve::{BODY_TIMEOUT, Client, MAX_BODY};

/// Paths that change state even when called with GET (GoCast's `/register?…`).
const STATE_CHANGING: [&str; 5] = ["/register", "/unregister", "/drain", "/undrain", "/reload"];
/// The audit line quotes at most this much of an app name.
const AUDIT_NAME_MAX: usize = 64;

/// Which requests need the token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthScope {
    /// State-changing requests only; reads (`/info`, `/apps`, `/healthz`, ...) stay open.
    #[default]
    Writes,
    /// Every request.
    All,
}

/// The API token, read once at start.
#[derive(Clone)]
pub struct Token(Arc<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("api token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("api token file {path} is empty")]
    Empty { path: PathBuf },
    #[error(
        "api token file {path} is readable by group or others (mode {mode:o}): chmod 600 it, \
         or anyone on the host can change routes"
    )]
    Exposed { path: PathBuf, mode: u32 },
}

impl Token {
    /// Reads the token (surrounding whitespace trimmed); refuses an empty file or one that
    /// group or others can read.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let read = |source| TokenError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
        if mode & 0o044 != 0 {
            return Err(TokenError::Exposed {
                path: path.to_owned(),
                mode: mode & 0o7777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self(token.as_bytes().into()))
    }

    /// The token as the CLI sends it.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Constant-time: the time taken does not tell how much of a guess was right.
    fn matches(&self, given: &[u8]) -> bool {
        self.0.as_ref().ct_eq(given).into()
    }

    #[cfg(test)]
    pub fn new(s: &str) -> Self {
        Self(s.as_bytes().into())
    }
}

/// The API's access rule.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// `None`: no token, every request allowed (GoCast's behaviour).
    pub token: Option<Token>,
    pub scope: AuthScope,
}

/// The router behind the body limits, the token check and the audit log.
pub fn guard(router: Router, auth: Auth) -> Router {
    router
        .layer(middleware::from_fn_with_state(Arc::new(auth), check))
        .layer(middleware::from_fn(read_body))
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Reads the whole body within [`BODY_TIMEOUT`] and [`MAX_BODY`], so a client announcing a
/// body it never sends holds its connection for seconds, not forever.
async fn read_body(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            &format!("request body not received within {BODY_TIMEOUT:?}"),
        ),
        Ok(Err(_)) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body unreadable or larger than {MAX_BODY} bytes"),
        ),
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    }
}

fn is_state_changing(req: &Request) -> bool {
    !matches!(*req.method(), Method::GET | Method::HEAD)
        || STATE_CHANGING.contains(&req.uri().path())
}

/// The token check, then the request, then its audit line.
async fn check(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let writes = is_state_changing(&req);
    let client = req.extensions().get::<Arc<Client>>().cloned();
    let needs_token = auth.token.is_some()
        && (writes || auth.scope == AuthScope::All)
        && !client.as_deref().is_some_and(Client::is_unix);
    let action = req.uri().path().to_owned();
    let app = writes.then(|| app_name(&req)).flatten();
    let response = match &auth.token {
        Some(token) if needs_token && !bearer(&req).is_some_and(|b| token.matches(b)) => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "this request needs Authorization: Bearer <token> (agent.api_token_file)",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
        _ => next.run(req).await,
    };
    if writes {
        let client = client.map_or_else(|| "unknown".to_owned(), |c| c.to_string());
        info!(
            target: "gocast::audit",
            %client,
            %action,
            app = app.as_deref().unwrap_or(""),
            status = response.status().as_u16(),
            "api request"
        );
    }
    response
}

/// The token of `Authorization: Bearer <token>`; never logged.
fn bearer(req: &Request) -> Option<&[u8]> {
    let value = req.headers().get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// The `name` parameter of the query, shortened for the log.
fn app_name(req: &Request) -> Option<String> {
    let query = req.uri().query()?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).ok()?;
    let name = pairs.into_iter().find(|(k, _)| k == "name")?.1;
    Some(crate::app::truncated(&name, AUDIT_NAME_MAX))
}
