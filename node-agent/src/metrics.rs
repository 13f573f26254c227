//! The agent's Prometheus metrics.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of plugin requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// ADD, DEL, CHECK, STATUS, GC.
    pub command: String,
    /// `enrolled`, `not_enrolled`, `ok`, or the error code.
    pub outcome: String,
}

/// Labels naming the rule backend.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// nftables, iptables-legacy, iptables-nft.
    pub backend: String,
}

/// Everything the agent exports.
pub struct Metrics {
    registry: Registry,
    /// `ambit_agent_pods_enrolled`.
    pub pods_enrolled: Gauge,
    /// `ambit_agent_enrolment_duration_seconds`: from the plugin's request to ztunnel's ack.
    pub enrolment_duration: Histogram,
    /// `ambit_agent_cni_requests_total{command,outcome}`.
    pub cni_requests: Family<RequestLabels, Counter>,
    /// `ambit_agent_rule_apply_errors_total{backend}`.
    pub rule_errors: Family<BackendLabels, Counter>,
    /// `ambit_agent_ztunnel_connections`: connected ztunnels.
    pub ztunnels: Gauge,
    /// `ambit_agent_installer_ready`: 1 while the plugin is installed and chained.
    pub installer_ready: Gauge,
    /// `ambit_agent_installer_repairs_total`: times the chained config had to be rewritten.
    pub installer_repairs: Counter,
    /// `ambit_agent_pods_swept_total`: pods dropped because their netns vanished without a DEL.
    pub pods_swept: Counter,
}

impl Metrics {
    /// Creates and registers them.
    pub fn new() -> Arc<Metrics> {
        let m = Metrics {
            registry: Registry::default(),
            pods_enrolled: Gauge::default(),
            enrolment_duration: Histogram::new([0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            cni_requests: Family::default(),
            rule_errors: Family::default(),
            ztunnels: Gauge::default(),
            installer_ready: Gauge::default(),
            installer_repairs: Counter::default(),
            pods_swept: Counter::default(),
        };
        let mut r = Registry::default();
        r.register("ambit_agent_pods_enrolled", "Pods enrolled on this node", m.pods_enrolled.clone());
        r.register(
            "ambit_agent_enrolment_duration_seconds",
            "Time from the plugin's ADD to ztunnel's ack",
            m.enrolment_duration.clone(),
        );
        r.register("ambit_agent_cni_requests", "Plugin requests by command and outcome", m.cni_requests.clone());
        r.register("ambit_agent_rule_apply_errors", "Failures applying or removing pod rules", m.rule_errors.clone());
        r.register("ambit_agent_ztunnel_connections", "ztunnels connected over ZDS", m.ztunnels.clone());
        r.register(
            "ambit_agent_installer_ready",
            "1 while ambit-cni is installed and chained",
            m.installer_ready.clone(),
        );
        r.register(
            "ambit_agent_installer_repairs",
            "Rewrites of the CNI config after something removed Ambit's entry",
            m.installer_repairs.clone(),
        );
        r.register(
            "ambit_agent_pods_swept",
            "Pods dropped because their netns vanished without a CNI DEL",
            m.pods_swept.clone(),
        );
        Arc::new(Metrics { registry: r, ..m })
    }

    /// The Prometheus text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
