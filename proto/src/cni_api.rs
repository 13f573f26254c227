//! The CNI plugin ↔ node agent API (Ambit's own, versioned JSON over a unix stream socket).
//!
//! One exchange per connection: the plugin connects to the agent's socket (default [`DEFAULT_SOCKET`]), writes
//! one JSON [`Request`], shuts down its write half, and reads one JSON [`Response`] until EOF. Both sides reject
//! a message larger than [`MAX_MESSAGE_BYTES`]. The plugin holds no Kubernetes credentials: it reports what the
//! runtime told it and the agent decides. A newer agent answers older request versions; an agent that does not
//! know a request's version answers with [`ErrorCode::UnsupportedVersion`].

use serde::{Deserialize, Serialize};

/// The version of this API. Bumped only for incompatible changes; fields are added compatibly.
pub const API_VERSION: u32 = 1;
/// Where the agent listens by default.
pub const DEFAULT_SOCKET: &str = "/var/run/ambit/cni.sock";
/// The largest request or response either side reads.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Where the plugin leaves a DEL it could not deliver (the agent was down), beside the agent's socket: the
/// agent carries each out when it starts and on every sweep, so a pod deleted while the agent was away, whose
/// netns outlives the DEL, does not stay captured.
pub fn deferred_del_dir(socket: &std::path::Path) -> std::path::PathBuf {
    socket.with_file_name("deferred-del")
}

/// The file a deferred DEL is left in: named by its container id, made safe as a file name.
pub fn deferred_del_file(socket: &std::path::Path, container_id: &str) -> std::path::PathBuf {
    let safe: String =
        container_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    deferred_del_dir(socket).join(format!("{safe}.json"))
}

/// What the runtime asked the plugin to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// A pod sandbox was created and networked by the primary CNI.
    Add,
    /// A pod sandbox is being torn down.
    Del,
    /// The runtime checks that the pod's networking is still in place.
    Check,
    /// The runtime asks whether the plugin can serve ADD.
    Status,
    /// The runtime lists the attachments that are still valid; everything else may go.
    Gc,
    /// Not from a runtime: `ambit-agent debug pod --repair` asks the agent to reinstall a pod's expected rules
    /// and routing (the pod, by UID or namespace and name, must be one the agent holds).
    Repair,
}

/// The pod a request is about, as the runtime named it in `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`, empty when the runtime did not send it.
    #[serde(default)]
    pub uid: String,
}

/// One attachment named by GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// The container id of a sandbox that is still valid.
    pub container_id: String,
    /// Its interface name.
    pub ifname: String,
}

/// What the plugin sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// Always [`API_VERSION`] for this plugin build.
    pub version: u32,
    /// The CNI command.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for STATUS and GC).
    #[serde(default)]
    pub container_id: String,
    /// `CNI_NETNS`, when the runtime gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    #[serde(default)]
    pub ifname: String,
    /// The pod, from `CNI_ARGS`.
    #[serde(default)]
    pub pod: PodRef,
    /// The pod's addresses in CIDR form (`10.1.0.5/24`), from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<String>,
    /// GC only: the attachments the runtime still knows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub valid_attachments: Vec<Attachment>,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// ADD: the pod is enrolled, its traffic is captured and ztunnel acknowledged it.
    Enrolled,
    /// ADD: the pod is not part of the mesh; nothing was done.
    NotEnrolled,
    /// DEL, CHECK, STATUS, GC: done, nothing to report.
    Ok,
}

/// Error classes the agent reports, mapped by the plugin onto CNI error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorCode {
    /// The request was malformed.
    BadRequest,
    /// The agent does not speak this request version.
    UnsupportedVersion,
    /// The pod's netns is gone or is not a netns.
    InvalidNetns,
    /// The agent is not ready (no ztunnel connected yet, still starting): the runtime should retry.
    TryAgainLater,
    /// Anything else; the message says what.
    Internal,
}

/// An error the agent reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    /// Its class.
    pub code: ErrorCode,
    /// What failed, on what, and what to do.
    pub message: String,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    /// The API version the agent answered in.
    pub version: u32,
    /// The outcome, when the request succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// The error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Response {
    /// A successful answer.
    pub fn ok(outcome: Outcome) -> Self {
        Response { version: API_VERSION, outcome: Some(outcome), error: None }
    }

    /// A failed answer.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response { version: API_VERSION, outcome: None, error: Some(ApiError { code, message: message.into() }) }
    }

    /// The outcome, or the error.
    pub fn into_result(self) -> Result<Outcome, ApiError> {
        match (self.outcome, self.error) {
            (_, Some(e)) => Err(e),
            (Some(o), None) => Ok(o),
            (None, None) => Err(ApiError {
                code: ErrorCode::Internal,
                message: "the agent answered with neither an outcome nor an error".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_shape() {
        let r = Request {
            version: API_VERSION,
            command: Command::Add,
            container_id: "abc".into(),
            netns: Some("/var/run/netns/cni-1".into()),
            ifname: "eth0".into(),
            pod: PodRef { namespace: "ns".into(), name: "p".into(), uid: "u-1".into() },
            ips: vec!["10.1.0.5/24".into()],
            valid_attachments: vec![],
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["command"], "ADD");
        assert_eq!(j["containerId"], "abc");
        assert_eq!(j["pod"]["uid"], "u-1");
        assert!(j.get("validAttachments").is_none());
        let back: Request = serde_json::from_value(j).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn response_results() {
        assert_eq!(Response::ok(Outcome::Enrolled).into_result(), Ok(Outcome::Enrolled));
        let e = Response::error(ErrorCode::TryAgainLater, "no ztunnel").into_result().unwrap_err();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        let empty: Response = serde_json::from_str(r#"{"version":1}"#).unwrap();
        assert!(empty.into_result().is_err());
    }
}

/// Property tests: requests survive the wire unchanged; any bytes are decoded or refused, never a panic.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![
            Just(Command::Add),
            Just(Command::Del),
            Just(Command::Check),
            Just(Command::Status),
            Just(Command::Gc),
            Just(Command::Repair)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::testing::proptest_cases()))]

        #[test]
        fn requests_round_trip(
            command in command(), container_id in ".{0,40}", netns in proptest::option::of(".{0,40}"),
            namespace in ".{0,20}", name in ".{0,20}", uid in ".{0,20}", ips in proptest::collection::vec(".{0,20}", 0..4),
        ) {
            let r = Request {
                version: API_VERSION, command, container_id, netns, ifname: "eth0".into(),
                pod: PodRef { namespace, name, uid }, ips, valid_attachments: Vec::new(),
            };
            let back: Request = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
            prop_assert_eq!(back, r);
        }

        #[test]
        fn any_bytes_are_decoded_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = serde_json::from_slice::<Request>(&bytes);
            let _ = serde_json::from_slice::<Response>(&bytes);
        }
    }
}
