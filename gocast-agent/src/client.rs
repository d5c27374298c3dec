//! The CLI's side of the HTTP API: `gocast status`, `reload`, `drain` and `undrain` talk to a
//! running agent.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    cli::{self, AgentAddr},
    config::Config,
};

/// How long a call may take; a reload applies a whole config, so it gets the most.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A client of one agent's API.
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    /// The agent at `--addr`, or at `--config`'s `agent.listen_addr`.
    pub fn new(agent: &AgentAddr) -> Result<Self> {
        let addr = match &agent.config {
            Some(path) => {
                let a = Config::load(path)?.agent.listen_addr.addr;
                // An agent listening on all interfaces is reachable on loopback.
                let ip = if a.ip().is_unspecified() {
                    Ipv4Addr::LOCALHOST.into()
                } else {
                    a.ip()
                };
                SocketAddr::new(ip, a.port()).to_string()
            }
            None => agent.addr.clone(),
        };
        Ok(Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder().timeout(TIMEOUT).build()?,
        })
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("asking the agent at {url}"))?;
        read(&url, response).await
    }

    async fn post(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .post(&url)
            .query(query)
            .send()
            .await
            .with_context(|| format!("asking the agent at {url}"))?;
        read(&url, response).await
    }
}

/// The JSON answer; an error status becomes an error with the agent's own message.
async fn read(url: &str, response: reqwest::Response) -> Result<Value> {
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("reading {url}"))?;
    if !status.is_success() {
        let message = body["error"].as_str().unwrap_or("no reason given");
        bail!("{url}: {status}: {message}");
    }
    Ok(body)
}

/// `gocast status`: the apps and peers as tables.
pub async fn status(agent: &AgentAddr) -> Result<()> {
    let client = Client::new(agent)?;
    let info = client.get("/info").await?;
    let apps = client.get("/apps").await?;
    // Without the eBPF dataplane there are no counters: the table says so.
    let stats = client.get("/stats").await.ok();
    print!("{}", cli::render_status(&info, &apps, stats.as_ref()));
    Ok(())
}

/// `gocast reload`: prints what changed; fails with the agent's reason if it refused.
pub async fn reload(agent: &AgentAddr) -> Result<()> {
    let answer = Client::new(agent)?.post("/reload", &[]).await?;
    print!("{}", cli::render_reload(&answer["reloaded"]));
    Ok(())
}

/// `gocast drain [APP]` / `gocast undrain [APP]`.
pub async fn drain(agent: &AgentAddr, app: Option<&str>, drain: bool) -> Result<()> {
    let path = if drain { "/drain" } else { "/undrain" };
    let query: Vec<(&str, &str)> = app.map(|a| ("name", a)).into_iter().collect();
    let answer = Client::new(agent)?.post(path, &query).await?;
    print!("{}", cli::render_drain(&answer));
    Ok(())
}
