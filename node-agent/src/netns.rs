//! Pod network namespaces: opening and checking them, and running work inside them.
//!
//! Work inside a pod netns always runs on a fresh OS thread that enters the netns and then ends, so no tokio
//! worker ever switches namespace and no thread is reused in the wrong one. Processes spawned there (`nft`) and
//! sockets created there (netlink, listeners) belong to the pod netns for their whole life.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ambit_proto::host::{NetnsCheck, check_netns};
use nix::sched::CloneFlags;

/// Why a netns could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path does not exist (any more).
    #[error("netns {0} is gone (pod deleted?)")]
    Gone(PathBuf),
    /// The path exists but is not a network namespace.
    #[error("{0} is not a network namespace")]
    NotANetns(PathBuf),
    /// Opening or inspecting it failed.
    #[error("cannot open netns {path}: {source}")]
    Io {
        /// The netns path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Entering it failed.
    #[error("cannot enter netns {path}: {source}")]
    Enter {
        /// The netns path.
        path: PathBuf,
        /// The cause.
        source: nix::Error,
    },
    /// The worker thread died.
    #[error("the worker thread for netns {0} panicked")]
    Panicked(PathBuf),
}

/// An open handle on a pod's network namespace. Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct PodNetns {
    ns: netns_rs::NetNs,
    inode: u64,
}

impl PodNetns {
    /// Opens the netns at `path` (a bind mount under `/var/run/netns` or a `/proc/<pid>/ns/net` link) and
    /// checks that it really is one.
    pub fn open(path: &Path) -> Result<PodNetns, NetnsError> {
        let ns = netns_rs::get_from_path(path).map_err(|e| match e {
            netns_rs::Error::OpenNsError(_, io) if io.kind() == std::io::ErrorKind::NotFound => {
                NetnsError::Gone(path.to_path_buf())
            }
            netns_rs::Error::OpenNsError(_, io) => NetnsError::Io { path: path.to_path_buf(), source: io },
            other => NetnsError::Io { path: path.to_path_buf(), source: std::io::Error::other(other.to_string()) },
        })?;
        // A netns file lives on nsfs; an unmounted bind-mount target left behind after the netns died is an empty
        // regular file on the parent filesystem, which is what "gone" looks like after a runtime cleaned up.
        let inode = match check_netns(ns.file()).map_err(|e| NetnsError::Io { path: path.to_path_buf(), source: e })? {
            NetnsCheck::Netns(inode) => inode,
            NetnsCheck::Stale => return Err(NetnsError::Gone(path.to_path_buf())),
            NetnsCheck::NotANetns => return Err(NetnsError::NotANetns(path.to_path_buf())),
        };
        Ok(PodNetns { ns, inode })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        self.ns.path()
    }

    /// The namespace's inode: two handles with the same inode name the same netns.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The descriptor, e.g. to pass to ztunnel.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ns.file().as_fd()
    }

    /// A second handle on the namespace file, to run work in it without holding `self`.
    pub fn file(&self) -> std::io::Result<File> {
        self.ns.file().try_clone()
    }

    /// Runs `f` on a fresh thread inside this netns and returns its result.
    pub async fn run<F, R>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path().to_path_buf();
        let file = self.file().map_err(|e| NetnsError::Io { path: path.clone(), source: e })?;
        run_in(path, file, f).await
    }
}

/// Runs `f` on a fresh thread inside the netns `file` (opened from `path`) refers to.
pub async fn run_in<F, R>(path: PathBuf, file: File, f: F) -> Result<R, NetnsError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_path = path.clone();
    std::thread::Builder::new()
        .name("netns-worker".into())
        .spawn(move || {
            let res = match nix::sched::setns(&file, CloneFlags::CLONE_NEWNET) {
                // The thread ends right after, so it never has to switch back.
                Ok(()) => Ok(f()),
                Err(e) => Err(NetnsError::Enter { path: thread_path, source: e }),
            };
            let _ = tx.send(res);
        })
        .map_err(|e| NetnsError::Io { path: path.clone(), source: e })?;
    rx.await.map_err(|_| NetnsError::Panicked(path))?
}

/// The inode of the agent's own netns, to refuse ever treating it as a pod's.
pub fn host_inode() -> std::io::Result<u64> {
    Ok(std::fs::metadata("/proc/self/ns/net")?.ino())
}
