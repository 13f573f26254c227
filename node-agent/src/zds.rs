//! The agent's side of ZDS: ztunnels connect, say hello, get the snapshot, then one request at a time, each
//! answered by exactly one ack.
//!
//! Each connection has a queue served by its own task, so requests to one ztunnel are strictly ordered and an
//! ack is always matched to the request it answers. The agent decides what goes into which queue
//! (`crate::enrolment`); this module moves packets. A ztunnel that breaks the protocol ([`Violation`]) is
//! told apart from one that went away.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use ambit_proto::seqpacket::SeqPacket;
use ambit_proto::zds::{self, Version, WorkloadRequest, WorkloadResponse, ZdsHello};
use tokio::sync::{mpsc, oneshot};

/// Why a ZDS request did not succeed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ZdsError {
    /// No ztunnel is connected to take the request.
    #[error("no ztunnel is connected to the agent's ZDS socket")]
    NoZtunnel,
    /// ztunnel answered with an error.
    #[error("ztunnel rejected it: {0}")]
    Nack(String),
    /// ztunnel did not answer in time.
    #[error("ztunnel did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection went away before the answer.
    #[error("the ztunnel connection closed: {0}")]
    Disconnected(String),
    /// ztunnel broke the protocol; the agent drops the connection.
    #[error("ztunnel broke the ZDS protocol: {0}")]
    Protocol(Violation),
}

/// How a ztunnel broke ZDS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A message that does not decode.
    #[error("undecodable {what}: {error}")]
    Undecodable {
        /// Which message.
        what: &'static str,
        /// The decoder's complaint.
        error: String,
    },
    /// File descriptors where none belong.
    #[error("{0} carried file descriptors nobody asked for")]
    UnaskedFds(&'static str),
    /// Listener ports and fds that do not pair up.
    #[error("an ack named {ports} listener ports but carried {fds} fds")]
    PortCount {
        /// Ports named.
        ports: usize,
        /// Fds carried.
        fds: usize,
    },
    /// A port number that is not one.
    #[error("listener port {0} out of range")]
    PortRange(u32),
    /// A returned fd that is not the listener it was said to be.
    #[error("returned listener {port}: {error}")]
    NotAListener {
        /// The port it was said to listen on.
        port: u16,
        /// What is wrong with it.
        error: ambit_proto::seqpacket::ListenerCheckError,
    },
    /// A message while nothing was asked.
    #[error("an unsolicited message")]
    Unsolicited,
    /// A hello for another protocol version.
    #[error("unsupported ZDS version {0}")]
    Version(i32),
}

/// Listening sockets ztunnel sent back with an ack, by port.
pub type Returned = Vec<(u16, OwnedFd)>;

/// What a request's outcome is.
pub type Outcome = Result<Returned, ZdsError>;

/// One request waiting in a connection's queue.
pub struct Job {
    /// The request.
    pub req: WorkloadRequest,
    /// The fds that travel with it (the netns, then listeners); owned copies, closed after sending.
    pub fds: Vec<OwnedFd>,
    /// Where the outcome goes, if someone waits for it.
    pub reply: Option<oneshot::Sender<Outcome>>,
}

impl Job {
    /// A job whose outcome the caller awaits on the returned receiver.
    pub fn awaited(req: WorkloadRequest, fds: Vec<OwnedFd>) -> (Job, oneshot::Receiver<Outcome>) {
        let (tx, rx) = oneshot::channel();
        (Job { req, fds, reply: Some(tx) }, rx)
    }

    /// A job nobody waits for (snapshot entries).
    pub fn fire(req: WorkloadRequest, fds: Vec<OwnedFd>) -> Job {
        Job { req, fds, reply: None }
    }

    /// Whether this request asked ztunnel to send listeners back.
    fn wants_listeners(&self) -> bool {
        matches!(&self.req.payload, Some(ambit_proto::zds::workload_request::Payload::Add(a)) if a.ambit_return_listeners)
    }

    fn finish(self, r: Outcome) {
        if let Some(tx) = self.reply {
            let _ = tx.send(r);
        }
    }
}

/// The agent's handle on one connected ztunnel.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    /// Connection number, increasing: the largest is the newest.
    pub id: u64,
    /// ztunnel's pid, for logs.
    pub pid: i32,
    /// Whether it takes listener fds (Ambit extension).
    pub handoff: bool,
    tx: mpsc::UnboundedSender<Job>,
}

impl ConnHandle {
    /// Creates a handle and the queue its task serves.
    pub fn new(id: u64, pid: i32, handoff: bool) -> (ConnHandle, mpsc::UnboundedReceiver<Job>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ConnHandle { id, pid, handoff, tx }, rx)
    }

    /// Queues a job; if the connection is gone, the job fails at once.
    pub fn enqueue(&self, job: Job) {
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job) {
            job.finish(Err(ZdsError::Disconnected("connection closed".into())));
        }
    }
}

/// Checks the listeners an ack brought back: only when asked for, one fd per port, each listening on it.
fn returned_listeners(ports: Vec<u32>, fds: Vec<OwnedFd>, asked: bool) -> Result<Returned, ZdsError> {
    if fds.is_empty() && ports.is_empty() {
        return Ok(Vec::new());
    }
    if !asked {
        return Err(ZdsError::Protocol(Violation::UnaskedFds("an ack")));
    }
    if ports.len() != fds.len() {
        return Err(ZdsError::Protocol(Violation::PortCount { ports: ports.len(), fds: fds.len() }));
    }
    let mut out = Vec::new();
    for (port, fd) in ports.into_iter().zip(fds) {
        let port = u16::try_from(port).map_err(|_| ZdsError::Protocol(Violation::PortRange(port)))?;
        ambit_proto::seqpacket::check_listener(fd.as_fd(), port)
            .map_err(|error| ZdsError::Protocol(Violation::NotAListener { port, error }))?;
        out.push((port, fd));
    }
    Ok(out)
}

/// Reads ztunnel's hello.
pub async fn read_hello(sock: &SeqPacket, timeout: Duration) -> Result<ZdsHello, ZdsError> {
    let mut buf = vec![0u8; zds::MAX_PACKET];
    let (n, fds) = tokio::time::timeout(timeout, sock.recv(&mut buf))
        .await
        .map_err(|_| ZdsError::Timeout(timeout))?
        .map_err(|e| ZdsError::Disconnected(e.to_string()))?;
    if n == 0 {
        return Err(ZdsError::Disconnected("closed before hello".into()));
    }
    if !fds.is_empty() {
        return Err(ZdsError::Protocol(Violation::UnaskedFds("the hello")));
    }
    let hello: ZdsHello = zds::decode(&buf[..n])
        .map_err(|e| ZdsError::Protocol(Violation::Undecodable { what: "hello", error: e.to_string() }))?;
    if hello.version != Version::V1 as i32 {
        return Err(ZdsError::Protocol(Violation::Version(hello.version)));
    }
    Ok(hello)
}

/// Serves one connection's queue until it fails or the queue closes; returns why it ended. Jobs still queued
/// then fail with [`ZdsError::Disconnected`].
pub async fn serve_queue(sock: SeqPacket, mut rx: mpsc::UnboundedReceiver<Job>, ack_timeout: Duration) -> ZdsError {
    let mut buf = vec![0u8; zds::MAX_PACKET];
    let reason = loop {
        let job = tokio::select! {
            job = rx.recv() => match job {
                Some(j) => j,
                None => break ZdsError::Disconnected("agent shutting down".into()),
            },
            // Nothing is owed to us while idle: a packet or end of stream means the peer closed or misbehaves.
            // (Dropping this recv when a job arrives first consumes nothing.)
            r = sock.recv(&mut buf) => {
                break match r {
                    Ok((0, _)) => ZdsError::Disconnected("ztunnel closed the connection".into()),
                    Ok((_, _)) => ZdsError::Protocol(Violation::Unsolicited),
                    Err(e) => ZdsError::Disconnected(e.to_string()),
                };
            }
        };
        let packet = zds::encode(&job.req);
        let fds: Vec<_> = job.fds.iter().map(|f| f.as_fd()).collect();
        let sent = tokio::time::timeout(ack_timeout, sock.send(&packet, &fds)).await;
        drop(fds);
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let err = ZdsError::Disconnected(format!("send failed: {e}"));
                job.finish(Err(err.clone()));
                break err;
            }
            Err(_) => {
                job.finish(Err(ZdsError::Timeout(ack_timeout)));
                break ZdsError::Timeout(ack_timeout);
            }
        }
        let answer = tokio::time::timeout(ack_timeout, sock.recv(&mut buf)).await;
        let outcome = match answer {
            Err(_) => Err(ZdsError::Timeout(ack_timeout)),
            Ok(Err(e)) => Err(ZdsError::Disconnected(e.to_string())),
            Ok(Ok((0, _))) => Err(ZdsError::Disconnected("ztunnel closed the connection".into())),
            Ok(Ok((n, fds))) => match zds::decode::<WorkloadResponse>(&buf[..n]) {
                Err(e) => Err(ZdsError::Protocol(Violation::Undecodable { what: "ack", error: e.to_string() })),
                Ok(r) => match r.into_result() {
                    Err(e) if fds.is_empty() => Err(ZdsError::Nack(e)),
                    Err(_) => Err(ZdsError::Protocol(Violation::UnaskedFds("a nack"))),
                    Ok(ports) => returned_listeners(ports, fds, job.wants_listeners()),
                },
            },
        };
        match outcome {
            Ok(l) => job.finish(Ok(l)),
            // A nack is an answer: the connection stays healthy.
            Err(ZdsError::Nack(m)) => job.finish(Err(ZdsError::Nack(m))),
            Err(e) => {
                job.finish(Err(e.clone()));
                break e;
            }
        }
    };
    rx.close();
    while let Ok(job) = rx.try_recv() {
        job.finish(Err(reason.clone()));
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fake_ztunnel(sock: SeqPacket, answers: Vec<WorkloadResponse>) -> Vec<(String, usize)> {
        sock.send(&zds::encode(&ZdsHello::ambit(true)), &[]).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        for a in answers {
            let (n, fds) = sock.recv(&mut buf).await.unwrap();
            let req: WorkloadRequest = zds::decode(&buf[..n]).unwrap();
            seen.push((req.kind().to_string(), fds.len()));
            sock.send(&zds::encode(&a), &[]).await.unwrap();
        }
        seen
    }

    #[tokio::test]
    async fn ordered_acks_nacks_and_disconnect() {
        let (agent, zt) = SeqPacket::pair().unwrap();
        let peer = tokio::spawn(fake_ztunnel(zt, vec![WorkloadResponse::ack(), WorkloadResponse::nack("no")]));
        let hello = read_hello(&agent, Duration::from_secs(1)).await.unwrap();
        assert!(hello.listener_handoff());
        let (handle, rx) = ConnHandle::new(1, 0, true);
        let netns = OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap());
        let (j1, r1) = Job::awaited(WorkloadRequest::add("a", Default::default(), vec![]), vec![netns]);
        let (j2, r2) = Job::awaited(WorkloadRequest::del("a"), vec![]);
        let (j3, r3) = Job::awaited(WorkloadRequest::del("b"), vec![]);
        handle.enqueue(j1);
        handle.enqueue(j2);
        handle.enqueue(j3);
        let server = tokio::spawn(serve_queue(agent, rx, Duration::from_secs(1)));
        assert!(r1.await.unwrap().unwrap().is_empty());
        assert_eq!(r2.await.unwrap().unwrap_err(), ZdsError::Nack("no".into()));
        assert_eq!(peer.await.unwrap(), vec![("add".to_string(), 1), ("del".to_string(), 0)]);
        // The fake ztunnel is gone: the third request fails, and so does the connection.
        assert!(matches!(r3.await.unwrap(), Err(ZdsError::Disconnected(_))));
        assert!(matches!(server.await.unwrap(), ZdsError::Disconnected(_)));
        let (j4, r4) = Job::awaited(WorkloadRequest::del("c"), vec![]);
        handle.enqueue(j4);
        assert!(matches!(r4.await.unwrap(), Err(ZdsError::Disconnected(_))));
    }

    #[tokio::test]
    async fn silent_ztunnel_times_out() {
        let (agent, zt) = SeqPacket::pair().unwrap();
        let (handle, rx) = ConnHandle::new(1, 0, false);
        let (j, r) = Job::awaited(WorkloadRequest::del("a"), vec![]);
        handle.enqueue(j);
        let reason = serve_queue(agent, rx, Duration::from_millis(50)).await;
        assert_eq!(reason, ZdsError::Timeout(Duration::from_millis(50)));
        assert_eq!(r.await.unwrap().unwrap_err(), ZdsError::Timeout(Duration::from_millis(50)));
        drop(zt);
    }

    #[tokio::test]
    async fn bad_hello_is_refused() {
        let (agent, zt) = SeqPacket::pair().unwrap();
        zt.send(&[0xff, 0xff], &[]).await.unwrap();
        assert!(read_hello(&agent, Duration::from_secs(1)).await.is_err());
        zt.send(&zds::encode(&ZdsHello { version: 7, ambit: None }), &[]).await.unwrap();
        assert!(read_hello(&agent, Duration::from_secs(1)).await.is_err());
    }

    /// How the fake ztunnel answers one request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Answer {
        Ack,
        Nack,
        /// Bytes that are no ZDS message.
        Garbage,
        /// An ack carrying a descriptor nobody asked for.
        AckWithFd,
        /// Closes the connection instead of answering.
        Close,
        /// Never answers (until the agent gives up).
        Silent,
    }

    /// What the agent must report for each job, given the answers: answered jobs get their answer, and once an
    /// answer ends the connection every later job fails the same way. The fake ztunnel closes after its list.
    fn model(answers: &[Answer], jobs: usize) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut dead: Option<&'static str> = None;
        for i in 0..jobs {
            if let Some(d) = dead {
                out.push(d);
                continue;
            }
            let o = match answers.get(i).copied().unwrap_or(Answer::Close) {
                Answer::Ack => "ok",
                Answer::Nack => "nack",
                Answer::Garbage | Answer::AckWithFd | Answer::Close => "disconnected",
                Answer::Silent => "timeout",
            };
            if matches!(o, "disconnected" | "timeout") {
                dead = Some(o);
            }
            out.push(o);
        }
        out
    }

    fn kind(o: &Outcome) -> &'static str {
        match o {
            Ok(_) => "ok",
            Err(ZdsError::Nack(_)) => "nack",
            Err(ZdsError::Timeout(_)) => "timeout",
            Err(ZdsError::Disconnected(_) | ZdsError::Protocol(_)) => "disconnected",
            Err(ZdsError::NoZtunnel) => "no ztunnel",
        }
    }

    async fn scripted_ztunnel(sock: SeqPacket, answers: Vec<Answer>) {
        let mut buf = vec![0u8; 4096];
        let spare = std::fs::File::open("/dev/null").unwrap();
        for a in answers {
            match sock.recv(&mut buf).await {
                Ok((n, _)) if n > 0 => {}
                _ => return,
            }
            let sent = match a {
                Answer::Ack => sock.send(&zds::encode(&WorkloadResponse::ack()), &[]).await,
                Answer::Nack => sock.send(&zds::encode(&WorkloadResponse::nack("no")), &[]).await,
                Answer::Garbage => sock.send(&[0xff, 0xff, 0x01], &[]).await,
                Answer::AckWithFd => sock.send(&zds::encode(&WorkloadResponse::ack()), &[spare.as_fd()]).await,
                Answer::Close => return,
                Answer::Silent => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    return;
                }
            };
            if sent.is_err() {
                return;
            }
        }
    }

    fn answer() -> impl proptest::strategy::Strategy<Value = Answer> {
        use proptest::prelude::*;
        prop_oneof![
            6 => Just(Answer::Ack),
            3 => Just(Answer::Nack),
            1 => Just(Answer::Garbage),
            1 => Just(Answer::AckWithFd),
            1 => Just(Answer::Close),
            1 => Just(Answer::Silent),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("AMBIT_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
            ..Default::default()
        })]
        /// The agent's side of a ZDS connection against any sequence of ztunnel behaviours: every request gets
        /// exactly one outcome, in order, the one its answer calls for; the first answer that ends the
        /// connection fails every request behind it the same way; nothing waits forever.
        #[test]
        fn every_request_gets_exactly_its_outcome(
            answers in proptest::collection::vec(answer(), 0..8),
            jobs in 0usize..10,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let got: Vec<&'static str> = rt.block_on(async {
                let (agent, zt) = SeqPacket::pair().unwrap();
                let peer = tokio::spawn(scripted_ztunnel(zt, answers.clone()));
                let (handle, rx) = ConnHandle::new(1, 0, false);
                let mut replies = Vec::new();
                for i in 0..jobs {
                    let (j, r) = Job::awaited(WorkloadRequest::del(format!("pod-{i}")), vec![]);
                    handle.enqueue(j);
                    replies.push(r);
                }
                // No more jobs: the queue ends once drained (or the connection ends first).
                drop(handle);
                let server = tokio::spawn(serve_queue(agent, rx, Duration::from_millis(40)));
                let mut got = Vec::new();
                for r in replies {
                    let o = tokio::time::timeout(Duration::from_secs(5), r).await.expect("an outcome in time");
                    got.push(kind(&o.expect("exactly one outcome")));
                }
                let reason = tokio::time::timeout(Duration::from_secs(5), server).await.expect("the queue ends").unwrap();
                assert!(
                    matches!(reason, ZdsError::Disconnected(_) | ZdsError::Protocol(_) | ZdsError::Timeout(_)),
                    "{reason:?}"
                );
                peer.abort();
                got
            });
            proptest::prop_assert_eq!(got, model(&answers, jobs));
        }
    }
}
