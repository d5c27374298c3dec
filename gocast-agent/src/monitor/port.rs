//! Port monitors (`port:tcp:N`, `port:udp:N`) read the kernel's socket table.
//!
//! The original Go agent probed a port by binding it: if the bind succeeded, the port was
//! "closed". While a service restarts, that probe can hold the port at the very moment the service
//! binds it, so the service fails to start: the health check breaks what it watches. Reading the
//! kernel's socket table (`NETLINK_SOCK_DIAG`, what `ss -ltu` uses) observes without touching the
//! port.
//!
//! One [`SocketTable::snapshot`] per monitor tick serves every app: four dumps (TCP and UDP, IPv4
//! and IPv6) whatever the number of apps, then each check is a lookup.
//!
//! # A listener that does not accept
//!
//! For a TCP listener the dump's `idiag_rqueue` is its accept queue's length (connections the
//! kernel completed that the service has not `accept()`ed) and `idiag_wqueue` its backlog
//! (`inet_diag_get_info` in `net/ipv4/tcp_diag.c`). The kernel refuses new connections once the
//! queue holds more than the backlog (`sk_acceptq_is_full`, `include/net/sock.h`): SYNs then get
//! no answer. [`SocketTable::accept_queue_full`] reads that off the same snapshot, with no
//! traffic to the VIP at all; the lifecycle counts it as a passive-health failure.
//!
//! [`prove_accepts`] is the active proof that such a service works again: a connection to the
//! listener is completed by the kernel and then `accept()`ed by the service, seen as the server
//! side of our connection getting an inode (a socket still in the accept queue has none:
//! `sock_i_ino` of a `struct sock` with no `struct socket`).
//!
//! Requests and replies are `netlink-packet-sock-diag` messages (`inet_diag_req_v2`,
//! `inet_diag_msg`) framed by `netlink-packet-core`'s `NetlinkMessage`; `netlink-sys` carries them.
//!
//! # Noticing a closed port between ticks
//!
//! A tick finds a dead service up to `monitor_interval` late. [`DestroyWatcher`] closes that gap:
//! when a socket is freed, the kernel (`sock_diag_broadcast_destroy`, Linux ≥ 4.2) multicasts an
//! `inet_diag_msg` for it to the `NETLINK_SOCK_DIAG` group of its family and protocol, to
//! listeners holding `CAP_NET_ADMIN`. What it sends, as observed on Linux 6.18:
//!
//! | socket freed                              | state         | source port | peer port, address |
//! |-------------------------------------------|---------------|-------------|--------------------|
//! | listening TCP socket                      | `CLOSE`       | its port    | 0, unspecified     |
//! | TCP connection (either side, any order)   | `CLOSE`       | local port  | peer's, peer's     |
//! | TCP connection aborted with `SO_LINGER` 0 | `CLOSE`       | local port  | 0, peer's          |
//! | bound UDP socket                          | `CLOSE`       | its port    | 0, unspecified     |
//! | connected UDP socket                      | `ESTABLISHED` | local port  | peer's, peer's     |
//!
//! By the time a TCP socket is freed it is `CLOSE` whatever it was, so the state cannot tell a
//! listener from one of the thousands of connections a busy server closes each second. The peer
//! can: only a socket that never had one — a listener (or a TCP socket bound but never used) or an
//! unconnected UDP socket — has both peer fields zero. The watcher forwards only those, and only
//! for ports some app monitors; an event is a hint to take a fresh snapshot, never a verdict (the
//! port may still be served by another socket, e.g. with `SO_REUSEPORT`).
//!
//! Subscribing has a cost: while anyone listens, the kernel allocates and queues a message for
//! every TCP and UDP socket freed in the namespace, so the scheduler subscribes only while some
//! app has a port monitor. A classic BPF filter on the socket ([`PEERLESS_ONLY`]) makes the
//! kernel drop the messages of sockets that had a peer before they are queued: on a server of
//! short connections that is nearly all of them, which the agent would otherwise wake up, read
//! and parse one by one (6 % of a core at 13,700 connections per second, measured; the rate
//! such a server then served rose with the filter, see `docs/benchmarks.md`).

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr as InetAddr, TcpStream};
use std::ops::ControlFlow;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SockDiagMessage, TCP_LISTEN,
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use nix::errno::Errno;
use tokio::sync::{mpsc, watch};

use crate::app::Proto;

/// The kernel sizes dump datagrams to at most 32 KiB; a larger buffer never truncates one.
const RECV_BUF_LEN: usize = 64 * 1024;

/// The listening TCP sockets and bound UDP ports of this network namespace, IPv4 and IPv6.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SocketTable {
    /// Sorted by port.
    tcp: Vec<Listener>,
    /// Sorted, deduplicated.
    udp: Vec<u16>,
}

/// One listening TCP socket, with its accept queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub addr: IpAddr,
    pub port: u16,
    /// Connections completed but not yet accepted (`idiag_rqueue`).
    pub queued: u32,
    /// The backlog given to `listen()`, as the kernel capped it (`idiag_wqueue`).
    pub backlog: u32,
}

impl Listener {
    /// The kernel refuses new connections (`sk_acceptq_is_full`: more queued than the backlog).
    pub fn full(&self) -> bool {
        self.queued > self.backlog
    }
}

impl SocketTable {
    /// One `sock_diag` dump per (family, protocol): TCP in state LISTEN only (the kernel filters, so
    /// connections are not dumped), UDP all sockets (any bound port, whatever its address).
    ///
    /// Blocking and synchronous: run it in `spawn_blocking`.
    pub fn snapshot() -> Result<Self, PortError> {
        let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(|source| PortError::Netlink {
            op: "open socket",
            source,
        })?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|source| PortError::Netlink {
                op: "connect to kernel",
                source,
            })?;

        let mut buf = vec![0; RECV_BUF_LEN];
        let mut table = Self::default();
        let mut udp = Vec::new();
        for dump in &DUMPS {
            let sockets = match dump.proto {
                Proto::Tcp => &mut table.tcp,
                Proto::Udp => &mut udp,
            };
            run_dump(&socket, dump, &mut buf, sockets)?;
        }
        table.tcp.sort_unstable_by_key(|l| l.port);
        table.udp = udp.iter().map(|l| l.port).collect();
        table.udp.sort_unstable();
        table.udp.dedup();
        Ok(table)
    }

    /// Whether `port` has a listening TCP socket (`Proto::Tcp`) or a bound UDP socket
    /// (`Proto::Udp`), IPv4 or IPv6.
    pub fn is_open(&self, proto: Proto, port: u16) -> bool {
        match proto {
            Proto::Tcp => !self.listeners(port).is_empty(),
            Proto::Udp => self.udp.binary_search(&port).is_ok(),
        }
    }

    /// The TCP listeners on `port`.
    pub fn listeners(&self, port: u16) -> &[Listener] {
        let start = self.tcp.partition_point(|l| l.port < port);
        let end = self.tcp.partition_point(|l| l.port <= port);
        &self.tcp[start..end]
    }

    /// Why TCP `port` refuses connections while it listens: every listener's accept queue is
    /// full. `None` when one has room (or none listens: that is the port monitor's verdict).
    pub fn accept_queue_full(&self, port: u16) -> Option<String> {
        let listeners = self.listeners(port);
        let first = listeners.first()?;
        listeners.iter().all(Listener::full).then(|| {
            format!(
                "tcp port {port} listens but does not accept: accept queue full ({} waiting, backlog {})",
                first.queued, first.backlog
            )
        })
    }
}

/// Proves that a service on TCP `port` accepts connections: connects to one of `listeners`
/// that has room (a wildcard one through loopback) and waits until the service has
/// `accept()`ed the connection, up to `within`. The reason, either way.
///
/// Blocking: run it in `spawn_blocking`.
pub fn prove_accepts(
    listeners: &[Listener],
    port: u16,
    within: Duration,
) -> Result<String, String> {
    let mut candidates: Vec<&Listener> = listeners.iter().filter(|l| !l.full()).collect();
    if candidates.is_empty() {
        return Err(format!(
            "tcp port {port}: no listener with room in its accept queue"
        ));
    }
    // IPv4 first: a dual-stack wildcard listener takes it, and `::1` may be missing.
    candidates.sort_by_key(|l| l.addr.is_ipv6());
    let deadline = Instant::now() + within;
    let listener = candidates[0];
    let target = InetAddr::new(
        match listener.addr {
            IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            a => a,
        },
        port,
    );
    let stream = TcpStream::connect_timeout(&target, within)
        .map_err(|e| format!("tcp port {port}: connecting to {target} failed: {e}"))?;
    let (local, peer) = stream
        .local_addr()
        .and_then(|l| Ok((l, stream.peer_addr()?)))
        .and_then(|pair| stream.set_nonblocking(true).map(|()| pair))
        .map_err(|e| format!("tcp port {port}: {e}"))?;
    loop {
        // Data or an end of stream can only come from a service that accepted (and maybe
        // closed at once, which leaves its side without an inode); a reset from one that
        // closed its listener.
        let answered = match stream.peek(&mut [0; 1]) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => accepted(peer, local)
                .map_err(|e| format!("tcp port {port}: {}", crate::error_chain(&e))),
            Err(e) => Err(format!("tcp port {port}: the connection failed: {e}")),
        };
        match answered? {
            true => return Ok(format!("tcp port {port} accepted a connection")),
            false if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            false => {
                return Err(format!(
                    "tcp port {port}: connected, but the service did not accept within {within:?}"
                ));
            }
        }
    }
}

/// Whether the server side of the connection `server` ↔ `client` has been accepted (has an
/// inode): one `sock_diag` request for that exact socket.
fn accepted(server: InetAddr, client: InetAddr) -> Result<bool, PortError> {
    const DUMP: &str = "accepted connection";
    let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(|source| PortError::Netlink {
        op: "open socket",
        source,
    })?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|source| PortError::Netlink {
            op: "connect to kernel",
            source,
        })?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: if server.is_ipv4() { AF_INET } else { AF_INET6 },
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            // The kernel looks the socket up as a packet from `client` to `server` would.
            socket_id: SocketId {
                source_port: server.port(),
                destination_port: client.port(),
                source_address: server.ip(),
                destination_address: client.ip(),
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: match on the addresses only.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    message.finalize();
    let mut request = vec![0; message.buffer_len()];
    message.serialize(&mut request);
    socket
        .send(&request, 0)
        .map_err(|source| PortError::Netlink {
            op: "send socket request",
            source,
        })?;
    let mut buf = vec![0; RECV_BUF_LEN];
    let len = socket
        .recv(&mut &mut buf[..], 0)
        .map_err(|source| PortError::Netlink {
            op: "receive socket reply",
            source,
        })?;
    let data = buf.get(..len).ok_or_else(|| PortError::Malformed {
        dump: DUMP,
        what: format!("{len}-byte datagram overflows the buffer"),
    })?;
    let message =
        NetlinkMessage::<SockDiagMessage>::deserialize(data).map_err(|e| PortError::Malformed {
            dump: DUMP,
            what: e.to_string(),
        })?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            Ok(response.header.inode != 0)
        }
        // ENOENT: not found (yet, or any more); the caller's peek tells what happened.
        NetlinkPayload::Error(error) => match error.code {
            Some(code) if code.get() == -(Errno::ENOENT as i32) => Ok(false),
            Some(code) => Err(PortError::Refused {
                dump: DUMP,
                source: io::Error::from_raw_os_error(code.get().saturating_neg()),
            }),
            None => Ok(false),
        },
        _ => Err(PortError::Malformed {
            dump: DUMP,
            what: "no socket in the reply".into(),
        }),
    }
}

/// Why a socket table snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// A socket call on the `sock_diag` netlink socket failed.
    #[error("sock_diag netlink: {op} failed")]
    Netlink {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel answered a dump with an error code.
    #[error("kernel refused the {dump} socket dump")]
    Refused {
        dump: &'static str,
        #[source]
        source: io::Error,
    },
    /// The reply did not parse; `what` says which part was wrong.
    #[error("malformed reply to the {dump} socket dump: {what}")]
    Malformed { dump: &'static str, what: String },
    /// Joining a destroy multicast group failed: `EPERM` without `CAP_NET_ADMIN`, an error too on
    /// a kernel older than 4.2, which has no such groups.
    #[error("cannot join the sock_diag destroy group {group} ({name})")]
    Subscribe {
        group: u32,
        name: &'static str,
        #[source]
        source: io::Error,
    },
    /// A destroy broadcast did not parse; `what` says which part was wrong.
    #[error("malformed socket destroy broadcast: {what}")]
    MalformedBroadcast { what: String },
    /// The thread that reads destroy broadcasts could not be started.
    #[error("cannot start the socket destroy watcher thread")]
    Thread(#[source] io::Error),
}

/// One (family, protocol) dump; `name` is for error messages.
struct Dump {
    name: &'static str,
    family: u8,
    proto: Proto,
}

const DUMPS: [Dump; 4] = [
    Dump {
        name: "tcp/ipv4",
        family: AF_INET,
        proto: Proto::Tcp,
    },
    Dump {
        name: "tcp/ipv6",
        family: AF_INET6,
        proto: Proto::Tcp,
    },
    Dump {
        name: "udp/ipv4",
        family: AF_INET,
        proto: Proto::Udp,
    },
    Dump {
        name: "udp/ipv6",
        family: AF_INET6,
        proto: Proto::Udp,
    },
];

impl Dump {
    /// `SOCK_DIAG_BY_FAMILY` dump request for this family and protocol.
    fn request(&self) -> Vec<u8> {
        let (protocol, states) = match self.proto {
            // The state filter makes the kernel skip connections: only listeners come back.
            Proto::Tcp => (IPPROTO_TCP, StateFlags::LISTEN),
            // A bound UDP socket is in state CLOSE, a connected one ESTABLISHED: take them all.
            Proto::Udp => (IPPROTO_UDP, StateFlags::all()),
        };
        // A dump ignores the socket id; its addresses only need the request's family.
        let socket_id = if self.family == AF_INET6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut message = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family: self.family,
                protocol,
                extensions: ExtensionFlags::empty(),
                states,
                socket_id,
            })
            .into(),
        );
        // Sets the header's length and message type (`SOCK_DIAG_BY_FAMILY`) from the payload.
        message.finalize();
        let mut request = vec![0; message.buffer_len()];
        message.serialize(&mut request);
        request
    }

    fn malformed(&self, what: impl Into<String>) -> PortError {
        PortError::Malformed {
            dump: self.name,
            what: what.into(),
        }
    }
}

/// Sends the dump request and collects every reply record into `sockets`, reading datagrams
/// until `NLMSG_DONE` (a dump spans many multi-part datagrams).
fn run_dump(
    socket: &Socket,
    dump: &Dump,
    buf: &mut [u8],
    sockets: &mut Vec<Listener>,
) -> Result<(), PortError> {
    socket
        .send(&dump.request(), 0)
        .map_err(|source| PortError::Netlink {
            op: "send dump request",
            source,
        })?;
    loop {
        let len = match socket.recv(&mut &mut buf[..], 0) {
            Ok(len) => len,
            // A signal handler ran; the reply is still queued.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(PortError::Netlink {
                    op: "receive dump reply",
                    source,
                });
            }
        };
        // `recv` reports the datagram's full length when it was truncated.
        let datagram = buf
            .get(..len)
            .ok_or_else(|| dump.malformed(format!("{len}-byte datagram overflows the buffer")))?;
        if datagram.is_empty() {
            // The kernel never sends an empty datagram; stop rather than spin.
            return Err(dump.malformed("empty datagram"));
        }
        if parse_datagram(dump, datagram, sockets)?.is_break() {
            return Ok(());
        }
    }
}

/// Walks the netlink messages of one datagram. Breaks once the dump is complete.
fn parse_datagram(
    dump: &Dump,
    mut data: &[u8],
    sockets: &mut Vec<Listener>,
) -> Result<ControlFlow<()>, PortError> {
    while !data.is_empty() {
        // Checks that the header fits and that its length stays within the datagram, then parses
        // the payload by message type; every length it reads is checked, so bad data is an error.
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(data)
            .map_err(|e| dump.malformed(e.to_string()))?;
        // At least a header long (so the walk advances) and at most what is left (checked above).
        let length = message.header.length as usize;
        match message.payload {
            // The final status: negative errno if the dump failed midway.
            NetlinkPayload::Done(done) if done.code < 0 => return Err(refused(dump, done.code)),
            NetlinkPayload::Done(_) => return Ok(ControlFlow::Break(())),
            NetlinkPayload::Error(error) => {
                return match error.code {
                    Some(code) => Err(refused(dump, code.get())),
                    // Code 0 is an acknowledgement, which also ends the request.
                    None => Ok(ControlFlow::Break(())),
                };
            }
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                let socket = &response.header;
                // The kernel already filtered TCP to LISTEN; re-checking keeps a kernel that
                // ignores the filter from turning connections into "open" ports.
                if dump.proto == Proto::Udp || socket.state == TCP_LISTEN {
                    sockets.push(Listener {
                        addr: socket.socket_id.source_address,
                        port: socket.socket_id.source_port,
                        queued: socket.recv_queue,
                        backlog: socket.send_queue,
                    });
                }
            }
            // NLMSG_NOOP and anything else carry no inet sockets.
            _ => {}
        }
        // Messages are padded to 4 bytes; the last one may end the datagram without padding.
        data = data.get(length.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(ControlFlow::Continue(()))
}

/// Netlink reports errors as negative errno.
fn refused(dump: &Dump, code: i32) -> PortError {
    PortError::Refused {
        dump: dump.name,
        source: io::Error::from_raw_os_error(code.saturating_neg()),
    }
}

/// The `NETLINK_SOCK_DIAG` multicast groups the kernel sends destroyed sockets to
/// (`enum sknetlink_groups`, `linux/sock_diag.h`), with names for error messages.
const DESTROY_GROUPS: [(u32, &str); 4] = [
    (1, "SKNLGRP_INET_TCP_DESTROY"),
    (2, "SKNLGRP_INET_UDP_DESTROY"),
    (3, "SKNLGRP_INET6_TCP_DESTROY"),
    (4, "SKNLGRP_INET6_UDP_DESTROY"),
];

/// Classic BPF (`SO_ATTACH_FILTER`, <https://docs.kernel.org/networking/filter.html>) run by the
/// kernel on each broadcast before it is queued to the watcher: accepts a message whose
/// `inet_diag_msg` has no peer (peer port 0 and peer address all zero), drops the rest, as
/// [`destroyed_port`] would. A broadcast is one `nlmsghdr` (16 bytes) and its `inet_diag_msg`,
/// whose socket id starts 4 bytes in: source port at byte 20, peer port at 22, source address
/// at 24, peer address at 40..56 (`linux/inet_diag.h`). Loads read big-endian; only zero is
/// compared, so byte order does not matter. A shorter message makes a load fail: dropped.
const PEERLESS_ONLY: [(u16, u8, u8, u32); 12] = {
    /// `BPF_LD | BPF_H | BPF_ABS`, `BPF_LD | BPF_W | BPF_ABS`, `BPF_JMP | BPF_JEQ | BPF_K`,
    /// `BPF_RET | BPF_K` (`linux/filter.h`).
    const LDH: u16 = 0x28;
    const LDW: u16 = 0x20;
    const JEQ: u16 = 0x15;
    const RET: u16 = 0x06;
    [
        (LDH, 0, 0, 22),
        (JEQ, 0, 9, 0),
        (LDW, 0, 0, 40),
        (JEQ, 0, 7, 0),
        (LDW, 0, 0, 44),
        (JEQ, 0, 5, 0),
        (LDW, 0, 0, 48),
        (JEQ, 0, 3, 0),
        (LDW, 0, 0, 52),
        (JEQ, 0, 1, 0),
        // Accept: the whole message. Drop: none of it.
        (RET, 0, 0, u32::MAX),
        (RET, 0, 0, 0),
    ]
};

/// How long a read waits for a broadcast before the forwarding thread looks whether its receiver
/// is still there: the thread outlives the scheduler by at most this.
const READ_TIMEOUT: Duration = Duration::from_millis(250);

/// Receive buffer asked for (the kernel caps it at `net.core.rmem_max`). Every freed socket takes
/// room until read, connections included; when the queue overflows anyway, [`Destroyed::Lost`]
/// says so.
const DESTROY_RCVBUF: usize = 1024 * 1024;

/// Forwarded events waiting for the scheduler. When it lags, the thread waits and the kernel
/// queue absorbs the rest (then overflows into [`Destroyed::Lost`]).
const EVENT_QUEUE: usize = 64;

/// What a destroy broadcast means for port monitors: a reason to look again, not a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Destroyed {
    /// A socket without a peer bound to `port` was freed — a listening (or bound, unused) TCP
    /// socket or an unconnected UDP socket: the port may have closed.
    Port { proto: Proto, port: u16 },
    /// The kernel dropped broadcasts (our receive queue overflowed) or one did not parse: any
    /// port may have closed.
    Lost,
}

/// The (protocol, port) pairs some app monitors; the forwarding thread drops other events.
pub type WatchedPorts = HashSet<(Proto, u16)>;

/// A `NETLINK_SOCK_DIAG` socket subscribed to the four destroy groups (see the module docs).
///
/// It sees the sockets of the network namespace it was created in, whatever thread reads it.
#[derive(Debug)]
pub struct DestroyWatcher {
    socket: Socket,
    buf: Vec<u8>,
}

impl DestroyWatcher {
    /// Opens the socket and joins the destroy groups. Fails without `CAP_NET_ADMIN` or on a
    /// kernel without destroy broadcasts (before 4.2).
    pub fn subscribe() -> Result<Self, PortError> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(|source| PortError::Netlink {
            op: "open socket",
            source,
        })?;
        socket
            .bind_auto()
            .map_err(|source| PortError::Netlink { op: "bind", source })?;
        // Before joining: no unfiltered broadcast gets queued in between.
        let filter =
            PEERLESS_ONLY.map(|(code, jt, jf, k)| socket2::SockFilter::new(code, jt, jf, k));
        socket2::SockRef::from(&socket)
            .attach_filter(&filter)
            .map_err(|source| PortError::Netlink {
                op: "attach the peerless-socket filter",
                source,
            })?;
        for (group, name) in DESTROY_GROUPS {
            socket
                .add_membership(group)
                .map_err(|source| PortError::Subscribe {
                    group,
                    name,
                    source,
                })?;
        }
        let options = socket2::SockRef::from(&socket);
        options
            .set_read_timeout(Some(READ_TIMEOUT))
            .map_err(|source| PortError::Netlink {
                op: "set receive timeout",
                source,
            })?;
        options
            .set_recv_buffer_size(DESTROY_RCVBUF)
            .map_err(|source| PortError::Netlink {
                op: "set receive buffer size",
                source,
            })?;
        Ok(Self {
            socket,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// Waits up to [`READ_TIMEOUT`] for one broadcast and appends what it means to `out`:
    /// nothing on timeout or for a socket that had a peer (a connection).
    ///
    /// Blocking: run it on a thread of its own ([`DestroyWatcher::spawn`]).
    pub fn recv(&mut self, out: &mut Vec<Destroyed>) -> Result<(), PortError> {
        let (len, from) = match self.socket.recv_from(&mut &mut self.buf[..], 0) {
            Ok(received) => received,
            Err(e) if is_timeout_or_signal(&e) => return Ok(()),
            // The queue overflowed and the kernel dropped broadcasts; the socket still works.
            Err(e) if e.raw_os_error().map(Errno::from_raw) == Some(Errno::ENOBUFS) => {
                out.push(Destroyed::Lost);
                return Ok(());
            }
            Err(source) => {
                return Err(PortError::Netlink {
                    op: "receive destroy broadcast",
                    source,
                });
            }
        };
        // Only the kernel (port 0) speaks for sockets; sending to these groups takes
        // CAP_NET_ADMIN, but checking costs nothing.
        if from.port_number() != 0 {
            return Ok(());
        }
        let datagram = self
            .buf
            .get(..len)
            .ok_or_else(|| PortError::MalformedBroadcast {
                what: format!("{len}-byte datagram overflows the buffer"),
            })?;
        parse_broadcast(datagram, out)
    }

    /// Moves the watcher to a thread of its own that forwards the events for `ports` (read at
    /// each event, so the set can change) and [`Destroyed::Lost`].
    ///
    /// The thread ends within [`READ_TIMEOUT`] once the receiver is dropped, or on a socket error,
    /// which it logs; the receiver then yields `None`. The handle is for tests: dropping it
    /// detaches the thread.
    pub fn spawn(
        self,
        ports: watch::Receiver<WatchedPorts>,
    ) -> Result<(mpsc::Receiver<Destroyed>, JoinHandle<()>), PortError> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let thread = std::thread::Builder::new()
            .name("gocast-sockdiag".into())
            .spawn(move || self.forward(&ports, &tx))
            .map_err(PortError::Thread)?;
        Ok((rx, thread))
    }

    fn forward(mut self, ports: &watch::Receiver<WatchedPorts>, tx: &mpsc::Sender<Destroyed>) {
        let mut events = Vec::new();
        let mut warned = false;
        while !tx.is_closed() {
            match self.recv(&mut events) {
                Ok(()) => {}
                Err(e @ PortError::MalformedBroadcast { .. }) => {
                    // Not expected from any kernel; once is enough to notice.
                    if !warned {
                        tracing::warn!(error = %e, "socket destroy broadcast not understood: re-checking every port monitor");
                        warned = true;
                    }
                    events.push(Destroyed::Lost);
                }
                Err(e) => {
                    tracing::warn!(
                        error = crate::error_chain(&e),
                        "socket destroy watcher stopped: port monitors see a closed port at the next monitor interval only"
                    );
                    return;
                }
            }
            for event in events.drain(..) {
                let wanted = match event {
                    Destroyed::Port { proto, port } => ports.borrow().contains(&(proto, port)),
                    Destroyed::Lost => !ports.borrow().is_empty(),
                };
                // An error means the receiver is gone: the scheduler stopped.
                if wanted && tx.blocking_send(event).is_err() {
                    return;
                }
            }
        }
    }
}

/// `EAGAIN` after [`READ_TIMEOUT`], or `EINTR`: nothing to read yet.
fn is_timeout_or_signal(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Walks the netlink messages of one broadcast datagram (the kernel sends one per freed socket)
/// and appends the events for sockets that had no peer.
fn parse_broadcast(mut data: &[u8], out: &mut Vec<Destroyed>) -> Result<(), PortError> {
    while !data.is_empty() {
        // As in `parse_datagram`: every length is checked, bad data is an error.
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(data).map_err(|e| {
            PortError::MalformedBroadcast {
                what: e.to_string(),
            }
        })?;
        let length = message.header.length as usize;
        if let NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) =
            message.payload
        {
            out.extend(destroyed_port(&response)?);
        }
        data = data.get(length.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(())
}

/// The event for one freed socket: `None` for a socket that had a peer (a connection; its state
/// says nothing, see the module docs) or no port, or of a protocol no monitor uses.
fn destroyed_port(response: &InetResponse) -> Result<Option<Destroyed>, PortError> {
    let id = &response.header.socket_id;
    if id.source_port == 0 || id.destination_port != 0 || !id.destination_address.is_unspecified() {
        return Ok(None);
    }
    // The group says the protocol too, but the attribute travels with the message.
    let protocol = response
        .nlas
        .iter()
        .find_map(|nla| match nla {
            Nla::Protocol(protocol) => Some(*protocol),
            _ => None,
        })
        .ok_or_else(|| PortError::MalformedBroadcast {
            what: "no INET_DIAG_PROTOCOL attribute".into(),
        })?;
    let proto = match protocol {
        IPPROTO_TCP => Proto::Tcp,
        IPPROTO_UDP => Proto::Udp,
        _ => return Ok(None),
    };
    Ok(Some(Destroyed::Port {
        proto,
        port: id.source_port,
    }))
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;
    use std::net::{IpAddr, TcpListener, TcpStream, UdpSocket};
    use std::time::Instant;

    use netlink_packet_core::{DoneMessage, NLMSG_ERROR};
    use netlink_packet_sock_diag::inet::InetResponseHeader;
    use netlink_packet_sock_diag::{SOCK_DIAG_BY_FAMILY, TCP_CLOSE, TCP_ESTABLISHED};

    use super::*;
    use crate::testing::in_new_netns;

    fn snapshot() -> SocketTable {
        SocketTable::snapshot().expect("sock_diag snapshot")
    }

    #[test]
    fn listening_tcp_port_is_open() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let table = snapshot();
        assert!(table.is_open(Proto::Tcp, port));
        assert!(!table.is_open(Proto::Udp, port));
    }

    #[test]
    fn a_listener_that_never_accepts_fills_its_queue_and_proves_nothing_until_it_accepts() {
        use socket2::{Domain, Socket as RawSocket, Type};
        let socket = RawSocket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<InetAddr>().unwrap().into())
            .unwrap();
        // Backlog 0: one connection waiting fills the queue (`sk_acceptq_is_full`).
        socket.listen(0).unwrap();
        let listener: TcpListener = socket.into();
        let port = listener.local_addr().unwrap().port();
        let table = snapshot();
        assert_eq!(table.accept_queue_full(port), None, "{table:?}");
        let why =
            prove_accepts(table.listeners(port), port, Duration::from_millis(200)).unwrap_err();
        assert!(why.contains("did not accept"), "{why}");
        // The proof's connection still waits in the queue: full now.
        let why = snapshot().accept_queue_full(port).expect("queue full");
        assert!(why.contains("1 waiting, backlog 0"), "{why}");
        let why = prove_accepts(snapshot().listeners(port), port, Duration::from_millis(200))
            .unwrap_err();
        assert!(why.contains("no listener with room"), "{why}");

        // The service accepts again: the waiting connection, then the proof's.
        let service = std::thread::spawn(move || {
            let waiting = listener.accept().unwrap();
            let proof = listener.accept().unwrap();
            (waiting, proof)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while snapshot().accept_queue_full(port).is_some() {
            assert!(Instant::now() < deadline, "the queue never drained");
            std::thread::sleep(Duration::from_millis(10));
        }
        let proof = prove_accepts(snapshot().listeners(port), port, Duration::from_secs(5));
        assert_eq!(proof, Ok(format!("tcp port {port} accepted a connection")));
        service.join().unwrap();
    }

    #[test]
    fn tcp_port_is_closed_once_the_listener_is_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        assert!(!snapshot().is_open(Proto::Tcp, port));
    }

    #[test]
    fn established_connections_do_not_count_as_listening() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
        let client_port = client.local_addr().unwrap().port();
        let (accepted, _) = listener.accept().unwrap();
        // The accepted socket keeps the server port in state ESTABLISHED.
        drop(listener);
        let table = snapshot();
        assert!(!table.is_open(Proto::Tcp, client_port));
        assert!(!table.is_open(Proto::Tcp, server_port));
        drop((client, accepted));
    }

    #[test]
    fn bound_udp_port_is_open() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let table = snapshot();
        assert!(table.is_open(Proto::Udp, port));
        assert!(!table.is_open(Proto::Tcp, port));
    }

    #[test]
    fn ipv6_sockets_count() {
        let (tcp, udp) = match (TcpListener::bind("[::1]:0"), UdpSocket::bind("[::]:0")) {
            (Ok(tcp), Ok(udp)) => (tcp, udp),
            (Err(e), _) | (_, Err(e)) if e.kind() == ErrorKind::AddrNotAvailable => {
                eprintln!("skipped: no IPv6 loopback ({e})");
                return;
            }
            (Err(e), _) | (_, Err(e)) => panic!("bind IPv6: {e}"),
        };
        let table = snapshot();
        assert!(table.is_open(Proto::Tcp, tcp.local_addr().unwrap().port()));
        assert!(table.is_open(Proto::Udp, udp.local_addr().unwrap().port()));
    }

    #[test]
    fn kernel_error_reply_is_reported() {
        // nlmsghdr(len 36, NLMSG_ERROR) + errno -EPERM + the echoed request header.
        let mut reply = vec![0; 36];
        reply[..4].copy_from_slice(&36u32.to_ne_bytes());
        reply[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        reply[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        let err = parse_datagram(&DUMPS[0], &reply, &mut Vec::new()).unwrap_err();
        let PortError::Refused { source, .. } = err else {
            panic!("expected Refused, got {err:?}");
        };
        assert_eq!(source.kind(), ErrorKind::PermissionDenied);
    }

    #[test]
    fn truncated_reply_is_an_error_not_a_panic() {
        // A header claiming 88 bytes in a 20-byte datagram, then a record too short to hold a port.
        let mut reply = vec![0; 20];
        reply[..4].copy_from_slice(&88u32.to_ne_bytes());
        reply[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let err = parse_datagram(&DUMPS[0], &reply, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, PortError::Malformed { .. }), "{err:?}");

        reply[..4].copy_from_slice(&20u32.to_ne_bytes());
        let err = parse_datagram(&DUMPS[0], &reply, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, PortError::Malformed { .. }), "{err:?}");
    }

    /// A socket record as the kernel sends it, framed by `netlink-packet-core`.
    fn response(
        family: u8,
        state: u8,
        socket_id: SocketId,
        nlas: impl IntoIterator<Item = Nla>,
    ) -> NetlinkMessage<SockDiagMessage> {
        let response = InetResponse {
            header: InetResponseHeader {
                family,
                state,
                timer: None,
                socket_id,
                recv_queue: 0,
                send_queue: 0,
                uid: 0,
                inode: 0,
            },
            nlas: nlas.into_iter().collect(),
        };
        SockDiagMessage::InetResponse(Box::new(response)).into()
    }

    /// A reply record of a dump.
    fn record(family: u8, state: u8, port: u16) -> NetlinkMessage<SockDiagMessage> {
        let mut socket_id = if family == AF_INET6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        };
        socket_id.source_port = port;
        response(family, state, socket_id, [])
    }

    fn datagram(messages: impl IntoIterator<Item = NetlinkMessage<SockDiagMessage>>) -> Vec<u8> {
        let mut datagram = Vec::new();
        for mut message in messages {
            message.finalize();
            let start = datagram.len();
            datagram.resize(start + message.buffer_len(), 0);
            message.serialize(&mut datagram[start..]);
        }
        datagram
    }

    #[test]
    fn records_of_a_multi_part_datagram_are_read_until_done() {
        let records = [
            record(AF_INET, TCP_LISTEN, 80),
            record(AF_INET6, TCP_ESTABLISHED, 81),
            record(AF_INET6, TCP_LISTEN, 443),
        ];
        let mut ports = Vec::new();
        let flow = parse_datagram(&DUMPS[1], &datagram(records.clone()), &mut ports).unwrap();
        assert!(flow.is_continue());
        let ports: Vec<u16> = ports.iter().map(|l| l.port).collect();
        assert_eq!(ports, [80, 443], "TCP keeps listeners only");

        let done = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::Done(DoneMessage::default()),
        );
        let mut ports = Vec::new();
        let flow = parse_datagram(
            &DUMPS[3],
            &datagram(records.into_iter().chain([done])),
            &mut ports,
        )
        .unwrap();
        assert!(flow.is_break());
        let ports: Vec<u16> = ports.iter().map(|l| l.port).collect();
        assert_eq!(ports, [80, 81, 443], "UDP keeps every socket");
    }

    /// A destroy broadcast as the kernel sends it (see the table in the module docs).
    fn broadcast(protocol: Option<u8>, sport: u16, dport: u16, peer: &str) -> Vec<u8> {
        let peer: IpAddr = peer.parse().unwrap();
        let (family, mut socket_id) = if peer.is_ipv6() {
            (AF_INET6, SocketId::new_v6())
        } else {
            (AF_INET, SocketId::new_v4())
        };
        socket_id.source_port = sport;
        socket_id.destination_port = dport;
        socket_id.destination_address = peer;
        let nlas = protocol.map(Nla::Protocol);
        datagram([response(family, TCP_CLOSE, socket_id, nlas)])
    }

    fn parsed(datagram: &[u8]) -> Vec<Destroyed> {
        let mut events = Vec::new();
        parse_broadcast(datagram, &mut events).expect("a well-formed broadcast");
        events
    }

    #[test]
    fn only_sockets_that_never_had_a_peer_are_reported() {
        let tcp = Some(IPPROTO_TCP);
        assert_eq!(
            parsed(&broadcast(tcp, 80, 0, "0.0.0.0")),
            [Destroyed::Port {
                proto: Proto::Tcp,
                port: 80
            }]
        );
        assert_eq!(
            parsed(&broadcast(Some(IPPROTO_UDP), 53, 0, "::")),
            [Destroyed::Port {
                proto: Proto::Udp,
                port: 53
            }]
        );
        // A connection, closed in order or aborted (`SO_LINGER` 0 zeroes the peer port only).
        assert_eq!(parsed(&broadcast(tcp, 80, 51234, "192.0.2.1")), []);
        assert_eq!(parsed(&broadcast(tcp, 80, 0, "2001:db8::1")), []);
        // Never bound; and a protocol no monitor uses (UDP-Lite).
        assert_eq!(parsed(&broadcast(tcp, 0, 0, "0.0.0.0")), []);
        assert_eq!(parsed(&broadcast(Some(136), 80, 0, "0.0.0.0")), []);
    }

    #[test]
    fn a_broadcast_without_its_protocol_or_cut_short_is_an_error() {
        let mut events = Vec::new();
        let err = parse_broadcast(&broadcast(None, 80, 0, "0.0.0.0"), &mut events).unwrap_err();
        assert!(
            matches!(err, PortError::MalformedBroadcast { .. }),
            "{err:?}"
        );
        let whole = broadcast(Some(IPPROTO_TCP), 80, 0, "0.0.0.0");
        let err = parse_broadcast(&whole[..whole.len() - 8], &mut events).unwrap_err();
        assert!(
            matches!(err, PortError::MalformedBroadcast { .. }),
            "{err:?}"
        );
        assert_eq!(events, []);
    }

    /// Reads broadcasts until all of `expected` came, then 300 ms more for anything unexpected
    /// (or gives up after 3 s); returns them sorted.
    fn collect(watcher: &mut DestroyWatcher, expected: &[Destroyed]) -> Vec<Destroyed> {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut grace_until = None;
        let mut events = Vec::new();
        while Instant::now() < grace_until.unwrap_or(deadline) {
            watcher.recv(&mut events).expect("read a broadcast");
            if grace_until.is_none() && expected.iter().all(|e| events.contains(e)) {
                grace_until = Some(Instant::now() + Duration::from_millis(300));
            }
        }
        events.sort_unstable();
        events
    }

    /// A client connection to `listener` and its accepted side.
    fn connection(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// Makes closing `stream` abort the connection (RST) instead of closing it in order.
    fn abort(stream: &TcpStream) {
        socket2::SockRef::from(stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }

    #[test]
    fn the_kernel_drops_the_broadcasts_of_connections_before_the_watcher_wakes() {
        in_new_netns(|| async {
            crate::netlink::Netlink::new().await.expect("set lo up");
            let mut watcher = DestroyWatcher::subscribe().expect("subscribe as root");
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            // Aborted, so both ends are freed at once: 40 sockets with a peer.
            for _ in 0..20 {
                let (client, server) = connection(&listener);
                abort(&client);
                drop((client, server));
            }
            drop(listener);
            // What reaches the socket at all, read past the watcher's own parsing.
            let (mut datagrams, mut events) = (0, Vec::new());
            let deadline = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < deadline {
                match watcher.socket.recv_from(&mut &mut watcher.buf[..], 0) {
                    Ok((len, _)) => {
                        datagrams += 1;
                        parse_broadcast(&watcher.buf[..len], &mut events).unwrap();
                    }
                    Err(e) if is_timeout_or_signal(&e) => {}
                    Err(e) => panic!("reading broadcasts: {e}"),
                }
            }
            let listener_closed = Destroyed::Port {
                proto: Proto::Tcp,
                port,
            };
            assert_eq!((datagrams, events), (1, vec![listener_closed]));
        });
    }

    #[test]
    fn closed_listeners_and_udp_sockets_are_broadcast_and_connections_filtered_out() {
        in_new_netns(|| async {
            // `lo` comes up; connections need it.
            crate::netlink::Netlink::new().await.expect("set lo up");
            let mut watcher = DestroyWatcher::subscribe().expect("subscribe as root");
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let tcp_port = listener.local_addr().unwrap().port();
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            let udp_port = udp.local_addr().unwrap().port();
            let connected_udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            connected_udp.connect(udp.local_addr().unwrap()).unwrap();
            let mut expected = vec![
                Destroyed::Port {
                    proto: Proto::Tcp,
                    port: tcp_port,
                },
                Destroyed::Port {
                    proto: Proto::Udp,
                    port: udp_port,
                },
            ];
            let listener6 = TcpListener::bind("[::1]:0").ok();
            if let Some(l) = &listener6 {
                let port = l.local_addr().unwrap().port();
                expected.push(Destroyed::Port {
                    proto: Proto::Tcp,
                    port,
                });
                // An IPv6 connection too.
                let _ = connection(l);
            }

            // Connections closed every way: client first, server first, server aborts (RST).
            let (client, server) = connection(&listener);
            drop((client, server));
            let (client, server) = connection(&listener);
            drop((server, client));
            let (client, server) = connection(&listener);
            abort(&server);
            drop((server, client));
            // One still open when the listener closes.
            let (client, server) = connection(&listener);
            drop((listener, connected_udp, udp, listener6));
            drop((client, server));

            expected.sort_unstable();
            assert_eq!(collect(&mut watcher, &expected), expected);
        });
    }

    #[test]
    fn the_thread_forwards_watched_ports_only_and_stops_with_its_receiver() {
        in_new_netns(|| async {
            let listener = TcpListener::bind("0.0.0.0:0").unwrap();
            let other = TcpListener::bind("0.0.0.0:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let (_ports, ports_rx) = watch::channel(WatchedPorts::from([(Proto::Tcp, port)]));
            let watcher = DestroyWatcher::subscribe().expect("subscribe as root");
            let (mut events, thread) = watcher.spawn(ports_rx).unwrap();

            drop(other);
            drop(listener);
            let event = tokio::time::timeout(Duration::from_secs(3), events.recv())
                .await
                .expect("an event in time");
            assert_eq!(
                event,
                Some(Destroyed::Port {
                    proto: Proto::Tcp,
                    port
                })
            );
            let more = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
            assert!(more.is_err(), "the unwatched port was forwarded: {more:?}");

            drop(events);
            let deadline = Instant::now() + READ_TIMEOUT * 4;
            while !thread.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "the thread outlived its receiver"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }
}
