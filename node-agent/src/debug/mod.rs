//! `ambit-agent debug`: is this pod really captured, and if not, why?
//!
//! [`inspect`] gathers the facts (the agent's records, the pod's netns, its rules against the ruleset the agent
//! would install now, policy routing, the sockets on the in-pod ports and who holds them, ztunnel's and the
//! agent's view, and two active probes). This module judges them, without I/O: a [`Verdict`] with its reasons,
//! printed for people or as JSON, and an exit code scripts can act on. Nothing is changed unless `--repair` is
//! given, and then only through the agent.

pub mod inspect;

use std::fmt::Write;
use std::path::PathBuf;

use serde::Serialize;

/// What `debug pod` was asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `namespace/name`.
    Name {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A pod UID.
    Uid(String),
    /// A netns path (`/var/run/netns/…`, `/proc/<pid>/ns/net`).
    Netns(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Target, String> {
        if s.is_empty() {
            return Err("an empty pod: give NAMESPACE/NAME, a UID or a netns path".into());
        }
        if s.starts_with('/') {
            return Ok(Target::Netns(PathBuf::from(s)));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Target::Name { namespace: ns.into(), name: name.into() })
            }
            Some(_) => Err(format!("{s:?} is neither NAMESPACE/NAME nor an absolute netns path")),
            None => Ok(Target::Uid(s.into())),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Name { namespace, name } => write!(f, "{namespace}/{name}"),
            Target::Uid(u) => write!(f, "uid {u}"),
            Target::Netns(p) => write!(f, "netns {}", p.display()),
        }
    }
}

/// The verdict on one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Enrolled, its rules as the agent installs them, served by ztunnel, and the probes prove capture.
    Captured,
    /// Not part of the mesh, as it should be.
    NotEnrolled,
    /// Enrolled, but its rules or routing differ from what the agent installs.
    Drifted,
    /// Enrolled, but its rules are gone.
    RulesMissing,
    /// Enrolled with rules in place, but no ztunnel serves it.
    NotServed,
    /// Rules and ztunnel look right, yet a probe was not captured.
    NotCaptured,
    /// The agent holds it, but its netns no longer exists.
    NetnsGone,
    /// No such pod: no record, and nothing else names it.
    NotFound,
    /// The facts could not be gathered (a check failed or timed out).
    CannotTell,
}

impl Verdict {
    /// The word people read.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Captured => "captured",
            Verdict::NotEnrolled => "not enrolled",
            Verdict::Drifted => "drifted",
            Verdict::RulesMissing => "rules missing",
            Verdict::NotServed => "ztunnel does not serve it",
            Verdict::NotCaptured => "not captured",
            Verdict::NetnsGone => "netns gone",
            Verdict::NotFound => "not found",
            Verdict::CannotTell => "cannot tell",
        }
    }

    /// Whether the pod is as it should be (captured when enrolled, left alone when not).
    pub fn is_good(self) -> bool {
        matches!(self, Verdict::Captured | Verdict::NotEnrolled)
    }

    /// Whether the verdict is that the pod's traffic escapes capture it should have.
    pub fn is_uncaptured(self) -> bool {
        matches!(self, Verdict::Drifted | Verdict::RulesMissing | Verdict::NotServed | Verdict::NotCaptured)
    }
}

/// Exit codes (`debug pod` and `debug node`).
pub mod exit {
    /// Everything as it should be.
    pub const OK: i32 = 0;
    /// A pod that should be captured is not (drifted, rules missing, not served, a probe escaped).
    pub const NOT_CAPTURED: i32 = 3;
    /// It cannot be told: no such pod, its netns is gone, or a check failed or timed out.
    pub const CANNOT_TELL: i32 = 4;
    /// Captured, but the node is degraded: the agent or ztunnel is down or not ready, so new pods would not be
    /// enrolled and drift would not be repaired.
    pub const DEGRADED: i32 = 5;
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// Whether it passed.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

impl Check {
    /// A pass.
    pub fn pass(detail: impl Into<String>) -> Check {
        Check { ok: true, detail: detail.into() }
    }
    /// A failure.
    pub fn fail(detail: impl Into<String>) -> Check {
        Check { ok: false, detail: detail.into() }
    }
}

/// Which pod it is and where its netns is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodId {
    /// Namespace, when known.
    pub namespace: String,
    /// Name, when known.
    pub name: String,
    /// UID, when known.
    pub uid: String,
    /// Service account, when known.
    pub service_account: String,
    /// Its IPs.
    pub ips: Vec<std::net::IpAddr>,
    /// Its netns path.
    pub netns: Option<PathBuf>,
    /// Where the pod was found: `agent record`, `agent record, netns found by inode`, `netns path`.
    pub found_by: String,
}

impl PodId {
    /// `namespace/name`, or the UID, or the netns.
    pub fn label(&self) -> String {
        if !self.name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else if !self.uid.is_empty() {
            format!("uid {}", self.uid)
        } else {
            self.netns.as_ref().map(|p| format!("netns {}", p.display())).unwrap_or_else(|| "?".into())
        }
    }
}

/// Whether the pod is enrolled, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Enrolment {
    /// The agent holds it (it has a record).
    pub held: bool,
    /// What the enrolment policy says now: `Some(true)` enrol, `Some(false)` leave out, `None` unknown.
    pub should: Option<bool>,
    /// Why (the label, the annotation, the opt-out, the standalone config).
    pub why: String,
}

/// The pod's rules against the ruleset the agent would install now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rules {
    /// The backends whose rules were found in the pod (`nftables`, `iptables-nft`, `iptables-legacy`).
    pub found: Vec<String>,
    /// The backend compared against.
    pub backend: String,
    /// How many rule lines the expected ruleset has.
    pub expected_lines: usize,
    /// Expected lines that are not there.
    pub missing: Vec<String>,
    /// Lines that are there and not expected.
    pub extra: Vec<String>,
    /// A rule tool failed.
    pub error: Option<String>,
}

impl Rules {
    /// No rules of Ambit's at all.
    pub fn absent(&self) -> bool {
        self.error.is_none() && self.found.is_empty()
    }
    /// Exactly what the agent installs.
    pub fn matches(&self) -> bool {
        self.error.is_none() && !self.found.is_empty() && self.missing.is_empty() && self.extra.is_empty()
    }
}

/// A socket on one of the in-pod ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Socket {
    /// The port.
    pub port: u16,
    /// The address it listens on.
    pub address: String,
    /// Processes that hold it (`ztunnel[1234]`).
    pub holders: Vec<String>,
}

/// ztunnel's view of the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ztunnel {
    /// The admin endpoints asked, and what each said (`pid 12 127.0.0.1:15000: serves it`).
    pub asked: Vec<String>,
    /// `Some(true)` when a ztunnel serves the pod, `Some(false)` when the ones reached do not, `None` when
    /// none could be asked.
    pub serves: Option<bool>,
    /// Its proxy state (`Up`, `Draining`, `Pending`).
    pub state: Option<String>,
    /// The pod's identity.
    pub identity: Option<String>,
    /// Its certificate's state and expiry (`Available, expires 2026-12-03T22:00:00Z`).
    pub certificate: Option<String>,
    /// Open connections (Ambit's ztunnel only).
    pub connections: Option<u64>,
    /// Whether the ztunnel is Istio's (no `ambit` key in its dump).
    pub istio: bool,
}

/// The agent's health.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    /// It answered.
    pub up: bool,
    /// `/readyz` said ready.
    pub ready: bool,
    /// What it said, or why it could not be asked.
    pub detail: String,
}

/// Everything about one pod.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodReport {
    /// What was asked.
    pub target: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Why, in order of importance.
    pub reasons: Vec<String>,
    /// Captured, but the agent or ztunnel is unhealthy.
    pub degraded: bool,
    /// The pod.
    pub pod: PodId,
    /// Enrolment.
    pub enrolment: Enrolment,
    /// The netns exists and could be entered.
    pub netns: Option<Check>,
    /// Rules.
    pub rules: Option<Rules>,
    /// Policy routing (`fwmark 0x111/0xfff lookup 100`, and `fwmark 0/0xfff ipproto tcp lookup 101` unless the
    /// agent's `loopbackRoute` is off).
    pub routing: Option<Check>,
    /// Listening sockets on 15001, 15006 and 15008.
    pub sockets: Vec<Socket>,
    /// ztunnel's view.
    pub ztunnel: Ztunnel,
    /// The outbound probe: an unmarked connection from inside the pod must land on 15001.
    pub probe_outbound: Option<Check>,
    /// The inbound probe: a connection to the pod must land on 15006.
    pub probe_inbound: Option<Check>,
    /// The agent.
    pub agent: Agent,
    /// Whether the probes were asked for (`debug node` and `--no-probe` skip them).
    pub probed: bool,
    /// What `--repair` did, when asked.
    pub repair: Option<Check>,
}

impl PodReport {
    /// A report with nothing gathered yet.
    pub fn new(target: &Target) -> PodReport {
        PodReport {
            target: target.to_string(),
            verdict: Verdict::CannotTell,
            reasons: Vec::new(),
            degraded: false,
            pod: PodId::default(),
            enrolment: Enrolment::default(),
            netns: None,
            rules: None,
            routing: None,
            sockets: Vec::new(),
            ztunnel: Ztunnel::default(),
            probe_outbound: None,
            probe_inbound: None,
            agent: Agent::default(),
            probed: true,
            repair: None,
        }
    }

    /// The exit code for this report.
    pub fn exit_code(&self) -> i32 {
        exit_code(self.verdict, self.degraded)
    }
}

/// The exit code of a verdict.
pub fn exit_code(v: Verdict, degraded: bool) -> i32 {
    match v {
        _ if v.is_uncaptured() => exit::NOT_CAPTURED,
        Verdict::NetnsGone | Verdict::NotFound | Verdict::CannotTell => exit::CANNOT_TELL,
        Verdict::Captured if degraded => exit::DEGRADED,
        _ => exit::OK,
    }
}

/// Judges the gathered facts: sets the verdict, the reasons and `degraded`.
pub fn judge(r: &mut PodReport) {
    let mut reasons = Vec::new();
    let verdict = verdict(r, &mut reasons);
    // A probe's failure says what the drift does, whatever the verdict's first reason.
    for (what, probe) in [("outbound", &r.probe_outbound), ("inbound", &r.probe_inbound)] {
        if let Some(c) = probe.as_ref().filter(|c| !c.ok) {
            let line = format!("the {what} probe was not captured: {}", c.detail);
            if !reasons.contains(&line) {
                reasons.push(line);
            }
        }
    }
    if !r.agent.up {
        reasons.push(format!(
            "the agent is down ({}): new pods are not enrolled and drift is not repaired",
            r.agent.detail
        ));
    } else if !r.agent.ready {
        reasons.push(format!("the agent is not ready: {}", r.agent.detail));
    }
    r.degraded = !r.agent.ready || (r.enrolment.held && r.ztunnel.serves.is_none());
    r.verdict = verdict;
    r.reasons = reasons;
}

fn verdict(r: &PodReport, reasons: &mut Vec<String>) -> Verdict {
    if r.pod.netns.is_none() && !r.enrolment.held {
        if r.enrolment.should == Some(false) {
            reasons.push(format!("not enrolled: {}", r.enrolment.why));
            return Verdict::NotEnrolled;
        }
        reasons.push(format!("no record of {} in the agent's state, and no netns to look at", r.target));
        return Verdict::NotFound;
    }
    match &r.netns {
        Some(c) if !c.ok && r.enrolment.held => {
            reasons.push(format!("the agent holds it but its netns is gone: {}", c.detail));
            return Verdict::NetnsGone;
        }
        Some(c) if !c.ok => {
            reasons.push(format!("its netns cannot be entered: {}", c.detail));
            return Verdict::CannotTell;
        }
        None => {
            reasons.push("its netns was not looked at".into());
            return Verdict::CannotTell;
        }
        Some(_) => {}
    }
    let rules = r.rules.clone().unwrap_or_default();
    if let Some(e) = &rules.error {
        reasons.push(format!("its rules could not be read: {e}"));
        return Verdict::CannotTell;
    }
    let enrolled = r.enrolment.held || r.enrolment.should == Some(true);
    if !enrolled {
        if rules.absent() {
            reasons.push(format!("not enrolled: {}", r.enrolment.why));
            return Verdict::NotEnrolled;
        }
        // Rules without a record: a stale capture (an agent removed without uninstalling), or a pod Ambit
        // enrolled through another agent. Its traffic goes to whatever listens on the ports.
        reasons.push(format!(
            "the agent does not hold it ({}), yet its netns has Ambit's rules ({})",
            r.enrolment.why,
            rules.found.join(", ")
        ));
        return Verdict::Drifted;
    }
    if !r.enrolment.held {
        reasons.push(format!("it should be enrolled ({}) but the agent does not hold it", r.enrolment.why));
        return if rules.absent() { Verdict::RulesMissing } else { Verdict::Drifted };
    }
    if rules.absent() {
        reasons.push(format!("no Ambit rules in its netns (expected {} for {})", rules.expected_lines, rules.backend));
        return Verdict::RulesMissing;
    }
    let routing_ok = r.routing.as_ref().is_some_and(|c| c.ok);
    if !rules.matches() || !routing_ok {
        if !rules.missing.is_empty() || !rules.extra.is_empty() {
            reasons.push(format!(
                "its {} rules differ from what the agent installs: {} missing, {} extra (see the diff)",
                rules.backend,
                rules.missing.len(),
                rules.extra.len()
            ));
        }
        if let Some(c) = r.routing.as_ref().filter(|c| !c.ok) {
            reasons.push(format!("policy routing: {}", c.detail));
        }
        return Verdict::Drifted;
    }
    if r.ztunnel.serves == Some(false) {
        reasons.push("no ztunnel serves it: its captured connections are refused".into());
        return Verdict::NotServed;
    }
    let probes =
        if r.probed { vec![("outbound", &r.probe_outbound), ("inbound", &r.probe_inbound)] } else { Vec::new() };
    for (what, probe) in probes {
        match probe {
            Some(c) if !c.ok => {
                reasons.push(format!("the {what} probe was not captured: {}", c.detail));
                return Verdict::NotCaptured;
            }
            None => {
                reasons.push(format!("the {what} probe was not run"));
                return Verdict::CannotTell;
            }
            Some(_) => {}
        }
    }
    if r.ztunnel.serves.is_none() {
        reasons.push("no ztunnel admin endpoint could be asked; the probes were answered on the in-pod ports".into());
    }
    Verdict::Captured
}

/// The human form of a pod report.
pub fn render_pod(r: &PodReport) -> String {
    let mut s = String::new();
    let w = &mut s;
    let verdict = r.verdict.as_str().to_uppercase();
    let degraded = if r.degraded && r.verdict == Verdict::Captured { " (node degraded)" } else { "" };
    let _ = writeln!(w, "pod {}: {verdict}{degraded}", r.pod.label());
    for why in &r.reasons {
        let _ = writeln!(w, "  - {why}");
    }
    let p = &r.pod;
    if !p.uid.is_empty() {
        let _ = writeln!(w, "  uid:        {}", p.uid);
    }
    if let Some(n) = &p.netns {
        let _ = writeln!(w, "  netns:      {} (found by {})", n.display(), p.found_by);
    }
    if !p.ips.is_empty() {
        let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(w, "  ips:        {}", ips.join(", "));
    }
    let e = &r.enrolment;
    let held = if e.held { "held by the agent" } else { "not held by the agent" };
    let _ = writeln!(w, "  enrolment:  {held}; {}", e.why);
    if let Some(rules) = &r.rules {
        let found = if rules.found.is_empty() { "none".to_string() } else { rules.found.join(", ") };
        let state = match (&rules.error, rules.matches()) {
            (Some(e), _) => format!("cannot read: {e}"),
            (None, true) => format!("as the agent installs them ({} lines)", rules.expected_lines),
            (None, false) if rules.absent() => "absent".to_string(),
            (None, false) => format!("{} missing, {} extra", rules.missing.len(), rules.extra.len()),
        };
        let _ = writeln!(w, "  rules:      {state} [found: {found}; expected: {}]", rules.backend);
        for l in &rules.missing {
            let _ = writeln!(w, "              - {l}");
        }
        for l in &rules.extra {
            let _ = writeln!(w, "              + {l}");
        }
    }
    if let Some(c) = &r.routing {
        let _ = writeln!(w, "  routing:    {}", c.detail);
    }
    if r.netns.as_ref().is_some_and(|c| c.ok) {
        let socks: Vec<String> = ambit_proto::zds::INPOD_PORTS
            .iter()
            .map(|port| {
                let held: Vec<&Socket> = r.sockets.iter().filter(|s| s.port == *port).collect();
                if held.is_empty() {
                    format!("{port} closed")
                } else {
                    let by: Vec<String> = held.iter().flat_map(|s| s.holders.clone()).collect();
                    let by = if by.is_empty() { "?".to_string() } else { by.join(" ") };
                    format!("{port} {by}")
                }
            })
            .collect();
        let _ = writeln!(w, "  sockets:    {}", socks.join("; "));
    }
    let z = &r.ztunnel;
    let who = if z.istio { "Istio's ztunnel" } else { "ztunnel" };
    let view = match z.serves {
        Some(true) => {
            let mut v = format!("{who} serves it ({})", z.state.as_deref().unwrap_or("?"));
            if let Some(id) = &z.identity {
                let _ = write!(v, ", identity {id}");
            }
            if let Some(c) = &z.certificate {
                let _ = write!(v, ", certificate {c}");
            }
            if let Some(n) = z.connections {
                let _ = write!(v, ", {n} open connections");
            }
            v
        }
        Some(false) => format!("{who} does not serve it"),
        None => "no ztunnel admin endpoint answered".into(),
    };
    let _ = writeln!(w, "  ztunnel:    {view}");
    for a in &z.asked {
        let _ = writeln!(w, "              {a}");
    }
    for (what, c) in [("outbound", &r.probe_outbound), ("inbound", &r.probe_inbound)] {
        if let Some(c) = c {
            let _ = writeln!(w, "  probe {what:<9}{} {}", if c.ok { "ok:" } else { "FAILED:" }, c.detail);
        }
    }
    let a = &r.agent;
    let agent = match (a.up, a.ready) {
        (true, true) => "ready".to_string(),
        (true, false) => format!("not ready: {}", a.detail),
        (false, _) => format!("down: {}", a.detail),
    };
    let _ = writeln!(w, "  agent:      {agent}");
    if let Some(c) = &r.repair {
        let _ = writeln!(w, "  repair:     {} {}", if c.ok { "done:" } else { "FAILED:" }, c.detail);
    }
    s
}

/// One pod's line in `debug node`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePod {
    /// `namespace/name`.
    pub pod: String,
    /// UID.
    pub uid: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The first reason.
    pub why: String,
}

/// `debug node`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// Every pod the agent holds.
    pub pods: Vec<NodePod>,
    /// The CNI config: which file is the primary's and whether ambit-cni is chained last in it.
    pub cni: Check,
    /// The plugin binary in the CNI bin dir.
    pub plugin_binary: Check,
    /// The agent's health.
    pub agent: Agent,
    /// ztunnel: its readiness, the ZDS connection.
    pub ztunnel: Vec<Check>,
}

impl NodeReport {
    /// The exit code: the worst of the pods', degraded when a component is unhealthy.
    pub fn exit_code(&self) -> i32 {
        let degraded =
            !self.agent.ready || !self.cni.ok || !self.plugin_binary.ok || !self.ztunnel.iter().any(|z| z.ok);
        let mut code = if degraded { exit::DEGRADED } else { exit::OK };
        for p in &self.pods {
            code = match (code, exit_code(p.verdict, false)) {
                (_, exit::NOT_CAPTURED) | (exit::NOT_CAPTURED, _) => exit::NOT_CAPTURED,
                (_, exit::CANNOT_TELL) | (exit::CANNOT_TELL, _) => exit::CANNOT_TELL,
                (c, _) => c,
            };
        }
        code
    }
}

/// The human form of a node report.
pub fn render_node(r: &NodeReport) -> String {
    let mut s = String::new();
    let w = &mut s;
    let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
    let agent = match (r.agent.up, r.agent.ready) {
        (true, true) => "ready".to_string(),
        (true, false) => format!("not ready: {}", r.agent.detail),
        (false, _) => format!("down: {}", r.agent.detail),
    };
    let _ = writeln!(w, "{} agent:   {agent}", mark(r.agent.ready));
    for z in &r.ztunnel {
        let _ = writeln!(w, "{} ztunnel: {}", mark(z.ok), z.detail);
    }
    if r.ztunnel.is_empty() {
        let _ = writeln!(w, "{} ztunnel: no ztunnel process found", mark(false));
    }
    let _ = writeln!(w, "{} cni:     {}", mark(r.cni.ok), r.cni.detail);
    let _ = writeln!(w, "{} plugin:  {}", mark(r.plugin_binary.ok), r.plugin_binary.detail);
    let _ = writeln!(w, "pods ({}):", r.pods.len());
    let width = r.pods.iter().map(|p| p.pod.len()).max().unwrap_or(0);
    for p in &r.pods {
        let _ = writeln!(w, "  {:width$}  {:<26} {}", p.pod, p.verdict.as_str(), p.why);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured() -> PodReport {
        let mut r = PodReport::new(&Target::Name { namespace: "mesh".into(), name: "web".into() });
        r.pod = PodId {
            namespace: "mesh".into(),
            name: "web".into(),
            uid: "u1".into(),
            netns: Some("/var/run/netns/p".into()),
            found_by: "agent record".into(),
            ..Default::default()
        };
        r.enrolment = Enrolment { held: true, should: Some(true), why: "namespace enrolled".into() };
        r.netns = Some(Check::pass("entered"));
        r.rules = Some(Rules {
            found: vec!["nftables".into()],
            backend: "nftables".into(),
            expected_lines: 20,
            ..Default::default()
        });
        r.routing = Some(Check::pass("present"));
        r.ztunnel.serves = Some(true);
        r.probe_outbound = Some(Check::pass("landed on 15001"));
        r.probe_inbound = Some(Check::pass("landed on 15006"));
        r.agent = Agent { up: true, ready: true, detail: "ready".into() };
        r
    }

    fn judged(f: impl FnOnce(&mut PodReport)) -> (Verdict, bool, i32) {
        let mut r = captured();
        f(&mut r);
        judge(&mut r);
        (r.verdict, r.degraded, r.exit_code())
    }

    #[test]
    fn targets_parse() {
        assert_eq!("ns/web".parse(), Ok(Target::Name { namespace: "ns".into(), name: "web".into() }));
        assert_eq!("1234-abcd".parse(), Ok(Target::Uid("1234-abcd".into())));
        assert_eq!("/var/run/netns/x".parse(), Ok(Target::Netns("/var/run/netns/x".into())));
        for bad in ["", "a/b/c", "ns/", "/web"] {
            assert!(bad.parse::<Target>().is_err() || bad.starts_with('/'), "{bad:?}");
        }
        assert!(
            "a/b/c".parse::<Target>().is_err() && "ns/".parse::<Target>().is_err() && "".parse::<Target>().is_err()
        );
    }

    #[test]
    fn verdicts_and_exit_codes() {
        type Change = Box<dyn FnOnce(&mut PodReport)>;
        let table: Vec<(&str, Change, Verdict, i32)> = vec![
            ("all good", Box::new(|_| {}), Verdict::Captured, exit::OK),
            (
                "agent down",
                Box::new(|r| r.agent = Agent { up: false, ready: false, detail: "refused".into() }),
                Verdict::Captured,
                exit::DEGRADED,
            ),
            ("no ztunnel admin, probes fine", Box::new(|r| r.ztunnel.serves = None), Verdict::Captured, exit::DEGRADED),
            (
                "rules edited",
                Box::new(|r| r.rules.as_mut().unwrap().extra = vec!["x".into()]),
                Verdict::Drifted,
                exit::NOT_CAPTURED,
            ),
            (
                "routing gone",
                Box::new(|r| r.routing = Some(Check::fail("missing"))),
                Verdict::Drifted,
                exit::NOT_CAPTURED,
            ),
            (
                "rules removed",
                Box::new(|r| r.rules.as_mut().unwrap().found.clear()),
                Verdict::RulesMissing,
                exit::NOT_CAPTURED,
            ),
            ("not served", Box::new(|r| r.ztunnel.serves = Some(false)), Verdict::NotServed, exit::NOT_CAPTURED),
            (
                "probe escaped",
                Box::new(|r| r.probe_inbound = Some(Check::fail("reached the app"))),
                Verdict::NotCaptured,
                exit::NOT_CAPTURED,
            ),
            ("probe not run", Box::new(|r| r.probe_outbound = None), Verdict::CannotTell, exit::CANNOT_TELL),
            ("netns gone", Box::new(|r| r.netns = Some(Check::fail("ENOENT"))), Verdict::NetnsGone, exit::CANNOT_TELL),
            (
                "rule tool failed",
                Box::new(|r| r.rules.as_mut().unwrap().error = Some("nft: timeout".into())),
                Verdict::CannotTell,
                exit::CANNOT_TELL,
            ),
            (
                "not enrolled",
                Box::new(|r| {
                    r.enrolment = Enrolment { held: false, should: Some(false), why: "namespace not enrolled".into() };
                    r.rules.as_mut().unwrap().found.clear();
                }),
                Verdict::NotEnrolled,
                exit::OK,
            ),
            (
                "rules without a record",
                Box::new(|r| r.enrolment = Enrolment { held: false, should: Some(false), why: "opted out".into() }),
                Verdict::Drifted,
                exit::NOT_CAPTURED,
            ),
            (
                "should be enrolled, not held",
                Box::new(|r| {
                    r.enrolment = Enrolment { held: false, should: Some(true), why: "namespace enrolled".into() };
                    r.rules.as_mut().unwrap().found.clear();
                }),
                Verdict::RulesMissing,
                exit::NOT_CAPTURED,
            ),
            (
                "no such pod",
                Box::new(|r| {
                    r.enrolment = Enrolment::default();
                    r.pod.netns = None;
                }),
                Verdict::NotFound,
                exit::CANNOT_TELL,
            ),
        ];
        for (name, f, verdict, code) in table {
            let (v, _, c) = judged(f);
            assert_eq!((v, c), (verdict, code), "{name}");
        }
    }

    #[test]
    fn the_human_form_shows_the_diff_and_the_reasons() {
        let mut r = captured();
        r.rules.as_mut().unwrap().missing = vec!["ip daddr != 127.0.0.0/8 redirect to :15001".into()];
        judge(&mut r);
        let text = render_pod(&r);
        assert!(text.starts_with("pod mesh/web: DRIFTED\n"), "{text}");
        assert!(text.contains("              - ip daddr != 127.0.0.0/8 redirect to :15001"), "{text}");
        assert!(text.contains("1 missing, 0 extra"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["verdict"], "drifted");
        assert_eq!(json["rules"]["missing"][0], "ip daddr != 127.0.0.0/8 redirect to :15001");
    }
}
