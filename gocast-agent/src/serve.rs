//! Serving the HTTP API so that no number of clients can starve the agent.
//!
//! `axum::serve` holds every accepted connection for as long as the client keeps it, and a
//! client that sends nothing, half a header or a `Content-Length` body that never comes holds a
//! descriptor forever: ~1,000 of them exhausted the agent's 1,024 files, after which port
//! monitors, BGP reconnects and the state file all failed. This accept loop bounds each way a
//! client can hold on:
//!
//! - one semaphore caps the open API connections (TCP and Unix together); a connection beyond the
//!   cap closes the oldest *idle* one (no request being handled: nothing sent yet, a partial
//!   header, or kept alive between requests) and takes its place, so a flood of idle clients
//!   cannot keep a health probe out; when every connection is busy, the new one is closed at
//!   once;
//! - hyper's header read timeout closes a connection whose request header is not complete within
//!   [`HEADER_TIMEOUT`]; hyper starts that clock whenever it waits for a request, so it is also
//!   the idle timeout of a kept-alive connection;
//! - the body is read within [`BODY_TIMEOUT`] and [`MAX_BODY`] ([`crate::auth::guard`]).
//!
//! The cap itself stays below the process's descriptor limit minus [`FD_RESERVE`], kept for
//! what keeps routes correct (`sock_diag` and netlink sockets, BGP sessions, the state file,
//! exec monitors' pipes); [`raise_nofile_limit`] first lifts the soft limit to the hard one.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, extract::Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Semaphore,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::{debug, error, warn};

/// A request header must be complete this long after the connection (or its previous
/// response) is ready for it; also how long a kept-alive connection may sit idle.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A request body must have arrived whole this long after its header.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request body accepted (413 beyond); a register with every allowed monitor and
/// NAT rule is a few kilobytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Default of `agent.api_max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Descriptors the API may never take: `sock_diag` and netlink sockets, one per BGP session (two
/// while one reconnects), the state file and its temporary copy, exec monitors' pipes.
pub const FD_RESERVE: u64 = 256;
/// How long a connection over the cap waits for the evicted one's slot.
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// A refused connection is logged at most this often (with the count since).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Who sent a request: what the audit log names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    Tcp(SocketAddr),
    /// The Unix socket's peer credentials (`SO_PEERCRED`).
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
}

impl Client {
    /// A request on the Unix socket passed its file permissions, which are its gate.
    pub fn is_unix(&self) -> bool {
        matches!(self, Self::Unix { .. })
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix { uid, gid, pid } => {
                write!(f, "unix uid={uid} gid={gid}")?;
                match pid {
                    Some(pid) => write!(f, " pid={pid}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit in force.
///
/// systemd's default soft limit (1,024) is kept low for `select()` users; this agent uses
/// epoll, so the whole hard limit is safe to take.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                warn!(error = %e, soft, hard, "cannot raise the open-files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            warn!(error = %e, "cannot read the open-files limit");
            1024
        }
    }
}

/// The API's connection cap: the configured one, lowered so [`FD_RESERVE`] descriptors and the
/// agent's own (about as many again) always remain under `nofile`.
pub fn connection_cap(configured: usize, nofile: u64) -> usize {
    let room = nofile.saturating_sub(2 * FD_RESERVE).max(1);
    configured.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// An API socket, bound before the agent touches the host.
pub enum ApiListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// What goes wrong making the Unix socket.
#[derive(Debug, thiserror::Error)]
pub enum UnixSocketError {
    #[error("{path}: exists and is not a socket; refusing to remove it")]
    NotASocket { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent.listen_unix_group: no group {0:?}")]
    NoGroup(String),
}

/// The Unix socket's file: created fresh, with its mode and group set before it listens, so no
/// client connects through wider permissions.
pub fn bind_unix(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<std::os::unix::net::UnixListener, UnixSocketError> {
    let io = |op| {
        move |source| UnixSocketError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        // A socket left by an agent that died: nothing else can be listening on it, since this
        // agent holds the TCP port too.
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
        }
        Ok(_) => {
            return Err(UnixSocketError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspecting")(e)),
    }
    let gid = match group {
        None => None,
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| UnixSocketError::NoGroup(name.to_owned()))?
                .gid
                .as_raw(),
        ),
    };
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(io("creating a socket for"))?;
    let addr = socket2::SockAddr::unix(path).map_err(io("addressing"))?;
    socket.bind(&addr).map_err(io("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("setting the mode of"))?;
    if gid.is_some() {
        std::os::unix::fs::chown(path, None, gid).map_err(io("setting the group of"))?;
    }
    socket.listen(128).map_err(io("listening on"))?;
    socket.set_nonblocking(true).map_err(io("configuring"))?;
    Ok(socket.into())
}

impl ApiListener {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Self::Tcp(l) => Self::Tcp(l.try_clone()?),
            Self::Unix(l) => Self::Unix(l.try_clone()?),
        })
    }
}

/// A handle on the sockets the supervisor restarts the server on; the port or path is never
/// released between two instances.
pub struct Sockets(Vec<ApiListener>);

impl Sockets {
    pub fn new(listeners: Vec<ApiListener>) -> Self {
        Self(listeners)
    }

    /// Serves `router` on every socket until `stop`, with at most `cap` connections open in all.
    pub async fn serve(&self, router: Router, cap: Arc<Semaphore>, stop: CancellationToken) {
        let tracker = TaskTracker::new();
        let open = Registry::default();
        let mut loops = Vec::new();
        for listener in &self.0 {
            let listener = match listener.try_clone() {
                Ok(l) => l,
                Err(e) => {
                    error!(error = %e, "cannot serve the HTTP API on its socket");
                    continue;
                }
            };
            loops.push(accept_loop(
                listener,
                router.clone(),
                cap.clone(),
                open.clone(),
                tracker.clone(),
                stop.clone(),
            ));
        }
        futures::future::join_all(loops).await;
        tracker.close();
        tracker.wait().await;
    }
}

/// Accepts until `stop`; each connection within the cap gets its own task in `tracker`.
async fn accept_loop(
    listener: ApiListener,
    router: Router,
    cap: Arc<Semaphore>,
    open: Registry,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    enum Tokio {
        Tcp(tokio::net::TcpListener),
        Unix(tokio::net::UnixListener),
    }
    let listener = match listener {
        ApiListener::Tcp(l) => tokio::net::TcpListener::from_std(l).map(Tokio::Tcp),
        ApiListener::Unix(l) => tokio::net::UnixListener::from_std(l).map(Tokio::Unix),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "cannot serve the HTTP API on its socket");
            return;
        }
    };
    let mut refusals = Refusals::default();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = async {
                match &listener {
                    Tokio::Tcp(l) => l.accept().await.map(|(s, addr)| Conn::Tcp(s, addr)),
                    Tokio::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
                }
            } => a,
        };
        let conn = match accepted {
            Ok(conn) => {
                backoff = Duration::from_millis(10);
                conn
            }
            Err(e) => {
                // EMFILE and ENFILE leave the connection in the backlog: wait rather than spin.
                warn!(error = %e, "accepting an API connection failed");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let permit = match cap.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) if open.evict_oldest_idle() => {
                let freed = tokio::time::timeout(EVICTION_WAIT, cap.clone().acquire_owned()).await;
                let Ok(Ok(permit)) = freed else {
                    refusals.count();
                    continue;
                };
                permit
            }
            Err(_) => {
                // Every connection is handling a request: those are the ones served.
                refusals.count();
                drop(conn);
                continue;
            }
        };
        let router = router.clone();
        let slot = open.add();
        let stop = stop.clone();
        let open = open.clone();
        tracker.spawn(async move {
            let id = slot.id;
            match conn {
                Conn::Tcp(stream, addr) => {
                    serve_conn(stream, Client::Tcp(addr), router, slot, stop).await;
                }
                Conn::Unix(stream) => {
                    let client = match stream.peer_cred() {
                        Ok(c) => Client::Unix {
                            uid: c.uid(),
                            gid: c.gid(),
                            pid: c.pid(),
                        },
                        Err(e) => {
                            debug!(error = %e, "no peer credentials on the API socket");
                            return;
                        }
                    };
                    serve_conn(stream, client, router, slot, stop).await;
                }
            }
            open.remove(id);
            drop(permit);
        });
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

/// Connections refused at the cap, logged once per [`REFUSAL_LOG_EVERY`].
#[derive(Default)]
struct Refusals {
    since_log: u64,
    logged: Option<Instant>,
}

impl Refusals {
    fn count(&mut self) {
        self.since_log += 1;
        if self.logged.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
            warn!(
                refused = self.since_log,
                "API connection cap reached: new connections are closed at once"
            );
            self.logged = Some(Instant::now());
            self.since_log = 0;
        }
    }
}

/// The open connections, oldest first, so one over the cap can close the oldest idle one.
#[derive(Clone, Default)]
struct Registry(Arc<Mutex<Open>>);

#[derive(Default)]
struct Open {
    next: u64,
    conns: BTreeMap<u64, (Arc<AtomicUsize>, CancellationToken)>,
}

/// A connection's entry: requests in progress, and its eviction.
struct Slot {
    id: u64,
    busy: Arc<AtomicUsize>,
    evict: CancellationToken,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // The lock guards plain inserts and removals: a panic cannot leave it half changed.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self) -> Slot {
        let mut open = self.lock();
        let id = open.next;
        open.next += 1;
        let slot = Slot {
            id,
            busy: Arc::default(),
            evict: CancellationToken::new(),
        };
        open.conns
            .insert(id, (slot.busy.clone(), slot.evict.clone()));
        slot
    }

    fn remove(&self, id: u64) {
        self.lock().conns.remove(&id);
    }

    /// Closes the oldest connection not handling a request; false if there is none.
    fn evict_oldest_idle(&self) -> bool {
        let mut open = self.lock();
        let idle = open
            .conns
            .iter()
            .find(|(_, (busy, _))| busy.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
        match idle.and_then(|id| open.conns.remove(&id)) {
            Some((_, evict)) => {
                evict.cancel();
                true
            }
            None => false,
        }
    }
}

/// Counts a request in progress on its connection while alive.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One HTTP/1.1 connection, with the client in each request's extensions.
async fn serve_conn<S>(
    stream: S,
    client: Client,
    router: Router,
    slot: Slot,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client = Arc::new(client);
    let busy = slot.busy.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(client.clone());
        let guard = Busy::new(&busy);
        let response = router.clone().oneshot(req.map(Body::new));
        async move {
            let response = response.await;
            drop(guard);
            response
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        // Over the cap a newer connection took this idle one's place.
        () = slot.evict.cancelled() => return,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "API connection ended");
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn the_cap_leaves_the_reserve_under_the_descriptor_limit() {
        assert_eq!(connection_cap(256, 65_536), 256);
        assert_eq!(connection_cap(10_000, 1024), 512);
        assert_eq!(connection_cap(256, 300), 1);
    }

    fn server(cap: usize) -> (SocketAddr, CancellationToken) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let stop = CancellationToken::new();
        let sockets = Sockets::new(vec![ApiListener::Tcp(listener)]);
        let s = stop.clone();
        tokio::spawn(async move {
            sockets
                .serve(router, Arc::new(Semaphore::new(cap)), s)
                .await;
        });
        (addr, stop)
    }

    async fn get(addr: SocketAddr) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn at_the_cap_a_new_connection_closes_the_oldest_idle_one() {
        let (addr, stop) = server(2);
        let mut idle1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(get(addr).await.unwrap().contains("200 OK"));
        let mut buf = [0; 1];
        let closed = tokio::time::timeout(Duration::from_secs(1), idle1.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_partial_header_is_cut_off_after_the_header_timeout() {
        let (addr, stop) = server(4);
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost:").await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(HEADER_TIMEOUT * 2, s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "still open after {:?}", started.elapsed());
        assert!(started.elapsed() >= HEADER_TIMEOUT / 2);
        stop.cancel();
    }
}
