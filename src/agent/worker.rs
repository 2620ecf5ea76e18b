//! One queue per hosted instance: its commands run one after the other, in
//! the order they were accepted, and a hook that fails is retried (with
//! backoff, alerting) before the instance's next command runs: a `restore`
//! must never overtake the `revoke` before it. Each instance has its own
//! task, so a failing hook holds up that instance only. Outcomes go to the
//! instance's reporter, which sends them to keywarden in the same order.

use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::alert::Alerter;
use super::config::{Hooks, HostedInstance, Retry};
use super::hooks::{self, action_name};
use super::journal::{Entry, Journal, JournalError};
use super::report::{Outcome, Reporter};
use crate::backoff::Backoff;
use crate::engine::DataPlaneOutcome;
use crate::tell::{pause, Command};

/// A command waiting for its instance's turn.
#[derive(Debug, Clone)]
pub struct Queued {
    pub command: Command,
    /// A run of it was started before a restart and never finished.
    pub interrupted: bool,
}

pub struct Worker {
    pub instance: HostedInstance,
    pub hooks: Hooks,
    pub journal: Journal,
    pub retry: Retry,
    pub alerter: Alerter,
    pub reports: mpsc::Sender<Outcome>,
}

impl Worker {
    /// Runs the instance's commands until shutdown; a journal that cannot be
    /// written stops it (and the agent), since nothing it did would be known.
    pub async fn run(self, mut queue: mpsc::Receiver<Queued>, shutdown: CancellationToken) -> Result<(), JournalError> {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = queue.recv() => next,
            };
            let Some(queued) = next else { return Ok(()) };
            if !self.enforce(queued, &shutdown).await? {
                return Ok(());
            }
        }
    }

    /// Runs one command's hook until it succeeds; false: shut down while
    /// waiting to retry (the command stays unfinished in the journal and is
    /// run after the restart).
    async fn enforce(&self, queued: Queued, shutdown: &CancellationToken) -> Result<bool, JournalError> {
        let Queued { command, mut interrupted } = queued;
        let action = action_name(&command);
        let id = command.command_id.clone();
        let Some(hook) = self.hooks.get(command.action) else {
            tracing::info!(instance_id = %command.instance_id, command_id = %id, %action, "no hook for this action; nothing to do on this host");
            self.finish(command, DataPlaneOutcome::Skipped, format!("no {action} hook is configured on this host")).await?;
            return Ok(true);
        };
        let mut backoff = Backoff::new(self.retry.first.0, self.retry.max.0);
        let mut failures = 0u32;
        loop {
            if interrupted {
                tracing::warn!(instance_id = %command.instance_id, command_id = %id, %action, "a run of this hook was interrupted (the agent stopped mid-run); running it again");
            }
            self.journal.append(Entry::Started { command_id: id.clone(), at: Utc::now() }).await?;
            let started = std::time::Instant::now();
            match hooks::run(hook, &self.instance, &command, interrupted).await {
                Ok(output) => {
                    tracing::info!(instance_id = %command.instance_id, command_id = %id, %action, elapsed_ms = started.elapsed().as_millis() as u64, attempts = failures + 1, "hook enforced the command");
                    if failures > 0 {
                        self.alerter.hook_failing(&command.instance_id, &action, &id, "it succeeded now", true);
                    }
                    self.finish(command, DataPlaneOutcome::Enforced, output).await?;
                    return Ok(true);
                }
                Err(e) => {
                    failures += 1;
                    let delay = backoff.next_delay();
                    tracing::error!(instance_id = %command.instance_id, command_id = %id, %action, attempt = failures, retry_in_ms = delay.as_millis() as u64, error = %e, "hook failed; retrying");
                    if failures == 1 {
                        self.alerter.hook_failing(&command.instance_id, &action, &id, &e.to_string(), false);
                        // Said at once, not only when it finally works: an
                        // operator looking at the instance sees it failing.
                        self.report(Outcome { command: command.clone(), outcome: DataPlaneOutcome::Failed, at: Utc::now(), detail: e.to_string() }).await;
                    }
                    if !pause(shutdown, tokio::time::sleep(delay)).await {
                        return Ok(false);
                    }
                }
            }
            interrupted = false;
        }
    }

    /// Made durable before the next command of the instance starts, then reported.
    async fn finish(&self, command: Command, outcome: DataPlaneOutcome, detail: String) -> Result<(), JournalError> {
        let at = Utc::now();
        self.journal.append(Entry::Finished { command_id: command.command_id.clone(), outcome, at, detail: detail.clone() }).await?;
        self.report(Outcome { command, outcome, at, detail }).await;
        Ok(())
    }

    async fn report(&self, outcome: Outcome) {
        // The reporter only stops at shutdown; the journal re-reports a
        // finished outcome after the restart.
        drop(self.reports.send(outcome).await);
    }
}

/// Sends an instance's outcomes to keywarden in order, retrying what may
/// pass later. A finished outcome is journaled as reported once keywarden
/// took it (or refused it for good); a `failed` one is not, since the
/// outcome that matters is the one that follows it.
pub async fn report_loop(
    reporter: Reporter,
    instance: HostedInstance,
    journal: Journal,
    retry: Retry,
    mut rx: mpsc::Receiver<Outcome>,
    shutdown: CancellationToken,
) -> Result<(), JournalError> {
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = rx.recv() => next,
        };
        let Some(outcome) = next else { return Ok(()) };
        let id = outcome.command.command_id.clone();
        let mut backoff = Backoff::new(retry.first.0, retry.max.0);
        loop {
            match reporter.send(&instance, &outcome).await {
                Ok(()) => {
                    tracing::info!(instance_id = %instance.id, command_id = %id, outcome = ?outcome.outcome, "outcome reported to keywarden");
                    break;
                }
                Err(e) if e.retryable() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(instance_id = %instance.id, command_id = %id, retry_in_ms = delay.as_millis() as u64, error = %e, "cannot report the outcome; retrying");
                    if !pause(&shutdown, tokio::time::sleep(delay)).await {
                        return Ok(());
                    }
                }
                Err(e) => {
                    tracing::error!(instance_id = %instance.id, command_id = %id, error = %e, "keywarden refused the report; not sending it again");
                    break;
                }
            }
        }
        if outcome.outcome != DataPlaneOutcome::Failed {
            journal.append(Entry::Reported { command_id: id, at: Utc::now() }).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;
    use crate::engine::CommandAction;
    use std::time::Duration;

    fn retry() -> Retry {
        Retry { first: HumanDuration(Duration::from_millis(20)), max: HumanDuration(Duration::from_millis(80)) }
    }

    /// A hook that logs the key id of each run, and fails the first run of
    /// key `k1` (as a database that would not stop at once).
    fn worker(dir: &std::path::Path) -> (Worker, mpsc::Receiver<Outcome>, Journal) {
        let (journal, _, thread) = Journal::open(&dir.join("journal"), None).unwrap();
        drop(thread);
        let script = "if [ \"$KEYWARDEN_KEY_ID\" = k1 ] && [ ! -e \"$DIR/failed-once\" ]; then touch \"$DIR/failed-once\"; echo not yet; exit 1; fi; echo \"$KEYWARDEN_KEY_ID\" >> \"$DIR/runs\"";
        let hook = super::super::config::Hook { argv: vec!["/bin/sh".into(), "-c".into(), script.into()], timeout: HumanDuration(Duration::from_secs(10)) };
        let instance = HostedInstance { id: "db-1".into(), credential_file: dir.join("cred"), env: [("DIR".to_string(), dir.display().to_string())].into() };
        let (tx, rx) = mpsc::channel(16);
        let w = Worker {
            instance,
            hooks: Hooks { revoke: Some(hook.clone()), restore: Some(hook), ..Default::default() },
            journal: journal.clone(),
            retry: retry(),
            alerter: Alerter::new(vec![], "test".into(), "http://127.0.0.1:1".into()),
            reports: tx,
        };
        (w, rx, journal)
    }

    #[tokio::test]
    async fn a_failing_hook_is_retried_and_holds_back_the_instances_next_command() {
        let dir = tempfile::tempdir().unwrap();
        let (w, mut reports, _journal) = worker(dir.path());
        let (tx, rx) = mpsc::channel(16);
        let at = Utc::now();
        let revoke = Command::new("db-1", "k1", CommandAction::Revoke, None, "e1", at, None);
        let restore = Command::new("db-1", "k2", CommandAction::Restore, None, "e2", at, None);
        let erase = Command::new("db-1", "k3", CommandAction::Erase, None, "e3", at, None);
        for c in [&revoke, &restore, &erase] {
            tx.send(Queued { command: c.clone(), interrupted: false }).await.unwrap();
        }
        drop(tx);
        w.run(rx, CancellationToken::new()).await.unwrap();
        // k1 failed once, was retried, and only then did k2 run.
        assert_eq!(std::fs::read_to_string(dir.path().join("runs")).unwrap(), "k1\nk2\n");
        let mut seen = Vec::new();
        while let Ok(o) = reports.try_recv() {
            seen.push((o.command.command_id, o.outcome));
        }
        assert_eq!(
            seen,
            [
                (revoke.command_id.clone(), DataPlaneOutcome::Failed),
                (revoke.command_id, DataPlaneOutcome::Enforced),
                (restore.command_id, DataPlaneOutcome::Enforced),
                // No erase hook on this host: reported as skipped, not run.
                (erase.command_id, DataPlaneOutcome::Skipped),
            ]
        );
        let (_, replay, _) = Journal::open(&dir.path().join("journal"), None).unwrap();
        assert!(replay.commands.is_empty(), "the worker journals steps; accepting is the consumer's");
    }

    #[test]
    fn the_retry_delay_doubles_up_to_its_bound() {
        let r = retry();
        let mut b = Backoff::new(r.first.0, r.max.0);
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [20, 40, 80, 80, 80]);
    }
}
