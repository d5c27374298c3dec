//! The app model: what an app is once its input (YAML, HTTP, Consul tags) has been parsed.
//!
//! Every value here is parsed once at the edge with `FromStr` and is valid by construction, so
//! the lifecycle, monitors and dataplane never see a string they would have to re-check. Each
//! type prints back in the form GoCast users write (`port:tcp:80`, `tcp:80:8080`, `65000:100`).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    sync::Arc,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a piece of app input was refused; the message names the value and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid app name {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ -")]
    Name(String),
    #[error("invalid vip {value:?}: {reason}")]
    Vip { value: String, reason: &'static str },
    /// A well-formed address that can never be an anycast VIP (a policy refusal, not a typo).
    #[error("vip {value:?} refused: {reason}")]
    VipRefused { value: String, reason: &'static str },
    #[error("invalid monitor {value:?}: {reason}")]
    Monitor { value: String, reason: &'static str },
    #[error("invalid nat {value:?}: {reason}")]
    Nat { value: String, reason: &'static str },
    #[error(
        "invalid community {0:?}: expected asn:value, a:b:c (large), no-export, no-advertise, blackhole or graceful-shutdown"
    )]
    Community(String),
}

/// `s` cut to at most `max` bytes (on a character boundary) with `…` and the full length
/// appended when cut: a value from a request or a state file can be megabytes, a log line or an
/// error message should not be.
pub fn truncated(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// The most of a bad value an error message quotes: a 1 MB name must not come back whole.
pub const QUOTE_MAX: usize = 64;

/// Implements `Display`-based `Serialize` and `FromStr`-based `Deserialize`, so YAML, JSON and
/// the state file all carry the user's spelling and are parsed by the one `FromStr`.
macro_rules! string_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(FromStrVisitor::<$ty>::new())
            }
        }
    };
}

/// Parses a string with `FromStr` inside the deserializer, so a bad value is reported with the
/// key path and the line of the value itself (not of the enclosing mapping).
pub struct FromStrVisitor<T>(std::marker::PhantomData<T>);

impl<T> FromStrVisitor<T> {
    pub fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T> Default for FromStrVisitor<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: FromStr> serde::de::Visitor<'_> for FromStrVisitor<T>
where
    T::Err: fmt::Display,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

/// An app's name: 1–64 characters of `[A-Za-z0-9._-]` (it ends up in an interface label,
/// iptables comments and metric labels, so nothing that needs quoting is allowed).
///
/// Shared, not copied: the lifecycle, the monitors, the metrics, the stats and the events each
/// hold an app's name, and a monitor result carries it every interval; a clone is a reference
/// count, not an allocation (docs/design.md, "Memory").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AppName(Arc<str>);

/// The longest label the kernel keeps for an address (`IFNAMSIZ` - 1).
const MAX_LABEL: usize = 15;

impl AppName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The label of the app's VIP on `lo`.
    ///
    /// `lo:` + name when that fits in 15 bytes (names of up to 12 characters), as GoCast does.
    /// Longer names get `lo:` + their first 4 characters + `~` + 7 hex digits of the name's
    /// FNV-1a hash. `~` cannot occur in a name, so a shortened label never equals a plain one;
    /// two long names whose shortened labels are equal are refused at registration
    /// ([`crate::lifecycle`] checks labels like VIPs), so labels never collide.
    pub fn lo_label(&self) -> String {
        let full = format!("lo:{}", self.0);
        if full.len() <= MAX_LABEL {
            return full;
        }
        let hash = fnv1a64(self.0.as_bytes());
        format!("lo:{}~{:07x}", &self.0[..4], hash & 0x0fff_ffff)
    }
}

/// FNV-1a, 64 bit: tiny, stable across releases and platforms (labels must not change when
/// the agent is upgraded, or a restart would not recognise its own addresses).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl FromStr for AppName {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(s.into()))
        } else {
            Err(ParseError::Name(truncated(s, QUOTE_MAX)))
        }
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_serde!(AppName);

/// An anycast VIP: the address put on `lo` with its prefix length; the announced route is the
/// prefix it belongs to (`192.0.2.10/32` → `192.0.2.10/32`, `192.0.2.10/24` → `192.0.2.0/24`).
///
/// Addresses that can never be an anycast service address are refused here, whoever asks:
/// the default route, unspecified, loopback, multicast, link-local and broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Vip(IpNet);

impl Vip {
    /// The address as configured on `lo`.
    pub fn net(&self) -> IpNet {
        self.0
    }

    pub fn addr(&self) -> IpAddr {
        self.0.addr()
    }

    /// The route announced for this VIP.
    pub fn prefix(&self) -> IpNet {
        self.0.trunc()
    }

    fn refusal(net: IpNet) -> Option<&'static str> {
        if net.prefix_len() == 0 {
            return Some("a default route cannot be a VIP");
        }
        match net.addr() {
            IpAddr::V4(a) if a.is_unspecified() => Some("unspecified address"),
            IpAddr::V4(a) if a.is_loopback() => Some("loopback address"),
            IpAddr::V4(a) if a.is_multicast() => Some("multicast address"),
            IpAddr::V4(a) if a.is_link_local() => Some("link-local address"),
            IpAddr::V4(a) if a == Ipv4Addr::BROADCAST => Some("broadcast address"),
            IpAddr::V6(a) if a.is_unspecified() => Some("unspecified address"),
            IpAddr::V6(a) if a.is_loopback() => Some("loopback address"),
            IpAddr::V6(a) if a.is_multicast() => Some("multicast address"),
            IpAddr::V6(a) if a.is_unicast_link_local() => Some("link-local address"),
            IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
                Some("IPv4-mapped IPv6 address: write the IPv4 form")
            }
            _ => None,
        }
    }
}

impl FromStr for Vip {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseError::Vip {
            value: truncated(s, QUOTE_MAX),
            reason,
        };
        let net: IpNet = match s.parse() {
            Ok(net) => net,
            // A bare address means a host route, as `ip address add` reads it.
            Err(_) => match s.parse::<IpAddr>() {
                Ok(addr) => IpNet::from(addr),
                Err(_) => {
                    return Err(err(
                        "expected address/length, e.g. 192.0.2.10/32 or 2001:db8::10/128",
                    ));
                }
            },
        };
        match Self::refusal(net) {
            Some(reason) => Err(ParseError::VipRefused {
                value: truncated(s, QUOTE_MAX),
                reason,
            }),
            None => Ok(Self(net)),
        }
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

string_serde!(Vip);

/// Transport protocol of a port monitor or NAT rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn parse_port(s: &str) -> Option<u16> {
    s.parse().ok().filter(|p| *p != 0)
}

/// A health check. All of an app's monitors must pass for the app to be healthy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Monitor {
    /// `port:tcp:N` — a TCP socket listens on port N; `port:udp:N` — a UDP socket is bound to N.
    /// Read from the kernel's socket table, never by binding the port.
    Port { proto: Proto, port: u16 },
    /// `exec:CMD` — `sh -c CMD` exits 0 within the exec timeout. Everything after the first `:`
    /// is the command, colons included.
    Exec { command: String },
    /// `consul` — the service's checks in Consul decide.
    Consul,
}

impl Monitor {
    /// The kind, for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Port { .. } => "port",
            Self::Exec { .. } => "exec",
            Self::Consul => "consul",
        }
    }
}

impl FromStr for Monitor {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseError::Monitor {
            value: truncated(s, QUOTE_MAX),
            reason,
        };
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "port" => {
                let (proto, port) = rest
                    .split_once(':')
                    .ok_or_else(|| err("expected port:tcp:N or port:udp:N"))?;
                let proto =
                    Proto::parse(proto).ok_or_else(|| err("protocol must be tcp or udp"))?;
                let port = parse_port(port).ok_or_else(|| err("port must be 1-65535"))?;
                Ok(Self::Port { proto, port })
            }
            "exec" if rest.trim().is_empty() => Err(err("exec needs a command: exec:CMD")),
            "exec" => Ok(Self::Exec {
                command: rest.to_owned(),
            }),
            "consul" if s == "consul" => Ok(Self::Consul),
            _ => Err(err("expected port:tcp:N, port:udp:N, exec:CMD or consul")),
        }
    }
}

impl fmt::Display for Monitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Port { proto, port } => write!(f, "port:{proto}:{port}"),
            Self::Exec { command } => write!(f, "exec:{command}"),
            Self::Consul => f.write_str("consul"),
        }
    }
}

string_serde!(Monitor);

/// `proto:listen:dest` (or `proto:port`): traffic to `VIP:listen` goes to `dest_ip:dest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NatRule {
    pub proto: Proto,
    pub listen: u16,
    pub dest: u16,
}

impl FromStr for NatRule {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseError::Nat {
            value: truncated(s, QUOTE_MAX),
            reason,
        };
        let mut parts = s.split(':');
        let proto = parts.next().and_then(Proto::parse).ok_or_else(|| {
            err("expected tcp:LISTEN:DEST, udp:LISTEN:DEST, tcp:PORT or udp:PORT")
        })?;
        let listen = parts
            .next()
            .and_then(parse_port)
            .ok_or_else(|| err("listen port must be 1-65535"))?;
        let dest = match parts.next() {
            None => listen,
            Some(d) => parse_port(d).ok_or_else(|| err("destination port must be 1-65535"))?,
        };
        if parts.next().is_some() {
            return Err(err("too many fields: expected proto:listen:dest"));
        }
        Ok(Self {
            proto,
            listen,
            dest,
        })
    }
}

impl fmt::Display for NatRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.proto, self.listen, self.dest)
    }
}

string_serde!(NatRule);

/// A BGP community attached to an announcement: standard (RFC 1997) or large (RFC 8092).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Community {
    /// The 32-bit value, `asn << 16 | value`.
    Standard(u32),
    Large(u32, u32, u32),
}

/// Well-known communities, by the names operators write (RFC 1997, RFC 7999, RFC 8326).
const WELL_KNOWN: [(&str, u32); 4] = [
    ("no-export", 0xFFFF_FF01),
    ("no-advertise", 0xFFFF_FF02),
    ("blackhole", 0xFFFF_029A),
    ("graceful-shutdown", 0xFFFF_0000),
];

impl FromStr for Community {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::Community(truncated(s, QUOTE_MAX));
        if let Some((_, v)) = WELL_KNOWN.iter().find(|(name, _)| *name == s) {
            return Ok(Self::Standard(*v));
        }
        let fields: Vec<&str> = s.split(':').collect();
        match fields.as_slice() {
            [asn, value] => {
                let asn: u16 = asn.parse().map_err(|_| err())?;
                let value: u16 = value.parse().map_err(|_| err())?;
                Ok(Self::Standard(u32::from(asn) << 16 | u32::from(value)))
            }
            [a, b, c] => Ok(Self::Large(
                a.parse().map_err(|_| err())?,
                b.parse().map_err(|_| err())?,
                c.parse().map_err(|_| err())?,
            )),
            _ => Err(err()),
        }
    }
}

impl fmt::Display for Community {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Standard(v) => match WELL_KNOWN.iter().find(|(_, w)| w == v) {
                Some((name, _)) => f.write_str(name),
                None => write!(f, "{}:{}", v >> 16, v & 0xFFFF),
            },
            Self::Large(a, b, c) => write!(f, "{a}:{b}:{c}"),
        }
    }
}

string_serde!(Community);

/// Where an app came from; decides what happens at cleanup (HTTP and Consul apps are dropped,
/// config apps stay and are checked again) and what policy applies (config is trusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Http,
    Consul,
}

/// Everything that defines an app. Two specs that compare equal describe the same app, so
/// registering one again is a no-op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub name: AppName,
    pub vip: Vip,
    pub monitors: Vec<Monitor>,
    #[serde(default)]
    pub nats: Vec<NatRule>,
    /// Communities for this VIP, added to the `bgp.communities` of each peer.
    #[serde(default)]
    pub communities: Vec<Community>,
    /// Where NAT sends traffic; `None` = the agent's `nat_dest_ip`. Consul apps set it to the
    /// service's `Address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_dest: Option<IpAddr>,
    /// The VIP's counters may fail the app (eBPF dataplane only): SYNs without SYN-ACKs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passive_health: bool,
}

/// Parses a comma list of communities, as in `vip_communities=a:b,c:d`; blanks are skipped.
pub fn parse_community_list(s: &str) -> Result<Vec<Community>, ParseError> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::parse)
        .collect()
}

/// An IPv6 address is usable as a NAT destination only if it is not link-local (iptables
/// cannot DNAT to a scoped address).
pub fn nat_dest_usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_unspecified() && !a.is_multicast(),
        IpAddr::V6(a) => {
            !a.is_unspecified()
                && !a.is_multicast()
                && !a.is_unicast_link_local()
                && a != Ipv6Addr::LOCALHOST
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_get_gocast_labels() {
        let n: AppName = "web".parse().unwrap();
        assert_eq!(n.lo_label(), "lo:web");
        let n: AppName = "exactly12chr".parse().unwrap();
        assert_eq!(n.lo_label(), "lo:exactly12chr");
    }

    #[test]
    fn long_names_sharing_a_prefix_get_distinct_stable_labels() {
        let a: AppName = "frontend-service-a".parse().unwrap();
        let b: AppName = "frontend-service-b".parse().unwrap();
        assert_ne!(a.lo_label(), b.lo_label());
        assert_eq!(a.lo_label().len(), 15);
        assert!(a.lo_label().starts_with("lo:fron~"));
        // Pinned: a label must survive upgrades.
        assert_eq!(
            a.lo_label(),
            format!(
                "lo:fron~{:07x}",
                fnv1a64(b"frontend-service-a") & 0x0fff_ffff
            )
        );
        let short: AppName = "thirteen-char".parse().unwrap();
        assert_eq!(short.lo_label().len(), 15);
    }

    #[test]
    fn names_with_other_characters_are_refused() {
        for bad in ["", "a b", "a/b", "a~b", "é", &"x".repeat(65)] {
            assert!(bad.parse::<AppName>().is_err(), "{bad:?}");
        }
        assert!("A-z_0.9".parse::<AppName>().is_ok());
    }

    #[test]
    fn vips_parse_v4_v6_and_bare_addresses() {
        assert_eq!(
            "192.0.2.10/32".parse::<Vip>().unwrap().to_string(),
            "192.0.2.10/32"
        );
        assert_eq!(
            "192.0.2.10".parse::<Vip>().unwrap().to_string(),
            "192.0.2.10/32"
        );
        assert_eq!(
            "2001:db8::10/128".parse::<Vip>().unwrap().to_string(),
            "2001:db8::10/128"
        );
        assert_eq!(
            "192.0.2.10/24".parse::<Vip>().unwrap().prefix().to_string(),
            "192.0.2.0/24"
        );
    }

    #[test]
    fn unusable_vips_are_refused_with_the_reason() {
        for (bad, why) in [
            ("0.0.0.0/0", "default route"),
            ("::/0", "default route"),
            ("0.0.0.0/32", "unspecified"),
            ("127.0.0.2/32", "loopback"),
            ("::1/128", "loopback"),
            ("224.0.0.1/32", "multicast"),
            ("ff02::1/128", "multicast"),
            ("169.254.1.1/32", "link-local"),
            ("fe80::1/128", "link-local"),
            ("255.255.255.255/32", "broadcast"),
            ("192.0.2.1/33", "expected address/length"),
            ("garbage", "expected address/length"),
        ] {
            let e = bad.parse::<Vip>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn monitors_parse_and_print_back() {
        for s in ["port:tcp:80", "port:udp:53", "exec:/bin/true", "consul"] {
            assert_eq!(s.parse::<Monitor>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn exec_monitor_keeps_colons_in_the_command() {
        let m: Monitor = "exec:curl -sf http://127.0.0.1:8080/health"
            .parse()
            .unwrap();
        assert_eq!(
            m,
            Monitor::Exec {
                command: "curl -sf http://127.0.0.1:8080/health".into()
            }
        );
    }

    #[test]
    fn unknown_or_malformed_monitors_are_refused() {
        for bad in [
            "port:tcp",
            "port:sctp:80",
            "port:tcp:0",
            "port:tcp:70000",
            "exec:",
            "exec:  ",
            "http:80",
            "consul:x",
            "",
        ] {
            assert!(bad.parse::<Monitor>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nat_rules_take_two_or_three_fields() {
        assert_eq!(
            "tcp:80:8080".parse::<NatRule>().unwrap(),
            NatRule {
                proto: Proto::Tcp,
                listen: 80,
                dest: 8080
            }
        );
        assert_eq!(
            "udp:53".parse::<NatRule>().unwrap(),
            NatRule {
                proto: Proto::Udp,
                listen: 53,
                dest: 53
            }
        );
        for bad in [
            "tcp",
            "icmp:1:2",
            "tcp:0:80",
            "tcp:80:0",
            "tcp:80:90:100",
            "tcp:x:80",
            "",
        ] {
            assert!(bad.parse::<NatRule>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn communities_standard_large_and_well_known() {
        assert_eq!(
            "65000:100".parse::<Community>().unwrap(),
            Community::Standard(65000 << 16 | 100)
        );
        assert_eq!(
            "4200000000:1:2".parse::<Community>().unwrap(),
            Community::Large(4_200_000_000, 1, 2)
        );
        assert_eq!(
            "no-export".parse::<Community>().unwrap(),
            Community::Standard(0xFFFF_FF01)
        );
        assert_eq!(
            "65535:0".parse::<Community>().unwrap().to_string(),
            "graceful-shutdown"
        );
        for bad in [
            "65536:1",
            "1:65536",
            "a:b",
            "1",
            "1:2:3:4",
            "no_export",
            "-1:2",
        ] {
            assert!(bad.parse::<Community>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn community_lists_are_comma_separated() {
        assert_eq!(parse_community_list("65000:1, 65000:2,").unwrap().len(), 2);
        assert!(parse_community_list("65000:1,bad").is_err());
        assert!(parse_community_list("").unwrap().is_empty());
    }
}
