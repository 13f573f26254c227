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
//! Each worker also watches its traffic for pauses ([`watch_pauses`]) to return a burst's memory.

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
                        trim_due = release_memory();
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
        trim_due = release_memory();
    }
}

/// glibc's default for giving back the free top of the heap.
#[cfg(target_env = "gnu")]
const TRIM_DEFAULT: i32 = 128 << 10;
/// While traffic flows: the free top of a worker's heap stays (see [`tune_allocator`]).
#[cfg(target_env = "gnu")]
const TRIM_BURST: i32 = 64 << 20;
/// Whether [`tune_allocator`] ran.
static TUNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets the allocator keep freed memory while traffic flows. By default glibc hands a worker arena's free
/// top back to the kernel as soon as it passes 128 KiB and serves blocks of 128 KiB or more with a fresh
/// `mmap`: a bulk transfer, whose buffers are that size, then pays a page fault for every 4 KiB it moves
/// (an eighth of a proxy's CPU time, measured with perf). With both limits raised, the buffers of one burst
/// are reused by the next; [`release_memory`] returns them when the worker's traffic pauses. Call before any
/// thread starts.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    crate::sys::set_malloc_thresholds(4 << 20, TRIM_BURST);
    TUNED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Returns the calling thread's freed heap memory to the system (glibc keeps it otherwise: after a bulk
/// transfer its freed buffers would stay resident), at most a few times a second per thread. `Some(wait)`:
/// it was done too recently, try again after `wait`.
pub fn release_memory() -> Option<Duration> {
    const EVERY: Duration = Duration::from_millis(250);
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    if let Some(t) = LAST.get() {
        let since = t.elapsed();
        if since < EVERY {
            return Some(EVERY - since);
        }
    }
    LAST.set(Some(Instant::now()));
    if TUNED.load(std::sync::atomic::Ordering::Relaxed) {
        // malloc_trim releases free blocks inside every heap but shrinks only the main arena's top; a worker's
        // arena gives back its top when a large block (64 KiB or more) is freed and the top exceeds the trim
        // threshold. So: lower the threshold for a moment and free such a block here, in this thread's arena.
        // (Another thread freeing meanwhile merely trims its own arena early.)
        #[cfg(target_env = "gnu")]
        crate::sys::set_trim_threshold(TRIM_DEFAULT);
        crate::sys::trim_heap(64 << 10);
        #[cfg(target_env = "gnu")]
        crate::sys::set_trim_threshold(TRIM_BURST);
    } else {
        crate::sys::trim_heap(0);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_mib() -> f64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096.0 / (1 << 20) as f64
    }

    #[test]
    fn release_is_rate_limited_per_thread() {
        std::thread::spawn(|| {
            assert_eq!(release_memory(), None);
            let wait = release_memory().expect("a second release right away is deferred");
            assert!(wait <= Duration::from_millis(250));
        })
        .join()
        .unwrap();
        // Another thread has its own budget.
        std::thread::spawn(|| assert_eq!(release_memory(), None)).join().unwrap();
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn a_burst_stays_for_reuse_until_released() {
        tune_allocator();
        std::thread::spawn(|| {
            let before = rss_mib();
            // A burst: 32 MiB in buffers of the copy loop's largest size, written, then freed.
            let bufs: Vec<Vec<u8>> = (0..128).map(|_| vec![1u8; 256 * 1024]).collect();
            drop(std::hint::black_box(bufs));
            let kept = rss_mib();
            assert!(kept - before > 24.0, "freed buffers stay for the next burst: {before:.1} → {kept:.1} MiB");
            assert_eq!(release_memory(), None);
            let after = rss_mib();
            assert!(after - before < 4.0, "released when traffic pauses: {before:.1} → {kept:.1} → {after:.1} MiB");
        })
        .join()
        .unwrap();
    }

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
