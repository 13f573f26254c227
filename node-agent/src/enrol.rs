//! Which pods are enrolled. Pure: given what is known about a pod, decide.

use serde::Deserialize;

use ambit_proto::cni_api::PodRef;

/// The value of `istio.io/dataplane-mode` (and of the standalone overrides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneMode {
    /// Enrolled in the ambient mesh.
    Ambient,
    /// Explicitly not enrolled.
    None,
}

/// A per-pod override in standalone mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodOverride {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// Force enrolment on or off.
    #[serde(default)]
    pub mode: Option<DataplaneMode>,
    /// The pod's service account (its mesh identity).
    #[serde(default)]
    pub service_account: Option<String>,
}

/// Standalone mode: which pods are enrolled, from the agent's config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StandalonePolicy {
    /// Namespaces whose pods are enrolled (like the namespace label).
    #[serde(default)]
    pub enrolled_namespaces: Vec<String>,
    /// Per-pod settings, taking precedence over the namespace (like the pod label).
    #[serde(default)]
    pub pods: Vec<PodOverride>,
    /// Service account of pods without an override.
    #[serde(default)]
    pub default_service_account: Option<String>,
}

/// The decision for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Enrol it with this identity.
    Enrol {
        /// Its service account.
        service_account: String,
    },
    /// Leave it alone, for this reason.
    Skip(&'static str),
}

impl StandalonePolicy {
    /// Checks the policy for mistakes an operator would want to hear about.
    pub fn validate(&self) -> anyhow::Result<()> {
        for p in &self.pods {
            if p.namespace.is_empty() || p.name.is_empty() {
                anyhow::bail!("standalone.pods entries need a namespace and a name");
            }
        }
        Ok(())
    }

    /// Decides for `pod`.
    pub fn decide(&self, pod: &PodRef) -> Decision {
        let over = self.pods.iter().find(|o| o.namespace == pod.namespace && o.name == pod.name);
        let sa = over
            .and_then(|o| o.service_account.clone())
            .or_else(|| self.default_service_account.clone())
            .unwrap_or_else(|| "default".to_string());
        match over.and_then(|o| o.mode) {
            Some(DataplaneMode::None) => Decision::Skip("pod opted out (mode none)"),
            Some(DataplaneMode::Ambient) => Decision::Enrol { service_account: sa },
            None if self.enrolled_namespaces.iter().any(|n| n == &pod.namespace) => {
                Decision::Enrol { service_account: sa }
            }
            None => Decision::Skip("namespace not enrolled"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> PodRef {
        PodRef { namespace: ns.into(), name: name.into(), uid: "u".into() }
    }

    #[test]
    fn namespace_pod_and_opt_out() {
        let p: StandalonePolicy = serde_yaml_ng::from_str(
            "enrolledNamespaces: [mesh]\npods:\n- {namespace: mesh, name: legacy, mode: none}\n- {namespace: other, name: solo, mode: ambient, serviceAccount: solo-sa}\n- {namespace: mesh, name: web, serviceAccount: web}\n",
        )
        .unwrap();
        assert_eq!(p.decide(&pod("mesh", "a")), Decision::Enrol { service_account: "default".into() });
        assert_eq!(p.decide(&pod("mesh", "web")), Decision::Enrol { service_account: "web".into() });
        assert!(matches!(p.decide(&pod("mesh", "legacy")), Decision::Skip(_)));
        assert_eq!(p.decide(&pod("other", "solo")), Decision::Enrol { service_account: "solo-sa".into() });
        assert!(matches!(p.decide(&pod("other", "x")), Decision::Skip(_)));
    }
}
