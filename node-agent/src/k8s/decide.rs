//! Kubernetes enrolment, pure: a pod and its namespace in, a verdict out. Istio's rules, so the same labels
//! drive both meshes.

use k8s_openapi::api::core::v1::{Namespace, Pod};

/// The label that enrols (`ambient`) or opts out (`none`), on a pod or its namespace.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The annotation recording that a pod's traffic is redirected (read by Istio's tools).
pub const REDIRECTION: &str = "ambient.istio.io/redirection";
/// The annotation of sidecar-injected pods, which ambient leaves alone.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Enrol it with this identity.
    Enrol {
        /// Its service account.
        service_account: String,
    },
    /// Leave it (or take it) out of the mesh, for this reason.
    Skip(&'static str),
    /// It finished: forget it.
    Gone(&'static str),
}

fn label<'a>(labels: Option<&'a std::collections::BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.and_then(|l| l.get(key)).map(String::as_str)
}

/// Decides for `pod` in `ns` (if known), with `excluded` namespaces never enrolled.
pub fn decide(pod: &Pod, ns: Option<&Namespace>, excluded: &[String]) -> Verdict {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return Verdict::Gone("pod finished");
    }
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Verdict::Skip("hostNetwork pod");
    }
    let meta = &pod.metadata;
    if meta.annotations.as_ref().is_some_and(|a| a.contains_key(SIDECAR_STATUS)) {
        return Verdict::Skip("sidecar-injected pod");
    }
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    if excluded.iter().any(|e| e == namespace) {
        return Verdict::Skip("excluded namespace");
    }
    let sa =
        spec.and_then(|s| s.service_account_name.clone()).filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into());
    match label(meta.labels.as_ref(), DATAPLANE_MODE) {
        Some("none") => return Verdict::Skip("pod opted out"),
        Some("ambient") => return Verdict::Enrol { service_account: sa },
        _ => {}
    }
    match label(ns.and_then(|n| n.metadata.labels.as_ref()), DATAPLANE_MODE) {
        Some("ambient") => Verdict::Enrol { service_account: sa },
        _ => Verdict::Skip("namespace not enrolled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        let mut base = json!({"metadata": {"name": "p", "namespace": "app"}, "spec": {"containers": [], "serviceAccountName": "web"}});
        merge(&mut base, v);
        serde_json::from_value(base).unwrap()
    }

    fn ns(label: Option<&str>) -> Namespace {
        let labels = label.map(|l| json!({DATAPLANE_MODE: l})).unwrap_or(json!({}));
        serde_json::from_value(json!({"metadata": {"name": "app", "labels": labels}})).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn istio_rules() {
        let enrol = Verdict::Enrol { service_account: "web".into() };
        let none: [String; 0] = [];
        assert_eq!(decide(&pod(json!({})), Some(&ns(Some("ambient"))), &none), enrol);
        assert_eq!(decide(&pod(json!({})), Some(&ns(None)), &none), Verdict::Skip("namespace not enrolled"));
        assert_eq!(
            decide(&pod(json!({"metadata": {"labels": {DATAPLANE_MODE: "ambient"}}})), Some(&ns(None)), &none),
            enrol
        );
        assert_eq!(decide(&pod(json!({"metadata": {"labels": {DATAPLANE_MODE: "ambient"}}})), None, &none), enrol);
        assert!(matches!(
            decide(&pod(json!({"metadata": {"labels": {DATAPLANE_MODE: "none"}}})), Some(&ns(Some("ambient"))), &none),
            Verdict::Skip(_)
        ));
        assert!(matches!(
            decide(&pod(json!({"spec": {"hostNetwork": true}})), Some(&ns(Some("ambient"))), &none),
            Verdict::Skip(_)
        ));
        assert!(matches!(
            decide(
                &pod(json!({"metadata": {"annotations": {SIDECAR_STATUS: "{}"}}})),
                Some(&ns(Some("ambient"))),
                &none
            ),
            Verdict::Skip(_)
        ));
        assert!(matches!(decide(&pod(json!({})), Some(&ns(Some("ambient"))), &["app".to_string()]), Verdict::Skip(_)));
        assert!(matches!(
            decide(&pod(json!({"status": {"phase": "Succeeded"}})), Some(&ns(Some("ambient"))), &none),
            Verdict::Gone(_)
        ));
        let no_sa = pod(json!({"spec": {"serviceAccountName": ""}}));
        assert_eq!(
            decide(&no_sa, Some(&ns(Some("ambient"))), &none),
            Verdict::Enrol { service_account: "default".into() }
        );
    }
}
