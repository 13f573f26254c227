//! Why an enrolment (or any plugin request) failed, and the one place that maps each reason to the plugin
//! API's error code: `TryAgainLater` for what goes away by itself (no ztunnel yet, the API unreachable),
//! `InvalidNetns` for a netns that is gone or wrong, `BadRequest` for what the plugin sent, `Internal` for
//! the rest. The plugin turns the code into its CNI error; the runtime retries the sandbox either way.

use std::net::IpAddr;
use std::path::PathBuf;

use ambit_proto::cni_api::{self, ErrorCode};

use crate::netns::NetnsError;
use crate::rules::RuleError;
use crate::zds::ZdsError;

/// Why a plugin request (or the controller's enrolment of a running pod) failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// The plugin speaks another version of the API.
    #[error("agent speaks API version {ours}, plugin sent {0}", ours = cni_api::API_VERSION)]
    Version(u32),
    /// An ADD without a netns path.
    #[error("ADD without a netns path")]
    NoNetnsPath,
    /// A pod address that is not an IP address.
    #[error("pod address {0:?} is not an IP address")]
    BadAddress(String),
    /// The agent is removing Ambit from the node.
    #[error("the agent is removing Ambit from this node")]
    Stopping,
    /// The netns is the node's own.
    #[error("{} is the node's own netns; refusing to install pod rules there", .0.display())]
    HostNetns(PathBuf),
    /// The netns cannot be used.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The rules, routing or listeners could not be installed (or checked).
    #[error("redirection for pod {pod} in {}: {source}", netns.display())]
    Rules {
        /// namespace/name.
        pod: String,
        /// The netns path.
        netns: PathBuf,
        /// The cause.
        source: Box<RuleError>,
    },
    /// No ztunnel is connected to take the pod.
    #[error(
        "no ztunnel is connected to {} (is ztunnel running on this node?); pod {pod} stays blocked, its traffic is captured",
        socket.display()
    )]
    NoZtunnel {
        /// namespace/name.
        pod: String,
        /// The agent's ZDS socket.
        socket: PathBuf,
    },
    /// ztunnel did not take the pod.
    #[error("handing pod {pod} to ztunnel: {source}")]
    Handoff {
        /// namespace/name.
        pod: String,
        /// The cause.
        source: ZdsError,
    },
    /// The fds to send could not be duplicated.
    #[error("handing pod {pod} to ztunnel: duplicating fds: {source}")]
    Fds {
        /// namespace/name.
        pod: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No ztunnel is connected (CHECK, STATUS).
    #[error("no ztunnel is connected to {}", .0.display())]
    Unready(PathBuf),
    /// The pod was removed while ztunnel was taking it.
    #[error("pod {0} was removed while ztunnel was taking it")]
    Superseded(String),
    /// The Kubernetes API could not say whether the pod is enrolled.
    #[error("{0}; the pod stays blocked until the API answers")]
    Api(#[from] ApiError),
    /// CHECK: the pod's rules are not (all) there.
    #[error("the redirection rules are missing in {}", .0.display())]
    RulesMissing(PathBuf),
    /// CHECK: the pod should be enrolled and is not.
    #[error("the pod should be enrolled but the agent does not hold it")]
    NotHeld,
    /// A running pod's netns was not found under /proc.
    #[error("no process of pod {pod} (uid {uid}) with IP {ips:?} found under {}", proc_root.display())]
    NotFound {
        /// namespace/name.
        pod: String,
        /// Its UID.
        uid: String,
        /// Its IPs.
        ips: Vec<IpAddr>,
        /// Where the search looked.
        proc_root: PathBuf,
    },
}

/// A Kubernetes API request that failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Reading a pod.
    #[error("cannot read pod {namespace}/{name} from the Kubernetes API: {source}")]
    ReadPod {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The cause.
        source: kube::Error,
    },
    /// Reading a namespace.
    #[error("cannot read namespace {namespace}: {source}")]
    ReadNamespace {
        /// The namespace.
        namespace: String,
        /// The cause.
        source: kube::Error,
    },
    /// Setting or removing the redirection annotation.
    #[error("annotating pod {namespace}/{name}: {source}")]
    Annotate {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The cause.
        source: kube::Error,
    },
}

impl EnrolError {
    /// The plugin API's error code for this error: the only mapping there is.
    pub fn code(&self) -> ErrorCode {
        match self {
            EnrolError::Version(_) => ErrorCode::UnsupportedVersion,
            EnrolError::NoNetnsPath | EnrolError::BadAddress(_) => ErrorCode::BadRequest,
            EnrolError::HostNetns(_) => ErrorCode::InvalidNetns,
            EnrolError::Netns(NetnsError::Gone(_) | NetnsError::NotANetns(_)) => ErrorCode::InvalidNetns,
            EnrolError::Stopping
            | EnrolError::NoZtunnel { .. }
            | EnrolError::Unready(_)
            | EnrolError::Api(_)
            | EnrolError::NotFound { .. } => ErrorCode::TryAgainLater,
            EnrolError::Netns(_)
            | EnrolError::Rules { .. }
            | EnrolError::Handoff { .. }
            | EnrolError::Fds { .. }
            | EnrolError::Superseded(_)
            | EnrolError::RulesMissing(_)
            | EnrolError::NotHeld => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_the_code_the_runtime_acts_on() {
        let gone = || NetnsError::Gone("/var/run/netns/x".into());
        let cases: Vec<(EnrolError, ErrorCode)> = vec![
            (EnrolError::Version(9), ErrorCode::UnsupportedVersion),
            (EnrolError::NoNetnsPath, ErrorCode::BadRequest),
            (EnrolError::BadAddress("x".into()), ErrorCode::BadRequest),
            (EnrolError::Stopping, ErrorCode::TryAgainLater),
            (EnrolError::HostNetns("/proc/1/ns/net".into()), ErrorCode::InvalidNetns),
            (EnrolError::Netns(gone()), ErrorCode::InvalidNetns),
            (EnrolError::Netns(NetnsError::NotANetns("/etc".into())), ErrorCode::InvalidNetns),
            (EnrolError::Netns(NetnsError::Panicked("/x".into())), ErrorCode::Internal),
            (EnrolError::NoZtunnel { pod: "a/b".into(), socket: "/s".into() }, ErrorCode::TryAgainLater),
            (EnrolError::Handoff { pod: "a/b".into(), source: ZdsError::Nack("no".into()) }, ErrorCode::Internal),
            (EnrolError::RulesMissing("/x".into()), ErrorCode::Internal),
            (EnrolError::NotHeld, ErrorCode::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e}");
        }
        // The messages the plugin passes on name the pod and what to do.
        let e = EnrolError::NoZtunnel { pod: "ns/p".into(), socket: "/run/ztunnel.sock".into() };
        assert!(e.to_string().contains("no ztunnel is connected to /run/ztunnel.sock"), "{e}");
    }
}
