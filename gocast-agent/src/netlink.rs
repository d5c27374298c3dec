//! Netlink: the VIP addresses on `lo` and the routing questions the agent asks the kernel.
//!
//! [`Netlink`] owns one rtnetlink connection. The socket lives in the network namespace of the
//! thread that opened it, so everything it does happens there, whichever thread later polls it.
//!
//! Addresses the agent adds carry [`ADDR_PROTO`] in `IFA_PROTO`; [`Netlink::owned_vips`] lists
//! exactly those, which is how a restart after a crash finds what it must clean up without
//! touching addresses an operator or another tool put on `lo`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use nix::errno::Errno;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{
        AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol,
        AddressScope,
    },
    link::{LinkAttribute, LinkInfo, LinkMessage, LinkXdp},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType, RouteVia},
};
use rtnetlink::{AddressMessageBuilder, Handle, LinkUnspec, MulticastGroup, RouteMessageBuilder};
use tokio::sync::mpsc;
use tracing::debug;

use crate::app::Vip;

/// The `IFA_PROTO` value on every address this agent adds to `lo`.
///
/// Marks addresses this agent added, so a restart after a crash removes exactly those and
/// nothing else. 0xc7 is unused by the kernel (which uses 1–3) and by iproute2's
/// `rt_addrprotos`; the kernel keeps and reports it since Linux 6.1.
pub const ADDR_PROTO: u8 = 0xc7;

/// A failed netlink operation; the message says what the agent was doing.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink needs a tokio runtime to drive its connection")]
    NoRuntime,
    #[error("cannot open a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("there is no interface named lo")]
    NoLoopback,
    #[error("cannot {action} lo")]
    Loopback {
        action: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot add {vip} to lo")]
    AddAddress {
        vip: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot remove {vip} from lo")]
    RemoveAddress {
        vip: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot list the addresses of interface {index}")]
    ListAddresses {
        index: u32,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot look up the route toward {dest}")]
    RouteLookup {
        dest: IpAddr,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot look up interface {name}")]
    LinkByName {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot look up interface {index}")]
    LinkLookup {
        index: u32,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot list the interfaces")]
    ListLinks(#[source] rtnetlink::Error),
    #[error("cannot list the addresses of the interfaces")]
    ListAllAddresses(#[source] rtnetlink::Error),
    #[error("cannot list the IPv4 routes")]
    ListRoutes(#[source] rtnetlink::Error),
    #[error("cannot subscribe to the kernel's address events")]
    Subscribe(#[source] std::io::Error),
    #[error(
        "{vip} is already on lo and was not added by gocast (label {label:?}); remove it or choose another vip"
    )]
    NotOurs { vip: String, label: Option<String> },
}

/// One rtnetlink connection, plus the index of `lo` where VIPs live.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    lo_index: u32,
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace, driven by a task on the
    /// current tokio runtime, and resolves `lo`.
    ///
    /// Also sets `lo` up: it is down in a fresh network namespace, and a VIP on a down `lo`
    /// answers nothing. On a host it is already up, and setting it up again changes nothing.
    pub async fn new() -> Result<Self, NetlinkError> {
        // `tokio::spawn` would panic outside a runtime; an error is kinder to callers.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(NetlinkError::NoRuntime);
        }
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(connection);

        let lo = handle
            .link()
            .get()
            .match_name("lo")
            .execute()
            .try_next()
            .await
            .map_err(|source| NetlinkError::Loopback {
                action: "look up",
                source,
            })?
            .ok_or(NetlinkError::NoLoopback)?;
        let lo_index = lo.header.index;
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo_index).up().build())
            .execute()
            .await
            .map_err(|source| NetlinkError::Loopback {
                action: "set up",
                source,
            })?;
        Ok(Self { handle, lo_index })
    }

    /// Adds the VIP (its address and prefix length, [`Vip::net`]) to `lo`, marked with
    /// [`ADDR_PROTO`] and, for IPv4, labelled `label` (IPv6 addresses have no labels).
    ///
    /// Idempotent: an address that is already there counts as added, even if someone else put
    /// it there (it then keeps their marker, so [`Self::owned_vips`] will not list it).
    pub async fn add_vip(&self, vip: &Vip, label: &str) -> Result<(), NetlinkError> {
        let net = vip.net();
        let mut request = self
            .handle
            .address()
            .add(self.lo_index, net.addr(), net.prefix_len());
        let message = request.message_mut();
        message
            .attributes
            .push(AddressAttribute::Protocol(AddressProtocol::Other(
                ADDR_PROTO,
            )));
        match net {
            IpNet::V4(_) => message
                .attributes
                .push(AddressAttribute::Label(label.to_owned())),
            // A VIP is on every host announcing it, so duplicate address detection would
            // only ever delay it (lo skips DAD anyway; the flag says so explicitly).
            // A /128 gets no prefix route: the kernel's local route already delivers it, and
            // Linux walks every IPv6 route when an address is deleted, so a redundant
            // route per VIP made removing one of 4,000 VIPs 3x slower (docs/benchmarks.md).
            IpNet::V6(v6) => {
                message.header.flags = AddressHeaderFlags::Nodad;
                let mut flags = AddressFlags::Nodad;
                if v6.prefix_len() == 128 {
                    flags |= AddressFlags::Noprefixroute;
                }
                message.attributes.push(AddressAttribute::Flags(flags));
            }
        }
        match request.execute().await {
            Err(e) if errno(&e) == Some(Errno::EEXIST) => self.adopt(vip, label).await,
            result => result.map_err(|source| NetlinkError::AddAddress {
                vip: vip.to_string(),
                source,
            }),
        }
    }

    /// The VIP is already on `lo`: it is ours if it carries our marker, or the label this app
    /// would get (an address GoCast or an older agent left for this very app). Anything else
    /// belongs to someone else, and removing it later would break their service.
    async fn adopt(&self, vip: &Vip, label: &str) -> Result<(), NetlinkError> {
        let existing = self
            .addresses_of(self.lo_index)
            .await?
            .into_iter()
            .find(|m| address_net(m).is_some_and(|n| n.addr() == vip.addr()));
        let Some(m) = existing else {
            // Gone again in the meantime: adding once more settles it.
            return Err(NetlinkError::NotOurs {
                vip: vip.to_string(),
                label: None,
            });
        };
        let ours = m
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Protocol(p) if u8::from(*p) == ADDR_PROTO));
        let their_label = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Label(l) => Some(l.clone()),
            _ => None,
        });
        if ours || their_label.as_deref() == Some(label) {
            Ok(())
        } else {
            Err(NetlinkError::NotOurs {
                vip: vip.to_string(),
                label: their_label,
            })
        }
    }

    /// Removes the VIP from `lo`. Idempotent: an address that is not there counts as removed.
    pub async fn remove_vip(&self, vip: &Vip) -> Result<(), NetlinkError> {
        self.remove_address(vip.net()).await
    }

    /// Removes an address from `lo`; an address that is not there counts as removed.
    pub async fn remove_address(&self, net: IpNet) -> Result<(), NetlinkError> {
        let message = match net {
            IpNet::V4(n) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(self.lo_index)
                .address(n.addr(), n.prefix_len())
                .build(),
            IpNet::V6(n) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(self.lo_index)
                .address(n.addr(), n.prefix_len())
                .build(),
        };
        match self.handle.address().del(message).execute().await {
            Err(e) if errno(&e) == Some(Errno::EADDRNOTAVAIL) => Ok(()),
            result => result.map_err(|source| NetlinkError::RemoveAddress {
                vip: net.to_string(),
                source,
            }),
        }
    }

    /// The addresses on `lo` that carry [`ADDR_PROTO`], both families, with their label
    /// (always `None` for IPv6, which has no labels).
    pub async fn owned_vips(&self) -> Result<Vec<(IpNet, Option<String>)>, NetlinkError> {
        let addresses = self.addresses_of(self.lo_index).await?;
        let owned = addresses
            .into_iter()
            .filter(|m| {
                m.attributes.iter().any(
                    |a| matches!(a, AddressAttribute::Protocol(p) if u8::from(*p) == ADDR_PROTO),
                )
            })
            .filter_map(|m| {
                let net = address_net(&m)?;
                let label = m.attributes.into_iter().find_map(|a| match a {
                    AddressAttribute::Label(l) => Some(l),
                    _ => None,
                });
                Some((net, label))
            })
            .collect();
        Ok(owned)
    }

    /// Every address on `lo`, both families, in one dump: self-repair checks that each VIP
    /// is still there.
    pub async fn lo_addresses(&self) -> Result<std::collections::HashSet<IpAddr>, NetlinkError> {
        let addresses = self.addresses_of(self.lo_index).await?;
        Ok(addresses
            .iter()
            .filter_map(address_net)
            .map(|n| n.addr())
            .collect())
    }

    /// Every address of every interface with the interface's name, in two dumps (links, then
    /// addresses): what no VIP may cover (docs/security.md, "Safe VIPs"). Left out: the
    /// addresses this agent put on `lo` (marked with [`ADDR_PROTO`]) and loopback addresses
    /// (127/8, `::1`), which no VIP can be anyway.
    pub async fn interface_addresses(&self) -> Result<Vec<(IpAddr, String)>, NetlinkError> {
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::ListLinks)?;
        let names: std::collections::HashMap<u32, String> = links
            .into_iter()
            .filter_map(|l| {
                let name = l.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n),
                    _ => None,
                })?;
                Some((l.header.index, name))
            })
            .collect();
        let addresses: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::ListAllAddresses)?;
        Ok(addresses
            .iter()
            .filter(|m| {
                !m.attributes.iter().any(
                    |a| matches!(a, AddressAttribute::Protocol(p) if u8::from(*p) == ADDR_PROTO),
                )
            })
            .filter_map(|m| {
                let addr = address_net(m)?.addr();
                if addr.is_loopback() {
                    return None;
                }
                let name = names
                    .get(&m.header.index)
                    .cloned()
                    .unwrap_or_else(|| format!("#{}", m.header.index));
                Some((addr, name))
            })
            .collect())
    }

    /// The ids of the XDP programs attached to `interface`, in any mode; empty if none (or no
    /// such interface).
    pub async fn xdp_program_ids(&self, interface: &str) -> Result<Vec<u32>, NetlinkError> {
        let link = match self.link_named(interface).await {
            Err(NetlinkError::LinkByName { source, .. })
                if errno(&source) == Some(Errno::ENODEV) =>
            {
                return Ok(Vec::new());
            }
            other => other?,
        };
        let xdp = link
            .into_iter()
            .flat_map(|l| l.attributes)
            .filter_map(|a| match a {
                LinkAttribute::Xdp(xdp) => Some(xdp),
                _ => None,
            });
        Ok(xdp
            .flatten()
            .filter_map(|x| match x {
                LinkXdp::ProgId(id)
                | LinkXdp::DrvProgId(id)
                | LinkXdp::SkbProgId(id)
                | LinkXdp::HwProgId(id) => Some(id),
                _ => None,
            })
            .filter(|id| *id != 0)
            .collect())
    }

    /// Follows the kernel's address events (`RTNLGRP_IPV4_IFADDR`, `RTNLGRP_IPV6_IFADDR`) on a
    /// connection of its own and sends each address that leaves `lo` (the lifecycle decides
    /// whether it was drift). The task ends when the receiver is dropped.
    pub fn watch_lo_removals(&self) -> Result<mpsc::UnboundedReceiver<IpAddr>, NetlinkError> {
        let groups = [MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv6Ifaddr];
        let (connection, handle, mut events) =
            rtnetlink::new_multicast_connection(&groups).map_err(NetlinkError::Subscribe)?;
        let connection = tokio::spawn(connection);
        // Unbounded: the lifecycle takes every queued address each turn, and the kernel
        // reports each removal once (bounded by the addresses there are to remove).
        let (tx, rx) = mpsc::unbounded_channel();
        let lo = self.lo_index;
        tokio::spawn(async move {
            // Holds the connection's handle: without one, the connection would end.
            let _handle = handle;
            loop {
                let event = tokio::select! {
                    () = tx.closed() => break,
                    event = events.next() => event,
                };
                let Some((message, _)) = event else {
                    debug!("the kernel's address events ended");
                    break;
                };
                if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(m)) =
                    message.payload
                    && m.header.index == lo
                    && let Some(net) = address_net(&m)
                    && tx.send(net.addr()).is_err()
                {
                    break;
                }
            }
            connection.abort();
        });
        Ok(rx)
    }

    /// The preferred source address the kernel would use toward `dest` (`ip route get DEST`),
    /// or `None` if `dest` is unroutable (no route, or an unreachable, prohibit or blackhole
    /// route).
    pub async fn source_toward(&self, dest: IpAddr) -> Result<Option<IpAddr>, NetlinkError> {
        Ok(self
            .route_toward(dest)
            .await?
            .as_ref()
            .and_then(pref_source))
    }

    /// The first global address of the given family on the interface the kernel uses toward
    /// `dest`: the next hop to announce for that family over a session with that peer (an IPv6
    /// next hop must be global, RFC 4760; an IPv4 one for routes sent over an IPv6 session).
    pub async fn global_address_toward(
        &self,
        dest: IpAddr,
        v6: bool,
    ) -> Result<Option<IpAddr>, NetlinkError> {
        let Some(oif) = self.oif_toward(dest).await? else {
            return Ok(None);
        };
        let family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        Ok(self.addresses_of(oif).await?.iter().find_map(|m| {
            if m.header.family != family || m.header.scope != AddressScope::Universe {
                return None;
            }
            address_net(m).map(|n| n.addr())
        }))
    }

    /// The name of the interface the kernel sends packets toward `dest` through, or `None` if
    /// `dest` is unroutable or local (the eBPF dataplane attaches there).
    pub async fn interface_toward(&self, dest: IpAddr) -> Result<Option<String>, NetlinkError> {
        let Some(oif) = self.oif_toward(dest).await? else {
            return Ok(None);
        };
        if oif == self.lo_index {
            return Ok(None);
        }
        let link = self
            .handle
            .link()
            .get()
            .match_index(oif)
            .execute()
            .try_next()
            .await
            .map_err(|source| NetlinkError::LinkLookup { index: oif, source })?;
        Ok(link.and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name),
                _ => None,
            })
        }))
    }

    /// Whether `interface` is a virtual device (veth, bridge, bond, vlan, tun, ...): the kernel
    /// names a link kind for those, not for physical NICs.
    pub async fn is_virtual(&self, interface: &str) -> Result<bool, NetlinkError> {
        let link = self.link_named(interface).await?;
        Ok(link.is_some_and(|l| {
            l.attributes.iter().any(|a| {
                matches!(a, LinkAttribute::LinkInfo(infos)
                    if infos.iter().any(|i| matches!(i, LinkInfo::Kind(_))))
            })
        }))
    }

    /// The link called `name`; the kernel answers a name it does not know with `ENODEV`.
    async fn link_named(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        self.handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await
            .map_err(|source| NetlinkError::LinkByName {
                name: name.to_owned(),
                source,
            })
    }

    /// The index of the interface the route toward `dest` leaves through.
    async fn oif_toward(&self, dest: IpAddr) -> Result<Option<u32>, NetlinkError> {
        Ok(self.route_toward(dest).await?.and_then(|route| {
            route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        }))
    }

    /// `ip route get DEST`: the route the kernel would use, or `None` if `dest` is unroutable
    /// (no route, or an unreachable, prohibit or blackhole route).
    async fn route_toward(&self, dest: IpAddr) -> Result<Option<RouteMessage>, NetlinkError> {
        let query = match dest {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        // With a destination this is a single lookup, not a dump: one reply or an error.
        match self.handle.route().get(query).execute().try_next().await {
            Ok(route) => Ok(route),
            // ENETUNREACH: no route; EHOSTUNREACH: unreachable route; EACCES: prohibit route;
            // EINVAL: IPv4 blackhole route. All mean no packet would leave toward `dest`.
            Err(e)
                if matches!(
                    errno(&e),
                    Some(Errno::ENETUNREACH | Errno::EHOSTUNREACH | Errno::EACCES | Errno::EINVAL)
                ) =>
            {
                Ok(None)
            }
            Err(source) => Err(NetlinkError::RouteLookup { dest, source }),
        }
    }

    /// The IPv4 default route of the main table as `(gateway, source)`, or `None` if there is
    /// none with a gateway. With several, the one the kernel uses (lowest metric) wins.
    ///
    /// The source is the route's preferred source if it has one, else the first global address
    /// of its out interface, else the source the kernel would use toward the gateway.
    pub async fn default_gateway(&self) -> Result<Option<(IpAddr, IpAddr)>, NetlinkError> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::ListRoutes)?;
        let best = routes
            .iter()
            .filter(|r| {
                r.header.address_family == AddressFamily::Inet
                    && r.header.destination_prefix_length == 0
                    && r.header.kind == RouteType::Unicast
                    && table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
            })
            .filter_map(|r| Some((r, next_hop(r)?)))
            .min_by_key(|(r, _)| priority(r));
        let Some((route, (gateway, oif))) = best else {
            return Ok(None);
        };
        if let Some(source) = pref_source(route) {
            return Ok(Some((gateway, source)));
        }
        if let Some(oif) = oif {
            let global = self.addresses_of(oif).await?.into_iter().find(|m| {
                m.header.family == AddressFamily::Inet && m.header.scope == AddressScope::Universe
            });
            if let Some(net) = global.as_ref().and_then(address_net) {
                return Ok(Some((gateway, net.addr())));
            }
        }
        Ok(self
            .source_toward(gateway)
            .await?
            .map(|source| (gateway, source)))
    }

    /// All addresses of interface `index`, both families, in kernel order (primary first).
    async fn addresses_of(&self, index: u32) -> Result<Vec<AddressMessage>, NetlinkError> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetlinkError::ListAddresses { index, source })
    }
}

/// The errno of a kernel refusal, if that is what the error is.
fn errno(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| Errno::from_raw(-c.get())),
        _ => None,
    }
}

/// The address of an address message with its prefix length. For IPv4 `IFA_LOCAL` is the
/// address itself (`IFA_ADDRESS` is the peer on point-to-point links); IPv6 only sends
/// `IFA_ADDRESS`.
fn address_net(m: &AddressMessage) -> Option<IpNet> {
    let find = |want_local: bool| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if want_local => Some(*ip),
            AddressAttribute::Address(ip) if !want_local => Some(*ip),
            _ => None,
        })
    };
    let addr = find(true).or_else(|| find(false))?;
    IpNet::new(addr, m.header.prefix_len).ok()
}

/// `RTA_PREFSRC`: the source address the kernel picks for traffic on this route.
fn pref_source(route: &RouteMessage) -> Option<IpAddr> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(addr) => route_ip(addr),
        _ => None,
    })
}

fn route_ip(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// The route's table: `RTA_TABLE` when present (ids above 255 only fit there), else the header.
fn table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// The route's metric; a route without `RTA_PRIORITY` has metric 0.
fn priority(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

/// The gateway and out interface of a route: its own `RTA_GATEWAY` / `RTA_VIA` (an IPv6 next
/// hop for an IPv4 route) and `RTA_OIF`, or those of its first next hop if it is multipath.
fn next_hop(route: &RouteMessage) -> Option<(IpAddr, Option<u32>)> {
    let gateway = |attributes: &[RouteAttribute]| {
        attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(addr) => route_ip(addr),
            RouteAttribute::Via(RouteVia::Inet(a)) => Some(IpAddr::V4(*a)),
            RouteAttribute::Via(RouteVia::Inet6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        })
    };
    if let Some(gw) = gateway(&route.attributes) {
        let oif = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        return Some((gw, oif));
    }
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::MultiPath(hops) => hops.iter().find_map(|hop| {
            let oif = (hop.interface_index != 0).then_some(hop.interface_index);
            Some((gateway(&hop.attributes)?, oif))
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::AppName;
    use crate::testing::in_new_netns;
    use rtnetlink::{LinkDummy, LinkVeth};

    fn vip(s: &str) -> Vip {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn vips_added_to_lo_are_owned_with_their_labels_and_adding_or_removing_twice_is_fine() {
        in_new_netns(|| async {
            let nl = Netlink::new().await.unwrap();
            let long: AppName = "frontend-service-a".parse().unwrap();
            let short: AppName = "web".parse().unwrap();
            let (v4_short, v4_long, v6) = (
                vip("198.18.0.10/32"),
                vip("192.0.2.10/24"),
                vip("2001:db8::10/128"),
            );
            for _ in 0..2 {
                nl.add_vip(&v4_short, &short.lo_label()).await.unwrap();
                nl.add_vip(&v4_long, &long.lo_label()).await.unwrap();
                nl.add_vip(&v6, &short.lo_label()).await.unwrap();
            }
            let mut owned = nl.owned_vips().await.unwrap();
            owned.sort();
            assert_eq!(
                owned,
                vec![
                    (net("192.0.2.10/24"), Some(long.lo_label())),
                    (net("198.18.0.10/32"), Some("lo:web".to_owned())),
                    // IPv6 addresses have no labels.
                    (net("2001:db8::10/128"), None),
                ]
            );
            for _ in 0..2 {
                for v in [&v4_short, &v4_long, &v6] {
                    nl.remove_vip(v).await.unwrap();
                }
            }
            assert_eq!(nl.owned_vips().await.unwrap(), vec![]);
        });
    }

    #[test]
    fn addresses_on_lo_without_the_marker_are_not_owned() {
        in_new_netns(|| async {
            let nl = Netlink::new().await.unwrap();
            for (addr, len) in [("192.0.2.20", 32), ("2001:db8::20", 128)] {
                nl.handle
                    .address()
                    .add(nl.lo_index, addr.parse().unwrap(), len)
                    .execute()
                    .await
                    .unwrap();
            }
            // As an operator would add one, with a label but no marker.
            let status = std::process::Command::new("ip")
                .args([
                    "address",
                    "add",
                    "192.0.2.21/32",
                    "dev",
                    "lo",
                    "label",
                    "lo:other",
                ])
                .status()
                .unwrap();
            assert!(status.success());
            nl.add_vip(&vip("192.0.2.30/32"), "lo:mine").await.unwrap();

            let owned = nl.owned_vips().await.unwrap();
            assert_eq!(
                owned,
                vec![(net("192.0.2.30/32"), Some("lo:mine".to_owned()))]
            );
            // The unmarked addresses are really there (127.0.0.1 and ::1 too).
            let all = nl.addresses_of(nl.lo_index).await.unwrap();
            assert_eq!(all.len(), 6, "{all:#?}");
        });
    }

    #[test]
    fn an_address_someone_else_put_on_lo_is_not_taken_over() {
        in_new_netns(|| async {
            let nl = Netlink::new().await.unwrap();
            let status = std::process::Command::new("ip")
                .args([
                    "address",
                    "add",
                    "192.0.2.40/32",
                    "dev",
                    "lo",
                    "label",
                    "lo:admin",
                ])
                .status()
                .unwrap();
            assert!(status.success());
            let e = nl
                .add_vip(&vip("192.0.2.40/32"), "lo:web")
                .await
                .unwrap_err();
            assert!(matches!(e, NetlinkError::NotOurs { .. }), "{e}");
            assert!(e.to_string().contains("not added by gocast"), "{e}");
            // The label the app would get means it was left for this app (GoCast's own form).
            nl.add_vip(&vip("192.0.2.40/32"), "lo:admin").await.unwrap();
        });
    }

    #[test]
    fn netlink_and_its_futures_can_move_between_threads() {
        fn send<T: Send>(_: &T) {}
        fn sync<T: Send + Sync>() {}
        // Compile-time only: building the futures needs a connection, running them needs root.
        fn futures(nl: &Netlink, v: &Vip) {
            send(&nl.add_vip(v, "lo:x"));
            send(&nl.remove_vip(v));
            send(&nl.owned_vips());
            send(&nl.source_toward(v.addr()));
            send(&nl.default_gateway());
        }
        sync::<Netlink>();
        send(&Netlink::new());
        let _ = futures;
    }

    /// Adds an interface `gc0` that is up with a carrier: a dummy, or where the kernel has no
    /// dummy driver, one end of a veth pair whose other end is up too.
    async fn add_uplink(h: &Handle) -> u32 {
        let dummy = h
            .link()
            .add(LinkDummy::new("gc0").up().build())
            .execute()
            .await;
        if let Err(e) = dummy {
            assert_eq!(errno(&e), Some(Errno::EOPNOTSUPP), "{e}");
            h.link()
                .add(LinkVeth::new("gc0", "gc1").up().build())
                .execute()
                .await
                .unwrap();
            let peer = index_of(h, "gc1").await;
            h.link()
                .set(LinkUnspec::new_with_index(peer).up().build())
                .execute()
                .await
                .unwrap();
        }
        index_of(h, "gc0").await
    }

    async fn index_of(h: &Handle, name: &str) -> u32 {
        let link = h
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await
            .unwrap()
            .unwrap();
        link.header.index
    }

    #[test]
    fn source_and_default_gateway_follow_the_routing_table() {
        in_new_netns(|| async {
            let nl = Netlink::new().await.unwrap();
            let peer: IpAddr = "192.0.2.1".parse().unwrap();
            assert_eq!(nl.default_gateway().await.unwrap(), None);
            assert_eq!(nl.source_toward(peer).await.unwrap(), None);

            let h = &nl.handle;
            let index = add_uplink(h).await;
            h.address()
                .add(index, "198.18.0.1".parse().unwrap(), 30)
                .execute()
                .await
                .unwrap();
            let default = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway("198.18.0.2".parse().unwrap())
                .output_interface(index)
                .build();
            h.route().add(default).execute().await.unwrap();

            let local: IpAddr = "198.18.0.1".parse().unwrap();
            let gateway: IpAddr = "198.18.0.2".parse().unwrap();
            assert_eq!(nl.default_gateway().await.unwrap(), Some((gateway, local)));
            assert_eq!(nl.source_toward(peer).await.unwrap(), Some(local));
            assert_eq!(nl.source_toward(gateway).await.unwrap(), Some(local));
            // No IPv6 route at all.
            assert_eq!(
                nl.source_toward("2001:db8::1".parse().unwrap())
                    .await
                    .unwrap(),
                None
            );
        });
    }
}
