//! The supervisor: every long-running task of the daemon lives in one
//! `JoinSet`. A task that ends before shutdown was asked for, or panics, is a
//! failure of the whole daemon: a relay that died sends no revocation, yet the
//! API would go on answering. So the first such end marks the daemon failed
//! (`/readyz` answers 503 at once, naming it), logs and alerts it, and starts
//! the one shutdown path; the daemon then exits non-zero and systemd restarts it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

/// Why the daemon failed, once it has; read by `/readyz`.
#[derive(Default)]
pub struct Failure(OnceLock<String>);

impl Failure {
    /// Keeps the first reason: later ones are consequences of it.
    pub fn set(&self, reason: String) -> bool {
        self.0.set(reason).is_ok()
    }

    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

pub struct Supervisor {
    set: JoinSet<()>,
    names: HashMap<Id, &'static str>,
    /// Cancelled for shutdown (the daemon's, or the tasks' own once the
    /// intake drained): a task ending after either is no failure.
    stopping: [CancellationToken; 2],
    failure: Arc<Failure>,
    faults: Faults,
}

impl Supervisor {
    pub fn new(shutdown: CancellationToken, tasks: CancellationToken, failure: Arc<Failure>) -> Supervisor {
        Supervisor { set: JoinSet::new(), names: HashMap::new(), stopping: [shutdown, tasks], failure, faults: Faults::from_env() }
    }

    /// Runs `task` until it ends; it must end only once `stopping` is cancelled.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let task = self.faults.wrap(name, task);
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Runs blocking `work` (a thread's loop) under supervision.
    pub fn spawn_blocking(&mut self, name: &'static str, work: impl FnOnce() + Send + 'static) {
        let fault = self.faults.get(name);
        let handle = self.set.spawn_blocking(move || {
            if let Some(fault) = fault {
                std::thread::sleep(FAULT_AFTER);
                match fault {
                    Fault::Panic => panic!("fault injected into {name} (KEYWARDEN_FAULT_INJECT)"),
                    Fault::Exit => return,
                }
            }
            work()
        });
        self.names.insert(handle.id(), name);
    }

    /// Waits for the first task to end, which before shutdown is a failure;
    /// returns its reason. Pending forever when there are no tasks.
    pub async fn failed(&mut self) -> String {
        loop {
            let Some(joined) = self.set.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let reason = self.reason(joined);
            if self.stopping.iter().any(CancellationToken::is_cancelled) {
                tracing::debug!(%reason, "task ended during shutdown");
                continue;
            }
            tracing::error!(%reason, "a critical task stopped; keywarden is not ready and exits so that it is restarted");
            self.failure.set(reason.clone());
            return reason;
        }
    }

    fn reason(&mut self, joined: Result<(Id, ()), JoinError>) -> String {
        let id = match &joined {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let name = self.names.remove(&id).unwrap_or("unnamed");
        match joined {
            Ok(_) => format!("task {name} ended unexpectedly"),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let message = payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned());
                format!("task {name} panicked: {}", message.unwrap_or_else(|| "no message".into()))
            }
            Err(_) => format!("task {name} was cancelled"),
        }
    }

    /// After `stopping` is cancelled: waits for every task, at most `timeout`
    /// (a task stuck in a broker call is then abandoned, and named).
    pub async fn join(mut self, timeout: Duration) {
        let all = async {
            while let Some(joined) = self.set.join_next_with_id().await {
                let reason = self.reason(joined);
                tracing::debug!(%reason, "task joined");
            }
        };
        if tokio::time::timeout(timeout, all).await.is_err() {
            let left: Vec<&str> = self.names.values().copied().collect();
            tracing::warn!(tasks = ?left, ?timeout, "tasks did not stop in time; abandoning them");
        }
    }
}

/// How long after start an injected fault fires: late enough for the daemon
/// to be ready, so a test sees it go from ready to failed.
const FAULT_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Panic,
    Exit,
}

/// `KEYWARDEN_FAULT_INJECT=panic:<task>` or `exit:<task>`: makes that task
/// panic, or end, two seconds after start. For the supervision tests; it can
/// only stop the daemon, which whoever sets its environment can do anyway.
#[derive(Default)]
struct Faults(Option<(Fault, String)>);

impl Faults {
    fn from_env() -> Faults {
        Faults::parse(std::env::var("KEYWARDEN_FAULT_INJECT").ok().as_deref())
    }

    fn parse(spec: Option<&str>) -> Faults {
        let Some((kind, task)) = spec.and_then(|s| s.split_once(':')) else { return Faults(None) };
        let fault = match kind {
            "panic" => Fault::Panic,
            "exit" => Fault::Exit,
            _ => return Faults(None),
        };
        tracing::warn!(task, fault = ?fault, "fault injection is on (KEYWARDEN_FAULT_INJECT); this daemon will fail on purpose");
        Faults(Some((fault, task.to_string())))
    }

    fn get(&self, name: &str) -> Option<Fault> {
        self.0.as_ref().filter(|(_, task)| task == name).map(|(f, _)| *f)
    }

    fn wrap(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) -> impl Future<Output = ()> + Send + 'static {
        let fault = self.get(name);
        async move {
            if let Some(fault) = fault {
                tokio::time::sleep(FAULT_AFTER).await;
                match fault {
                    Fault::Panic => panic!("fault injected into {name} (KEYWARDEN_FAULT_INJECT)"),
                    Fault::Exit => return,
                }
            }
            task.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_ends_before_shutdown_is_a_failure_naming_it() {
        let stopping = CancellationToken::new();
        let failure = Arc::new(Failure::default());
        let mut s = Supervisor::new(CancellationToken::new(), stopping.clone(), failure.clone());
        let forever = stopping.clone();
        s.spawn("steady", async move { forever.cancelled().await });
        s.spawn("relay", async { panic!("boom") });
        let reason = s.failed().await;
        assert_eq!(reason, "task relay panicked: boom");
        assert_eq!(failure.get(), Some("task relay panicked: boom"));
        s.spawn("early", async {});
        assert_eq!(s.failed().await, "task early ended unexpectedly");
        assert_eq!(failure.get(), Some("task relay panicked: boom"), "the first reason is kept");
        stopping.cancel();
        s.join(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn tasks_ending_during_shutdown_are_no_failure() {
        let stopping = CancellationToken::new();
        let failure = Arc::new(Failure::default());
        let shutdown = CancellationToken::new();
        let mut s = Supervisor::new(shutdown.clone(), stopping.clone(), failure.clone());
        let token = shutdown.clone();
        s.spawn("notify", async move { token.cancelled().await });
        s.spawn("worker", async move { stopping.cancelled().await });
        // The daemon's shutdown ends one task at once; the rest end later.
        shutdown.cancel();
        tokio::task::yield_now().await;
        let waited = tokio::time::timeout(Duration::from_millis(200), s.failed()).await;
        assert!(waited.is_err(), "no failure is reported");
        assert!(failure.get().is_none());
    }

    #[test]
    fn fault_specs_name_a_task_and_a_kind() {
        assert_eq!(Faults::parse(Some("panic:relay")).get("relay"), Some(Fault::Panic));
        assert_eq!(Faults::parse(Some("exit:api")).get("api"), Some(Fault::Exit));
        assert_eq!(Faults::parse(Some("exit:api")).get("relay"), None);
        assert_eq!(Faults::parse(Some("nonsense")).get("relay"), None);
        assert_eq!(Faults::parse(None).get("relay"), None);
    }
}
