//! Adaptive busy polling: after I/O activity, a worker keeps polling its sockets (instead of sleeping in
//! `epoll_wait`) for a short window, so the next packet of a conversation is picked up without a wakeup.
//!
//! On virtual machines a wakeup of a sleeping thread costs tens of microseconds (the vCPU halts and must be
//! interrupted back), and a packet crossing the mesh passes two proxies, so each round trip would pay several
//! of them. A task that yields in a loop makes a tokio current-thread runtime poll its I/O driver with a zero
//! timeout between tasks; it runs only while traffic flows and stops `window` after the last event, so an
//! idle ztunnel sleeps. Each worker thread has its own spinner and counts its own activity.

use std::cell::Cell;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

struct Spinner {
    activity: Cell<u64>,
    sleeping: Cell<bool>,
    wake: Notify,
}

thread_local! {
    static LOCAL: Cell<Option<&'static Spinner>> = const { Cell::new(None) };
}

/// Notes I/O activity on this worker (a no-op on threads without a spinner).
#[inline]
pub fn activity() {
    LOCAL.with(|l| {
        if let Some(s) = l.get() {
            s.activity.set(s.activity.get().wrapping_add(1));
            if s.sleeping.replace(false) {
                s.wake.notify_one();
            }
        }
    });
}

/// The spinner of the current worker thread: polls while activity continues, for `window` after the last of
/// it. Runs forever: the future a worker's current-thread runtime blocks on.
pub async fn run(window: Duration) {
    // Leaked once per worker thread (they live as long as the process).
    let s: &'static Spinner =
        Box::leak(Box::new(Spinner { activity: Cell::new(0), sleeping: Cell::new(false), wake: Notify::new() }));
    LOCAL.with(|l| l.set(Some(s)));
    loop {
        s.sleeping.set(true);
        s.wake.notified().await;
        let mut last = s.activity.get();
        let mut until = Instant::now() + window;
        loop {
            tokio::task::yield_now().await;
            let now = s.activity.get();
            if now != last {
                // Traffic is flowing: the worker has work, nobody is waiting on the spin.
                last = now;
                until = Instant::now() + window;
            } else if Instant::now() >= until {
                break;
            } else {
                // Waiting for the next packet: let any other runnable thread on this CPU (the pod's app, the
                // peer proxy) go first. Spinning must only use time nobody else wants, or it would delay the
                // very wakeups it saves.
                std::thread::yield_now();
            }
        }
        // The traffic paused: a good moment to give the burst's freed buffers back to the system.
        release_memory();
    }
}

/// Returns freed heap memory to the system (glibc keeps it otherwise: after a bulk transfer its freed
/// buffers would stay resident), at most a few times a second.
pub fn release_memory() {
    static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    const EVERY: Duration = Duration::from_millis(250);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_some_and(|t| t.elapsed() < EVERY) {
        return;
    }
    *last = Some(Instant::now());
    drop(last);
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and releases the allocator's free memory; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
