//! The catalog side of Consul discovery: `GET /v1/catalog/node/{node}` parsed into typed
//! values, and each service tagged `enable_gocast` turned into an [`AppSpec`].
//!
//! Tags are GoCast's: `enable_gocast` (required), `gocast_vip=` (one), `gocast_vip_communities=`
//! (comma list), `gocast_monitor=` and `gocast_nat=` (repeatable). Every problem is reported per
//! service, naming the service and the tag, so one badly tagged service never stops the others.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::Deserialize;

use crate::app::{
    AppName, AppSpec, Community, Monitor, NatRule, ParseError, Vip, nat_dest_usable,
    parse_community_list,
};

/// The tag that makes a service an app.
pub const ENABLE_TAG: &str = "enable_gocast";

/// `GET /v1/catalog/node/{node}`: the node and its services by service ID. Consul answers
/// `null` for a node it does not know, hence the `Option` in [`parse_node`].
#[derive(Debug, Clone, Deserialize)]
pub struct CatalogNode {
    /// Required, so an answer that is not a node (`{}`, `[]`, a proxy's JSON) is malformed
    /// rather than "a node without services", which would remove every Consul app.
    #[serde(rename = "Node")]
    pub node: NodeInfo,
    #[serde(rename = "Services", default)]
    pub services: Option<BTreeMap<String, CatalogService>>,
}

/// The node itself; only its name is read.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeInfo {
    #[serde(rename = "Node")]
    pub name: String,
}

/// One service instance on the node, with the fields discovery reads.
#[derive(Debug, Clone, Deserialize)]
pub struct CatalogService {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Service")]
    pub service: String,
    #[serde(rename = "Tags", default)]
    pub tags: Option<Vec<String>>,
    /// The service's own address; empty when it uses the node's.
    #[serde(rename = "Address", default)]
    pub address: String,
}

/// Parses the body of `/v1/catalog/node/{node}`; `Ok(None)` is Consul's `null` (unknown node).
pub fn parse_node(body: &[u8]) -> Result<Option<CatalogNode>, serde_json::Error> {
    // serde would also build a struct from a JSON array; Consul only ever sends an object.
    match serde_json::from_slice::<Option<serde_json::Value>>(body)? {
        None => Ok(None),
        Some(v @ serde_json::Value::Object(_)) => serde_json::from_value(v).map(Some),
        Some(_) => Err(serde::de::Error::custom("expected a JSON object or null")),
    }
}

/// Why one service was not made an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    /// The Consul service name.
    pub service: String,
    /// The tag at fault, when one tag is.
    pub tag: Option<String>,
    pub reason: String,
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tag {
            Some(tag) => write!(
                f,
                "service {:?}, tag {tag:?}: {}",
                self.service, self.reason
            ),
            None => write!(f, "service {:?}: {}", self.service, self.reason),
        }
    }
}

/// What one catalog read yields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovered {
    /// One app per well-tagged service, in service-ID order.
    pub apps: Vec<AppSpec>,
    /// Services tagged `enable_gocast` that could not be made apps.
    pub refused: Vec<ServiceError>,
}

impl Discovered {
    /// Names of refused services that are valid app names: their current app (from an earlier,
    /// good read) is kept as it is rather than removed.
    pub fn keep(&self) -> Vec<AppName> {
        self.refused
            .iter()
            .filter_map(|e| e.service.parse().ok())
            .collect()
    }
}

/// Policy for what tags may ask for.
#[derive(Debug, Clone, Copy, Default)]
pub struct TagPolicy {
    /// Allow `gocast_monitor=exec:..` (see `agent.allow_consul_exec`).
    pub allow_exec: bool,
}

/// Turns the node's services into apps; services without `enable_gocast` are ignored.
pub fn discover(node: &CatalogNode, policy: TagPolicy) -> Discovered {
    let mut out = Discovered::default();
    // Service ID -> app name of the first instance of each service: two instances of one
    // service on a node would be two apps with one name.
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (id, svc) in node.services.iter().flatten() {
        let tags = svc.tags.as_deref().unwrap_or_default();
        if !tags.iter().any(|t| t == ENABLE_TAG) {
            continue;
        }
        if let Some(first) = seen.get(&svc.service) {
            out.refused.push(ServiceError {
                service: svc.service.clone(),
                tag: None,
                reason: format!(
                    "instance {id:?} ignored: instance {first:?} of the same service is already the app"
                ),
            });
            continue;
        }
        seen.insert(svc.service.clone(), id.clone());
        match service_app(svc, policy) {
            Ok(spec) => out.apps.push(spec),
            Err(e) => out.refused.push(e),
        }
    }
    out
}

/// One service's app, or the first problem found in its tags.
pub fn service_app(svc: &CatalogService, policy: TagPolicy) -> Result<AppSpec, ServiceError> {
    let err = |tag: Option<&str>, reason: String| ServiceError {
        service: svc.service.clone(),
        tag: tag.map(str::to_owned),
        reason,
    };
    let name: AppName = svc
        .service
        .parse()
        .map_err(|e: ParseError| err(None, e.to_string()))?;
    let mut vip: Option<(Vip, &str)> = None;
    let mut monitors: Vec<Monitor> = Vec::new();
    let mut nats: Vec<NatRule> = Vec::new();
    let mut communities: Vec<Community> = Vec::new();
    let mut passive_health = false;
    for tag in svc.tags.as_deref().unwrap_or_default() {
        let Some((key, value)) = tag.split_once('=') else {
            continue;
        };
        let bad = |e: ParseError| err(Some(tag), e.to_string());
        match key {
            "gocast_vip" => {
                let v: Vip = value.parse().map_err(bad)?;
                if let Some((other, other_tag)) = vip
                    && other != v
                {
                    return Err(err(
                        Some(tag),
                        format!("a second vip; {other_tag:?} already gives {other}"),
                    ));
                }
                vip = Some((v, tag));
            }
            "gocast_monitor" => {
                let m: Monitor = value.parse().map_err(bad)?;
                if matches!(m, Monitor::Exec { .. }) && !policy.allow_exec {
                    return Err(err(
                        Some(tag),
                        "exec monitors from Consul are refused (set agent.allow_consul_exec: true to allow them)"
                            .into(),
                    ));
                }
                if !monitors.contains(&m) {
                    monitors.push(m);
                }
            }
            "gocast_nat" => {
                let n: NatRule = value.parse().map_err(bad)?;
                if !nats.contains(&n) {
                    nats.push(n);
                }
            }
            "gocast_vip_communities" => {
                for c in parse_community_list(value).map_err(bad)? {
                    if !communities.contains(&c) {
                        communities.push(c);
                    }
                }
            }
            // Ours, not GoCast's: the VIP's traffic counters may fail the app (eBPF).
            "gocast_passive_health" => {
                passive_health = match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(err(Some(tag), "expected true or false".into())),
                };
            }
            // A misspelt gocast tag would silently drop a monitor or a NAT rule.
            other if other.starts_with("gocast_") => {
                return Err(err(
                    Some(tag),
                    "unknown gocast tag: expected gocast_vip=, gocast_vip_communities=, gocast_monitor=, gocast_nat= or gocast_passive_health="
                        .into(),
                ));
            }
            _ => {}
        }
    }
    let Some((vip, _)) = vip else {
        return Err(err(
            None,
            "tagged enable_gocast but has no gocast_vip= tag".into(),
        ));
    };
    let nat_dest = if nats.is_empty() {
        None
    } else {
        nat_destination(svc, vip)?
    };
    Ok(AppSpec {
        name,
        vip,
        monitors,
        nats,
        communities,
        nat_dest,
        passive_health,
    })
}

/// The service's `Address` as the NAT destination; `None` (the agent's own) when it is empty.
/// An address that cannot work is refused (the service is not made an app, with a WARN naming
/// it) rather than replaced by the agent's own: traffic would go where the service's owner did
/// not say. Refused: a loopback address (the kernel drops packets that DNAT in PREROUTING
/// sends to loopback) and an address of the other family than the VIP (NAT cannot change the family).
fn nat_destination(svc: &CatalogService, vip: Vip) -> Result<Option<IpAddr>, ServiceError> {
    if svc.address.is_empty() {
        return Ok(None);
    }
    let err = |reason: String| ServiceError {
        service: svc.service.clone(),
        tag: None,
        reason,
    };
    let ip: IpAddr = svc.address.parse().map_err(|_| {
        err(format!(
            "service Address {:?} is not an IP address, so NAT has no destination",
            svc.address
        ))
    })?;
    if ip.is_loopback() {
        return Err(err(format!(
            "service Address {ip} is a loopback address: the kernel drops traffic NATed to it from outside; register the service with a reachable Address, or none for the agent's own"
        )));
    }
    if ip.is_ipv4() != vip.addr().is_ipv4() {
        return Err(err(format!(
            "service Address {ip} and vip {vip} are of different IP families: NAT cannot send one to the other"
        )));
    }
    if !nat_dest_usable(ip) {
        return Err(err(format!(
            "service Address {ip} cannot be a NAT destination"
        )));
    }
    Ok(Some(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: &str) -> CatalogNode {
        parse_node(json.as_bytes()).unwrap().unwrap()
    }

    fn svc(name: &str, tags: &[&str], address: &str) -> CatalogService {
        CatalogService {
            id: name.to_owned(),
            service: name.to_owned(),
            tags: Some(tags.iter().map(|t| (*t).to_owned()).collect()),
            address: address.to_owned(),
        }
    }

    const CATALOG: &str = r#"{
      "Node": {"ID": "40e4a748-2192-161a-0510-9bf59fe950b5", "Node": "node1",
               "Address": "10.0.0.1", "Datacenter": "dc1", "TaggedAddresses": null, "Meta": {}},
      "Services": {
        "consul": {"ID": "consul", "Service": "consul", "Tags": null, "Address": "", "Port": 8300,
                   "Meta": {}, "EnableTagOverride": false},
        "web-1": {"ID": "web-1", "Service": "web", "Address": "198.18.0.1", "Port": 8080,
                  "Tags": ["enable_gocast", "gocast_vip=192.0.2.10/32", "gocast_monitor=port:tcp:8080",
                           "gocast_monitor=consul", "gocast_nat=tcp:80:8080", "gocast_nat=udp:53",
                           "gocast_vip_communities=65001:10,no-export", "v1", "weight=3"],
                  "Meta": {"version": "1"}, "EnableTagOverride": false, "Weights": {"Passing": 1, "Warning": 1}},
        "db": {"ID": "db", "Service": "db", "Tags": ["v2"], "Address": "", "Port": 5432}
      }
    }"#;

    #[test]
    fn tagged_services_become_apps_with_every_gocast_tag() {
        let d = discover(&node(CATALOG), TagPolicy::default());
        assert!(d.refused.is_empty(), "{:?}", d.refused);
        assert_eq!(d.apps.len(), 1);
        let a = &d.apps[0];
        assert_eq!(a.name.as_str(), "web");
        assert_eq!(a.vip.to_string(), "192.0.2.10/32");
        let monitors: Vec<String> = a.monitors.iter().map(ToString::to_string).collect();
        assert_eq!(monitors, ["port:tcp:8080", "consul"]);
        let nats: Vec<String> = a.nats.iter().map(ToString::to_string).collect();
        assert_eq!(nats, ["tcp:80:8080", "udp:53:53"]);
        let communities: Vec<String> = a.communities.iter().map(ToString::to_string).collect();
        assert_eq!(communities, ["65001:10", "no-export"]);
        assert_eq!(a.nat_dest, Some("198.18.0.1".parse().unwrap()));
        assert!(!a.passive_health);
    }

    #[test]
    fn passive_health_is_a_tag_too() {
        let s = svc(
            "web",
            &[
                "enable_gocast",
                "gocast_vip=192.0.2.10",
                "gocast_passive_health=true",
            ],
            "",
        );
        assert!(
            service_app(&s, TagPolicy::default())
                .unwrap()
                .passive_health
        );
    }

    #[test]
    fn unknown_node_is_null_and_a_node_without_services_has_no_apps() {
        assert!(parse_node(b"null").unwrap().is_none());
        let d = discover(
            &node(r#"{"Node": {"Node": "n"}, "Services": null}"#),
            TagPolicy::default(),
        );
        assert_eq!(d, Discovered::default());
        let d = discover(
            &node(r#"{"Node": {"Node": "n"}, "Services": {}}"#),
            TagPolicy::default(),
        );
        assert_eq!(d, Discovered::default());
    }

    #[test]
    fn malformed_json_is_an_error() {
        for bad in [
            &b"{"[..],
            b"[]",
            b"{}",
            b"{\"Node\": {\"Node\": \"n\"}, \"Services\": {\"x\": {\"ID\": 1}}}",
            b"<html>",
        ] {
            assert!(parse_node(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn no_address_or_no_nat_means_the_local_nat_destination() {
        let a = service_app(
            &svc(
                "web",
                &["enable_gocast", "gocast_vip=192.0.2.1", "gocast_nat=tcp:80"],
                "",
            ),
            TagPolicy::default(),
        )
        .unwrap();
        assert_eq!(a.nat_dest, None);
        // Without NAT rules the address does not matter (and cannot make the app differ).
        let a = service_app(
            &svc(
                "web",
                &["enable_gocast", "gocast_vip=192.0.2.1"],
                "db.example",
            ),
            TagPolicy::default(),
        )
        .unwrap();
        assert_eq!(a.nat_dest, None);
    }

    #[test]
    fn bad_tags_refuse_the_service_naming_service_and_tag() {
        for (tags, address, needle) in [
            (&["enable_gocast"][..], "", "no gocast_vip"),
            (
                &[
                    "enable_gocast",
                    "gocast_vip=192.0.2.1",
                    "gocast_passive_health=yes",
                ],
                "",
                "gocast_passive_health=yes",
            ),
            (
                &["enable_gocast", "gocast_vip=192.0.2.300/32"],
                "",
                "gocast_vip=192.0.2.300/32",
            ),
            (
                &["enable_gocast", "gocast_vip=127.0.0.1/32"],
                "",
                "loopback",
            ),
            (
                &[
                    "enable_gocast",
                    "gocast_vip=192.0.2.1",
                    "gocast_vip=192.0.2.2",
                ],
                "",
                "second vip",
            ),
            (
                &[
                    "enable_gocast",
                    "gocast_vip=192.0.2.1",
                    "gocast_monitor=port:tcp",
                ],
                "",
                "gocast_monitor=port:tcp",
            ),
            (
                &[
                    "enable_gocast",
                    "gocast_vip=192.0.2.1",
                    "gocast_monitor=exec:true",
                ],
                "",
                "allow_consul_exec",
            ),
            (
                &["enable_gocast", "gocast_vip=192.0.2.1", "gocast_nat=sctp:1"],
                "",
                "gocast_nat=sctp:1",
            ),
            (
                &[
                    "enable_gocast",
                    "gocast_vip=192.0.2.1",
                    "gocast_vip_communities=1:2:3:4",
                ],
                "",
                "invalid community",
            ),
            (
                &[
                    "enable_gocast",
                    "gocast_vip=192.0.2.1",
                    "gocast_monitors=consul",
                ],
                "",
                "unknown gocast tag",
            ),
            (
                &["enable_gocast", "gocast_vip=192.0.2.1", "gocast_nat=tcp:80"],
                "web.example",
                "not an IP",
            ),
            (
                &["enable_gocast", "gocast_vip=192.0.2.1", "gocast_nat=tcp:80"],
                "224.0.0.1",
                "NAT destination",
            ),
        ] {
            let e = service_app(&svc("web", tags, address), TagPolicy::default()).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("service \"web\""), "{text}");
            assert!(text.contains(needle), "{tags:?}: {text}");
        }
        let e = service_app(&svc("a b", &["enable_gocast"], ""), TagPolicy::default()).unwrap_err();
        assert!(e.to_string().contains("invalid app name"), "{e}");
    }

    #[test]
    fn an_address_nat_cannot_reach_refuses_the_service_naming_it() {
        for (vip, address, needle) in [
            (
                "192.0.2.1",
                "127.0.0.1",
                "Address 127.0.0.1 is a loopback address",
            ),
            ("192.0.2.1", "127.0.1.1", "loopback"),
            ("2001:db8::1", "::1", "loopback"),
            (
                "192.0.2.1",
                "2001:db8::5",
                "Address 2001:db8::5 and vip 192.0.2.1/32 are of different IP families",
            ),
            ("2001:db8::1/128", "198.18.0.5", "different IP families"),
        ] {
            let vip_tag = format!("gocast_vip={vip}");
            let tags = ["enable_gocast", &vip_tag, "gocast_nat=tcp:80"];
            let e = service_app(&svc("web", &tags, address), TagPolicy::default()).unwrap_err();
            let text = e.to_string();
            assert!(text.starts_with("service \"web\": "), "{text}");
            assert!(text.contains(needle), "{vip} {address}: {text}");
        }
    }

    #[test]
    fn an_address_of_the_vips_family_is_the_nat_destination() {
        for (vip, address) in [
            ("192.0.2.1", "198.18.0.5"),
            ("2001:db8::1", "2001:db8:1::5"),
        ] {
            let a = service_app(
                &svc(
                    "web",
                    &[
                        "enable_gocast",
                        &format!("gocast_vip={vip}"),
                        "gocast_nat=tcp:80",
                    ],
                    address,
                ),
                TagPolicy::default(),
            )
            .unwrap();
            assert_eq!(a.nat_dest, Some(address.parse().unwrap()));
        }
    }

    #[test]
    fn one_bad_service_does_not_stop_the_others_and_is_kept() {
        let mut n = node(CATALOG);
        let services = n.services.as_mut().unwrap();
        services.insert(
            "api".into(),
            svc("api", &["enable_gocast", "gocast_vip=bad"], ""),
        );
        let d = discover(&n, TagPolicy::default());
        assert_eq!(d.apps.len(), 1);
        assert_eq!(d.refused.len(), 1);
        assert_eq!(d.keep(), vec!["api".parse::<AppName>().unwrap()]);
    }

    #[test]
    fn exec_monitors_need_the_policy_and_repeats_are_merged() {
        let tags = [
            "enable_gocast",
            "gocast_vip=192.0.2.1",
            "gocast_vip=192.0.2.1/32",
            "gocast_monitor=exec:test -e /tmp/x",
            "gocast_monitor=exec:test -e /tmp/x",
        ];
        let a = service_app(&svc("web", &tags, ""), TagPolicy { allow_exec: true }).unwrap();
        assert_eq!(a.monitors.len(), 1);
        assert_eq!(a.monitors[0].to_string(), "exec:test -e /tmp/x");
    }

    #[test]
    fn a_second_instance_of_a_service_is_refused_the_first_kept() {
        let mut n = node(r#"{"Node": {"Node": "n"}, "Services": {}}"#);
        let services = n.services.as_mut().unwrap();
        for id in ["web-a", "web-b"] {
            let mut s = svc("web", &["enable_gocast", "gocast_vip=192.0.2.1"], "");
            s.id = id.into();
            services.insert(id.into(), s);
        }
        let d = discover(&n, TagPolicy::default());
        assert_eq!(d.apps.len(), 1);
        assert!(
            d.refused[0].to_string().contains("\"web-b\" ignored"),
            "{:?}",
            d.refused
        );
    }
}
