//! What a reload of the `bgp:` section does to each peer: the pure diff between the running
//! peers and the new ones ([`plan`]), and the report the caller logs and returns
//! ([`SpeakerReload`]).
//!
//! A peer is identified by its `peer_ip` and `peer_port`; an autodiscovered peer (no
//! `peer_ip`) by its position among the autodiscovered peers (the config allows one). So a new
//! address or port is a peer removed (Cease 6/3) and another one added. For a peer in both:
//! - a change of a **session parameter** (what the OPEN or the connection carries: AS numbers,
//!   hold time, TCP MD5 password, TTL, source addresses, and the speaker's router id) resets
//!   that session alone, with Cease / Other Configuration Change (6/6, RFC 4486);
//! - a change of **route attributes** only (communities, origin, MED, `LOCAL_PREF`, `NEXT_HOP`)
//!   is sent as UPDATEs on the running session, for the prefixes whose attributes changed;
//! - new **BFD** timers go to the running BFD session (a Poll Sequence, RFC 5880 §6.8.3) and a
//!   new `bfd.strict` applies at the next connection; turning BFD on or off resets the session.

pub use crate::config::NotApplied;
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use serde::Serialize;

use crate::config::PeerConfig;

/// How the speaker recognises a peer across reloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerKey {
    /// A configured `peer_ip` and `peer_port`.
    Address(SocketAddr),
    /// The n-th peer without `peer_ip` (the default gateway).
    Autodiscovered(usize),
}

impl fmt::Display for PeerKey {
    /// The peer's address as logs and metrics name it (the port only when not 179), or
    /// `autodiscover`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(a) if a.port() == crate::config::BGP_PORT => write!(f, "{}", a.ip()),
            Self::Address(a) => write!(f, "{a}"),
            Self::Autodiscovered(0) => f.write_str("autodiscover"),
            Self::Autodiscovered(n) => write!(f, "autodiscover#{n}"),
        }
    }
}

/// The key of each peer, in config order.
pub fn keys(peers: &[PeerConfig]) -> Vec<PeerKey> {
    let mut autodiscovered = 0;
    peers
        .iter()
        .map(|p| {
            if let Some(ip) = p.peer_ip {
                PeerKey::Address(SocketAddr::new(ip, p.peer_port))
            } else {
                autodiscovered += 1;
                PeerKey::Autodiscovered(autodiscovered - 1)
            }
        })
        .collect()
}

/// What a reload does to one peer of the new configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// New: its session starts.
    Add,
    /// Nothing of it changed.
    Keep,
    /// Only route attributes changed (the keys named): UPDATEs on the running session.
    Update(Vec<&'static str>),
    /// Session parameters changed (the keys named): Cease 6/6, then a new session.
    Reset(Vec<&'static str>),
}

/// The diff of a reload: an action per new peer (in the new config's order) and the peers
/// that are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub peers: Vec<(PeerKey, Action)>,
    pub removed: Vec<PeerKey>,
}

/// Compares the running peers (and router id) with the new ones.
pub fn plan(
    old: &[PeerConfig],
    old_router_id: Ipv4Addr,
    new: &[PeerConfig],
    new_router_id: Ipv4Addr,
) -> Plan {
    let old_keys = keys(old);
    let new_keys = keys(new);
    let peers = new_keys
        .iter()
        .zip(new)
        .map(|(key, peer)| {
            let action = match old_keys.iter().position(|k| k == key) {
                None => Action::Add,
                Some(i) => {
                    let mut session = session_changes(&old[i], peer);
                    if old_router_id != new_router_id {
                        session.push("router_id");
                    }
                    let attributes = attribute_changes(&old[i], peer);
                    if !session.is_empty() {
                        Action::Reset(session)
                    } else if !attributes.is_empty() {
                        Action::Update(attributes)
                    } else {
                        Action::Keep
                    }
                }
            };
            (*key, action)
        })
        .collect();
    let removed = old_keys
        .into_iter()
        .filter(|k| !new_keys.contains(k))
        .collect();
    Plan { peers, removed }
}

/// The session parameters that differ: what only a new OPEN or a new connection can carry.
fn session_changes(old: &PeerConfig, new: &PeerConfig) -> Vec<&'static str> {
    // Destructured in full, so a new key of `PeerConfig` does not compile until it is sorted
    // here or in `attribute_changes`.
    let PeerConfig {
        local_as,
        peer_as,
        peer_ip: _,
        peer_port: _,
        local_ip,
        local_ipv6,
        password,
        multihop,
        hold_time,
        communities: _,
        origin: _,
        next_hop: _,
        med: _,
        local_pref: _,
        drain_local_pref: _,
        passive,
        bfd,
    } = new;
    let mut changed = Vec::new();
    let mut check = |key, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    check("local_as", *local_as != old.local_as);
    check("peer_as", *peer_as != old.peer_as);
    check("local_ip", *local_ip != old.local_ip);
    // The IPv6 next hop is chosen once, when the session comes up.
    check("local_ipv6", *local_ipv6 != old.local_ipv6);
    check("password", *password != old.password);
    check("multihop", *multihop != old.multihop);
    check("hold_time", *hold_time != old.hold_time);
    // A passive session waits for the peer; an active one connects: a new session either way.
    check("passive", *passive != old.passive);
    // Turning BFD on or off changes whether the session waits for it; new timers or `strict`
    // are taken by the running sessions (`attribute_changes`).
    check("bfd", bfd.is_some() != old.bfd.is_some());
    changed
}

/// What a running session takes in place: route attributes (sent as UPDATEs) and BFD's
/// timers and strictness.
fn attribute_changes(old: &PeerConfig, new: &PeerConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |key, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    check("communities", new.communities != old.communities);
    check("origin", new.origin != old.origin);
    check("next_hop", new.next_hop != old.next_hop);
    check("med", new.med != old.med);
    check("local_pref", new.local_pref != old.local_pref);
    check(
        "drain_local_pref",
        new.drain_local_pref != old.drain_local_pref,
    );
    // The BFD session takes new timers with a Poll Sequence (RFC 5880 §6.8.3), and the BGP
    // session reads `strict` when it next connects: neither resets BGP.
    check(
        "bfd",
        new.bfd.is_some() && old.bfd.is_some() && new.bfd != old.bfd,
    );
    changed
}

/// What a reload of the `bgp:` section did, for the log and `POST /reload`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SpeakerReload {
    /// Peers whose session started.
    pub added: Vec<String>,
    /// Peers whose session closed with Cease / Peer De-configured (6/3); the peer drops our
    /// routes with it.
    pub removed: Vec<String>,
    /// Peers whose session was reset (Cease 6/6) because these session parameters changed.
    pub reset: Vec<PeerChange>,
    /// Peers sent new UPDATEs on their running session because these attributes changed.
    pub updated: Vec<PeerChange>,
    /// Section-wide keys applied live (`bgp.listen_port`, `bgp.graceful_shutdown`).
    pub applied: Vec<&'static str>,
    /// Changes left out, with why; the running value stays.
    pub not_applied: Vec<NotApplied>,
}

impl SpeakerReload {
    /// Whether the reload changed nothing (and refused nothing).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A peer and the keys of it that changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerChange {
    pub peer: String,
    pub keys: Vec<&'static str>,
}

impl fmt::Display for SpeakerReload {
    /// One line for the log: `added [..] removed [..] reset [peer (keys)] ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let changes = |list: &[PeerChange]| {
            list.iter()
                .map(|c| format!("{} ({})", c.peer, c.keys.join(", ")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let not_applied = self
            .not_applied
            .iter()
            .map(|n| format!("{}: {}", n.key, n.reason))
            .collect::<Vec<_>>()
            .join("; ");
        write!(
            f,
            "added [{}] removed [{}] reset [{}] updated [{}] applied [{}] not applied [{not_applied}]",
            self.added.join(", "),
            self.removed.join(", "),
            changes(&self.reset),
            changes(&self.updated),
            self.applied.join(", "),
        )
    }
}

/// The MD5 keys the listener needs: one per peer with both an address and a password.
pub fn listener_keys(peers: &[PeerConfig]) -> Vec<(IpAddr, String)> {
    peers
        .iter()
        .filter_map(|p| Some((p.peer_ip?, p.password.clone()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{app::Community, config::Origin};

    const ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    fn peer(ip: &str) -> PeerConfig {
        PeerConfig {
            local_as: 65001,
            peer_as: 65000,
            peer_ip: Some(ip.parse().unwrap()),
            peer_port: 179,
            local_ip: None,
            local_ipv6: None,
            password: None,
            multihop: None,
            hold_time: Duration::from_secs(90),
            communities: vec!["65001:100".parse().unwrap()],
            origin: Origin::Igp,
            next_hop: None,
            med: None,
            local_pref: None,
            drain_local_pref: 0,
            passive: false,
            bfd: None,
        }
    }

    fn autodiscovered() -> PeerConfig {
        PeerConfig {
            peer_ip: None,
            ..peer("198.18.0.9")
        }
    }

    fn key(ip: &str) -> PeerKey {
        PeerKey::Address(SocketAddr::new(ip.parse().unwrap(), 179))
    }

    #[test]
    fn new_bfd_timers_or_strictness_update_the_running_session_without_a_reset() {
        let with_bfd = PeerConfig {
            bfd: Some(crate::config::BfdConfig::default()),
            ..peer("198.18.0.2")
        };
        let faster = PeerConfig {
            bfd: Some(crate::config::BfdConfig {
                min_tx: Duration::from_millis(100),
                strict: false,
                ..crate::config::BfdConfig::default()
            }),
            ..with_bfd.clone()
        };
        let p = plan(std::slice::from_ref(&with_bfd), ID, &[faster], ID);
        assert_eq!(
            p.peers,
            vec![(key("198.18.0.2"), Action::Update(vec!["bfd"]))]
        );
        let off = PeerConfig {
            bfd: None,
            ..with_bfd.clone()
        };
        let p = plan(&[with_bfd], ID, &[off], ID);
        assert_eq!(
            p.peers,
            vec![(key("198.18.0.2"), Action::Reset(vec!["bfd"]))]
        );
    }

    /// One edit of the peer `198.18.0.2`, and what a reload must do about it.
    #[test]
    fn each_changed_key_resets_the_session_or_only_updates_its_routes() {
        type Edit = fn(&mut PeerConfig);
        let cases: &[(&str, Edit, Action)] = &[
            ("nothing", |_| {}, Action::Keep),
            (
                "local_as",
                |p| p.local_as = 65002,
                Action::Reset(vec!["local_as"]),
            ),
            (
                "peer_as",
                |p| p.peer_as = 65003,
                Action::Reset(vec!["peer_as"]),
            ),
            (
                "hold_time",
                |p| p.hold_time = Duration::from_secs(30),
                Action::Reset(vec!["hold_time"]),
            ),
            (
                "password",
                |p| p.password = Some("s3cret".into()),
                Action::Reset(vec!["password"]),
            ),
            (
                "multihop",
                |p| p.multihop = Some(2),
                Action::Reset(vec!["multihop"]),
            ),
            (
                "passive",
                |p| p.passive = true,
                Action::Reset(vec!["passive"]),
            ),
            (
                "local_ip",
                |p| p.local_ip = Some("198.18.0.1".parse().unwrap()),
                Action::Reset(vec!["local_ip"]),
            ),
            (
                "local_ipv6",
                |p| p.local_ipv6 = Some("2001:db8::1".parse().unwrap()),
                Action::Reset(vec!["local_ipv6"]),
            ),
            (
                "bfd turned on",
                |p| p.bfd = Some(crate::config::BfdConfig::default()),
                Action::Reset(vec!["bfd"]),
            ),
            (
                "communities",
                |p| p.communities.push(Community::Large(65001, 1, 2)),
                Action::Update(vec!["communities"]),
            ),
            (
                "origin",
                |p| p.origin = Origin::Egp,
                Action::Update(vec!["origin"]),
            ),
            (
                "next_hop",
                |p| p.next_hop = Some("198.18.0.5".parse().unwrap()),
                Action::Update(vec!["next_hop"]),
            ),
            ("med", |p| p.med = Some(10), Action::Update(vec!["med"])),
            (
                "local_pref",
                |p| p.local_pref = Some(200),
                Action::Update(vec!["local_pref"]),
            ),
            (
                "med and communities",
                |p| {
                    p.med = Some(10);
                    p.communities.clear();
                },
                Action::Update(vec!["communities", "med"]),
            ),
            (
                "a session key beside attributes",
                |p| {
                    p.med = Some(10);
                    p.hold_time = Duration::from_secs(30);
                },
                Action::Reset(vec!["hold_time"]),
            ),
        ];
        for (what, edit, expected) in cases {
            let old = [peer("198.18.0.2")];
            let mut new = old.clone();
            edit(&mut new[0]);
            let plan = plan(&old, ID, &new, ID);
            assert_eq!(
                plan.peers,
                [(key("198.18.0.2"), expected.clone())],
                "{what}"
            );
            assert!(plan.removed.is_empty(), "{what}");
        }
    }

    #[test]
    fn only_the_changed_peer_is_touched_and_added_or_removed_peers_are_listed() {
        let old = [peer("198.18.0.2"), peer("198.18.0.6"), peer("198.18.0.10")];
        let mut changed = peer("198.18.0.6");
        changed.hold_time = Duration::from_secs(30);
        // .10 goes, .14 arrives first, .2 gets a MED.
        let mut with_med = peer("198.18.0.2");
        with_med.med = Some(5);
        let new = [peer("198.18.0.14"), with_med, changed];
        let plan = plan(&old, ID, &new, ID);
        assert_eq!(
            plan.peers,
            [
                (key("198.18.0.14"), Action::Add),
                (key("198.18.0.2"), Action::Update(vec!["med"])),
                (key("198.18.0.6"), Action::Reset(vec!["hold_time"])),
            ]
        );
        assert_eq!(plan.removed, [key("198.18.0.10")]);
    }

    #[test]
    fn a_new_port_or_address_is_another_peer() {
        let old = [peer("198.18.0.2")];
        let mut moved = peer("198.18.0.2");
        moved.peer_port = 1179;
        let plan = plan(&old, ID, &[moved], ID);
        let new_key = PeerKey::Address("198.18.0.2:1179".parse().unwrap());
        assert_eq!(plan.peers, [(new_key, Action::Add)]);
        assert_eq!(plan.removed, [key("198.18.0.2")]);
        assert_eq!(new_key.to_string(), "198.18.0.2:1179");
        assert_eq!(key("198.18.0.2").to_string(), "198.18.0.2");
    }

    #[test]
    fn a_new_router_id_resets_every_kept_peer_but_not_the_added_ones() {
        let old = [peer("198.18.0.2")];
        let new = [peer("198.18.0.2"), peer("198.18.0.6")];
        let plan = plan(&old, ID, &new, Ipv4Addr::new(192, 0, 2, 9));
        assert_eq!(
            plan.peers,
            [
                (key("198.18.0.2"), Action::Reset(vec!["router_id"])),
                (key("198.18.0.6"), Action::Add),
            ]
        );
    }

    #[test]
    fn an_autodiscovered_peer_is_known_by_its_position() {
        let old = [autodiscovered()];
        let mut new = autodiscovered();
        new.med = Some(1);
        let plan = plan(&old, ID, &[peer("198.18.0.2"), new], ID);
        assert_eq!(
            plan.peers,
            [
                (key("198.18.0.2"), Action::Add),
                (PeerKey::Autodiscovered(0), Action::Update(vec!["med"])),
            ]
        );
        assert!(plan.removed.is_empty());
        assert_eq!(PeerKey::Autodiscovered(0).to_string(), "autodiscover");
    }

    #[test]
    fn from_no_peers_everything_is_added_and_to_no_peers_everything_removed() {
        let peers = [peer("198.18.0.2"), autodiscovered()];
        let up = plan(&[], ID, &peers, ID);
        assert!(up.peers.iter().all(|(_, a)| *a == Action::Add));
        assert!(up.removed.is_empty());
        let down = plan(&peers, ID, &[], ID);
        assert!(down.peers.is_empty());
        assert_eq!(
            down.removed,
            [key("198.18.0.2"), PeerKey::Autodiscovered(0)]
        );
    }

    #[test]
    fn the_report_reads_on_one_line() {
        let report = SpeakerReload {
            added: vec!["198.18.0.6".into()],
            reset: vec![PeerChange {
                peer: "198.18.0.2".into(),
                keys: vec!["hold_time"],
            }],
            not_applied: vec![NotApplied {
                key: "bgp.listen_port",
                reason: "port 179 is taken; needs a restart".into(),
            }],
            ..SpeakerReload::default()
        };
        assert_eq!(
            report.to_string(),
            "added [198.18.0.6] removed [] reset [198.18.0.2 (hold_time)] updated [] applied [] \
             not applied [bgp.listen_port: port 179 is taken; needs a restart]"
        );
        assert!(!report.is_empty());
        assert!(SpeakerReload::default().is_empty());
    }
}
