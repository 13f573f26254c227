//! The allocator's settings for a proxy: freed buffers are kept while traffic flows (so a bulk transfer does not
//! page-fault on every 4 KiB) and returned to the system when a worker's traffic pauses.

use std::cell::Cell;
use std::time::{Duration, Instant};

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
pub(crate) mod tests {
    use super::*;

    pub(crate) fn rss_mib() -> f64 {
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
}
