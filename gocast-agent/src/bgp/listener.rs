//! The passive side (`bgp.listen_port`): a dual-stack listener that hands each connection from
//! a configured peer to that peer's session and refuses the rest with Cease / Connection
//! Rejected.
//!
//! The speaker owns the [`Listener`]: it keeps the TCP MD5 keys on the listening socket in step
//! with the peers, and publishes which session takes which address ([`Table`]); the accept loop
//! reads the latest table at each connection, so peers added or removed by a reload need no new
//! socket.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, watch},
};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use super::session;

/// Which session takes the connections from which peer address.
pub type Table = Arc<BTreeMap<IpAddr, mpsc::Sender<TcpStream>>>;

/// A listening socket and its accept loop; dropping it closes both.
pub struct Listener {
    pub port: u16,
    socket: Arc<TcpListener>,
    /// The MD5 keys set on the socket, by peer address.
    keys: BTreeMap<IpAddr, String>,
    /// Ends the accept loop (which holds the other reference to the socket) on drop.
    _stop: DropGuard,
}

impl Listener {
    /// Binds `[::]:port` (both families) with `keys` set first, and starts accepting.
    pub fn bind(
        port: u16,
        keys: BTreeMap<IpAddr, String>,
        table: watch::Receiver<Table>,
    ) -> io::Result<Self> {
        let socket = TcpSocket::new_v6()?;
        socket.set_reuseaddr(true)?;
        for (ip, password) in &keys {
            set_key(&socket, *ip, password)?;
        }
        socket.bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))?;
        let socket = Arc::new(socket.listen(16)?);
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(socket.clone(), table, stop.clone()));
        Ok(Self {
            port,
            socket,
            keys,
            _stop: stop.drop_guard(),
        })
    }

    /// Brings the socket's MD5 keys to `wanted`: new and changed keys are set, keys of peers
    /// that are gone are removed.
    pub fn set_keys(&mut self, wanted: BTreeMap<IpAddr, String>) -> io::Result<()> {
        for (ip, password) in &wanted {
            if self.keys.get(ip) != Some(password) {
                set_key(&*self.socket, *ip, password)?;
            }
        }
        for ip in self.keys.keys().filter(|ip| !wanted.contains_key(ip)) {
            // An empty key removes the peer's signature.
            set_key(&*self.socket, *ip, "")?;
        }
        self.keys = wanted;
        Ok(())
    }
}

/// Sets `peer`'s MD5 key on the listening socket. A v4 peer reaches a dual-stack socket as a
/// v4-mapped address.
fn set_key(socket: &impl std::os::fd::AsFd, peer: IpAddr, password: &str) -> io::Result<()> {
    let key_addr = match peer {
        IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
        IpAddr::V6(_) => peer,
    };
    gocast_common::tcp_md5::set(socket, key_addr, password.as_bytes())
}

/// Hands each accepted connection to the session of its peer; strangers are closed.
async fn accept_loop(
    listener: Arc<TcpListener>,
    table: watch::Receiver<Table>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "bgp listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let from = remote.ip().to_canonical();
        let session = table.borrow().get(&from).cloned();
        if let Some(session) = session {
            // A full queue means the session is busy with a connection already: refuse this one.
            if let Err(
                mpsc::error::TrySendError::Full(stream) | mpsc::error::TrySendError::Closed(stream),
            ) = session.try_send(stream)
            {
                tokio::spawn(session::reject(stream));
            }
        } else {
            debug!(%from, "bgp listener: connection from an unconfigured address refused");
            tokio::spawn(session::reject(stream));
        }
    }
}
