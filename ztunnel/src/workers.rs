//! The proxy's worker threads, each an independent single-threaded event loop (the model of Envoy's workers):
//! every pod is served by one worker, chosen round robin when the pod arrives, and all of that pod's
//! listeners, connections and HBONE pool live there. A connection never hops threads, so handing bytes
//! between its tasks costs no cross-thread wakeup, and each worker can busy-poll ([`crate::spin`]) while its
//! pods have traffic. Control work (ZDS, admin, configuration) runs on the main thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;

/// The worker threads.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `n` workers; each busy-polls for `spin` after activity (`Duration::ZERO`: never).
    pub fn start(n: usize, spin: Duration) -> std::io::Result<Workers> {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            // Even without busy polling the spinner runs: it returns a burst's memory when traffic pauses.
            std::thread::Builder::new()
                .name(format!("ztunnel-worker-{i}"))
                .spawn(move || rt.block_on(crate::spin::run(spin)))?;
        }
        Ok(Workers { handles, next: AtomicUsize::new(0) })
    }

    /// The worker for a new pod.
    pub fn pick(&self) -> Handle {
        self.handles[self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()].clone()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never, once started).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}
