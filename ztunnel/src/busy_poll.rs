//! Adaptive busy polling: after I/O activity, a worker keeps polling its sockets (instead of sleeping in
//! `epoll_wait`) for a short window, so the next packet of a conversation is picked up without a wakeup.
//!
//! On virtual machines a wakeup of a sleeping thread costs tens of microseconds (the vCPU halts and must be
//! interrupted back), and a packet crossing the mesh passes two proxies, so each round trip would pay several
//! of them. The polling happens where the worker's current-thread runtime would otherwise go to sleep — its
//! park hook, [`on_idle`], which runs only once every task that was ready has run: there, within `window`
//! of the last activity, it offers the CPU to any other runnable thread (the pod's app, the peer proxy)
//! with `sched_yield` and has the runtime poll its I/O driver without waiting instead of blocking. Spinning
//! thus uses only time nobody else wants, never delays work of its own worker, and stops `window` after the
//! last event, so an idle ztunnel sleeps. (A task that yielded in a loop did the same less well: after
//! polling its driver the runtime polls its `block_on` future before the tasks the driver woke, and tasks
//! woken by tasks queue behind a spinning task, so the spinner gave the CPU away with work still waiting —
//! a scheduler round, tens of µs, per packet.)
//!
//! Each worker also watches its traffic for pauses ([`watch_pauses`]) to return a burst's memory
//! ([`crate::heap`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// One worker's state. Only its own thread uses it; the fields are atomics (relaxed: plain loads and stores
/// on x86 and arm64) so that its tasks can be ordinary `Send` tasks of the worker's runtime.
pub struct Spinner {
    window: Duration,
    activity: AtomicU64,
    /// The pause watcher waits for traffic to start.
    sleeping: AtomicBool,
    wake: Notify,
    /// Wakes [`poller`]: a ready task keeps the runtime from blocking in `epoll_wait`.
    poll: Notify,
}

thread_local! {
    static LOCAL: Cell<Option<&'static Spinner>> = const { Cell::new(None) };
    /// [`on_idle`]'s own: the activity count it last saw, and until when the worker keeps polling.
    static POLLING: Cell<(u64, Option<Instant>)> = const { Cell::new((0, None)) };
}

#[cfg(test)]
thread_local! {
    /// Tests: how often this worker offered its CPU to other threads.
    pub(crate) static YIELDS: Cell<u64> = const { Cell::new(0) };
    /// Tests: [`YIELDS`] when the driver was last polled for [`poller`].
    pub(crate) static POLLED_AFTER: Cell<u64> = const { Cell::new(0) };
}

/// Makes the calling thread a worker that busy-polls for `window` after activity (`Duration::ZERO`: never).
/// Its runtime must call [`on_idle`] when it parks and run [`poller`] and [`watch_pauses`].
pub fn install(window: Duration) -> &'static Spinner {
    // Leaked once per worker thread (they live as long as the process).
    let s: &'static Spinner = Box::leak(Box::new(Spinner {
        window,
        activity: AtomicU64::new(0),
        sleeping: AtomicBool::new(false),
        wake: Notify::new(),
        poll: Notify::new(),
    }));
    LOCAL.with(|l| l.set(Some(s)));
    s
}

/// Notes I/O activity on this worker (a no-op on threads that are not workers).
#[inline]
pub fn activity() {
    LOCAL.with(|l| {
        if let Some(s) = l.get() {
            s.activity.store(s.activity.load(Relaxed).wrapping_add(1), Relaxed);
            if s.sleeping.swap(false, Relaxed) {
                s.wake.notify_one();
            }
        }
    });
}

/// The worker runtime's park hook: the worker has nothing left to run. Within the polling window it wakes
/// [`poller`], so the runtime polls its driver without blocking; right after activity at once (the tasks
/// that just ran may have made more work ready: a connect that completed on loopback, a reply already
/// queued), otherwise after offering the CPU to other threads once.
pub fn on_idle() {
    let Some(s) = LOCAL.with(Cell::get) else { return };
    if s.window.is_zero() {
        return;
    }
    let seen = s.activity.load(Relaxed);
    let (last, until) = POLLING.get();
    if seen != last {
        POLLING.set((seen, Some(Instant::now() + s.window)));
        s.poll.notify_one();
        return;
    }
    // Not polling (the window passed with no activity): let the runtime sleep, without reading the clock.
    let Some(until) = until else { return };
    if Instant::now() >= until {
        POLLING.set((seen, None));
        return;
    }
    #[cfg(test)]
    YIELDS.set(YIELDS.get() + 1);
    std::thread::yield_now();
    s.poll.notify_one();
}

/// A task that [`on_idle`] wakes to keep its worker polling; it does nothing else. (Queued before the
/// driver's poll, it runs ahead of the tasks that poll wakes.)
pub async fn poller(s: &'static Spinner) {
    loop {
        s.poll.notified().await;
        #[cfg(test)]
        POLLED_AFTER.set(YIELDS.get());
    }
}

/// How long a worker must see no activity before it counts its traffic as paused.
const QUIET: Duration = Duration::from_millis(100);

/// Watches the worker's traffic and returns the burst's memory once it pauses (a quiet period without
/// activity). Runs forever; sleeps while the worker is idle.
pub async fn watch_pauses(s: &'static Spinner) {
    // When the heap could not be trimmed at the last pause (trimmed too recently), how long until it can.
    let mut trim_due: Option<Duration> = None;
    loop {
        s.sleeping.store(true, Relaxed);
        match trim_due.take() {
            None => s.wake.notified().await,
            Some(wait) => {
                tokio::select! {
                    _ = s.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {
                        trim_due = crate::heap::release_memory();
                        continue;
                    }
                }
            }
        }
        let mut last = s.activity.load(Relaxed);
        loop {
            tokio::time::sleep(QUIET).await;
            let now = s.activity.load(Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        // The traffic paused: a good moment to give the burst's freed buffers back to the system (or as soon
        // as allowed, if the pause lasts).
        trim_due = crate::heap::release_memory();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heap::tests::rss_mib;
    use crate::heap::tune_allocator;

    #[cfg(target_env = "gnu")]
    #[test]
    fn without_busy_polling_a_pause_still_releases_the_burst() {
        tune_allocator();
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(tokio::task::LocalSet::new().run_until(async {
                tokio::task::spawn_local(watch_pauses(install(Duration::ZERO)));
                // Let the watcher start waiting for traffic.
                tokio::task::yield_now().await;
                let before = rss_mib();
                let bufs: Vec<Vec<u8>> = (0..128).map(|_| vec![1u8; 256 * 1024]).collect();
                drop(std::hint::black_box(bufs));
                activity();
                let kept = rss_mib();
                assert!(kept - before > 24.0, "freed buffers stay while traffic flows: {before:.1} → {kept:.1} MiB");
                tokio::time::sleep(QUIET / 2).await;
                assert!(rss_mib() - before > 24.0, "not released before a quiet period");
                tokio::time::sleep(QUIET * 3).await;
                let after = rss_mib();
                assert!(
                    after - before < 4.0,
                    "released after a quiet period: {before:.1} → {kept:.1} → {after:.1} MiB"
                );
            }));
        })
        .join()
        .unwrap();
    }
}
