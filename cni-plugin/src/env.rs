//! The CNI_* environment the runtime sets for each invocation.

use ambit_proto::cni_api::PodRef;

use crate::error::{CniError, code};

/// The CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach.
    Add,
    /// Detach.
    Del,
    /// Verify.
    Check,
    /// Readiness (1.1).
    Status,
    /// Garbage collection (1.1).
    Gc,
    /// Report supported versions.
    Version,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }
}

/// The parsed environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The Kubernetes pod from `CNI_ARGS`, if the runtime named one.
    pub pod: Option<PodRef>,
}

impl CniEnv {
    /// Reads and validates the environment through `var` (the process environment in production).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let command = match get("CNI_COMMAND") {
            None => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
            Some(c) => Command::parse(&c)
                .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND {c:?}")))?,
        };
        let mut env = CniEnv {
            command,
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            pod: None,
        };
        let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        if needs_attachment {
            if env.container_id.is_empty() {
                return Err(CniError::new(code::INVALID_ENV, format!("CNI_CONTAINERID is required for {command:?}")));
            }
            validate_container_id(&env.container_id)?;
            if env.ifname.is_empty() {
                return Err(CniError::new(code::INVALID_ENV, format!("CNI_IFNAME is required for {command:?}")));
            }
            validate_ifname(&env.ifname)?;
        }
        // DEL may come without a netns (the runtime lost it); ADD and CHECK need one.
        if matches!(command, Command::Add | Command::Check) && env.netns.is_none() {
            return Err(CniError::new(code::INVALID_ENV, format!("CNI_NETNS is required for {command:?}")));
        }
        if let Some(args) = get("CNI_ARGS") {
            env.pod = parse_k8s_args(&args)?;
        }
        Ok(env)
    }
}

fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(code::INVALID_ENV, format!("CNI_CONTAINERID {id:?} has characters outside [a-zA-Z0-9_.-]")))
    }
}

fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = name.len() > 15
        || name == "."
        || name == ".."
        || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        Err(CniError::new(code::INVALID_ENV, format!("CNI_IFNAME {name:?} is not a valid interface name")))
    } else {
        Ok(())
    }
}

/// Parses `CNI_ARGS` (`K=V;K=V`) and returns the pod it names, if it names one. Unknown keys are ignored.
pub fn parse_k8s_args(args: &str) -> Result<Option<PodRef>, CniError> {
    let mut pod = PodRef::default();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("CNI_ARGS entry {pair:?} is not KEY=VALUE")))?;
        match k {
            "K8S_POD_NAMESPACE" => pod.namespace = v.to_string(),
            "K8S_POD_NAME" => pod.name = v.to_string(),
            "K8S_POD_UID" => pod.uid = v.to_string(),
            _ => {}
        }
    }
    if pod.namespace.is_empty() || pod.name.is_empty() {
        return Ok(None);
    }
    Ok(Some(pod))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        CniEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn full_add() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-123"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u;K8S_POD_INFRA_CONTAINER_ID=abc",
            ),
        ])
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.pod, Some(PodRef { namespace: "ns".into(), name: "p".into(), uid: "u".into() }));
    }

    #[test]
    fn missing_or_bad_vars() {
        assert_eq!(env(&[]).unwrap_err().code, code::INVALID_ENV);
        assert_eq!(env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code, code::INVALID_ENV);
        assert_eq!(env(&[("CNI_COMMAND", "ADD")]).unwrap_err().code, code::INVALID_ENV);
        let no_netns = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "a"), ("CNI_IFNAME", "eth0")]);
        assert_eq!(no_netns.unwrap_err().code, code::INVALID_ENV);
        let bad_id = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "-a/b"), ("CNI_IFNAME", "eth0")]);
        assert_eq!(bad_id.unwrap_err().code, code::INVALID_ENV);
        let bad_if = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "a"), ("CNI_IFNAME", "a-very-long-interface")]);
        assert_eq!(bad_if.unwrap_err().code, code::INVALID_ENV);
        let bad_args =
            env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "a"), ("CNI_IFNAME", "eth0"), ("CNI_ARGS", "junk")]);
        assert_eq!(bad_args.unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn del_without_netns_and_version_without_anything() {
        let d = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "a"), ("CNI_IFNAME", "eth0")]).unwrap();
        assert_eq!(d.netns, None);
        assert_eq!(d.pod, None);
        assert_eq!(env(&[("CNI_COMMAND", "VERSION")]).unwrap().command, Command::Version);
        assert_eq!(env(&[("CNI_COMMAND", "STATUS")]).unwrap().command, Command::Status);
    }
}
