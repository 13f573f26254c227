//! Adaptive busy polling: after I/O activity, a worker may keep polling its sockets (instead of sleeping in
//! `epoll_wait`) for a short window, so the next packet of a conversation is picked up without a wakeup.
//!
//! On virtual machines a wakeup of a sleeping thread costs tens of microseconds (the vCPU halts and must be
//! interrupted back), and a packet crossing the mesh passes two proxies, so each round trip would pay several
//! of them. The polling happens where the worker's current-thread runtime would otherwise go to sleep — its
//! park hook, [`on_idle`], which runs only once every task that was ready has run: there, within the window
//! after the last activity, it offers the CPU to any other runnable thread (the pod's app, the peer proxy)
//! with `sched_yield` and has the runtime poll its I/O driver without waiting instead of blocking. Spinning
//! thus uses only time nobody else wants and never delays work of its own worker. (A task that yielded in a
//! loop did the same less well: after polling its driver the runtime polls its `block_on` future before the
//! tasks the driver woke, and tasks woken by tasks queue behind a spinning task, so the spinner gave the CPU
//! away with work still waiting — a scheduler round, tens of µs, per packet.)
//!
//! Polling pays only when the next event comes within the window: a poll that ends in sleep anyway spent its
//! whole window for nothing. So each worker chooses its window from the gaps it observes between going idle
//! and the next event ([`Window`]): the window that would have saved the most over the recent gaps, a saved
//! wakeup being worth at most `AMBIT_BUSY_POLL` of polling, or none. Traffic whose events come back to back
//! is polled for; a conversation that pauses between requests is polled for only across the short gaps of a
//! request crossing the proxies, not through its pauses; traffic that only pauses costs no CPU while it waits.
//!
//! Polling must stop where the CPU is contended. A thread that spins through its windows uses more CPU than its
//! share, and the scheduler (CFS's virtual runtime, EEVDF's lag) then makes it wait behind the node's other
//! busy threads when its work arrives: milliseconds per request, on a node running real workloads, for
//! microseconds saved on an idle one. A worker sees this when it offers the CPU: a yield that comes back only
//! after [`CONTENDED_YIELD`] means another thread ran for a slice of its own. It then stops polling for a
//! while, and sleeps between events as a proxy without polling does ([`Backoff`]): 50 ms after a lone long
//! yield, doubling up to 2 s while the contention lasts.
//!
//! Each worker also watches its traffic for pauses ([`watch_pauses`]) to return a burst's memory
//! ([`crate::heap`]).

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// One worker's state. Only its own thread uses it; the fields are atomics (relaxed: plain loads and stores
/// on x86 and arm64) so that its tasks can be ordinary `Send` tasks of the worker's runtime.
pub struct Spinner {
    /// The longest window (`AMBIT_BUSY_POLL`).
    max: Duration,
    activity: AtomicU64,
    /// The pause watcher waits for traffic to start.
    sleeping: AtomicBool,
    wake: Notify,
    /// Wakes [`poller`]: a ready task keeps the runtime from blocking in `epoll_wait`.
    poll: Notify,
}

/// The polling window of one worker, chosen from the gaps it observed between going idle and the next event.
///
/// Polling for a gap that ends within the window saves a wakeup and spends the gap; a gap longer than the
/// window spends the whole window and saves nothing. With a saved wakeup valued at the longest window `max`
/// (`AMBIT_BUSY_POLL`: the most a worker may spend to save one), the window is the candidate (10 µs doubling
/// up to `max`) that would have saved the most, net, over the recent gaps: Σ (max − gap) over the gaps it
/// covers, less the window for each gap it does not; none (no polling) when no candidate comes out ahead. A
/// conversation whose events come back to back is polled for; a request every millisecond is not (it would
/// spend the window on every pause); traffic with both — short gaps while a request crosses the proxies, a
/// long pause between requests — gets a window that covers the short gaps only. Recent gaps weigh most: each
/// new one discounts the older ones by 1/32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    max: Duration,
    /// How many candidate windows there are ([`Window::candidate`]).
    n: usize,
    /// For each candidate, the (discounted) number of recent gaps it is the smallest to cover, and their total
    /// length in µs; the last entry is the gaps longer than `max`.
    count: [f32; CANDIDATES + 1],
    total_us: [f32; CANDIDATES + 1],
    current: Duration,
}

/// At most this many candidate windows (10 µs doubled 23 times is over a minute).
const CANDIDATES: usize = 24;

/// How much each new gap discounts the ones before it.
const DISCOUNT: f32 = 31.0 / 32.0;

impl Window {
    /// The smallest window worth opening.
    pub const START: Duration = Duration::from_micros(10);

    /// A closed window of at most `max`; it opens once it has seen gaps worth polling for.
    pub fn new(max: Duration) -> Window {
        let mut n = 0;
        while n < CANDIDATES && !max.is_zero() {
            n += 1;
            if Self::START * (1 << (n - 1)) >= max {
                break;
            }
        }
        Window { max, n, count: [0.0; CANDIDATES + 1], total_us: [0.0; CANDIDATES + 1], current: Duration::ZERO }
    }

    /// Candidate window `i`: [`Window::START`] doubled `i` times, at most `max`.
    fn candidate(&self, i: usize) -> Duration {
        (Self::START * (1 << i)).min(self.max)
    }

    /// How long to poll after going idle now.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The next event came `gap` after the worker went idle: takes it into account and chooses the window
    /// anew.
    pub fn observe(&mut self, gap: Duration) {
        if self.n == 0 {
            return;
        }
        for (c, t) in self.count.iter_mut().zip(&mut self.total_us) {
            *c *= DISCOUNT;
            *t *= DISCOUNT;
        }
        let slot = (0..self.n).find(|&i| gap <= self.candidate(i)).unwrap_or(self.n);
        self.count[slot] += 1.0;
        self.total_us[slot] += gap.as_secs_f32() * 1e6;
        let worth = self.max.as_secs_f32() * 1e6;
        let all: f32 = self.count[..=self.n].iter().sum();
        let (mut covered, mut covered_us) = (0.0, 0.0);
        let (mut best, mut best_net) = (Duration::ZERO, 0.0);
        for i in 0..self.n {
            covered += self.count[i];
            covered_us += self.total_us[i];
            let window = self.candidate(i);
            let net = covered * worth - covered_us - (all - covered) * window.as_secs_f32() * 1e6;
            if net > best_net {
                (best, best_net) = (window, net);
            }
        }
        self.current = best;
    }
}

/// A yield that takes longer than this gave the CPU to a thread that ran a slice of its own (a conversation's
/// partner, woken for a packet, runs for microseconds; the scheduler's slice for a CPU-bound thread is 0.75 ms
/// and more): the CPU is contended.
pub const CONTENDED_YIELD: Duration = Duration::from_micros(500);
/// How long a worker does not poll once it found its CPU contended: at first, and at most while contention
/// goes on (each time it finds it again soon after trying, twice as long as the last).
pub const CONTENDED_BACKOFF: Duration = Duration::from_millis(50);
pub const CONTENDED_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Whether a worker polls at all, from how its yields went: after a yield that shows the CPU contended, not
/// for a while ([`CONTENDED_BACKOFF`], doubling up to [`CONTENDED_BACKOFF_MAX`] while contention lasts).
#[derive(Debug, Default, Clone, Copy)]
pub struct Backoff {
    until: Option<Instant>,
    /// The last backoff: when it ended (or ends) and how long it was.
    last: Option<(Instant, Duration)>,
}

impl Backoff {
    /// A yield started at `at` came back after `took`: returns whether the worker may go on polling.
    pub fn after_yield(&mut self, at: Instant, took: Duration) -> bool {
        if took <= CONTENDED_YIELD {
            return true;
        }
        let end = at + took;
        let length = match self.last {
            // Contended again soon after the last backoff: the contention goes on.
            Some((last_end, last)) if end < last_end + 2 * last => (2 * last).min(CONTENDED_BACKOFF_MAX),
            _ => CONTENDED_BACKOFF,
        };
        self.until = Some(end + length);
        self.last = Some((end + length, length));
        false
    }

    /// Whether the worker may poll at `now`.
    pub fn allows(&mut self, now: Instant) -> bool {
        match self.until {
            Some(until) if now < until => false,
            Some(_) => {
                self.until = None;
                true
            }
            None => true,
        }
    }
}

/// What [`on_idle`] keeps between calls, on its worker's thread (updated in place: it holds the window's
/// history, a few hundred bytes, and the hook runs at every park).
#[derive(Debug)]
struct Polling {
    /// The activity count it last saw.
    seen: u64,
    /// When the worker last went idle after activity.
    idle_since: Option<Instant>,
    /// Until when it polls; `None` once it stopped (and sleeps), or when it does not poll.
    until: Option<Instant>,
    window: Window,
    backoff: Backoff,
}

thread_local! {
    static LOCAL: Cell<Option<&'static Spinner>> = const { Cell::new(None) };
    static POLLING: RefCell<Option<Polling>> = const { RefCell::new(None) };
    /// Set when the worker goes idle; the first activity after it takes the time, which ends the gap. (The
    /// next park would end it only after the tasks that activity woke have run.)
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static WOKE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The clock gaps and windows are measured on. Tests give a worker one they move themselves
/// ([`TestClock`]), so that what they assert does not depend on how fast the machine runs their sleeps.
#[inline]
fn now() -> Instant {
    #[cfg(test)]
    if let Some(c) = TEST_CLOCK.get() {
        return c.base + Duration::from_nanos(c.offset_ns.load(Relaxed));
    }
    Instant::now()
}

/// Tests: a worker's clock that stands still until the test moves it.
#[cfg(test)]
pub(crate) struct TestClock {
    base: Instant,
    offset_ns: AtomicU64,
}

#[cfg(test)]
impl TestClock {
    /// Makes the calling worker thread measure its gaps and windows on a clock of the test's own.
    pub(crate) fn install() -> &'static TestClock {
        let c: &'static TestClock =
            Box::leak(Box::new(TestClock { base: Instant::now(), offset_ns: AtomicU64::new(0) }));
        TEST_CLOCK.set(Some(c));
        c
    }

    pub(crate) fn advance(&self, by: Duration) {
        self.offset_ns.fetch_add(by.as_nanos() as u64, Relaxed);
    }
}

#[cfg(test)]
thread_local! {
    static TEST_CLOCK: Cell<Option<&'static TestClock>> = const { Cell::new(None) };
    /// Tests: how often this worker offered its CPU to other threads.
    pub(crate) static YIELDS: Cell<u64> = const { Cell::new(0) };
    /// Tests: [`YIELDS`] when the driver was last polled for [`poller`].
    pub(crate) static POLLED_AFTER: Cell<u64> = const { Cell::new(0) };
}

/// Makes the calling thread a worker that busy-polls for up to `max` after activity (`Duration::ZERO`: never).
/// Its runtime must call [`on_idle`] when it parks and run [`poller`] and [`watch_pauses`].
pub fn install(max: Duration) -> &'static Spinner {
    // Leaked once per worker thread (they live as long as the process).
    let s: &'static Spinner = Box::leak(Box::new(Spinner {
        max,
        activity: AtomicU64::new(0),
        sleeping: AtomicBool::new(false),
        wake: Notify::new(),
        poll: Notify::new(),
    }));
    LOCAL.with(|l| l.set(Some(s)));
    POLLING.set(Some(Polling {
        seen: 0,
        idle_since: None,
        until: None,
        window: Window::new(max),
        backoff: Backoff::default(),
    }));
    s
}

/// The calling worker's polling window now (tests and diagnostics).
#[cfg(test)]
pub fn window() -> Option<Window> {
    POLLING.with_borrow(|p| p.as_ref().map(|p| p.window))
}

/// Notes I/O activity on this worker (a no-op on threads that are not workers).
#[inline]
pub fn activity() {
    LOCAL.with(|l| {
        if let Some(s) = l.get() {
            s.activity.store(s.activity.load(Relaxed).wrapping_add(1), Relaxed);
            if ARMED.get() {
                ARMED.set(false);
                WOKE.set(Some(now()));
            }
            if s.sleeping.swap(false, Relaxed) {
                s.wake.notify_one();
            }
        }
    });
}

/// The worker runtime's park hook: the worker has nothing left to run. After activity it first feeds its
/// [`Window`] the gap from when it last went idle to the first activity since; then, while the window lasts,
/// it wakes [`poller`], so the runtime polls its driver without blocking: right after activity at once (the
/// tasks that just ran may have made more work ready: a connect that completed on loopback, a reply already
/// queued), otherwise after offering the CPU to other threads once.
pub fn on_idle() {
    let Some(s) = LOCAL.with(Cell::get) else { return };
    if s.max.is_zero() {
        return;
    }
    let poll = POLLING.with_borrow_mut(|p| {
        let Some(p) = p else { return false };
        let seen = s.activity.load(Relaxed);
        if seen != p.seen {
            let now = now();
            let woke = WOKE.take().unwrap_or(now);
            if let Some(idle_since) = p.idle_since {
                p.window.observe(woke.saturating_duration_since(idle_since));
            }
            p.seen = seen;
            p.idle_since = Some(now);
            ARMED.set(true);
            let window = p.window.current();
            p.until = (!window.is_zero() && p.backoff.allows(now)).then(|| now + window);
            return p.until.is_some();
        }
        // Not polling (the window passed with no activity, or is closed): let the runtime sleep, without
        // reading the clock.
        let Some(until) = p.until else { return false };
        if now() >= until {
            p.until = None;
            return false;
        }
        #[cfg(test)]
        YIELDS.set(YIELDS.get() + 1);
        // Timed on the real clock: what the scheduler did, whatever clock the window runs on.
        let at = Instant::now();
        std::thread::yield_now();
        if !p.backoff.after_yield(at, at.elapsed()) {
            p.until = None;
            // Tests: the driver's next poll is the runtime's own, blocking one, after this yield.
            #[cfg(test)]
            POLLED_AFTER.set(YIELDS.get());
            return false;
        }
        true
    });
    if poll {
        s.poll.notify_one();
    }
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

    const US: Duration = Duration::from_micros(1);

    fn fed(max: Duration, gaps: impl IntoIterator<Item = Duration>) -> Window {
        let mut w = Window::new(max);
        for g in gaps {
            w.observe(g);
        }
        w
    }

    #[test]
    fn the_window_covers_back_to_back_gaps_and_closes_for_pauses() {
        let w = Window::new(250 * US);
        assert_eq!(w.current(), Duration::ZERO, "closed until it has seen gaps");
        // Events 60 µs apart: polled for, with the smallest window that covers them.
        assert_eq!(fed(250 * US, [60 * US; 40]).current(), 80 * US);
        assert_eq!(fed(250 * US, [8 * US; 40]).current(), Window::START);
        // A request every millisecond: every window would be spent for nothing.
        assert_eq!(fed(250 * US, [1000 * US; 40]).current(), Duration::ZERO);
        // Gaps near the maximum save little: the window never passes it.
        assert_eq!(fed(250 * US, [200 * US; 40]).current(), 250 * US);
    }

    #[test]
    fn traffic_that_pauses_between_requests_is_polled_for_across_its_short_gaps_only() {
        // A request crossing the proxies: gaps of 30 µs; a millisecond between requests.
        let bimodal = (0..40).map(|i| if i % 2 == 0 { 30 * US } else { 1000 * US });
        assert_eq!(fed(250 * US, bimodal).current(), 40 * US);
        // Mostly pauses: the short gaps caught are not worth polling through every pause.
        let sparse = (0..40).map(|i| if i % 10 == 0 { 30 * US } else { 1000 * US });
        assert_eq!(fed(250 * US, sparse).current(), Duration::ZERO);
    }

    #[test]
    fn recent_gaps_decide() {
        let mut w = fed(250 * US, [60 * US; 40]);
        for _ in 0..40 {
            w.observe(1000 * US);
        }
        assert_eq!(w.current(), Duration::ZERO, "the traffic started pausing");
        for _ in 0..40 {
            w.observe(60 * US);
        }
        assert_eq!(w.current(), 80 * US, "and came back to back again");
    }

    #[test]
    fn a_yield_that_comes_back_late_stops_polling_for_a_while() {
        let t = Instant::now();
        let mut b = Backoff::default();
        assert!(b.allows(t));
        // The conversation's partner ran for a moment: polling goes on.
        assert!(b.after_yield(t, 30 * US));
        assert!(b.allows(t + 40 * US));
        // Someone ran a slice of their own: no polling for the backoff, counted from the yield's end.
        let took = Duration::from_millis(3);
        assert!(!b.after_yield(t, took));
        assert!(!b.allows(t + took + CONTENDED_BACKOFF / 2));
        let mut at = t + took + CONTENDED_BACKOFF;
        assert!(b.allows(at));
        assert!(b.allows(at + US), "and it stays allowed");
        // Contended again right after: twice as long each time, up to the most.
        let mut expect = CONTENDED_BACKOFF;
        for _ in 0..8 {
            expect = (expect * 2).min(CONTENDED_BACKOFF_MAX);
            assert!(!b.after_yield(at, took));
            assert!(!b.allows(at + took + expect - US), "{expect:?}");
            at += took + expect;
            assert!(b.allows(at));
        }
        assert_eq!(expect, CONTENDED_BACKOFF_MAX);
        // Long after the contention ended, a lone long yield backs off for the shortest time again.
        let later = at + 10 * CONTENDED_BACKOFF_MAX;
        assert!(!b.after_yield(later, took));
        assert!(b.allows(later + took + CONTENDED_BACKOFF));
    }

    #[test]
    fn a_maximum_below_the_start_is_the_only_window_and_zero_never_polls() {
        assert_eq!(fed(4 * US, [3 * US; 10]).current(), 4 * US);
        assert_eq!(fed(Duration::ZERO, [US; 10]).current(), Duration::ZERO);
        // A maximum of an hour still has at most 24 candidates: 10 µs doubled up to 84 s.
        let hour = Duration::from_secs(3600);
        assert_eq!(fed(hour, [Duration::from_secs(50); 10]).current(), Window::START * (1 << 23));
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
