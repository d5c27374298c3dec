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
//! Requests and replies are `netlink-packet-sock-diag` messages (`inet_diag_req_v2`,
//! `inet_diag_msg`) framed by `netlink-packet-core`'s `NetlinkMessage`; `netlink-sys` carries them.

use std::io;
use std::ops::ControlFlow;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SockDiagMessage, TCP_LISTEN,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::app::Proto;

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
                    ports.push(socket.socket_id.source_port);
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

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;
    use std::net::{TcpListener, TcpStream, UdpSocket};

    use netlink_packet_core::{DoneMessage, NLMSG_ERROR};
    use netlink_packet_sock_diag::inet::{InetResponse, InetResponseHeader};
    use netlink_packet_sock_diag::{SOCK_DIAG_BY_FAMILY, TCP_ESTABLISHED};

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

    /// A reply record as the kernel would send it, framed by `netlink-packet-core`.
    fn record(family: u8, state: u8, port: u16) -> NetlinkMessage<SockDiagMessage> {
        let mut socket_id = if family == AF_INET6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        };
        socket_id.source_port = port;
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
            nlas: std::iter::empty().collect(),
        };
        SockDiagMessage::InetResponse(Box::new(response)).into()
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
        assert_eq!(ports, [80, 81, 443], "UDP keeps every socket");
    }
}
