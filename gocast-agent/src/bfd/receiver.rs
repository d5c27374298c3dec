//! The receiving side shared by every session (RFC 5881 §4: one well-known port, 3784): binds
//! the IPv4 and IPv6 sockets on first use, drops what RFC 5881 §5 (TTL / hop limit 255, GTSM)
//! and RFC 5880 §6.8.6 reject, counts each drop by reason, and hands the rest to the session
//! they belong to: by Your Discriminator, or by source address while it is zero.
//!
//! ```text
//!  Bfd::register ─Command─▶ receiver task ─owns─ sockets :3784, discriminators → sessions
//!  router ─UDP:3784─▶ recvmsg + TTL cmsg ─▶ decode ─▶ session (mpsc) or dropped{reason}
//! ```
//!
//! The task owns the discriminator table; sessions register over a channel and are forgotten
//! once their end of the packet channel is gone.

use std::{
    collections::HashMap,
    io::{self, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    num::NonZeroU32,
    os::fd::AsRawFd,
};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::Interest,
    net::UdpSocket,
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use super::packet::ControlPacket;
use crate::{backoff::XorShift, metrics::Metrics};

/// The TTL / hop limit of every single-hop BFD packet (RFC 5881 §5).
pub const TTL: u8 = 255;
/// Packets waiting for a busy session; beyond it they are dropped (`overload`): a session
/// reads them at a rate of a few per second.
pub const QUEUE_LEN: usize = 16;

/// A packet for one session, from its peer's address (checked here).
#[derive(Debug)]
pub struct Received {
    pub packet: ControlPacket,
}

/// What sessions ask of the receiver.
pub enum Command {
    /// A session toward `peer` starts: it gets a discriminator of its own and its packets on
    /// `packets`; the reply is an error when the port cannot be bound.
    Register {
        peer: IpAddr,
        packets: mpsc::Sender<Received>,
        reply: oneshot::Sender<io::Result<NonZeroU32>>,
    },
}

/// A registered session.
struct Entry {
    peer: IpAddr,
    packets: mpsc::Sender<Received>,
}

/// The receiver task's state.
pub struct Receiver {
    port: u16,
    metrics: Metrics,
    sockets: Vec<UdpSocket>,
    sessions: HashMap<NonZeroU32, Entry>,
    rng: XorShift,
}

impl Receiver {
    pub fn new(port: u16, metrics: Metrics) -> Self {
        Self {
            port,
            metrics,
            sockets: Vec::new(),
            sessions: HashMap::new(),
            rng: XorShift::from_os(),
        }
    }

    /// Serves registrations and packets until every [`super::Bfd`] handle is gone.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Register { peer, packets, reply }) => {
                        let _ = reply.send(self.register(peer, packets));
                    }
                    None => return,
                },
                got = recv_any(&self.sockets, &mut buf) => match got {
                    Ok((len, from, ttl)) => {
                        let bytes = buf.get(..len).unwrap_or_default();
                        self.dispatch(bytes, from, ttl);
                    }
                    Err(e) => {
                        warn!(error = %e, "bfd: receive failed");
                        // A persistent error must not spin this loop.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    fn register(
        &mut self,
        peer: IpAddr,
        packets: mpsc::Sender<Received>,
    ) -> io::Result<NonZeroU32> {
        if self.sockets.is_empty() {
            self.sockets = bind(self.port)?;
        }
        self.sessions.retain(|_, e| !e.packets.is_closed());
        // A session of the same peer that has not noticed its end yet: the new one wins.
        self.sessions.retain(|_, e| e.peer != peer);
        let discr = loop {
            if let Some(d) = NonZeroU32::new(self.rng.below(u32::MAX))
                && !self.sessions.contains_key(&d)
            {
                break d;
            }
        };
        self.sessions.insert(discr, Entry { peer, packets });
        Ok(discr)
    }

    /// Routes one datagram, or counts why it was dropped.
    fn dispatch(&self, bytes: &[u8], from: IpAddr, ttl: Option<u8>) {
        let drop = |reason| {
            debug!(%from, reason, "bfd: packet dropped");
            self.metrics.bfd_dropped(reason);
        };
        if ttl != Some(TTL) {
            return drop("ttl");
        }
        let packet = match ControlPacket::decode(bytes) {
            Ok(p) => p,
            Err(e) => return drop(e.reason()),
        };
        let entry = match packet.your_discr {
            Some(d) => self.sessions.get(&d),
            // §6.8.6: select the session by the source address while the peer does not know
            // our discriminator (the decoder has checked the state is Down or AdminDown).
            None => self.sessions.values().find(|e| e.peer == from),
        };
        let Some(entry) = entry.filter(|e| e.peer == from) else {
            return drop(if packet.your_discr.is_some() {
                "your_discriminator"
            } else {
                "source"
            });
        };
        if entry.packets.try_send(Received { packet }).is_err() {
            drop("overload");
        }
    }
}

/// Binds the IPv4 and IPv6 receive sockets with the TTL / hop limit reported per packet. A
/// host without IPv6 gets the IPv4 socket alone.
fn bind(port: u16) -> io::Result<Vec<UdpSocket>> {
    let v4 = udp(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))?;
    setsockopt(&v4, sockopt::Ipv4RecvTtl, &true)?;
    let mut sockets = vec![v4];
    match udp(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)) {
        Ok(v6) => {
            setsockopt(&v6, sockopt::Ipv6RecvHopLimit, &true)?;
            sockets.push(v6);
        }
        Err(e) => warn!(error = %e, port, "bfd: no IPv6 socket; IPv6 peers get no BFD"),
    }
    Ok(sockets)
}

/// A non-blocking UDP socket bound to `addr` (IPv6 only for `::`, so IPv4 has its own).
pub fn udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// The next datagram on any socket: its length, source and received TTL / hop limit.
async fn recv_any(
    sockets: &[UdpSocket],
    buf: &mut [u8],
) -> io::Result<(usize, IpAddr, Option<u8>)> {
    if sockets.is_empty() {
        return std::future::pending().await;
    }
    // Readiness first (no buffer borrowed across the select), then the read itself.
    let ready = sockets.iter().map(|s| Box::pin(s.readable()));
    let (result, index, _) = futures::future::select_all(ready).await;
    result?;
    let Some(socket) = sockets.get(index) else {
        return Err(io::Error::other("socket index out of range"));
    };
    socket.try_io(Interest::READABLE, || recv_with_ttl(socket, buf))
}

/// One `recvmsg` with the `IP_TTL` / `IPV6_HOPLIMIT` control message.
fn recv_with_ttl(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, IpAddr, Option<u8>)> {
    let mut cmsg = nix::cmsg_space!(libc::c_int);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let from = msg
        .address
        .as_ref()
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .map(|ip| ip.to_canonical())
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    let mut ttl = None;
    // A truncated control buffer reads as "no TTL", which drops the packet.
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::Ipv4Ttl(t) | ControlMessageOwned::Ipv6HopLimit(t) = c {
                ttl = u8::try_from(t).ok();
            }
        }
    }
    Ok((msg.bytes, from, ttl))
}
