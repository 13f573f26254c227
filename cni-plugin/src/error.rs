//! CNI errors: the spec's codes and the JSON the runtime reads from stdout.

use serde::Serialize;

/// The spec's error codes (CNI SPEC.md, "Error" section) plus the one Ambit reserves.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid or missing environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Invalid netns (libcni's code).
    pub const INVALID_NETNS: u32 = 8;
    /// Try again later: a transient condition.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Ambit: the node agent could not enrol the pod (rules, ztunnel). The message says why.
    pub const ENROLMENT_FAILED: u32 = 100;
}

/// A CNI error as the spec defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// One of [`code`].
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// More detail, may be empty.
    pub details: String,
}

impl CniError {
    /// An error with a code and message.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The JSON the runtime expects on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire { cni_version, code: self.code, msg: &self.msg, details: &self.details })
            .expect("serializing plain strings cannot fail")
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}
