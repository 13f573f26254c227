//! Running a CNI network configuration list exactly as a container runtime does (libcni's rules): each plugin
//! exec'd with the CNI_* environment and its config on stdin, `name` and `cniVersion` copied from the list,
//! the previous plugin's result passed as `prevResult`; DEL in reverse order with the cached ADD result.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::netns::Netns;

/// A plugin that failed, with what it printed.
#[derive(Debug, Clone)]
pub struct CniFailure {
    /// The plugin type.
    pub plugin: String,
    /// Its exit status.
    pub exit_code: Option<i32>,
    /// The error JSON it printed on stdout, if it was JSON.
    pub error: Option<Value>,
    /// Raw stdout.
    pub stdout: String,
    /// Raw stderr.
    pub stderr: String,
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI plugin {} failed (exit {:?}): {}", self.plugin, self.exit_code, self.stdout.trim())
    }
}

impl std::error::Error for CniFailure {}

impl CniFailure {
    /// The CNI error code it reported.
    pub fn code(&self) -> Option<u64> {
        self.error.as_ref().and_then(|e| e.get("code")).and_then(Value::as_u64)
    }

    /// The CNI error message it reported.
    pub fn msg(&self) -> String {
        self.error.as_ref().and_then(|e| e.get("msg")).and_then(Value::as_str).unwrap_or_default().to_string()
    }
}

/// One attachment (a sandbox's interface), as the runtime identifies it.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
}

/// Runs the conflist found in a conf dir with plugins from a bin dir.
#[derive(Debug, Clone)]
pub struct CniRunner {
    /// `CNI_PATH`.
    pub bin_dir: PathBuf,
    /// Where the runtime looks for network configs.
    pub conf_dir: PathBuf,
}

/// Timing of the plugins of one ADD, in order.
pub type Timings = Vec<(String, Duration)>;

impl CniRunner {
    /// The config a runtime would use now: the first `.conflist` or `.conf` in the conf dir by name.
    pub fn load_conflist(&self) -> anyhow::Result<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .with_context(|| format!("reading {}", self.conf_dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(p.extension().and_then(|x| x.to_str()), Some("conflist") | Some("conf") | Some("json"))
            })
            .collect();
        files.sort();
        let first = files.first().with_context(|| format!("no network config in {}", self.conf_dir.display()))?;
        let v: Value =
            serde_json::from_slice(&std::fs::read(first)?).with_context(|| format!("parsing {}", first.display()))?;
        if v.get("plugins").is_some() {
            Ok(v)
        } else {
            // A single-plugin .conf is a list of one.
            Ok(json!({"cniVersion": v["cniVersion"], "name": v["name"], "plugins": [v]}))
        }
    }

    fn conflist(&self) -> Result<Value, CniFailure> {
        self.load_conflist().map_err(|e| CniFailure {
            plugin: "(conflist)".into(),
            exit_code: None,
            error: None,
            stdout: String::new(),
            stderr: format!("{e:#}"),
        })
    }

    fn exec(&self, node: &Netns, command: &str, att: &Attachment, conf: &Value) -> Result<Value, CniFailure> {
        let plugin = conf["type"].as_str().unwrap_or_default().to_string();
        let fail = |exit_code, stdout: String, stderr: String| CniFailure {
            plugin: plugin.clone(),
            exit_code,
            error: serde_json::from_str(&stdout).ok(),
            stdout,
            stderr,
        };
        let mut cmd = node.command(self.bin_dir.join(&plugin));
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", &att.args)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| fail(None, String::new(), format!("exec: {e}")))?;
        let stdin = serde_json::to_vec(conf).expect("json");
        if let Some(mut s) = child.stdin.take() {
            let _ = s.write_all(&stdin);
        }
        let out = child.wait_with_output().map_err(|e| fail(None, String::new(), e.to_string()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(fail(out.status.code(), stdout, stderr));
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).map_err(|_| fail(out.status.code(), stdout, stderr))
    }

    fn plugin_conf(list: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["name"] = list["name"].clone();
        c["cniVersion"] = list["cniVersion"].clone();
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    /// ADD through the whole list; returns the final result and how long each plugin took.
    pub fn add(&self, node: &Netns, att: &Attachment) -> Result<(Value, Timings), CniFailure> {
        let list = self.conflist()?;
        let mut prev: Option<Value> = None;
        let mut timings = Vec::new();
        for p in list["plugins"].as_array().into_iter().flatten() {
            let conf = Self::plugin_conf(&list, p, prev.as_ref());
            let t = Instant::now();
            let r = self.exec(node, "ADD", att, &conf)?;
            timings.push((p["type"].as_str().unwrap_or_default().to_string(), t.elapsed()));
            prev = Some(r);
        }
        Ok((prev.unwrap_or(Value::Null), timings))
    }

    /// DEL through the list in reverse, with the cached ADD result; every plugin runs even if one fails, and
    /// the first failure is returned.
    pub fn del(&self, node: &Netns, att: &Attachment, cached: Option<&Value>) -> Result<(), CniFailure> {
        let list = self.conflist()?;
        let mut first_err = None;
        for p in list["plugins"].as_array().into_iter().flatten().rev() {
            let conf = Self::plugin_conf(&list, p, cached);
            if let Err(e) = self.exec(node, "DEL", att, &conf) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Runs one command of one plugin binary directly, with a given config (CHECK, STATUS, GC, VERSION, or
    /// malformed input in tests).
    pub fn exec_raw(&self, node: &Netns, command: &str, att: &Attachment, conf: &Value) -> Result<Value, CniFailure> {
        self.exec(node, command, att, conf)
    }
}

/// Writes a file atomically (temp + rename), as well-behaved config writers do.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
