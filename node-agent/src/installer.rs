//! Installing the CNI plugin on the node: the `ambit-cni` binary into the CNI bin dir, and Ambit's entry
//! chained last into the primary CNI's network config list — kept there while the agent runs, even when the
//! primary CNI rewrites its file, and removed on uninstall (but not on an upgrade, where the next agent takes
//! over without a gap).
//!
//! The config editing ([`chain`], [`unchain`], [`is_chained`], [`choose_primary`]) is pure; the rest touches
//! files atomically (temp file + rename), so a runtime never reads a half-written config or executes a
//! half-copied binary ("text file busy" cannot happen: the old binary's inode is replaced, not written).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tracing::{info, warn};

/// The plugin's type (its binary name).
pub const PLUGIN_TYPE: &str = "ambit-cni";

/// Installer settings (`install:` in the agent config).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstallConfig {
    /// Install at all (off when something else manages the CNI config).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where the runtime finds CNI plugins.
    #[serde(default = "default_bin_dir")]
    pub cni_bin_dir: PathBuf,
    /// Where the runtime finds network configs.
    #[serde(default = "default_conf_dir")]
    pub cni_conf_dir: PathBuf,
    /// The primary CNI's file, when it is not simply the first by name.
    #[serde(default)]
    pub cni_conf_name: Option<String>,
    /// The plugin binary to install (default: `ambit-cni` beside the agent's own binary).
    #[serde(default)]
    pub plugin_binary: Option<PathBuf>,
    /// Extra fields for the plugin's entry (log level, excluded namespaces, …).
    #[serde(default)]
    pub plugin_config: Map<String, Value>,
}

fn yes() -> bool {
    true
}
fn default_bin_dir() -> PathBuf {
    PathBuf::from("/opt/cni/bin")
}
fn default_conf_dir() -> PathBuf {
    PathBuf::from("/etc/cni/net.d")
}

impl Default for InstallConfig {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("defaults")
    }
}

/// Why installing failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The first installation has not run yet.
    #[error("not installed yet")]
    NotYet,
    /// No usable primary network config yet (the primary CNI has not written one, or all are broken).
    #[error("no usable primary CNI network config in {dir} ({detail})")]
    NoPrimary {
        /// The conf dir.
        dir: PathBuf,
        /// What was found.
        detail: String,
    },
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io { what, path: path.to_path_buf(), source }
}

/// Whether a config (list or single) has Ambit's entry as its last plugin.
pub fn is_chained(doc: &Value) -> bool {
    doc.get("plugins")
        .and_then(Value::as_array)
        .and_then(|p| p.last())
        .and_then(|p| p.get("type"))
        .and_then(Value::as_str)
        == Some(PLUGIN_TYPE)
}

/// The config with Ambit's entry appended last (any earlier Ambit entry removed). A single-plugin `.conf` is
/// turned into a list of it and Ambit.
pub fn chain(doc: &Value, entry: &Value) -> Value {
    let mut list = if doc.get("plugins").is_some() {
        doc.clone()
    } else {
        let mut single = doc.clone();
        let name = single.get("name").cloned().unwrap_or_else(|| json!("k8s-pod-network"));
        let version = single.get("cniVersion").cloned().unwrap_or_else(|| json!("0.3.1"));
        if let Some(m) = single.as_object_mut() {
            m.remove("name");
            m.remove("cniVersion");
        }
        json!({"name": name, "cniVersion": version, "plugins": [single]})
    };
    let plugins = list["plugins"].as_array_mut().expect("a list has plugins");
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    plugins.push(entry.clone());
    list
}

/// The config without Ambit's entry.
pub fn unchain(doc: &Value) -> Value {
    let mut d = doc.clone();
    if let Some(p) = d.get_mut("plugins").and_then(Value::as_array_mut) {
        p.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    }
    d
}

/// Picks the primary config among `files` (name, content) the way runtimes do: the named one if given, else
/// the first by name that parses and has plugins (or, for a `.conf`, a type). Returns its name, its parsed
/// content, and what was skipped and why.
pub fn choose_primary(files: &[(String, Vec<u8>)], name: Option<&str>) -> (Option<(String, Value)>, Vec<String>) {
    let mut skipped = Vec::new();
    let mut sorted: Vec<&(String, Vec<u8>)> = files
        .iter()
        .filter(|(n, _)| n.ends_with(".conf") || n.ends_with(".conflist") || n.ends_with(".json"))
        .filter(|(n, _)| name.is_none_or(|want| n == want))
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (n, bytes) in sorted {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(v) if v.get("plugins").and_then(Value::as_array).is_some_and(|p| !p.is_empty()) => {
                return (Some((n.clone(), v)), skipped);
            }
            Ok(v) if v.get("plugins").is_none() && v.get("type").is_some() => return (Some((n.clone(), v)), skipped),
            Ok(_) => skipped.push(format!("{n}: no plugins")),
            Err(e) => skipped.push(format!("{n}: {e}")),
        }
    }
    (None, skipped)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.ambit-tmp.{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io("setting the mode of", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming into", path))
}

/// Copies the plugin binary into the bin dir atomically; does nothing when the installed one is identical.
/// Leftover temp files of interrupted copies are removed first.
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    std::fs::create_dir_all(bin_dir).map_err(io("creating", bin_dir))?;
    for e in std::fs::read_dir(bin_dir).map_err(io("reading", bin_dir))?.flatten() {
        if e.file_name().to_string_lossy().starts_with(&format!(".{PLUGIN_TYPE}.ambit-tmp.")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let dst = bin_dir.join(PLUGIN_TYPE);
    let new = std::fs::read(src).map_err(io("reading the plugin binary", src))?;
    if std::fs::read(&dst).ok().as_deref() == Some(&new[..]) {
        return Ok(false);
    }
    write_atomic(&dst, &new, 0o755)?;
    Ok(true)
}

/// What the installer did to the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfOutcome {
    /// Already chained; nothing written.
    Unchanged(PathBuf),
    /// Chained (or re-chained after someone removed it).
    Written(PathBuf),
}

/// The node's CNI config as the installer manages it.
#[derive(Debug, Clone)]
pub struct Installer {
    /// Settings.
    pub config: InstallConfig,
    /// Ambit's entry.
    pub entry: Value,
}

impl Installer {
    /// An installer whose entry points the plugin at `agent_socket`.
    pub fn new(config: InstallConfig, agent_socket: &Path) -> Installer {
        let mut entry = Map::new();
        entry.insert("type".into(), json!(PLUGIN_TYPE));
        entry.insert("agent_socket".into(), json!(agent_socket));
        for (k, v) in &config.plugin_config {
            entry.insert(k.clone(), v.clone());
        }
        Installer { config, entry: Value::Object(entry) }
    }

    fn read_dir(&self) -> Result<Vec<(String, Vec<u8>)>, InstallError> {
        let dir = &self.config.cni_conf_dir;
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io("reading", dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.path().is_file() {
                continue;
            }
            if let Ok(b) = std::fs::read(e.path()) {
                files.push((name, b));
            }
        }
        Ok(files)
    }

    /// Makes sure the primary config ends with Ambit's entry; writes only when it does not.
    pub fn ensure_chained(&self) -> Result<ConfOutcome, InstallError> {
        let dir = &self.config.cni_conf_dir;
        let (primary, skipped) = choose_primary(&self.read_dir()?, self.config.cni_conf_name.as_deref());
        let Some((name, doc)) = primary else {
            let detail = if skipped.is_empty() { "none found".to_string() } else { skipped.join("; ") };
            return Err(InstallError::NoPrimary { dir: dir.clone(), detail });
        };
        for s in &skipped {
            warn!(skipped = %s, "ignoring a CNI config that does not parse");
        }
        let path = dir.join(&name);
        if is_chained(&doc) && doc["plugins"].as_array().and_then(|p| p.last()) == Some(&self.entry) {
            return Ok(ConfOutcome::Unchanged(path));
        }
        let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
        let chained = chain(&doc, &self.entry);
        let body = serde_json::to_vec_pretty(&chained).expect("json");
        if name.ends_with(".conf") {
            // A single config becomes a list; runtimes read .conflist for lists.
            let list = path.with_extension("conflist");
            write_atomic(&list, &body, mode)?;
            std::fs::remove_file(&path).map_err(io("removing", &path))?;
            info!(from = %path.display(), to = %list.display(), "converted the primary CNI config to a list and chained ambit-cni");
            return Ok(ConfOutcome::Written(list));
        }
        write_atomic(&path, &body, mode)?;
        info!(config = %path.display(), "chained ambit-cni into the primary CNI config");
        Ok(ConfOutcome::Written(path))
    }

    /// Installs the binary and chains the config.
    pub fn install(&self) -> Result<ConfOutcome, InstallError> {
        if let Some(src) = self.plugin_source()
            && install_binary(&src, &self.config.cni_bin_dir)?
        {
            info!(bin = %self.config.cni_bin_dir.join(PLUGIN_TYPE).display(), "installed the CNI plugin binary");
        }
        self.ensure_chained()
    }

    fn plugin_source(&self) -> Option<PathBuf> {
        self.config.plugin_binary.clone().or_else(|| {
            let beside = std::env::current_exe().ok()?.parent()?.join(PLUGIN_TYPE);
            beside.exists().then_some(beside)
        })
    }

    /// Removes Ambit's entry from every config in the dir and the binary (uninstall, not upgrade).
    pub fn uninstall(&self) -> Result<(), InstallError> {
        for (name, bytes) in self.read_dir()? {
            let Ok(doc) = serde_json::from_slice::<Value>(&bytes) else { continue };
            let stripped = unchain(&doc);
            if stripped != doc {
                let path = self.config.cni_conf_dir.join(&name);
                let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
                write_atomic(&path, &serde_json::to_vec_pretty(&stripped).expect("json"), mode)?;
                info!(config = %path.display(), "removed ambit-cni from the CNI config");
            }
        }
        let bin = self.config.cni_bin_dir.join(PLUGIN_TYPE);
        match std::fs::remove_file(&bin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(InstallError::Io { what: "removing", path: bin, source: e })
            }
            _ => Ok(()),
        }
    }
}

/// Counts repairs and says so, rate-limited, when something keeps undoing Ambit's entry.
#[derive(Debug, Default)]
pub struct RepairLimiter {
    recent: Vec<Instant>,
    last_warning: Option<Instant>,
}

impl RepairLimiter {
    /// Records a repair; returns whether to warn now (more than 5 repairs within a minute, at most one
    /// warning a minute).
    pub fn record(&mut self, now: Instant) -> bool {
        self.recent.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        self.recent.push(now);
        let due = self.last_warning.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60));
        if self.recent.len() > 5 && due {
            self.last_warning = Some(now);
            return true;
        }
        false
    }
}

/// Stops the installer's watch (before an uninstall, which must not be undone by it).
pub struct WatchHandle {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WatchHandle {
    /// Stops watching and waits for the watcher to finish what it was doing.
    pub fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Keeps the plugin installed: installs now, then watches the conf and bin dirs (inotify, with a slow poll as a
/// safety net) and puts Ambit's entry back whenever something removes it. Runs on its own thread; `on_state`
/// hears whether the installation is complete after every check, and `on_repair` each rewrite that undid
/// someone else's change.
pub fn watch(
    installer: Installer,
    on_state: impl Fn(Result<(), InstallError>) + Send + 'static,
    on_repair: impl Fn() + Send + 'static,
) -> WatchHandle {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
        .name("cni-installer".into())
        .spawn(move || {
            let _ = std::fs::create_dir_all(&installer.config.cni_bin_dir);
            let mut watch =
                ambit_proto::host::DirWatch::new(&[&installer.config.cni_conf_dir, &installer.config.cni_bin_dir]);
            let mut limiter = RepairLimiter::default();
            let mut installed_once = false;
            let mut last_poll = Instant::now() - Duration::from_secs(60);
            while !stopped.load(std::sync::atomic::Ordering::Acquire) {
                let mut changed = last_poll.elapsed() >= Duration::from_secs(if installed_once { 10 } else { 1 });
                // Only other writers' changes matter: ours are temp files renamed into place.
                changed |= watch.changed(|n| n.is_none_or(|n| !n.to_string_lossy().starts_with('.')));
                if changed {
                    last_poll = Instant::now();
                    match installer.install() {
                        Ok(ConfOutcome::Written(path)) => {
                            if installed_once {
                                on_repair();
                                if limiter.record(Instant::now()) {
                                    warn!(config = %path.display(), "another component keeps rewriting the CNI config and removing ambit-cni; if it is Cilium, set cni.exclusive=false");
                                }
                            }
                            installed_once = true;
                            on_state(Ok(()));
                        }
                        Ok(ConfOutcome::Unchanged(_)) => {
                            installed_once = true;
                            on_state(Ok(()));
                        }
                        Err(e) => on_state(Err(e)),
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .expect("spawning the installer thread");
    WatchHandle { stop, thread: Some(thread) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Value {
        json!({"type": "ambit-cni", "agent_socket": "/var/run/ambit/cni.sock"})
    }

    #[test]
    fn chains_lists_and_single_configs_once() {
        let list = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}, {"type": "portmap"}]});
        let c = chain(&list, &entry());
        assert!(is_chained(&c));
        assert_eq!(c["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(chain(&c, &entry()), c, "chaining twice changes nothing");
        assert_eq!(unchain(&c), list);
        let single = json!({"cniVersion": "0.4.0", "name": "calico", "type": "calico", "ipam": {}});
        let c = chain(&single, &entry());
        assert_eq!(c["name"], "calico");
        assert_eq!(c["cniVersion"], "0.4.0");
        assert_eq!(c["plugins"][0], json!({"type": "calico", "ipam": {}}));
        assert!(is_chained(&c));
        // An entry someone moved into the middle goes back to the end.
        let moved = json!({"name": "k", "cniVersion": "1.0.0", "plugins": [entry(), {"type": "bridge"}]});
        assert_eq!(chain(&moved, &entry())["plugins"], json!([{"type": "bridge"}, entry()]));
    }

    #[test]
    fn primary_is_the_first_usable_by_name() {
        let files = vec![
            ("99-other.conflist".to_string(), br#"{"name":"o","plugins":[{"type":"x"}]}"#.to_vec()),
            ("05-broken.conflist".to_string(), b"{".to_vec()),
            ("10-calico.conflist".to_string(), br#"{"name":"c","plugins":[{"type":"calico"}]}"#.to_vec()),
            ("00-notes.txt".to_string(), b"hello".to_vec()),
        ];
        let (p, skipped) = choose_primary(&files, None);
        assert_eq!(p.unwrap().0, "10-calico.conflist");
        assert_eq!(skipped.len(), 1);
        assert_eq!(choose_primary(&files, Some("99-other.conflist")).0.unwrap().0, "99-other.conflist");
        assert!(choose_primary(&[], None).0.is_none());
    }

    #[test]
    fn repair_warnings_are_rate_limited() {
        let mut l = RepairLimiter::default();
        let t0 = Instant::now();
        let warned: Vec<bool> = (0..10).map(|i| l.record(t0 + Duration::from_millis(i * 100))).collect();
        assert_eq!(warned.iter().filter(|w| **w).count(), 1);
        assert!(warned[5]);
        assert!(l.record(t0 + Duration::from_secs(70)) || l.recent.len() <= 5);
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ambit-installer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn files_are_replaced_atomically_keeping_their_mode() {
        let d = tempdir("files");
        let (conf, bin) = (d.join("net.d"), d.join("bin"));
        std::fs::create_dir_all(&conf).unwrap();
        let primary = conf.join("10-bridge.conf");
        std::fs::write(&primary, br#"{"cniVersion":"1.0.0","name":"b","type":"bridge"}"#).unwrap();
        std::fs::set_permissions(&primary, std::fs::Permissions::from_mode(0o640)).unwrap();
        let src = d.join("ambit-cni-src");
        std::fs::write(&src, b"#!/bin/sh\n").unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join(".ambit-cni.ambit-tmp.123"), b"stale").unwrap();
        let cfg = InstallConfig {
            cni_bin_dir: bin.clone(),
            cni_conf_dir: conf.clone(),
            plugin_binary: Some(src.clone()),
            ..Default::default()
        };
        let inst = Installer::new(cfg, Path::new("/run/a.sock"));
        let out = inst.install().unwrap();
        let list = conf.join("10-bridge.conflist");
        assert_eq!(out, ConfOutcome::Written(list.clone()));
        assert!(!primary.exists());
        assert_eq!(std::fs::metadata(&list).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read(bin.join(PLUGIN_TYPE)).unwrap(), b"#!/bin/sh\n");
        assert!(!bin.join(".ambit-cni.ambit-tmp.123").exists());
        assert_eq!(inst.install().unwrap(), ConfOutcome::Unchanged(list.clone()));
        assert!(!install_binary(&src, &bin).unwrap(), "an identical binary is not rewritten");
        inst.uninstall().unwrap();
        let doc: Value = serde_json::from_slice(&std::fs::read(&list).unwrap()).unwrap();
        assert!(!is_chained(&doc));
        assert!(!bin.join(PLUGIN_TYPE).exists());
        // No primary at all is a clear error.
        std::fs::remove_file(&list).unwrap();
        assert!(matches!(inst.ensure_chained(), Err(InstallError::NoPrimary { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
