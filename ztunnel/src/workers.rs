//! The proxy's worker threads, each an independent single-threaded event loop (the model of Envoy's workers):
//! every pod is served by one worker, chosen round robin when the pod arrives, and all of that pod's
//! listeners, connections and HBONE pool live there. A connection never hops threads, so handing bytes
//! between its tasks costs no cross-thread wakeup, and each worker can busy-poll ([`crate::busy_poll`]) while its
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
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(crate::busy_poll::on_idle)
                .build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new().name(format!("ztunnel-worker-{i}")).spawn(move || {
                let s = crate::busy_poll::install(spin);
                rt.block_on(async {
                    // Whether the worker polls is the park hook's decision: without busy polling nothing
                    // ever wakes this task.
                    tokio::spawn(crate::busy_poll::poller(s));
                    // Even without busy polling: a burst's memory goes back when the traffic pauses.
                    tokio::spawn(crate::busy_poll::watch_pauses(s));
                    std::future::pending::<()>().await
                })
            })?;
        }
        Ok(Workers { handles, next: AtomicUsize::new(0) })
    }

    /// The worker for a new pod.
    pub fn pick(&self) -> Handle {
        self.handles[self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::busy_poll::{POLLED_AFTER, TestClock, YIELDS};

    /// A packet that arrives while a worker busy-polls is handled by the first poll that sees it: the task it
    /// wakes runs before the worker offers its CPU to another thread.
    #[test]
    fn a_packet_arriving_while_the_worker_polls_is_handled_before_it_yields_the_cpu() {
        let workers = Workers::start(1, Duration::from_secs(10)).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        workers.pick().spawn(async move {
            let b = tokio::net::UnixStream::from_std(b).unwrap();
            crate::busy_poll::activity();
            let mut late = 0;
            let mut buf = [0u8; 64];
            // Packets, not wakeups: on a busy machine two may arrive before one wakeup.
            let mut got = 0;
            while got < 100 {
                b.readable().await.unwrap();
                // Yields since the driver poll that woke this task (the poller ran right after it).
                late += YIELDS.get() - POLLED_AFTER.get();
                crate::busy_poll::activity();
                while let Ok(n @ 1..) = b.try_read(&mut buf) {
                    got += n;
                }
            }
            tx.send((late, YIELDS.get())).unwrap();
        });
        // Packets at moments the worker cannot predict, each after it has been idle (polling) for a while.
        for i in 0..100u64 {
            std::thread::sleep(Duration::from_micros(300 + (i * 7919) % 700));
            std::io::Write::write_all(&mut &a, b"x").unwrap();
        }
        let (late, yields) = rx.recv_timeout(Duration::from_secs(30)).expect("the worker read every packet");
        assert!(yields > 0, "the worker offered its CPU while idle");
        assert_eq!(late, 0, "{late} times the worker yielded its CPU before running a task the driver had woken");
    }

    /// A worker polls while its events come back to back, and stops once they come further apart than its
    /// longest window: it would spend the whole window before each event for nothing, then sleep anyway. The
    /// gaps are on a clock the test moves (the worker's [`TestClock`]), not the test's sleeps: a busy machine
    /// stretches a sleep of 50 µs past the window, and the window would then rightly never open.
    #[test]
    fn a_worker_stops_polling_when_its_events_come_further_apart_than_its_longest_window() {
        let workers = Workers::start(1, Duration::from_micros(500)).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        workers.pick().spawn(async move {
            let clock = TestClock::install();
            let b = tokio::net::UnixStream::from_std(b).unwrap();
            let mut buf = [0u8; 64];
            // After each packet: yields so far, and the window.
            let mut seen = Vec::new();
            let mut got = 0;
            while got < 140 {
                b.readable().await.unwrap();
                let Ok(n @ 1..) = b.try_read(&mut buf[..1]) else { continue };
                got += n;
                // The packet says how long after the worker went idle it came: the clock moves by that much
                // as it arrives, whenever the machine let the worker run.
                clock.advance(Duration::from_micros(if buf[0] == b'b' { 50 } else { 3000 }));
                crate::busy_poll::activity();
                seen.push((YIELDS.get(), crate::busy_poll::window().unwrap().current()));
                ack_tx.send(()).unwrap();
            }
            tx.send(seen).unwrap();
        });
        // Back to back first (gaps well under 500 µs), then 3 ms apart: the recent gaps weigh most, so the
        // window closes within a few dozen pauses. One packet at a time, each once the worker has read the
        // last (a busy machine would otherwise let several pile up into one read); between packets the worker
        // has real time to poll in.
        for i in 0..140 {
            std::thread::sleep(Duration::from_micros(100));
            std::io::Write::write_all(&mut &a, if i < 40 { b"b" } else { b"p" }).unwrap();
            ack_rx.recv_timeout(Duration::from_secs(30)).expect("the worker read the packet");
        }
        let seen = rx.recv_timeout(Duration::from_secs(30)).expect("the worker read every packet");
        assert_eq!(seen.len(), 140, "{seen:?}");
        let (at_40, open) = seen[seen.len() - 101];
        assert!(!open.is_zero() && at_40 > 0, "it polled while the packets came back to back: {seen:?}");
        let (end, closed) = seen[seen.len() - 1];
        assert_eq!(closed, Duration::ZERO, "the window closed: {seen:?}");
        let (at_60, _) = seen[seen.len() - 21];
        assert_eq!(end - at_60, 0, "the worker still polled between the last 20 packets: {seen:?}");
    }

    /// After activity the worker polls again before it offers its CPU: work its own tasks just made ready
    /// (here a packet sent to itself; in the proxy a loopback connect) is picked up without waiting a turn.
    #[test]
    fn after_activity_the_worker_looks_for_more_work_before_yielding_the_cpu() {
        let workers = Workers::start(1, Duration::from_secs(10)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        workers.pick().spawn(async move {
            let mut late = 0;
            for _ in 0..100 {
                // A lull: the worker polls, offering its CPU between polls.
                tokio::time::sleep(Duration::from_micros(200)).await;
                let (a, b) = tokio::net::UnixStream::pair().unwrap();
                crate::busy_poll::activity();
                let before = YIELDS.get();
                a.try_write(b"x").unwrap();
                b.readable().await.unwrap();
                late += YIELDS.get() - before;
            }
            tx.send(late).unwrap();
        });
        let late = rx.recv_timeout(Duration::from_secs(30)).expect("the worker finishes");
        assert_eq!(late, 0, "{late} times the worker yielded its CPU with a ready packet not yet seen");
    }
}
