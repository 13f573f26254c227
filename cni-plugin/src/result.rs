//! The chained plugin's result: the previous plugin's result, passed through.

use serde_json::{Map, Value};

use crate::error::{CniError, code};

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

/// Whether `s` is `<ip>/<prefix>` with a prefix that fits the address family.
fn is_cidr(s: &str) -> bool {
    let Some((ip, len)) = s.split_once('/') else { return false };
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else { return false };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    !len.is_empty()
        && len.len() <= 3
        && len.bytes().all(|b| b.is_ascii_digit())
        && len.parse::<u8>().is_ok_and(|l| l <= max)
}

/// The pod's addresses (`ips[].address`, CIDR strings) from the previous plugin's result, checked in full
/// before the agent is asked to act on them: `ips` a list of objects, each `address` a CIDR whose prefix fits
/// its family, each `gateway` (if any) an address of the same family, each `interface` (if any) an index into
/// `interfaces`. A primary plugin's result Ambit cannot read fails the ADD (the pod would otherwise be
/// enrolled on addresses nobody checked) with the field that is wrong.
pub fn pod_addresses(prev_result: Option<&Value>) -> Result<Vec<String>, CniError> {
    let bad = |what: String| CniError::new(code::INVALID_CONFIG, format!("prevResult: {what}"));
    let Some(prev) = prev_result else { return Ok(Vec::new()) };
    let interfaces = match prev.get("interfaces") {
        None | Some(Value::Null) => 0,
        Some(Value::Array(a)) => {
            for (i, itf) in a.iter().enumerate() {
                if !itf.get("name").is_some_and(Value::is_string) {
                    return Err(bad(format!("interfaces[{i}] has no name")));
                }
            }
            a.len()
        }
        Some(_) => return Err(bad("interfaces is not a list".into())),
    };
    let ips = match prev.get("ips") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("ips is not a list".into())),
    };
    let mut out = Vec::with_capacity(ips.len());
    for (i, ip) in ips.iter().enumerate() {
        let address =
            ip.get("address").and_then(Value::as_str).ok_or_else(|| bad(format!("ips[{i}] has no address")))?;
        if !is_cidr(address) {
            return Err(bad(format!("ips[{i}].address {address:?} is not an address with a prefix length")));
        }
        let v4 = address.split('/').next().is_some_and(|a| a.parse::<std::net::Ipv4Addr>().is_ok());
        if let Some(g) = ip.get("gateway") {
            let ok = g.as_str().and_then(|g| g.parse::<std::net::IpAddr>().ok()).is_some_and(|g| g.is_ipv4() == v4);
            if !ok {
                return Err(bad(format!("ips[{i}].gateway {g} is not an address of the same family")));
            }
        }
        if let Some(itf) = ip.get("interface")
            && itf.as_u64().is_none_or(|n| n as usize >= interfaces)
        {
            return Err(bad(format!("ips[{i}].interface {itf} is not an index into interfaces")));
        }
        out.push(address.to_string());
    }
    Ok(out)
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
        assert_eq!(pod_addresses(Some(&prev)).unwrap(), vec!["10.1.0.5/24", "fd00::5/64"]);
    }

    #[test]
    fn minimal_without_prev_result() {
        assert_eq!(passthrough(None, "1.1.0"), json!({"cniVersion": "1.1.0"}));
        assert!(pod_addresses(None).unwrap().is_empty());
        assert!(pod_addresses(Some(&json!({}))).unwrap().is_empty());
    }

    #[test]
    fn a_result_that_does_not_hold_together_is_refused_with_its_field() {
        let itf = json!([{"name": "eth0"}]);
        for (prev, says) in [
            (json!({"ips": "nonsense"}), "ips is not a list"),
            (json!({"ips": [{"interface": 0}], "interfaces": itf}), "ips[0] has no address"),
            (json!({"ips": [{"address": "10.1.0.5"}]}), "ips[0].address"),
            (json!({"ips": [{"address": "10.1.0.5/33"}]}), "ips[0].address"),
            (json!({"ips": [{"address": "10.1.0.300/24"}]}), "ips[0].address"),
            (json!({"ips": [{"address": "fd00::5/129"}]}), "ips[0].address"),
            (json!({"ips": [{"address": "10.1.0.5/+8"}]}), "ips[0].address"),
            (json!({"ips": [{"address": "10.1.0.5/24", "gateway": "fd00::1"}]}), "ips[0].gateway"),
            (json!({"ips": [{"address": "10.1.0.5/24", "gateway": 7}]}), "ips[0].gateway"),
            (json!({"ips": [{"address": "10.1.0.5/24", "interface": 1}], "interfaces": itf}), "ips[0].interface"),
            (json!({"ips": [{"address": "10.1.0.5/24", "interface": -1}], "interfaces": itf}), "ips[0].interface"),
            (json!({"interfaces": [{"mac": "x"}]}), "interfaces[0] has no name"),
            (json!({"interfaces": {}}), "interfaces is not a list"),
        ] {
            let e = pod_addresses(Some(&prev)).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG);
            assert!(e.msg.contains(says), "{prev}: {}", e.msg);
        }
    }
}
