//! Draining: stop accepting, let open connections finish until a deadline, then close what is left.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// Where a drain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// No new connections; open ones may finish.
    Draining,
    /// The deadline passed (or nothing was left): close everything.
    Closed,
}

/// The owner's side of a drain, cloneable.
#[derive(Debug, Clone)]
pub struct Drain {
    tx: Arc<watch::Sender<Phase>>,
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

/// A connection's or listener's view of the drain.
#[derive(Debug, Clone)]
pub struct DrainWatch(watch::Receiver<Phase>);

/// Counts one open connection while it lives.
#[derive(Debug)]
pub struct Active {
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    /// A drain in the running phase.
    pub fn new() -> Drain {
        Drain { tx: Arc::new(watch::channel(Phase::Running).0), active: Arc::default(), idle: Arc::default() }
    }

    /// A watch for listeners and connections.
    pub fn watch(&self) -> DrainWatch {
        DrainWatch(self.tx.subscribe())
    }

    /// Marks a connection as open until the guard drops.
    pub fn track(&self) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active { active: self.active.clone(), idle: self.idle.clone() }
    }

    /// Open connections now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// The phase now.
    #[cfg(test)]
    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }

    /// Drains: stop accepting at once, wait for open connections up to `deadline`, then close the rest.
    /// Returns how many connections the deadline cut.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.tx.send_replace(Phase::Draining);
        let idle = async {
            loop {
                let notified = self.idle.notified();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let cut = match tokio::time::timeout(deadline, idle).await {
            Ok(()) => 0,
            Err(_) => self.active(),
        };
        self.tx.send_replace(Phase::Closed);
        cut
    }
}

impl DrainWatch {
    async fn reach(&mut self, p: Phase) {
        // An error means the owner is gone, which counts as closed.
        let _ = self.0.wait_for(|ph| *ph >= p).await;
    }

    /// Resolves once draining starts (stop accepting).
    pub async fn draining(&mut self) {
        self.reach(Phase::Draining).await
    }

    /// Resolves once open connections must close.
    pub async fn closed(&mut self) {
        self.reach(Phase::Closed).await
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.0.borrow() >= Phase::Draining
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_connections_then_cuts() {
        let d = Drain::new();
        let a = d.track();
        let mut w = d.watch();
        let d2 = d.clone();
        let h = tokio::spawn(async move { d2.drain(Duration::from_secs(5)).await });
        w.draining().await;
        assert!(w.is_draining());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(d.phase(), Phase::Draining);
        drop(a);
        assert_eq!(h.await.unwrap(), 0);
        assert_eq!(d.phase(), Phase::Closed);

        let d = Drain::new();
        let _stuck = d.track();
        assert_eq!(d.drain(Duration::from_secs(5)).await, 1);
        let mut w = d.watch();
        w.closed().await;
    }
}
