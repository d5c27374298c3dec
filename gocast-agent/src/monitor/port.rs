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
//! The request and the two fields read from each reply are encoded by hand (layouts from
//! `linux/inet_diag.h`): `netlink-packet-sock-diag` 0.5 builds on `netlink-packet-core` 0.9 while
//! this crate depends on 0.8, so its typed messages do not fit this crate's netlink framing types.
//! Only its constants are used; the framing (`NetlinkBuffer`, `ErrorBuffer`) is core 0.8's.

use std::io;
use std::ops::ControlFlow;

use netlink_packet_core::{
    ErrorBuffer, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SOCK_DIAG_BY_FAMILY, TCP_LISTEN,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::app::Proto;

/// `struct nlmsghdr`.
const NLMSG_HEADER_LEN: u32 = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then a 48-byte socket id that we
/// leave zeroed (a dump ignores it).
const INET_DIAG_REQ_V2_LEN: u32 = 56;
const REQUEST_LEN: u32 = NLMSG_HEADER_LEN + INET_DIAG_REQ_V2_LEN;
/// `struct inet_diag_msg`: every reply record is at least this long.
const INET_DIAG_MSG_LEN: usize = 72;
/// The kernel sizes dump datagrams to at most 32 KiB; a larger buffer never truncates one.
const RECV_BUF_LEN: usize = 64 * 1024;

/// The listening TCP ports and bound UDP ports of this network namespace, IPv4 and IPv6.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SocketTable {
    /// Sorted, deduplicated.
    tcp: Vec<u16>,
    /// Sorted, deduplicated.
    udp: Vec<u16>,
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
        for dump in &DUMPS {
            let ports = match dump.proto {
                Proto::Tcp => &mut table.tcp,
                Proto::Udp => &mut table.udp,
            };
            run_dump(&socket, dump, &mut buf, ports)?;
        }
        for ports in [&mut table.tcp, &mut table.udp] {
            ports.sort_unstable();
            ports.dedup();
        }
        Ok(table)
    }

    /// Whether `port` has a listening TCP socket (`Proto::Tcp`) or a bound UDP socket
    /// (`Proto::Udp`), IPv4 or IPv6.
    pub fn is_open(&self, proto: Proto, port: u16) -> bool {
        let ports = match proto {
            Proto::Tcp => &self.tcp,
            Proto::Udp => &self.udp,
        };
        ports.binary_search(&port).is_ok()
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
    /// `SOCK_DIAG_BY_FAMILY` dump request: header plus `inet_diag_req_v2`.
    fn request(&self) -> [u8; REQUEST_LEN as usize] {
        let (protocol, states) = match self.proto {
            // The state bitmask makes the kernel skip connections: only listeners come back.
            Proto::Tcp => (IPPROTO_TCP, 1 << TCP_LISTEN),
            // A bound UDP socket is in state CLOSE, a connected one ESTABLISHED: take them all.
            Proto::Udp => (IPPROTO_UDP, u32::MAX),
        };
        let mut req = [0; REQUEST_LEN as usize];
        let mut header = NetlinkBuffer::new(&mut req[..]);
        header.set_length(REQUEST_LEN);
        header.set_message_type(SOCK_DIAG_BY_FAMILY);
        header.set_flags(NLM_F_REQUEST | NLM_F_DUMP);
        let body = &mut req[NLMSG_HEADER_LEN as usize..];
        body[0] = self.family;
        body[1] = protocol;
        body[4..8].copy_from_slice(&states.to_ne_bytes());
        req
    }

    fn malformed(&self, what: impl Into<String>) -> PortError {
        PortError::Malformed {
            dump: self.name,
            what: what.into(),
        }
    }
}

/// Sends the dump request and collects the source port of every reply record into `ports`,
/// reading datagrams until `NLMSG_DONE` (a dump spans many multi-part datagrams).
fn run_dump(
    socket: &Socket,
    dump: &Dump,
    buf: &mut [u8],
    ports: &mut Vec<u16>,
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
        if parse_datagram(dump, datagram, ports)?.is_break() {
            return Ok(());
        }
    }
}

/// Walks the netlink messages of one datagram. Breaks once the dump is complete.
fn parse_datagram(
    dump: &Dump,
    mut data: &[u8],
    ports: &mut Vec<u16>,
) -> Result<ControlFlow<()>, PortError> {
    while !data.is_empty() {
        // Checks that the header fits and that its length stays within the datagram.
        let msg = NetlinkBuffer::new_checked(data).map_err(|e| dump.malformed(e.to_string()))?;
        let payload = msg.payload();
        match msg.message_type() {
            NLMSG_DONE => {
                // The payload holds the dump's final status: negative errno if it failed midway.
                return match payload.get(..4).and_then(|b| b.try_into().ok()) {
                    Some(code) if i32::from_ne_bytes(code) < 0 => {
                        Err(refused(dump, i32::from_ne_bytes(code)))
                    }
                    _ => Ok(ControlFlow::Break(())),
                };
            }
            NLMSG_ERROR => {
                let error =
                    ErrorBuffer::new_checked(payload).map_err(|e| dump.malformed(e.to_string()))?;
                return match error.code() {
                    Some(code) => Err(refused(dump, code.get())),
                    // Code 0 is an acknowledgement, which also ends the request.
                    None => Ok(ControlFlow::Break(())),
                };
            }
            SOCK_DIAG_BY_FAMILY => {
                if payload.len() < INET_DIAG_MSG_LEN {
                    return Err(dump.malformed(format!(
                        "{}-byte inet_diag_msg, expected at least {INET_DIAG_MSG_LEN}",
                        payload.len()
                    )));
                }
                // inet_diag_msg: family, state, timer, retrans, then the socket id whose first
                // field is the local port in network byte order.
                let state = payload[1];
                let port = u16::from_be_bytes([payload[4], payload[5]]);
                // The kernel already filtered TCP to LISTEN; re-checking keeps a kernel that
                // ignores the bitmask from turning connections into "open" ports.
                if dump.proto == Proto::Udp || state == TCP_LISTEN {
                    ports.push(port);
                }
            }
            // NLMSG_NOOP and anything else carry no sockets.
            _ => {}
        }
        // Messages are padded to 4 bytes; the last one may end the datagram without padding.
        let next = (msg.length() as usize).next_multiple_of(4);
        data = data.get(next..).unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;
    use std::net::{TcpListener, TcpStream, UdpSocket};

    use super::*;

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
}
