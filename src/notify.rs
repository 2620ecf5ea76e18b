//! notify: the sd_notify protocol, spoken directly (one datagram per message to
//! the socket named by `$NOTIFY_SOCKET`), so that a `Type=notify` unit starts
//! only once keywarden consumes, shows what it is doing in `systemctl status`,
//! and is restarted by the watchdog when its main loop stops turning.
//!
//! Without `$NOTIFY_SOCKET` (not under systemd, or `Type=exec`) every message is
//! dropped, so the daemon behaves the same everywhere else.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cluster::fence::Fence;
use crate::intake::Health;
use crate::store::{Census, Store};

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an abstract socket (@name); fix the unit or unset it")]
    Address(String),
    #[error("cannot use NOTIFY_SOCKET={path:?}: {source}; fix the unit or unset it")]
    Socket { path: String, source: std::io::Error },
}

/// How often `systemctl status` gets fresh counts when nothing changes.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// How soon readiness (partitions assigned) is noticed and reported.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// The notify socket, or nothing when systemd did not ask for notifications.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr, String)>,
}

impl Notifier {
    pub fn from_env() -> Result<Notifier, NotifyError> {
        Notifier::new(std::env::var("NOTIFY_SOCKET").ok().as_deref())
    }

    pub fn new(notify_socket: Option<&str>) -> Result<Notifier, NotifyError> {
        let Some(path) = notify_socket.filter(|p| !p.is_empty()) else {
            return Ok(Notifier { target: None });
        };
        let socket_err = |source| NotifyError::Socket { path: path.to_string(), source };
        let addr = socket_address(path)?.map_err(socket_err)?;
        let socket = UnixDatagram::unbound().map_err(socket_err)?;
        // Sent from async tasks: a full socket queue (systemd not reading)
        // drops the notification, logged, rather than block a runtime thread.
        socket.set_nonblocking(true).map_err(socket_err)?;
        Ok(Notifier { target: Some((socket, addr, path.to_string())) })
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// A lost notification is logged, never fatal: systemd acts on the silence
    /// (start timeout, watchdog), which is the right outcome anyway.
    pub fn send(&self, message: &str) {
        let Some((socket, addr, path)) = &self.target else { return };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            tracing::warn!(error = %e, socket = %path, "cannot notify systemd");
        }
    }
}

/// `@name` is an abstract socket (systemd's default); anything else must be absolute.
fn socket_address(path: &str) -> Result<std::io::Result<SocketAddr>, NotifyError> {
    if let Some(name) = path.strip_prefix('@') {
        Ok(SocketAddr::from_abstract_name(name.as_bytes()))
    } else if path.starts_with('/') {
        Ok(SocketAddr::from_pathname(path))
    } else {
        Err(NotifyError::Address(path.to_string()))
    }
}

/// The interval systemd expects pings at, from `WATCHDOG_USEC`; `None` when the
/// watchdog is off or meant for another process (`WATCHDOG_PID`).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != our_pid {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The main loop's last turn. The watchdog pings only while it is recent, so a
/// loop that is stuck (not merely idle) stops the pings and systemd restarts us.
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds after `origin`.
    last: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat { origin: Instant::now(), last: AtomicU64::new(0) }
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    fn beat_at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    pub fn age_at(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.origin + Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// What the daemon is doing, as `systemctl status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Joining,
    Ready,
    KafkaDown,
    Draining,
}

pub fn status_line(phase: Phase, partitions: usize, c: &Census) -> String {
    let counts = format!("{} keys, {} instances, outbox {}", c.keys, c.instances, c.outbox);
    match phase {
        Phase::Joining => format!("waiting for partitions of the events topic; {counts}"),
        Phase::Ready => format!("ready: {partitions} partitions, {counts}"),
        Phase::KafkaDown => format!("not ready: kafka is unreachable, state is kept; {counts}"),
        Phase::Draining => format!("stopping: draining the intake; {counts}"),
    }
}

fn phase(health: &Health) -> Phase {
    if health.ready() {
        Phase::Ready
    } else if !health.broker_ok.load(Ordering::SeqCst) && health.assigned.load(Ordering::SeqCst) {
        Phase::KafkaDown
    } else {
        Phase::Joining
    }
}

/// What the supervisor watches.
pub struct Watched {
    pub health: Arc<Health>,
    pub fence: Arc<Fence>,
    pub store: Store,
}

/// Reports readiness once, status on every change and every few seconds, and
/// watchdog pings while the intake's heartbeat is fresh. Sends `STOPPING=1` as
/// soon as `shutdown` is cancelled, then stays quiet until `done`.
pub async fn supervise(notifier: Notifier, watched: Watched, shutdown: CancellationToken, done: CancellationToken) {
    let watchdog = watchdog_interval(std::env::var("WATCHDOG_USEC").ok().as_deref(), std::env::var("WATCHDOG_PID").ok().as_deref(), std::process::id());
    report(notifier, watched, watchdog, shutdown, done).await
}

async fn report(notifier: Notifier, watched: Watched, watchdog: Option<Duration>, shutdown: CancellationToken, done: CancellationToken) {
    if !notifier.enabled() {
        // Not under systemd: idle until shutdown (a supervised task that ends has failed).
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = done.cancelled() => {}
        }
        return;
    }
    // Pinging at half the interval leaves one ping of slack; a heartbeat older
    // than that means the loop missed a whole ping period.
    let ping_every = watchdog.map(|w| w / 2);
    let mut ping = tokio::time::interval(ping_every.unwrap_or(Duration::from_secs(3600)));
    let mut check = tokio::time::interval(CHECK_EVERY);
    let mut reported: Option<(Phase, Instant)> = None;
    let mut ready_sent = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = done.cancelled() => break,
            _ = ping.tick(), if ping_every.is_some() => {
                let age = watched.health.progress.age_at(Instant::now());
                if ping_every.is_some_and(|max| age < max) {
                    notifier.send("WATCHDOG=1");
                } else {
                    tracing::error!(stalled_for = ?age, "the intake loop has not turned; withholding the watchdog ping so that systemd restarts keywarden");
                }
            }
            _ = check.tick() => {
                let now_phase = phase(&watched.health);
                let due = reported.is_none_or(|(p, at)| p != now_phase || at.elapsed() >= STATUS_EVERY);
                if !due {
                    continue;
                }
                let status = status_line(now_phase, watched.fence.owned_count(), &census(&watched.store).await);
                if now_phase == Phase::Ready && !ready_sent {
                    notifier.send(&format!("READY=1\nSTATUS={status}"));
                    ready_sent = true;
                    tracing::info!("told systemd we are ready");
                } else {
                    notifier.send(&format!("STATUS={status}"));
                }
                reported = Some((now_phase, Instant::now()));
            }
        }
    }
    let status = status_line(Phase::Draining, watched.fence.owned_count(), &census(&watched.store).await);
    notifier.send(&format!("STOPPING=1\nSTATUS={status}"));
    done.cancelled().await;
}

/// Counting scans the store, so it runs off the async threads.
async fn census(store: &Store) -> Census {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.census()).await.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_or_empty_socket_sends_nothing() {
        assert!(!Notifier::new(None).unwrap().enabled());
        assert!(!Notifier::new(Some("")).unwrap().enabled());
        Notifier::new(None).unwrap().send("READY=1");
    }

    #[test]
    fn a_relative_socket_path_is_refused_with_advice() {
        let err = Notifier::new(Some("run/notify")).err().unwrap();
        assert!(err.to_string().contains("neither an absolute path nor an abstract socket"), "{err}");
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(Some(path.to_str().unwrap())).unwrap();
        n.send("READY=1\nSTATUS=ready: 1 partitions");
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ready: 1 partitions");
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        let name = format!("keywarden-test-{}", uuid::Uuid::new_v4());
        let server = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        Notifier::new(Some(&format!("@{name}"))).unwrap().send("WATCHDOG=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn a_vanished_socket_is_logged_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(Some(dir.path().join("gone").to_str().unwrap())).unwrap();
        n.send("STATUS=x");
    }

    #[test]
    fn watchdog_interval_follows_usec_and_only_for_our_pid() {
        assert_eq!(watchdog_interval(Some("30000000"), None, 7), Some(Duration::from_secs(30)));
        assert_eq!(watchdog_interval(Some("30000000"), Some("7"), 7), Some(Duration::from_secs(30)));
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
    }

    #[test]
    fn heartbeat_goes_stale_when_the_loop_stops_turning() {
        let h = Heartbeat::default();
        let t0 = h.origin + Duration::from_secs(10);
        h.beat_at(t0);
        assert_eq!(h.age_at(t0 + Duration::from_millis(300)), Duration::from_millis(300));
        assert!(h.age_at(t0 + Duration::from_secs(20)) >= Duration::from_secs(20));
        h.beat_at(t0 + Duration::from_secs(20));
        assert_eq!(h.age_at(t0 + Duration::from_secs(20)), Duration::ZERO);
        // A late beat from a slower thread never moves the heartbeat back.
        h.beat_at(t0);
        assert_eq!(h.age_at(t0 + Duration::from_secs(20)), Duration::ZERO);
    }

    /// Collects what `report` sends while `during` runs, then stops it.
    async fn reported(watched: Watched, watchdog: Duration, during: impl std::future::Future<Output = ()>) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        // Read as systemd does, all along: the socket's queue holds only a
        // few datagrams, and a full one drops notifications.
        server.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let reader = {
            let reading = reading.clone();
            std::thread::spawn(move || {
                let (mut got, mut buf) = (Vec::new(), [0u8; 512]);
                loop {
                    match server.recv(&mut buf) {
                        Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                        Err(_) if reading.load(std::sync::atomic::Ordering::SeqCst) => {}
                        Err(_) => return got,
                    }
                }
            })
        };
        let (shutdown, done) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(report(Notifier::new(path.to_str()).unwrap(), watched, Some(watchdog), shutdown.clone(), done.clone()));
        during.await;
        shutdown.cancel();
        done.cancel();
        task.await.unwrap();
        reading.store(false, std::sync::atomic::Ordering::SeqCst);
        reader.join().unwrap()
    }

    fn watched(dir: &std::path::Path) -> Watched {
        Watched { health: Arc::new(Health::default()), fence: Arc::new(Fence::default()), store: Store::open(dir).unwrap() }
    }

    #[tokio::test]
    async fn a_stuck_loop_gets_no_watchdog_pings_and_a_turning_one_does() {
        let dir = tempfile::tempdir().unwrap();
        let w = watched(dir.path());
        let health = w.health.clone();
        // Nobody beats: the heartbeat goes stale after half the interval.
        let stuck = reported(w, Duration::from_millis(200), tokio::time::sleep(Duration::from_millis(800))).await;
        let pings = stuck.iter().filter(|m| *m == "WATCHDOG=1").count();
        assert!(pings <= 2, "a stuck loop still got {pings} pings: {stuck:?}");

        let dir = tempfile::tempdir().unwrap();
        let w = Watched { health: health.clone(), ..watched(dir.path()) };
        let turning = async {
            for _ in 0..40 {
                health.progress.beat();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let alive = reported(w, Duration::from_millis(200), turning).await;
        let pings = alive.iter().filter(|m| *m == "WATCHDOG=1").count();
        assert!(pings >= 4, "a turning loop got only {pings} pings: {alive:?}");
    }

    #[tokio::test]
    async fn ready_is_sent_once_and_stopping_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let w = watched(dir.path());
        let health = w.health.clone();
        health.assigned.store(true, Ordering::SeqCst);
        health.broker_ok.store(true, Ordering::SeqCst);
        let sent = reported(w, Duration::from_secs(60), tokio::time::sleep(Duration::from_millis(700))).await;
        assert_eq!(sent.iter().filter(|m| m.starts_with("READY=1\nSTATUS=ready: ")).count(), 1, "{sent:?}");
        assert!(sent.last().unwrap().starts_with("STOPPING=1\nSTATUS=stopping: "), "{sent:?}");
    }

    #[test]
    fn status_names_the_phase_and_the_counts() {
        let c = Census { keys: 12, instances: 40, outbox: 0 };
        assert_eq!(status_line(Phase::Ready, 3, &c), "ready: 3 partitions, 12 keys, 40 instances, outbox 0");
        assert!(status_line(Phase::Joining, 0, &c).starts_with("waiting for partitions of the events topic"));
        assert!(status_line(Phase::KafkaDown, 3, &c).starts_with("not ready: kafka is unreachable"));
        assert!(status_line(Phase::Draining, 3, &c).starts_with("stopping: draining"));
    }

    #[test]
    fn readiness_needs_partitions_and_a_reachable_broker() {
        let h = Health::default();
        assert_eq!(phase(&h), Phase::Joining);
        h.assigned.store(true, Ordering::SeqCst);
        assert_eq!(phase(&h), Phase::KafkaDown);
        h.broker_ok.store(true, Ordering::SeqCst);
        assert_eq!(phase(&h), Phase::Ready);
    }
}
