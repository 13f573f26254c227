//! Small things every lab user needs: root, binaries, unique names, waiting.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Fails loudly unless running as root: lab tests need network namespaces and must never pass by skipping.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test builds network namespaces and must run as root (it does not skip itself); run it with sudo or as root"
        );
    }
}

/// Where Ambit's binaries are: `$AMBIT_BIN_DIR`, or the cargo target directory this test or tool was built in.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AMBIT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of one of Ambit's binaries; panics with the command to build it when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    if !p.exists() {
        panic!(
            "{} not found: build the workspace first (cargo build --workspace --bins) or set AMBIT_BIN_DIR",
            p.display()
        );
    }
    p
}

/// A short random id, unique enough for names of parallel labs.
pub fn unique_id() -> String {
    let mut b = [0u8; 4];
    getrandom(&mut b);
    format!("{:08x}", u32::from_le_bytes(b) ^ std::process::id().rotate_left(16))
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).expect("reading /dev/urandom");
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what` in the message.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The program a process was started as (its argv[0], from `/proc`), so that a report or a test names what
/// actually ran; `None` when the process is gone.
pub fn argv0(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    cmdline.split(|b| *b == 0).next().map(|a| String::from_utf8_lossy(a).into_owned())
}

/// The sum of the samples of metric `name` in Prometheus text whose lines contain every one of `labels`
/// (e.g. `reason="expired"`); 0 when there are none.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|s| l.contains(s)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
