//! L4 authorization: Istio's `Authorization` resource (what istiod derives from AuthorizationPolicy and
//! PeerAuthentication objects) as it appears in the local workload file, and its evaluation.
//!
//! A policy is a list of rules; a rule is a list of clauses that must all match; a clause is a list of match
//! groups of which one must match; a match group matches when every field it sets matches (one of the
//! positive values, none of the `not` values). Policies come from three scopes: `Global` (every workload),
//! `Namespace` (workloads in the policy's namespace) and `WorkloadSelector` (workloads that list the policy
//! as `<namespace>/<name>` in their `authorizationPolicies`). Evaluation follows Istio: a matching DENY
//! denies; otherwise no ALLOW policy means allow; otherwise one ALLOW must match. Dry-run policies are
//! evaluated and logged but never decide.
//!
//! Field names, casing and the meaning of every match follow Istio ztunnel's local file, so a file written
//! for it means the same here. Unknown fields are errors: a misspelt `notPrincipals` silently ignored would
//! open what the operator meant to close.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use crate::identity::Identity;

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Every workload.
    #[serde(alias = "GLOBAL")]
    Global,
    /// Workloads in the policy's namespace.
    #[serde(alias = "NAMESPACE")]
    Namespace,
    /// Workloads that name the policy in their `authorizationPolicies`.
    #[serde(alias = "WORKLOAD_SELECTOR")]
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Allow (and, by its presence, deny what no ALLOW policy matches).
    #[serde(alias = "ALLOW")]
    Allow,
    /// Deny.
    #[serde(alias = "DENY")]
    Deny,
}

/// A string match, in Istio's forms: `{Exact: s}`, `{Prefix: s}`, `{Suffix: s}`, `{Presence: []}` (the
/// lower-case forms of Istio's xDS JSON are accepted too).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// Whether `s` matches.
    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(e) => s == e,
            StringMatch::Prefix(p) => s.starts_with(p.as_str()),
            StringMatch::Suffix(x) => s.ends_with(x.as_str()),
            StringMatch::Presence => !s.is_empty(),
        }
    }

    /// Whether a principal matches. Istio writes principals without `spiffe://` (`cluster.local/ns/a/sa/b`),
    /// so a connection without a SPIFFE identity matches nothing, not even `Presence`.
    pub fn matches_principal(&self, id: Option<&Identity>) -> bool {
        match id {
            Some(id) => self.matches(&format!("{}/ns/{}/sa/{}", id.trust_domain, id.namespace, id.service_account)),
            None => false,
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        match self {
            StringMatch::Exact(v) => m.serialize_entry("Exact", v)?,
            StringMatch::Prefix(v) => m.serialize_entry("Prefix", v)?,
            StringMatch::Suffix(v) => m.serialize_entry("Suffix", v)?,
            StringMatch::Presence => m.serialize_entry("Presence", &[(); 0])?,
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let (kind, value) = match &v {
            serde_json::Value::Object(m) if m.len() == 1 => m.iter().next().expect("one entry"),
            _ => {
                return Err(de::Error::custom(format!(
                    "a string match is one of Exact, Prefix, Suffix, Presence; got {v}"
                )));
            }
        };
        let text = || -> Result<String, D::Error> {
            value
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| de::Error::custom(format!("{kind}: expected a string, got {value}")))
        };
        match kind.as_str() {
            "Exact" | "exact" => Ok(StringMatch::Exact(text()?)),
            "Prefix" | "prefix" => Ok(StringMatch::Prefix(text()?)),
            "Suffix" | "suffix" => Ok(StringMatch::Suffix(text()?)),
            "Presence" | "presence" => match value {
                serde_json::Value::Null => Ok(StringMatch::Presence),
                serde_json::Value::Array(a) if a.is_empty() => Ok(StringMatch::Presence),
                serde_json::Value::Object(o) if o.is_empty() => Ok(StringMatch::Presence),
                _ => Err(de::Error::custom(format!("Presence takes no value; got {value}"))),
            },
            other => {
                Err(de::Error::custom(format!("unknown string match {other:?} (Exact, Prefix, Suffix, Presence)")))
            }
        }
    }
}

/// A service account match: both parts equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

impl ServiceAccountMatch {
    fn matches(&self, id: Option<&Identity>) -> bool {
        id.is_some_and(|id| id.namespace == self.namespace && id.service_account == self.service_account)
    }
}

/// An IP network (`10.0.0.0/8`, `fd00::/64`; a bare address is a host route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` is inside (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.len),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.len),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], len: u8) -> bool {
    let (bytes, bits) = (usize::from(len / 8), len % 8);
    if a[..bytes] != b[..bytes] {
        return false;
    }
    bits == 0 || (a[bytes] ^ b[bytes]) & (0xffu8 << (8 - bits)) == 0
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("{s:?} is not an IP network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => {
                l.trim().parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| format!("{s:?}: bad prefix length"))?
            }
        };
        Ok(Cidr { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// One match group: every field it sets must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    /// Source namespaces (from the verified identity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    /// Source namespaces that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// Source service accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// Source service accounts that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Source principals (`<trust domain>/ns/<ns>/sa/<sa>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    /// Source principals that must not match (`[{Presence: []}]`: plaintext only — STRICT mTLS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    /// Source addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<Cidr>,
    /// Source addresses that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<Cidr>,
    /// Destination addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<Cidr>,
    /// Destination addresses that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<Cidr>,
    /// Destination ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    /// Destination ports that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

/// `positive` (if any) has a match and `negative` has none.
fn field<T>(positive: &[T], negative: &[T], f: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&f)) && !negative.iter().any(&f)
}

impl Match {
    /// A group that sets nothing matches nothing (Istio skips it).
    fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    fn matches(&self, c: &Conn) -> bool {
        let id = c.src_identity.as_ref();
        let ns = id.map(|i| i.namespace.as_str()).unwrap_or_default();
        !self.is_empty()
            && field(&self.destination_ips, &self.not_destination_ips, |n| n.contains(c.dst.ip()))
            && field(&self.source_ips, &self.not_source_ips, |n| n.contains(c.src.ip()))
            && field(&self.destination_ports, &self.not_destination_ports, |p| *p == c.dst.port())
            && field(&self.service_accounts, &self.not_service_accounts, |s| s.matches(id))
            && field(&self.principals, &self.not_principals, |p| p.matches_principal(id))
            && field(&self.namespaces, &self.not_namespaces, |n| n.matches(ns))
    }
}

/// One authorization policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// Name.
    pub name: String,
    /// Namespace (its scope's namespace for `Namespace`, its key's for `WorkloadSelector`).
    #[serde(default)]
    pub namespace: String,
    /// Which workloads it applies to.
    pub scope: Scope,
    /// What it does.
    pub action: Action,
    /// Rules: any rule; within it, every clause; within that, any match group.
    #[serde(default)]
    pub rules: Vec<Vec<Vec<Match>>>,
    /// Evaluate and log only.
    #[serde(default)]
    pub dry_run: bool,
}

impl Policy {
    /// `<namespace>/<name>`, the key workloads use in `authorizationPolicies`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the policy matches the connection.
    pub fn matches(&self, c: &Conn) -> bool {
        self.rules.iter().any(|rule| rule.iter().all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(c))))
    }
}

/// What policy looks at.
#[derive(Debug, Clone)]
pub struct Conn {
    /// Client address.
    pub src: SocketAddr,
    /// Destination (the app's address and port).
    pub dst: SocketAddr,
    /// The client's verified identity; `None` for plaintext.
    pub src_identity: Option<Identity>,
}

/// The workload a connection is for, as policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// The `<namespace>/<name>` keys of the workload-selector policies that select it.
    pub selected_by: &'a [String],
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A DENY policy matched.
    Denied {
        /// `<namespace>/<name>` of the policy.
        policy: String,
    },
    /// ALLOW policies apply and none matched.
    NotAllowed,
}

impl Denial {
    /// The policy to name in logs and metrics (`-` when no single policy decided).
    pub fn policy(&self) -> &str {
        match self {
            Denial::Denied { policy } => policy,
            Denial::NotAllowed => "-",
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Denied { policy } => write!(f, "denied by policy {policy}"),
            Denial::NotAllowed => write!(f, "allowed by no policy"),
        }
    }
}

/// What a dry-run policy would have done (logged, never enforced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    /// `<namespace>/<name>`.
    pub policy: String,
    /// Its action.
    pub action: Action,
}

/// The outcome of [`PolicySet::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `Ok` to allow.
    pub result: Result<(), Denial>,
    /// Dry-run policies that matched.
    pub dry_run_matches: Vec<DryRun>,
    /// Dry-run ALLOW policies apply, none matched and nothing else requires ALLOW: enforcing them would deny.
    pub dry_run_would_deny: bool,
}

/// Why a set of policies is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A policy without a name.
    #[error("a policy has no name")]
    NoName,
    /// A namespaced policy without a namespace.
    #[error("policy {name:?} ({scope:?} scope) has no namespace")]
    NoNamespace {
        /// Its name.
        name: String,
        /// Its scope.
        scope: Scope,
    },
    /// Two policies with the same namespace and name.
    #[error("policy {0} is defined twice")]
    Twice(String),
}

/// The policies in force, indexed by scope.
#[derive(Debug, Default, Clone)]
pub struct PolicySet {
    all: Vec<Policy>,
}

impl PolicySet {
    /// Indexes `policies` (checked: names unique per namespace).
    pub fn new(policies: Vec<Policy>) -> Result<PolicySet, PolicyError> {
        let mut seen = std::collections::HashSet::new();
        for p in &policies {
            if p.name.is_empty() {
                return Err(PolicyError::NoName);
            }
            if p.scope != Scope::Global && p.namespace.is_empty() {
                return Err(PolicyError::NoNamespace { name: p.name.clone(), scope: p.scope });
            }
            if !seen.insert(p.key()) {
                return Err(PolicyError::Twice(p.key()));
            }
        }
        Ok(PolicySet { all: policies })
    }

    /// Every policy.
    pub fn all(&self) -> &[Policy] {
        &self.all
    }

    /// The policies that apply to `t`.
    pub fn applicable<'a>(&'a self, t: Target<'a>) -> impl Iterator<Item = &'a Policy> + 'a {
        self.all.iter().filter(move |p| match p.scope {
            Scope::Global => true,
            Scope::Namespace => p.namespace == t.namespace,
            Scope::WorkloadSelector => t.selected_by.iter().any(|k| *k == p.key()),
        })
    }

    /// Decides a connection to `t`.
    pub fn check(&self, t: Target<'_>, c: &Conn) -> Verdict {
        let mut v = Verdict { result: Ok(()), dry_run_matches: Vec::new(), dry_run_would_deny: false };
        let (mut allows, mut dry_allows, mut dry_allow_matched) = (0, 0, false);
        let mut allowed = false;
        let mut denied = None;
        for p in self.applicable(t) {
            let m = p.matches(c);
            match (p.action, p.dry_run) {
                (Action::Deny, false) if m && denied.is_none() => denied = Some(p.key()),
                (Action::Allow, false) => {
                    allows += 1;
                    allowed |= m;
                }
                (Action::Allow, true) => {
                    dry_allows += 1;
                    dry_allow_matched |= m;
                }
                _ => {}
            }
            if p.dry_run && m {
                v.dry_run_matches.push(DryRun { policy: p.key(), action: p.action });
            }
        }
        v.dry_run_would_deny = allows == 0 && dry_allows > 0 && !dry_allow_matched;
        v.result = match denied {
            Some(policy) => Err(Denial::Denied { policy }),
            None if allows > 0 && !allowed => Err(Denial::NotAllowed),
            None => Ok(()),
        };
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(src: &str, dst: &str, id: Option<&str>) -> Conn {
        Conn { src: src.parse().unwrap(), dst: dst.parse().unwrap(), src_identity: id.map(|i| i.parse().unwrap()) }
    }

    fn policies(yaml: &str) -> PolicySet {
        PolicySet::new(serde_yaml_ng::from_str(yaml).unwrap()).unwrap()
    }

    const A: &str = "spiffe://cluster.local/ns/a/sa/client";
    const B: &str = "spiffe://cluster.local/ns/b/sa/other";
    const T: Target<'static> = Target { namespace: "app", selected_by: &[] };

    #[test]
    fn no_policy_allows() {
        assert_eq!(PolicySet::default().check(T, &conn("10.0.0.1:5", "10.0.1.1:80", None)).result, Ok(()));
    }

    #[test]
    fn istio_example_file_parses_and_denies_its_port() {
        // The policy of Istio ztunnel's example local file: ALLOW everything but port 9999.
        let p = policies(
            "- action: Allow\n  rules:\n  - - - notDestinationPorts: [9999]\n  name: deny-9999\n  namespace: default\n  scope: Namespace\n  dryRun: false\n",
        );
        let t = Target { namespace: "default", selected_by: &[] };
        assert_eq!(p.check(t, &conn("10.0.0.1:5", "10.0.1.1:80", Some(A))).result, Ok(()));
        assert_eq!(p.check(t, &conn("10.0.0.1:5", "10.0.1.1:9999", Some(A))).result, Err(Denial::NotAllowed));
        // Another namespace is not in its scope.
        assert_eq!(p.check(T, &conn("10.0.0.1:5", "10.0.1.1:9999", Some(A))).result, Ok(()));
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = policies(
            r#"
- {name: allow-a, namespace: app, scope: Namespace, action: Allow, rules: [[[{namespaces: [{Exact: a}]}]]]}
- {name: deny-port, namespace: app, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [22]}]]]}
"#,
        );
        assert_eq!(p.check(T, &conn("10.0.0.1:5", "10.0.1.1:80", Some(A))).result, Ok(()));
        assert_eq!(
            p.check(T, &conn("10.0.0.1:5", "10.0.1.1:22", Some(A))).result,
            Err(Denial::Denied { policy: "app/deny-port".into() })
        );
        assert_eq!(p.check(T, &conn("10.0.0.1:5", "10.0.1.1:80", Some(B))).result, Err(Denial::NotAllowed));
        assert_eq!(p.check(T, &conn("10.0.0.1:5", "10.0.1.1:80", None)).result, Err(Denial::NotAllowed));
    }

    #[test]
    fn strict_mtls_as_istio_converts_it() {
        // PeerAuthentication STRICT, as istiod converts it: deny what has no principal.
        let p = policies(
            "- {name: istio_converted_static_strict, namespace: app, scope: Namespace, action: Deny, rules: [[[{notPrincipals: [{Presence: []}]}]]]}",
        );
        assert_eq!(p.check(T, &conn("10.0.0.1:5", "10.0.1.1:80", Some(A))).result, Ok(()));
        assert!(p.check(T, &conn("10.0.0.1:5", "10.0.1.1:80", None)).result.is_err());
        // The xDS JSON spelling means the same.
        let q = policies(
            "- {name: s, namespace: app, scope: NAMESPACE, action: DENY, rules: [[[{notPrincipals: [{presence: {}}]}]]]}",
        );
        assert!(q.check(T, &conn("10.0.0.1:5", "10.0.1.1:80", None)).result.is_err());
        assert!(q.check(T, &conn("10.0.0.1:5", "10.0.1.1:80", Some(A))).result.is_ok());
        // STRICT with a PERMISSIVE port: two clauses, both must match to deny.
        let r = policies(
            "- {name: s, namespace: app, scope: Namespace, action: Deny, rules: [[[{notPrincipals: [{Presence: []}]}], [{notDestinationPorts: [9090]}]]]}",
        );
        assert!(r.check(T, &conn("10.0.0.1:5", "10.0.1.1:80", None)).result.is_err());
        assert!(r.check(T, &conn("10.0.0.1:5", "10.0.1.1:9090", None)).result.is_ok());
    }

    #[test]
    fn every_match_and_its_not_form() {
        let check = |m: &str, c: &Conn| {
            let p =
                policies(&format!("- {{name: p, namespace: app, scope: Namespace, action: Deny, rules: [[[{m}]]]}}"));
            p.check(T, c).result.is_err()
        };
        let c = conn("10.1.2.3:4000", "10.9.0.7:8080", Some(A));
        let plain = conn("10.1.2.3:4000", "10.9.0.7:8080", None);
        assert!(check("{principals: [{Exact: cluster.local/ns/a/sa/client}]}", &c));
        assert!(!check("{principals: [{Exact: spiffe://cluster.local/ns/a/sa/client}]}", &c));
        assert!(check("{principals: [{Prefix: cluster.local/ns/a/}]}", &c));
        assert!(check("{principals: [{Suffix: /sa/client}]}", &c));
        assert!(!check("{principals: [{Presence: []}]}", &plain));
        assert!(check("{notPrincipals: [{Exact: cluster.local/ns/b/sa/other}]}", &c));
        assert!(!check("{notPrincipals: [{Suffix: /sa/client}]}", &c));
        assert!(check("{namespaces: [{Exact: a}]}", &c));
        assert!(!check("{namespaces: [{Exact: a}]}", &plain));
        assert!(check("{notNamespaces: [{Exact: b}]}", &c));
        assert!(check("{serviceAccounts: [{namespace: a, serviceAccount: client}]}", &c));
        assert!(!check("{serviceAccounts: [{namespace: a, serviceAccount: client}]}", &plain));
        assert!(!check("{notServiceAccounts: [{namespace: a, serviceAccount: client}]}", &c));
        assert!(check("{sourceIps: [10.1.0.0/16]}", &c));
        assert!(!check("{sourceIps: [10.2.0.0/16]}", &c));
        assert!(check("{sourceIps: [10.1.2.3]}", &c));
        assert!(!check("{notSourceIps: [10.0.0.0/8]}", &c));
        assert!(check("{destinationIps: [10.9.0.0/24]}", &c));
        assert!(check("{notDestinationIps: [10.9.1.0/24]}", &c));
        assert!(check("{destinationPorts: [8080, 9090]}", &c));
        assert!(!check("{notDestinationPorts: [8080]}", &c));
        // Every field of a group must match; any group of a clause may.
        assert!(!check("{destinationPorts: [8080], namespaces: [{Exact: b}]}", &c));
        assert!(check("{destinationPorts: [1]}, {namespaces: [{Exact: a}]}", &c));
        // A group that sets nothing matches nothing.
        assert!(!check("{}", &c));
    }

    #[test]
    fn scopes() {
        let p = policies(
            r#"
- {name: g, namespace: istio-system, scope: Global, action: Deny, rules: [[[{destinationPorts: [1]}]]]}
- {name: ns, namespace: app, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [2]}]]]}
- {name: sel, namespace: app, scope: WorkloadSelector, action: Deny, rules: [[[{destinationPorts: [3]}]]]}
"#,
        );
        let selected = ["app/sel".to_string()];
        let other_ns = Target { namespace: "other", selected_by: &[] };
        let sel = Target { namespace: "app", selected_by: &selected };
        let deny = |t: Target<'_>, port: u16| {
            p.check(t, &conn("10.0.0.1:5", &format!("10.0.0.2:{port}"), Some(A))).result.is_err()
        };
        assert!(deny(other_ns, 1) && !deny(other_ns, 2) && !deny(other_ns, 3));
        assert!(deny(T, 1) && deny(T, 2) && !deny(T, 3));
        assert!(deny(sel, 1) && deny(sel, 2) && deny(sel, 3));
    }

    #[test]
    fn dry_run_never_decides() {
        let p = policies(
            r#"
- {name: d, namespace: app, scope: Namespace, action: Deny, dryRun: true, rules: [[[{destinationPorts: [80]}]]]}
- {name: a, namespace: app, scope: Namespace, action: Allow, dryRun: true, rules: [[[{destinationPorts: [81]}]]]}
"#,
        );
        let v = p.check(T, &conn("10.0.0.1:5", "10.0.0.2:80", Some(A)));
        assert_eq!(v.result, Ok(()));
        assert_eq!(v.dry_run_matches, vec![DryRun { policy: "app/d".into(), action: Action::Deny }]);
        assert!(v.dry_run_would_deny);
        let v = p.check(T, &conn("10.0.0.1:5", "10.0.0.2:81", Some(A)));
        assert_eq!(v.result, Ok(()));
        assert!(!v.dry_run_would_deny);
    }

    #[test]
    fn bad_policies_are_errors() {
        let parse = |y: &str| {
            serde_yaml_ng::from_str::<Vec<Policy>>(y)
                .map_err(|e| e.to_string())
                .and_then(|p| PolicySet::new(p).map_err(|e| e.to_string()))
        };
        for (y, why) in [
            (
                "- {name: p, namespace: a, scope: Namespace, action: Deny, rules: [[[{notPrincipal: [{Presence: []}]}]]]}",
                "unknown field",
            ),
            ("- {name: p, namespace: a, scope: Cluster, action: Deny}", "unknown variant"),
            ("- {name: p, namespace: a, scope: Namespace, action: Maybe}", "unknown variant"),
            (
                "- {name: p, namespace: a, scope: Namespace, action: Deny, rules: [[[{principals: [{Like: x}]}]]]}",
                "unknown string match",
            ),
            (
                "- {name: p, namespace: a, scope: Namespace, action: Deny, rules: [[[{sourceIps: [10.0.0.0/33]}]]]}",
                "prefix length",
            ),
            (
                "- {name: p, namespace: a, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [70000]}]]]}",
                "invalid value",
            ),
            ("- {name: p, scope: Namespace, action: Deny}", "no namespace"),
            (
                "- {name: p, namespace: a, scope: Namespace, action: Deny}\n- {name: p, namespace: a, scope: Global, action: Allow}",
                "twice",
            ),
        ] {
            let e = parse(y).unwrap_err();
            assert!(e.contains(why), "{y}: {e}");
        }
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.255.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let v6: Cidr = "fd00:1::/33".parse().unwrap();
        assert!(v6.contains("fd00:1:7fff::1".parse().unwrap()));
        assert!(!v6.contains("fd00:1:8000::1".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("192.0.2.1".parse().unwrap()));
        assert!("x/8".parse::<Cidr>().is_err());
    }
}

/// Property test: evaluation against a reference model written separately from it (one match field per
/// policy, so the model can say plainly when each matches). `AMBIT_PROPTEST_CASES` raises the case count.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// What one generated policy's only match looks at.
    #[derive(Debug, Clone, Copy)]
    enum Field {
        Port(u16),
        NotPort(u16),
        SourceNamespace(&'static str),
        Authenticated,
        Unauthenticated,
    }

    #[derive(Debug, Clone)]
    struct Spec {
        scope: Scope,
        namespace: &'static str,
        action: Action,
        dry_run: bool,
        field: Field,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        let scope = prop_oneof![Just(Scope::Global), Just(Scope::Namespace), Just(Scope::WorkloadSelector)];
        let field = prop_oneof![
            prop_oneof![Just(80u16), Just(22)].prop_map(Field::Port),
            prop_oneof![Just(80u16), Just(22)].prop_map(Field::NotPort),
            prop_oneof![Just("a"), Just("b")].prop_map(Field::SourceNamespace),
            Just(Field::Authenticated),
            Just(Field::Unauthenticated),
        ];
        (scope, prop_oneof![Just("app"), Just("other")], any::<bool>(), any::<bool>(), field).prop_map(
            |(scope, namespace, deny, dry_run, field)| Spec {
                scope,
                namespace,
                action: if deny { Action::Deny } else { Action::Allow },
                dry_run,
                field,
            },
        )
    }

    fn policy(i: usize, s: &Spec) -> Policy {
        let mut m = Match::default();
        match s.field {
            Field::Port(p) => m.destination_ports = vec![p],
            Field::NotPort(p) => m.not_destination_ports = vec![p],
            Field::SourceNamespace(n) => m.namespaces = vec![StringMatch::Exact(n.into())],
            Field::Authenticated => m.principals = vec![StringMatch::Presence],
            Field::Unauthenticated => m.not_principals = vec![StringMatch::Presence],
        }
        Policy {
            name: format!("p{i}"),
            namespace: s.namespace.into(),
            scope: s.scope,
            action: s.action,
            rules: vec![vec![vec![m]]],
            dry_run: s.dry_run,
        }
    }

    /// The model: which policies apply and match, and Istio's rule for combining them.
    fn model(specs: &[Spec], selected: &[String], port: u16, src_ns: Option<&str>) -> Result<(), Vec<String>> {
        let applies = |i: usize, s: &Spec| match s.scope {
            Scope::Global => true,
            Scope::Namespace => s.namespace == "app",
            Scope::WorkloadSelector => selected.contains(&format!("{}/p{i}", s.namespace)),
        };
        let matches = |s: &Spec| match s.field {
            Field::Port(p) => port == p,
            Field::NotPort(p) => port != p,
            Field::SourceNamespace(n) => src_ns == Some(n),
            Field::Authenticated => src_ns.is_some(),
            Field::Unauthenticated => src_ns.is_none(),
        };
        let live: Vec<(usize, &Spec)> =
            specs.iter().enumerate().filter(|(i, s)| !s.dry_run && applies(*i, s)).collect();
        let denying: Vec<String> = live
            .iter()
            .filter(|(_, s)| s.action == Action::Deny && matches(s))
            .map(|(i, s)| format!("{}/p{i}", s.namespace))
            .collect();
        if !denying.is_empty() {
            return Err(denying);
        }
        let allows: Vec<&&Spec> = live.iter().map(|(_, s)| s).filter(|s| s.action == Action::Allow).collect();
        if !allows.is_empty() && !allows.iter().any(|s| matches(s)) {
            return Err(Vec::new());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::testing::proptest_cases()))]

        #[test]
        fn evaluation_agrees_with_the_model(
            specs in proptest::collection::vec(spec(), 0..8),
            select in proptest::collection::vec(any::<bool>(), 8),
            port in prop_oneof![Just(80u16), Just(22), Just(443)],
            src in prop_oneof![Just(None), Just(Some("a")), Just(Some("b"))],
        ) {
            let policies: Vec<Policy> = specs.iter().enumerate().map(|(i, s)| policy(i, s)).collect();
            let selected: Vec<String> =
                policies.iter().zip(&select).filter(|(_, s)| **s).map(|(p, _)| p.key()).collect();
            let set = PolicySet::new(policies).unwrap();
            let conn = Conn {
                src: "10.0.0.1:40000".parse().unwrap(),
                dst: SocketAddr::new("10.0.1.1".parse().unwrap(), port),
                src_identity: src.map(|ns| Identity::new("cluster.local", ns, "sa")),
            };
            let got = set.check(Target { namespace: "app", selected_by: &selected }, &conn).result;
            match (model(&specs, &selected, port, src), got) {
                (Ok(()), Ok(())) => {}
                (Err(denying), Err(Denial::Denied { policy })) if !denying.is_empty() => {
                    prop_assert!(denying.contains(&policy), "{} is not one of {:?}", policy, denying);
                }
                (Err(denying), Err(Denial::NotAllowed)) if denying.is_empty() => {}
                (want, got) => prop_assert!(false, "model {:?}, evaluation {:?}", want, got),
            }
        }
    }
}
