//! The plugin's network configuration (stdin) and what it may contain.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{CniError, code};

/// Spec versions this plugin implements, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
/// The newest one, used when the runtime gave none we know.
pub const LATEST_VERSION: &str = "1.1.0";

/// Default time the plugin waits for the agent's answer.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default log file.
pub const DEFAULT_LOG_FILE: &str = "/var/run/ambit/cni.log";

/// The parsed network configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    /// `cniVersion`.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// `name` of the network.
    pub name: String,
    /// `type`, the plugin's binary name.
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The previous plugin's result, passed through untouched.
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    /// The agent's unix socket.
    #[serde(default = "default_socket")]
    pub agent_socket: PathBuf,
    /// How long to wait for the agent, in milliseconds.
    #[serde(default)]
    pub agent_timeout_ms: Option<u64>,
    /// Where the plugin logs besides stderr; empty disables the file.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// `error`, `warn`, `info` or `debug`.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Namespaces whose pods pass straight through without contacting the agent.
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// The agent's own namespace: its pods pass straight through (they start before the agent listens).
    #[serde(default)]
    pub agent_namespace: Option<String>,
    /// Name prefix of the agent's pods in `agent_namespace`.
    #[serde(default = "default_agent_prefix")]
    pub agent_pod_prefix: String,
    /// Whether a failing STATUS is reported to the runtime (which may mark the node NotReady).
    #[serde(default)]
    pub report_status: bool,
    /// GC's list of valid attachments (CNI 1.1).
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Value>>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(ambit_proto::cni_api::DEFAULT_SOCKET)
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".to_string()]
}

fn default_agent_prefix() -> String {
    "ambit-node-".to_string()
}

impl NetConf {
    /// Parses and validates the configuration from stdin.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let raw: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(code::DECODE_FAILURE, "the network configuration on stdin is not JSON")
                .with_details(e.to_string())
        })?;
        let version = raw.get("cniVersion").and_then(Value::as_str).unwrap_or_default().to_string();
        if version.is_empty() {
            return Err(CniError::new(code::INVALID_CONFIG, "the network configuration has no cniVersion"));
        }
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(CniError::new(code::INCOMPATIBLE_VERSION, format!("CNI version {version} is not supported"))
                .with_details(format!("supported versions: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        let conf: NetConf = serde_json::from_value(raw).map_err(|e| {
            CniError::new(code::INVALID_CONFIG, "the network configuration is invalid").with_details(e.to_string())
        })?;
        if conf.name.is_empty() {
            return Err(CniError::new(code::INVALID_CONFIG, "the network configuration has an empty name"));
        }
        if conf.plugin_type.is_empty() {
            return Err(CniError::new(code::INVALID_CONFIG, "the network configuration has an empty type"));
        }
        if let Some(prev) = &conf.prev_result
            && !prev.is_object()
        {
            return Err(CniError::new(code::INVALID_CONFIG, "prevResult is not a JSON object"));
        }
        if conf.agent_socket.as_os_str().is_empty() {
            return Err(CniError::new(code::INVALID_CONFIG, "agent_socket is empty"));
        }
        if conf.agent_timeout_ms == Some(0) {
            return Err(CniError::new(code::INVALID_CONFIG, "agent_timeout_ms must be positive"));
        }
        Ok(conf)
    }

    /// How long to wait for the agent.
    pub fn agent_timeout(&self) -> Duration {
        self.agent_timeout_ms.map(Duration::from_millis).unwrap_or(DEFAULT_AGENT_TIMEOUT)
    }

    /// Whether a pod passes through without asking the agent.
    pub fn bypasses(&self, namespace: &str, name: &str) -> bool {
        if self.exclude_namespaces.iter().any(|n| n == namespace) {
            return true;
        }
        self.agent_namespace.as_deref() == Some(namespace) && name.starts_with(&self.agent_pod_prefix)
    }
}

/// The cniVersion to answer with when the configuration could not be parsed: the one it names if it names one
/// we know, the newest otherwise.
pub fn best_effort_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConf, CniError> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn minimal_config() {
        let c = parse(r#"{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni"}"#).unwrap();
        assert_eq!(c.agent_socket, PathBuf::from("/var/run/ambit/cni.sock"));
        assert_eq!(c.agent_timeout(), DEFAULT_AGENT_TIMEOUT);
        assert_eq!(c.exclude_namespaces, vec!["kube-system"]);
        assert!(c.bypasses("kube-system", "x"));
        assert!(!c.bypasses("default", "x"));
    }

    #[test]
    fn bad_configs_get_the_right_code() {
        assert_eq!(parse("not json").unwrap_err().code, code::DECODE_FAILURE);
        assert_eq!(parse(r#"{"name":"k","type":"t"}"#).unwrap_err().code, code::INVALID_CONFIG);
        assert_eq!(
            parse(r#"{"cniVersion":"0.2.0","name":"k","type":"t"}"#).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(parse(r#"{"cniVersion":"1.0.0","name":"","type":"t"}"#).unwrap_err().code, code::INVALID_CONFIG);
        assert_eq!(parse(r#"{"cniVersion":"1.0.0","type":"t"}"#).unwrap_err().code, code::INVALID_CONFIG);
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","name":"k","type":"t","agent_timeout_ms":"x"}"#).unwrap_err().code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","name":"k","type":"t","prevResult":[1]}"#).unwrap_err().code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","name":"k","type":"t","agent_timeout_ms":0}"#).unwrap_err().code,
            code::INVALID_CONFIG
        );
    }

    #[test]
    fn agent_pods_bypass() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"k","type":"t","agent_namespace":"ambit-system","exclude_namespaces":[]}"#,
        )
        .unwrap();
        assert!(c.bypasses("ambit-system", "ambit-node-x7k2"));
        assert!(!c.bypasses("ambit-system", "other"));
        assert!(!c.bypasses("kube-system", "x"));
    }

    #[test]
    fn version_fallback() {
        assert_eq!(best_effort_version(b"{\"cniVersion\":\"0.4.0\"}"), "0.4.0");
        assert_eq!(best_effort_version(b"{\"cniVersion\":\"9.9.9\"}"), LATEST_VERSION);
        assert_eq!(best_effort_version(b"garbage"), LATEST_VERSION);
    }
}
