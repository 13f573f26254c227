//! Applying nftables scripts. Called on a thread that is inside the pod netns: the `nft` child inherits it.

use std::io::Write;
use std::process::{Command, Stdio};

/// Why a ruleset could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The `nft` binary could not be run.
    #[error("cannot run nft ({0}); is the nftables package installed?")]
    Spawn(std::io::Error),
    /// nft rejected the script; nothing was changed (the transaction is atomic).
    #[error("nft rejected the ruleset: {0}")]
    Rejected(String),
}

/// The `nft` binary, overridable for hosts that keep it elsewhere.
pub fn nft_binary() -> String {
    std::env::var("AMBIT_NFT").unwrap_or_else(|_| "nft".to_string())
}

/// Runs `nft -f -` with `script` in the calling thread's netns.
pub fn nft_run(script: &str) -> Result<(), ApplyError> {
    let mut child = Command::new(nft_binary())
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ApplyError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error means nft exited early; its stderr says why.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(ApplyError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ApplyError::Rejected(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// `nft list table inet <table>` in the calling thread's netns; `None` when the table does not exist.
pub fn nft_list_table(table: &str) -> Result<Option<String>, ApplyError> {
    let out = Command::new(nft_binary())
        .args(["list", "table", "inet", table])
        .stdin(Stdio::null())
        .output()
        .map_err(ApplyError::Spawn)?;
    if out.status.success() { Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned())) } else { Ok(None) }
}
