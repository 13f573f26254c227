//! Running the rule tools (`nft`, `iptables-restore`, `iptables-save`, `ipset`). Called on a thread inside the
//! target netns: the child process inherits it.

use std::io::Write;
use std::process::{Command, Stdio};

/// Why a ruleset could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A tool could not be run.
    #[error("cannot run {tool} ({source}); is its package installed?")]
    Spawn {
        /// The tool.
        tool: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A tool rejected its input; nothing was changed (each apply is one transaction).
    #[error("{tool} rejected the ruleset: {message}")]
    Rejected {
        /// The tool.
        tool: String,
        /// What it said.
        message: String,
    },
}

/// The `nft` binary, overridable for hosts that keep it elsewhere.
pub fn nft_binary() -> String {
    std::env::var("AMBIT_NFT").unwrap_or_else(|_| "nft".to_string())
}

/// Runs `tool args…` with `stdin` and returns its stdout.
pub fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ApplyError> {
    let spawn_err = |source| ApplyError::Spawn { tool: tool.to_string(), source };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error means the tool exited early; its stderr says why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ApplyError::Rejected {
            tool: format!("{tool} {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs `nft -f -` with `script`.
pub fn nft_run(script: &str) -> Result<(), ApplyError> {
    run(&nft_binary(), &["-f", "-"], Some(script)).map(|_| ())
}

/// `nft list table inet <table>`; `None` when the table does not exist.
pub fn nft_list_table(table: &str) -> Result<Option<String>, ApplyError> {
    match run(&nft_binary(), &["list", "table", "inet", table], None) {
        Ok(s) => Ok(Some(s)),
        Err(ApplyError::Rejected { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
