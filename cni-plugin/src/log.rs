//! The plugin's log: stderr (the runtime captures it) and a size-rotated file. Never stdout, which belongs to
//! the CNI result.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Rotate the file once it grows past this size; one previous generation (`.1`) is kept.
pub const ROTATE_BYTES: u64 = 10 * 1024 * 1024;

/// Log levels, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Failures.
    Error,
    /// Things that went wrong but did not fail the command.
    Warn,
    /// One line per command.
    Info,
    /// Detail.
    Debug,
}

impl Level {
    /// Parses a level name; unknown names mean `info`.
    pub fn parse(s: Option<&str>) -> Level {
        match s.map(str::to_ascii_lowercase).as_deref() {
            Some("error") => Level::Error,
            Some("warn") | Some("warning") => Level::Warn,
            Some("debug") | Some("trace") => Level::Debug,
            _ => Level::Info,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

/// A logger for one plugin invocation.
pub struct Logger {
    level: Level,
    file: Option<(PathBuf, Option<File>)>,
    context: String,
}

impl Logger {
    /// A logger writing at `level` and above to stderr and, if given, to `file`.
    pub fn new(level: Level, file: Option<&Path>) -> Logger {
        Logger {
            level,
            file: file.filter(|p| !p.as_os_str().is_empty()).map(|p| (p.to_path_buf(), None)),
            context: String::new(),
        }
    }

    /// Sets the context (command, container, pod) prefixed to every line.
    pub fn set_context(&mut self, context: String) {
        self.context = context;
    }

    /// Writes one line.
    pub fn log(&mut self, level: Level, msg: &str) {
        if level > self.level {
            return;
        }
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let line = format!(
            "{}.{:03} {} ambit-cni[{}] {}{}\n",
            ts.as_secs(),
            ts.subsec_millis(),
            level.name(),
            std::process::id(),
            self.context,
            msg
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
        if let Some((path, handle)) = &mut self.file {
            if handle.is_none() {
                *handle = open_rotated(path);
            }
            if let Some(f) = handle {
                let _ = f.write_all(line.as_bytes());
            }
        }
    }
}

fn open_rotated(path: &Path) -> Option<File> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if std::fs::metadata(path).map(|m| m.len() >= ROTATE_BYTES).unwrap_or(false) {
        // Concurrent invocations may race here; rename is atomic, so the worst case is one lost generation.
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        let _ = std::fs::rename(path, PathBuf::from(old));
    }
    OpenOptions::new().create(true).append(true).open(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_past_the_limit() {
        let dir = std::env::temp_dir().join(format!("ambit-cni-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("cni.log");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, vec![b'x'; ROTATE_BYTES as usize]).unwrap();
        let mut l = Logger::new(Level::Info, Some(&path));
        l.log(Level::Info, "hello");
        l.log(Level::Debug, "hidden");
        let now = std::fs::read_to_string(&path).unwrap();
        assert!(now.contains("hello") && !now.contains("hidden"));
        assert_eq!(std::fs::metadata(dir.join("cni.log.1")).unwrap().len(), ROTATE_BYTES);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
