//! The `ambit-cni` binary: see the library documentation.
#![forbid(unsafe_code)]

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    // Config arrives on stdin; VERSION may come with none. A read error leaves it empty and parsing says why.
    let _ = std::io::stdin().take(16 * 1024 * 1024).read_to_end(&mut stdin);
    let out = ambit_cni::run(|k| std::env::var(k).ok(), &stdin, &ambit_cni::SocketClient);
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::exit(out.exit_code);
}
