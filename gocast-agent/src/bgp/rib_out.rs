//! Adj-RIB-Out: what one peer has been told, and the smallest set of changes that brings it to
//! what the lifecycle wants announced now.
//!
//! Pure and synchronous: the session feeds it the desired routes (already turned into this
//! peer's attributes) and encodes the [`Changes`] it returns. Prefixes with equal attributes
//! are grouped, so the encoder can pack them into as few UPDATEs as fit. Attributes are shared
//! (`Arc`): apps use a handful of attribute sets, so a route costs its prefix and a pointer,
//! not a copy of its attributes.

use std::{collections::BTreeMap, sync::Arc};

use ipnet::IpNet;

use super::codec::{Attributes, Family};

/// The family of a prefix.
pub fn family_of(prefix: &IpNet) -> Family {
    match prefix {
        IpNet::V4(_) => Family::Ipv4Unicast,
        IpNet::V6(_) => Family::Ipv6Unicast,
    }
}

/// Routes to send, grouped by family and attributes, and prefixes to withdraw, by family.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub announce: Vec<(Family, Arc<Attributes>, Vec<IpNet>)>,
    pub withdraw: Vec<(Family, Vec<IpNet>)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.announce.is_empty() && self.withdraw.is_empty()
    }
}

/// What one peer has been sent since its session came up.
#[derive(Debug, Default)]
pub struct AdjRibOut {
    sent: BTreeMap<IpNet, Arc<Attributes>>,
}

impl AdjRibOut {
    /// Prefixes currently advertised to the peer.
    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// Forgets everything: the session went down, the peer dropped our routes.
    pub fn clear(&mut self) {
        self.sent.clear();
    }

    /// The changes that make the peer's view equal `desired`, which from now on counts as sent.
    /// Only prefixes of `families` (the negotiated ones) are considered.
    pub fn update(
        &mut self,
        desired: &BTreeMap<IpNet, Arc<Attributes>>,
        families: &[Family],
    ) -> Changes {
        let wanted = |p: &IpNet| families.contains(&family_of(p));
        let mut withdraw: BTreeMap<Family, Vec<IpNet>> = BTreeMap::new();
        for prefix in self.sent.keys().filter(|p| !desired.contains_key(p)) {
            withdraw.entry(family_of(prefix)).or_default().push(*prefix);
        }
        let mut announce = Vec::new();
        for (prefix, attrs) in desired.iter().filter(|(p, _)| wanted(p)) {
            if self.sent.get(prefix) != Some(attrs) {
                group(&mut announce, family_of(prefix), attrs, *prefix);
            }
        }
        let changes = Changes {
            announce,
            withdraw: withdraw.into_iter().collect(),
        };
        self.sent = desired
            .iter()
            .filter(|(p, _)| wanted(p))
            .map(|(p, a)| (*p, Arc::clone(a)))
            .collect();
        changes
    }

    /// Everything sent so far, as announcements: the answer to a ROUTE-REFRESH.
    pub fn all(&self, family: Family) -> Changes {
        let mut announce = Vec::new();
        for (prefix, attrs) in self.sent.iter().filter(|(p, _)| family_of(p) == family) {
            group(&mut announce, family, attrs, *prefix);
        }
        Changes {
            announce,
            withdraw: Vec::new(),
        }
    }
}

/// Adds a prefix to the group of its family and attributes. Apps share a handful of attribute
/// sets, so a linear search beats hashing the attributes.
fn group(
    groups: &mut Vec<(Family, Arc<Attributes>, Vec<IpNet>)>,
    family: Family,
    attrs: &Arc<Attributes>,
    prefix: IpNet,
) {
    match groups
        .iter_mut()
        .find(|(f, a, _)| *f == family && a == attrs)
    {
        Some((_, _, prefixes)) => prefixes.push(prefix),
        None => groups.push((family, Arc::clone(attrs), vec![prefix])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::codec::Origin;

    fn attrs(community: u32) -> Arc<Attributes> {
        Arc::new(Attributes {
            origin: Origin::Igp,
            as_path: vec![65001],
            med: None,
            local_pref: None,
            communities: vec![community],
            large_communities: Vec::new(),
        })
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    const BOTH: [Family; 2] = [Family::Ipv4Unicast, Family::Ipv6Unicast];

    /// A RIB that sent `192.0.2.1/32` and `2001:db8::1/128`, both with `attrs(1)`.
    fn sent_one_of_each() -> AdjRibOut {
        let mut rib = AdjRibOut::default();
        rib.update(
            &BTreeMap::from([
                (net("192.0.2.1/32"), attrs(1)),
                (net("2001:db8::1/128"), attrs(1)),
            ]),
            &BOTH,
        );
        rib
    }

    #[test]
    fn a_new_peer_gets_everything_grouped_by_family_and_attributes() {
        let mut rib = AdjRibOut::default();
        let desired = BTreeMap::from([
            (net("192.0.2.1/32"), attrs(1)),
            (net("192.0.2.2/32"), attrs(1)),
            (net("192.0.2.3/32"), attrs(2)),
            (net("2001:db8::1/128"), attrs(1)),
        ]);
        let c = rib.update(&desired, &BOTH);
        assert!(c.withdraw.is_empty());
        assert_eq!(c.announce.len(), 3);
        assert_eq!(
            c.announce[0],
            (
                Family::Ipv4Unicast,
                attrs(1),
                vec![net("192.0.2.1/32"), net("192.0.2.2/32")]
            )
        );
        assert_eq!(rib.len(), 4);
    }

    #[test]
    fn nothing_changed_sends_nothing() {
        let mut rib = AdjRibOut::default();
        let desired = BTreeMap::from([(net("192.0.2.1/32"), attrs(1))]);
        rib.update(&desired, &BOTH);
        assert!(rib.update(&desired, &BOTH).is_empty());
    }

    #[test]
    fn a_removed_route_is_withdrawn_and_a_changed_one_is_re_announced() {
        let mut rib = sent_one_of_each();
        let c = rib.update(&BTreeMap::from([(net("192.0.2.1/32"), attrs(2))]), &BOTH);
        assert_eq!(
            c.withdraw,
            vec![(Family::Ipv6Unicast, vec![net("2001:db8::1/128")])]
        );
        assert_eq!(
            c.announce,
            vec![(Family::Ipv4Unicast, attrs(2), vec![net("192.0.2.1/32")])]
        );
    }

    #[test]
    fn families_the_peer_did_not_negotiate_are_left_out() {
        let mut rib = AdjRibOut::default();
        let c = rib.update(
            &BTreeMap::from([(net("2001:db8::1/128"), attrs(1))]),
            &[Family::Ipv4Unicast],
        );
        assert!(c.is_empty() && rib.is_empty());
    }

    #[test]
    fn route_refresh_resends_what_was_sent() {
        let mut rib = sent_one_of_each();
        let c = rib.all(Family::Ipv4Unicast);
        assert_eq!(
            c.announce,
            vec![(Family::Ipv4Unicast, attrs(1), vec![net("192.0.2.1/32")])]
        );
        rib.clear();
        assert!(rib.all(Family::Ipv4Unicast).is_empty());
    }
}
