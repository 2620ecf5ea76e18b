//! agent: `keywarden agent --config FILE`, the data-plane agent that runs on
//! a database host and enforces keywarden's commands there: it consumes the
//! commands topic (`consume`), runs only what keywarden signed, once per
//! `command_id` (`journal`), one instance's commands in order and each
//! instance on its own (`worker`), through the configured hooks (`hooks`),
//! alerts when a hook keeps failing (`alert`), and reports each outcome back
//! to keywarden with the instance's own credential (`report`).

pub mod alert;
pub mod config;
pub mod consume;
pub mod hooks;
pub mod journal;
pub mod report;
pub mod worker;

use std::collections::{HashMap, HashSet};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::DataPlaneOutcome;
use crate::intake::signature::{SignatureError, Verifier};
use config::AgentConfig;
use journal::{Journal, JournalError};
use report::{Outcome, ReportError, Reporter};
use worker::{Queued, Worker};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("cannot load the command signature key: {0}; check signature.key_file")]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("kafka: {0}; check kafka.brokers and kafka.properties")]
    Kafka(rdkafka::error::KafkaError),
    #[error("an agent task stopped unexpectedly: {0}")]
    Task(String),
}

/// How many commands of one instance may wait in memory; more wait in the topic.
const QUEUE: usize = 256;

/// Runs the agent until `shutdown`: the hook running then is let finish.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let forget_before = chrono::Duration::from_std(config.journal_keep.0).ok().and_then(|keep| chrono::Utc::now().checked_sub_signed(keep));
    let (journal, replay, journal_thread) = Journal::open(&config.journal_dir, forget_before)?;
    let verifier = Verifier::single(&config.signature.key_id, config.signature.algorithm, &config.signature.key_file)?;
    let reporter = Reporter::new(&config)?;
    let alerter = alert::Alerter::new(config.alerts.clone(), format!("agent {}", config.kafka.group_id), config.keywarden.url.clone());
    let stop = shutdown.child_token();
    let mut tasks: JoinSet<Result<(), AgentError>> = JoinSet::new();
    let (mut queues, mut report_queues) = (HashMap::new(), HashMap::new());
    for instance in &config.instances {
        let (tx, rx) = mpsc::channel::<Queued>(QUEUE);
        let (rtx, rrx) = mpsc::channel::<Outcome>(QUEUE);
        let worker = Worker {
            instance: instance.clone(),
            hooks: config.hooks.clone(),
            journal: journal.clone(),
            retry: config.retry.clone(),
            alerter: alerter.clone(),
            reports: rtx.clone(),
        };
        let s = stop.clone();
        tasks.spawn(async move { worker.run(rx, s).await.map_err(AgentError::from) });
        let (r, inst, j, retry, s) = (reporter.clone(), instance.clone(), journal.clone(), config.retry.clone(), stop.clone());
        tasks.spawn(async move { worker::report_loop(r, inst, j, retry, rrx, s).await.map_err(AgentError::from) });
        queues.insert(instance.id.clone(), tx);
        report_queues.insert(instance.id.clone(), rtx);
    }
    // What the journal holds and did not finish: run first, in order.
    let (mut resumed, mut rereported) = (0, 0);
    let known: HashSet<String> = replay.commands.iter().map(|k| k.command.command_id.clone()).collect();
    for k in replay.commands {
        let id = k.command.instance_id.clone();
        match (&k.finished, queues.get(&id), report_queues.get(&id)) {
            (None, Some(queue), _) => {
                resumed += 1;
                if queue.send(Queued { command: k.command, interrupted: k.started }).await.is_err() {
                    break;
                }
            }
            (Some(f), _, Some(reports)) if !k.reported && f.outcome != DataPlaneOutcome::Failed => {
                rereported += 1;
                if reports.send(Outcome { command: k.command, outcome: f.outcome, at: f.at, detail: f.detail.clone() }).await.is_err() {
                    break;
                }
            }
            _ => {}
        }
    }
    tracing::info!(journaled = known.len(), resumed, rereported, "agent journal read");
    drop(report_queues);
    let consume = consume::Consume {
        judge: consume::Judge {
            verifier,
            key_id: config.signature.key_id.clone(),
            topic: config.kafka.commands_topic.clone(),
            hosted: config.instances.iter().map(|i| i.id.clone()).collect(),
            known,
        },
        journal: journal.clone(),
        queues,
        alerter,
    };
    let s = stop.clone();
    let consume_config = config.clone();
    tasks.spawn(async move { consume.run(&consume_config, s).await });
    // The first task to stop, with an error or not before shutdown, stops the rest.
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        let outcome = done.map_err(|e| AgentError::Task(e.to_string())).and_then(|r| r);
        if let Err(e) = outcome {
            if result.is_ok() {
                tracing::error!(error = %e, "agent task failed; stopping");
                result = Err(e);
            }
        } else if !stop.is_cancelled() && result.is_ok() {
            result = Err(AgentError::Task("a task ended before shutdown".into()));
        }
        stop.cancel();
    }
    drop(journal);
    // Every handle is gone: the journal's thread finishes what was queued.
    if journal_thread.join().is_err() {
        tracing::error!("the journal's thread panicked");
    }
    result
}
