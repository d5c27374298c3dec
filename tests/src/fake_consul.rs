//! A fake Consul agent for the end-to-end tests: the three endpoints the agent uses, with
//! Consul's JSON shapes, blocking queries (`index` + `wait`, `X-Consul-Index`) and the ACL token
//! check, served by plain threads on a socket bound inside a test namespace.
//!
//! - `GET /v1/catalog/node/{node}` → `{"Node": {..}, "Services": {"id": {"ID", "Service", "Tags",
//!   "Address", "Port", ..}}}`, or `null` for another node.
//! - `GET /v1/agent/checks` → `{"checkid": {"Node", "CheckID", "Name", "Status", "ServiceID",
//!   "ServiceName", "ServiceTags", ..}}`, this node's checks; `filter=X in ServiceTags` (the
//!   one filter form the agent sends) keeps the checks whose service has tag `X`.
//! - `GET /v1/health/checks/{service}` → `[{same fields}, ..]` of every node.
//!
//! Every state change bumps the index and wakes blocked queries. [`Mode`] makes it misbehave;
//! every request is recorded so tests can check what the agent sent.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::Netns;

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Connections are closed without an answer (as a dead agent's port would look).
    Refuse,
    /// `500 Internal Server Error` with Consul's plain-text style body.
    Error500,
    /// `200` with a truncated JSON body.
    Malformed,
    /// Answers after this delay.
    Slow(Duration),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    /// The raw query string (`index=3&wait=2000ms&stale`).
    pub query: String,
    pub token: Option<String>,
}

#[derive(Debug)]
struct State {
    index: u64,
    node: String,
    services: BTreeMap<String, Value>,
    /// Checks by (node, check ID).
    checks: BTreeMap<(String, String), Value>,
    token: Option<String>,
    mode: Mode,
    seen: Vec<Seen>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The fake Consul; stops on drop.
#[derive(Debug)]
pub struct FakeConsul {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl FakeConsul {
    /// Serves on `ip` (port chosen by the kernel) inside `ns`, for node `node`; with `token`,
    /// requests without that `X-Consul-Token` get 403 as from Consul's ACLs.
    pub fn start(ns: &Netns, ip: &str, node: &str, token: Option<&str>) -> Result<Self> {
        let listener = bind_in(ns, ip)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                index: 10,
                node: node.to_owned(),
                services: BTreeMap::new(),
                checks: BTreeMap::new(),
                token: token.map(str::to_owned),
                mode: Mode::Normal,
                seen: Vec::new(),
            }),
            changed: Condvar::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (shared, stop) = (shared.clone(), stop.clone());
            thread::spawn(move || accept_loop(&listener, &shared, &stop))
        };
        Ok(Self {
            shared,
            addr,
            stop,
            accept: Some(accept),
        })
    }

    /// The `consul_addr` for the agent's config, with the API prefix as GoCast writes it.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn change(&self, f: impl FnOnce(&mut State)) {
        let mut s = lock(&self.shared);
        f(&mut s);
        s.index += 1;
        self.shared.changed.notify_all();
    }

    /// Adds or replaces a service instance on this node.
    pub fn set_service(&self, id: &str, name: &str, tags: &[&str], address: &str) {
        let service = json!({
            "ID": id, "Service": name, "Tags": tags, "Address": address,
            "TaggedAddresses": {}, "Meta": {}, "Port": 8090,
            "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": false,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}}, "Connect": {},
            "PeerName": "", "CreateIndex": 10, "ModifyIndex": 10,
        });
        self.change(|s| {
            s.services.insert(id.to_owned(), service);
        });
    }

    pub fn remove_service(&self, id: &str) {
        self.change(|s| {
            s.services.remove(id);
        });
    }

    /// Adds or replaces a check of `service` on `node` (`None`: this node), for a service
    /// instance tagged `enable_gocast`.
    pub fn set_check(&self, node: Option<&str>, service: &str, check_id: &str, status: &str) {
        self.set_check_tagged(node, service, check_id, status, &["enable_gocast"]);
    }

    /// [`Self::set_check`] for a service instance with these tags.
    pub fn set_check_tagged(
        &self,
        node: Option<&str>,
        service: &str,
        check_id: &str,
        status: &str,
        tags: &[&str],
    ) {
        self.change(|s| {
            let node = node.map_or_else(|| s.node.clone(), str::to_owned);
            let check = json!({
                "Node": node, "CheckID": check_id, "Name": format!("Service '{service}' check"),
                "Status": status, "Notes": "", "Output": format!("{status} output"),
                "ServiceID": service, "ServiceName": service, "ServiceTags": tags,
                "Type": "http", "Interval": "10s", "Timeout": "5s", "ExposedPort": 0,
                "Definition": {}, "CreateIndex": 10, "ModifyIndex": 10,
            });
            s.checks.insert((node, check_id.to_owned()), check);
        });
    }

    pub fn remove_checks(&self) {
        self.change(|s| s.checks.clear());
    }

    pub fn set_mode(&self, mode: Mode) {
        self.change(|s| s.mode = mode);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.shared).seen.clone()
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared
        .state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Binds a listener inside `ns`: a thread enters the namespace, binds, and ends; the socket
/// stays in that namespace wherever it is used from.
fn bind_in(ns: &Netns, ip: &str) -> Result<TcpListener> {
    let path = format!("/var/run/netns/{}", ns.name);
    let addr = format!("{ip}:0");
    thread::spawn(move || -> Result<TcpListener> {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {path}"))?;
        TcpListener::bind(&addr).with_context(|| format!("binding {addr}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the bind thread panicked"))?
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, stop: &Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (shared, stop) = (shared.clone(), stop.clone());
                thread::spawn(move || {
                    let _ = handle(stream, &shared, &stop);
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Consul's `wait` values: `5000ms`, `5s`, `1m`; capped at 10 minutes, 5 minutes by default.
fn parse_wait(s: Option<&str>) -> Duration {
    let parsed = s.and_then(|s| {
        let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
        let n: u64 = num.parse().ok()?;
        match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => Some(Duration::from_secs(n * 60)),
            _ => None,
        }
    });
    parsed
        .unwrap_or(Duration::from_secs(300))
        .min(Duration::from_secs(600))
}

fn handle(stream: TcpStream, shared: &Shared, stop: &AtomicBool) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut token = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("x-consul-token")
        {
            token = Some(v.trim().to_owned());
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let (path, query) = (path.to_owned(), query.to_owned());
    let params: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let param = |k: &str| params.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);

    let mut s = lock(shared);
    s.seen.push(Seen {
        path: path.clone(),
        query: query.clone(),
        token: token.clone(),
    });
    // Blocking query: hold until the index moves past the client's, `wait` passes, or the
    // fake is told to misbehave.
    if let Some(index) = param("index").and_then(|i| i.parse::<u64>().ok()) {
        let deadline = Instant::now() + parse_wait(param("wait"));
        while s.index <= index && s.mode == Mode::Normal && !stop.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = shared
                .changed
                .wait_timeout(s, left.min(Duration::from_millis(200)))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
    let mode = s.mode;
    let index = s.index;
    let answer = if s.token.is_some() && token != s.token {
        (403, "ACL not found".to_owned())
    } else {
        route(&s, &path, param("filter").map(decode).as_deref())
    };
    drop(s);

    let (status, body) = match mode {
        Mode::Refuse => return Ok(()),
        Mode::Error500 => (500, "rpc error making call: No cluster leader".to_owned()),
        Mode::Malformed => (200, "{\"Node\": {\"Node\": \"trunc".to_owned()),
        Mode::Slow(d) => {
            thread::sleep(d);
            answer
        }
        Mode::Normal => answer,
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Internal Server Error",
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Consul-Index: {index}\r\nX-Consul-Knownleader: true\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()?;
    Ok(())
}

/// A query value with `%XX` and `+` decoded.
fn decode(v: &str) -> String {
    let mut out = Vec::new();
    let mut bytes = v.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                out.push(u8::from_str_radix(&hex, 16).unwrap_or(b'?'));
            }
            b => out.push(b),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Consul's filter for `X in ServiceTags` (or `"X" in ServiceTags`): the tag, else `None`
/// (other forms are not understood, and a request with one gets 400 like a bad filter).
fn tag_filter(filter: &str) -> Option<String> {
    let tag = filter.trim().strip_suffix("in ServiceTags")?.trim();
    let tag = tag.trim_matches('"');
    (!tag.is_empty() && !tag.contains(char::is_whitespace)).then(|| tag.to_owned())
}

/// The answer of a well-behaved Consul to `path`.
fn route(s: &State, path: &str, filter: Option<&str>) -> (u16, String) {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "catalog", "node", node] => {
            if *node != s.node {
                return (200, "null".into());
            }
            let body = json!({
                "Node": {"ID": "2ff4f2a6-1f8c-4a3f-9b43-a1a2a3a4a5a6", "Node": s.node,
                         "Address": "198.18.0.1", "Datacenter": "dc1",
                         "TaggedAddresses": {"lan": "198.18.0.1", "wan": "198.18.0.1"},
                         "Meta": {"consul-network-segment": ""}, "CreateIndex": 5, "ModifyIndex": 5},
                "Services": s.services,
            });
            (200, body.to_string())
        }
        ["v1", "agent", "checks"] => {
            let tag = match filter.map(tag_filter) {
                None => None,
                Some(Some(tag)) => Some(tag),
                Some(None) => {
                    return (
                        400,
                        format!("Failed to create boolean expression evaluator: {filter:?}"),
                    );
                }
            };
            let mine: BTreeMap<&str, &Value> = s
                .checks
                .iter()
                .filter(|((node, _), _)| *node == s.node)
                .filter(|(_, c)| {
                    tag.as_ref().is_none_or(|t| {
                        c["ServiceTags"]
                            .as_array()
                            .is_some_and(|tags| tags.iter().any(|x| x == t.as_str()))
                    })
                })
                .map(|((_, id), c)| (id.as_str(), c))
                .collect();
            (200, json!(mine).to_string())
        }
        ["v1", "health", "checks", service] => {
            let list: Vec<&Value> = s
                .checks
                .values()
                .filter(|c| c["ServiceName"] == *service)
                .collect();
            (200, json!(list).to_string())
        }
        _ => (
            404,
            format!("Invalid URL path: not a recognized HTTP API endpoint: {path}"),
        ),
    }
}
