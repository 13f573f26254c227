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

/// How long a worker without busy polling must see no activity before it counts its traffic as paused.
const QUIET: Duration = Duration::from_millis(100);

/// The spinner of the current worker thread: polls while activity continues, for `window` after the last of
/// it, and returns the burst's memory when the traffic pauses. With a zero `window` it never polls, but still
/// notices pauses (a quiet period) and returns the memory. Runs forever: the future a worker's current-thread
/// runtime blocks on.
pub async fn run(window: Duration) {
    // Leaked once per worker thread (they live as long as the process).
    let s: &'static Spinner =
        Box::leak(Box::new(Spinner { activity: Cell::new(0), sleeping: Cell::new(false), wake: Notify::new() }));
    LOCAL.with(|l| l.set(Some(s)));
    // When the heap could not be trimmed at the last pause (trimmed too recently), how long until it can.
    let mut trim_due: Option<Duration> = None;
    loop {
        s.sleeping.set(true);
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
        let mut last = s.activity.get();
        if window.is_zero() {
            // No busy polling: the traffic has paused once a quiet period passes without activity.
            loop {
                tokio::time::sleep(QUIET).await;
                let now = s.activity.get();
                if now == last {
                    break;
                }
                last = now;
            }
        } else {
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
        }
        // The traffic paused: a good moment to give the burst's freed buffers back to the system (or as soon
        // as allowed, if the pause lasts).
        trim_due = release_memory();
    }
}

/// glibc's default for giving back the free top of the heap.
#[cfg(target_env = "gnu")]
const TRIM_DEFAULT: libc::c_int = 128 << 10;
/// While traffic flows: the free top of a worker's heap stays (see [`tune_allocator`]).
#[cfg(target_env = "gnu")]
const TRIM_BURST: libc::c_int = 64 << 20;
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
    // SAFETY: mallopt only sets allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_BURST);
    }
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
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt sets parameters; malloc and free pair on a block nobody else sees; malloc_trim only
    // walks and releases the allocator's free memory.
    unsafe {
        if TUNED.load(std::sync::atomic::Ordering::Relaxed) {
            // malloc_trim releases free blocks inside every heap but shrinks only the main arena's top; a
            // worker's arena gives back its top when a large block (64 KiB or more) is freed and the top
            // exceeds the trim threshold. So: lower the threshold for a moment and free such a block here,
            // in this thread's arena. (Another thread freeing meanwhile merely trims its own arena early.)
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_DEFAULT);
            let p = libc::malloc(std::hint::black_box(64 << 10));
            libc::free(std::hint::black_box(p));
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_BURST);
        }
        libc::malloc_trim(0);
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
                tokio::task::spawn_local(run(Duration::ZERO));
                // Let the spinner register itself on this thread.
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
