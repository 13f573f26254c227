//! The chained plugin's result: the previous plugin's result, passed through.

use serde_json::{Map, Value};

/// What ADD prints: `prevResult` unchanged (the spec requires the output `cniVersion` to be the config's, which
/// the runtime already made the previous result's), or a minimal result when there is none.
pub fn passthrough(prev_result: Option<&Value>, cni_version: &str) -> Value {
    match prev_result {
        Some(Value::Object(m)) => {
            let mut m = m.clone();
            m.insert("cniVersion".into(), Value::String(cni_version.to_string()));
            Value::Object(m)
        }
        _ => {
            let mut m = Map::new();
            m.insert("cniVersion".into(), Value::String(cni_version.to_string()));
            Value::Object(m)
        }
    }
}

/// The pod's addresses (`ips[].address`, CIDR strings) in a result of any supported version.
pub fn addresses(prev_result: Option<&Value>) -> Vec<String> {
    prev_result
        .and_then(|r| r.get("ips"))
        .and_then(Value::as_array)
        .map(|ips| ips.iter().filter_map(|ip| ip.get("address").and_then(Value::as_str).map(str::to_string)).collect())
        .unwrap_or_default()
}

/// The VERSION answer.
pub fn version_info(cni_version: &str, supported: &[&str]) -> Value {
    serde_json::json!({ "cniVersion": cni_version, "supportedVersions": supported })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn passes_everything_through() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0},
                    {"address": "fd00::5/64", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.96.0.10"]}
        });
        assert_eq!(passthrough(Some(&prev), "1.0.0"), prev);
        assert_eq!(addresses(Some(&prev)), vec!["10.1.0.5/24", "fd00::5/64"]);
    }

    #[test]
    fn minimal_without_prev_result() {
        assert_eq!(passthrough(None, "1.1.0"), json!({"cniVersion": "1.1.0"}));
        assert!(addresses(None).is_empty());
        assert!(addresses(Some(&json!({"ips": "nonsense"}))).is_empty());
    }
}
