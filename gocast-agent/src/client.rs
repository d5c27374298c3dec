//! The CLI's side of the HTTP API: `gocast status`, `reload`, `drain` and `undrain` talk to a
//! running agent.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use axum::{body::Body, http};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::{
    cli::{self, AgentAddr, Output},
    config::Config,
};

/// How long a call may take; a reload applies a whole config, so it gets the most.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read (`/apps` of a host with thousands of apps).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// A client of one agent's API.
pub struct Client {
    transport: Transport,
    /// Sent as `Authorization: Bearer` when the token file is readable.
    token: Option<String>,
}

enum Transport {
    Tcp { base: String, http: reqwest::Client },
    Unix(PathBuf),
}

impl Client {
    /// The agent at `--socket`, at `--addr`, or where `--config` says (its Unix socket when it
    /// exists, else its TCP address).
    pub fn new(agent: &AgentAddr) -> Result<Self> {
        let config = agent.config.as_deref().map(Config::load).transpose()?;
        let api = config.as_ref().map(|c| &c.agent.api);
        let unix = agent.socket.clone().or_else(|| {
            api.and_then(|a| a.listen_unix.clone())
                .filter(|p| p.exists())
        });
        let transport = match (unix, &config) {
            (Some(path), _) => Transport::Unix(path),
            (None, Some(config)) => {
                let a = config.agent.listen_addr.addr;
                // An agent listening on all interfaces is reachable on loopback.
                let ip = if a.ip().is_unspecified() {
                    Ipv4Addr::LOCALHOST.into()
                } else {
                    a.ip()
                };
                tcp(&SocketAddr::new(ip, a.port()).to_string())?
            }
            (None, None) => tcp(&agent.addr)?,
        };
        let token_file = std::env::var_os("GOCAST_API_TOKEN_FILE")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .or_else(|| api.and_then(|a| a.token_file.clone()));
        Ok(Self {
            transport,
            token: token_file.as_deref().and_then(read_token),
        })
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.call(http::Method::GET, path, &[]).await
    }

    async fn post(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        self.call(http::Method::POST, path, query).await
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Value> {
        let query = serde_urlencoded::to_string(query)?;
        let path = if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{query}")
        };
        let (url, status, body) = match &self.transport {
            Transport::Tcp { base, http } => {
                let url = format!("{base}{path}");
                let mut request = http.request(method, &url);
                if let Some(token) = &self.token {
                    request = request.bearer_auth(token);
                }
                let response = request
                    .send()
                    .await
                    .with_context(|| format!("asking the agent at {url}"))?;
                let status = response.status();
                let body = response
                    .bytes()
                    .await
                    .with_context(|| format!("reading {url}"))?;
                (url, status, body)
            }
            Transport::Unix(socket) => {
                let url = format!("unix:{}{path}", socket.display());
                let (status, body) = tokio::time::timeout(
                    TIMEOUT,
                    unix_call(socket, method, &path, self.token.as_deref()),
                )
                .await
                .with_context(|| {
                    format!("asking the agent at {url}: no answer within {TIMEOUT:?}")
                })?
                .with_context(|| format!("asking the agent at {url}"))?;
                (url, status, body)
            }
        };
        let body: Value =
            serde_json::from_slice(&body).with_context(|| format!("reading {url}"))?;
        if !status.is_success() {
            let message = body["error"].as_str().unwrap_or("no reason given");
            bail!("{url}: {status}: {message}");
        }
        Ok(body)
    }
}

fn tcp(addr: &str) -> Result<Transport> {
    Ok(Transport::Tcp {
        base: format!("http://{addr}"),
        http: reqwest::Client::builder().timeout(TIMEOUT).build()?,
    })
}

/// The token, trimmed; `None` when the file cannot be read (the agent then says 401 if it
/// needs one).
fn read_token(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.trim().to_owned()).filter(|t| !t.is_empty())
}

/// One HTTP/1.1 request over the agent's Unix socket.
async fn unix_call(
    socket: &Path,
    method: http::Method,
    path: &str,
    token: Option<&str>,
) -> Result<(http::StatusCode, bytes::Bytes)> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "localhost");
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender.send_request(request.body(Body::empty())?).await?;
    let status = response.status();
    let body = axum::body::to_bytes(Body::new(response.into_body()), MAX_ANSWER).await?;
    Ok((status, body))
}

/// `gocast status`: the apps and peers as tables, or with `--json` the three answers it reads
/// in one object: `{"info": /info, "apps": /apps, "stats": /stats or null}`.
pub async fn status(agent: &AgentAddr, output: Output) -> Result<()> {
    let client = Client::new(agent)?;
    let info = client.get("/info").await?;
    let apps = client.get("/apps").await?;
    // Without the eBPF dataplane there are no counters: the table says so.
    let stats = client.get("/stats").await.ok();
    if output.json {
        print_json(&json!({"info": info, "apps": apps, "stats": stats}))
    } else {
        print!("{}", cli::render_status(&info, &apps, stats.as_ref()));
        Ok(())
    }
}

/// `gocast routes [--peer ADDR] [--json]`: what each session (or one) has sent.
pub async fn routes(agent: &AgentAddr, peer: Option<&str>, output: Output) -> Result<()> {
    let client = Client::new(agent)?;
    let peers: Vec<String> = match peer {
        Some(peer) => vec![peer.to_owned()],
        // An autodiscovered peer not found yet has no address and no session to ask.
        None => client.get("/info").await?["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["address"].as_str().map(str::to_owned))
            .collect(),
    };
    let mut answers = Vec::new();
    for peer in &peers {
        // The address goes into the path: refuse what is not one before it gets there.
        let ip: std::net::IpAddr = peer
            .parse()
            .with_context(|| format!("--peer {peer:?} is not an IP address"))?;
        answers.push(client.get(&format!("/peers/{ip}/routes")).await?);
    }
    if output.json {
        let value = match (peer, answers.len()) {
            (Some(_), 1) => answers.remove(0),
            _ => Value::Array(answers),
        };
        print_json(&value)?;
    } else {
        let text: Vec<String> = answers.iter().map(cli::render_peer_routes).collect();
        print!("{}", text.join("\n"));
    }
    Ok(())
}

/// `gocast reload`: prints what changed (`--json`: the API's answer); fails with the agent's
/// reason if it refused.
pub async fn reload(agent: &AgentAddr, output: Output) -> Result<()> {
    let answer = Client::new(agent)?.post("/reload", &[]).await?;
    if output.json {
        return print_json(&answer);
    }
    print!("{}", cli::render_reload(&answer["reloaded"]));
    Ok(())
}

/// `gocast drain [APP]` / `gocast undrain [APP]` (`--json`: the API's answer).
pub async fn drain(
    agent: &AgentAddr,
    app: Option<&str>,
    drain: bool,
    output: Output,
) -> Result<()> {
    let path = if drain { "/drain" } else { "/undrain" };
    let query: Vec<(&str, &str)> = app.map(|a| ("name", a)).into_iter().collect();
    let answer = Client::new(agent)?.post(path, &query).await?;
    if output.json {
        return print_json(&answer);
    }
    print!("{}", cli::render_drain(&answer));
    Ok(())
}

/// One JSON document on stdout, pretty-printed (jq reads it as well as a person does).
fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
