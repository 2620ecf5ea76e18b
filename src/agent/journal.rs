//! The agent's journal: what it accepted, started, finished and reported, by
//! `command_id`, in one append-only file of JSON lines, fsynced before each
//! step it records is acted on.
//!
//! A file rather than sled: the agent needs four kinds of record appended in
//! order and read back once at start, and an append-only file with fsync makes
//! the crash cases few and plain to reason about: a record is durable once its
//! fsync returned, and a kill during a write leaves at most one torn last
//! line, which is dropped (and cut off) when the journal is read again. One
//! thread owns the file and commits what is queued together (one fsync per
//! group), so that no async worker blocks on the disk.
//!
//! The steps, and what a kill -9 between any two of them does:
//! 1. `accepted` (the whole command) is durable **before** the consumer
//!    stores the message's offset: a kill before it re-delivers the message,
//!    a kill after it finds the command here (and never runs it from Kafka
//!    again: its id is known).
//! 2. `started` is durable before the hook is spawned, so a restart knows a
//!    run was interrupted (it says so in the log and in
//!    KEYWARDEN_INTERRUPTED=1 to the hook) and runs the hook again.
//! 3. `finished` is durable after the hook exited 0 (or was skipped), before
//!    the next command of the instance starts.
//! 4. `reported` once keywarden took the report (or refused it for good).
//!
//! The guarantee: every accepted command's hook runs to completion, and is
//! recorded as done, once. A hook killed with the agent (it gets SIGKILL when
//! the agent dies) is run again from the start after the restart; a hook is
//! run to completion a second time only if the agent dies in the moment
//! between the hook's exit and the fsync of `finished`. Hooks must therefore
//! tolerate a repeat (stopping a stopped database is a no-op), and may use
//! KEYWARDEN_COMMAND_ID to detect one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::engine::DataPlaneOutcome;
use crate::tell::Command;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open or write the agent journal {path}: {source}; check journal_dir (its disk, its permissions)")]
    Io { path: String, source: std::io::Error },
    #[error("the agent journal {path} is damaged at line {line} (not the last, so not a torn write): {message}; move it aside to start over (its commands' hooks may then run again)")]
    Damaged { path: String, line: usize, message: String },
    #[error("the agent journal's writer has stopped; the agent is shutting down")]
    Stopped,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Entry {
    Accepted { command: Command },
    Started { command_id: String, at: DateTime<Utc> },
    Finished { command_id: String, outcome: DataPlaneOutcome, at: DateTime<Utc>, detail: String },
    Reported { command_id: String, at: DateTime<Utc> },
}

/// A command as the journal knows it after a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    pub command: Command,
    /// A run was started (and, unless `finished`, interrupted).
    pub started: bool,
    pub finished: Option<Finished>,
    pub reported: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub outcome: DataPlaneOutcome,
    pub at: DateTime<Utc>,
    pub detail: String,
}

/// Every command the journal holds, in the order they were accepted.
#[derive(Debug, Default)]
pub struct Replay {
    pub commands: Vec<Known>,
}

impl Replay {
    fn apply(&mut self, index: &mut HashMap<String, usize>, entry: Entry) {
        let slot = |index: &HashMap<String, usize>, id: &str| index.get(id).copied();
        match entry {
            Entry::Accepted { command } => {
                if slot(index, &command.command_id).is_none() {
                    index.insert(command.command_id.clone(), self.commands.len());
                    self.commands.push(Known { command, started: false, finished: None, reported: false });
                }
            }
            Entry::Started { command_id, .. } => {
                if let Some(i) = slot(index, &command_id) {
                    self.commands[i].started = true;
                }
            }
            Entry::Finished { command_id, outcome, at, detail } => {
                if let Some(i) = slot(index, &command_id) {
                    self.commands[i].finished = Some(Finished { outcome, at, detail });
                }
            }
            Entry::Reported { command_id, .. } => {
                if let Some(i) = slot(index, &command_id) {
                    self.commands[i].reported = true;
                }
            }
        }
    }
}

type Request = (Entry, oneshot::Sender<Result<(), JournalError>>);

/// The handle the consumer and the workers append through.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Request>,
}

/// Appends queued at once share one fsync.
const GROUP: usize = 256;

impl Journal {
    /// Reads the journal in `dir` (created if missing), cuts off a torn last
    /// line, and starts the thread that appends to it. Commands issued before
    /// `forget_before` that are finished and reported are dropped from it
    /// (the file is rewritten without them), so that it does not grow
    /// forever; their ids are then no longer recognised, which is safe once
    /// the commands topic no longer holds them (see `journal_keep`).
    pub fn open(dir: &Path, forget_before: Option<DateTime<Utc>>) -> Result<(Journal, Replay, std::thread::JoinHandle<()>), JournalError> {
        let path = dir.join("journal.log");
        let io = |source| JournalError::Io { path: path.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io)?;
        let (mut replay, good_len) = read(&path, &file)?;
        let held = replay.commands.len();
        if let Some(cutoff) = forget_before {
            replay.commands.retain(|k| !(k.finished.is_some() && k.reported && k.command.issued_at < cutoff));
        }
        if replay.commands.len() < held {
            tracing::info!(path = %path.display(), forgotten = held - replay.commands.len(), kept = replay.commands.len(), "compacting the agent journal");
            file = rewrite(dir, &path, &replay)?;
        } else if file.metadata().map_err(io)?.len() != good_len {
            tracing::warn!(path = %path.display(), "the agent journal ends with a torn write (a crash mid-append); cutting it off");
            file.set_len(good_len).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        let (tx, rx) = mpsc::channel::<Request>(1024);
        let thread = std::thread::Builder::new()
            .name("agent-journal".into())
            .spawn(move || append_loop(file, path, rx))
            .map_err(|e| JournalError::Io { path: dir.display().to_string(), source: e })?;
        Ok((Journal { tx }, replay, thread))
    }

    /// Returns once the entry is durable.
    pub async fn append(&self, entry: Entry) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((entry, reply)).await.map_err(|_| JournalError::Stopped)?;
        rx.await.map_err(|_| JournalError::Stopped)?
    }
}

/// Writes what `replay` holds to a new file, made durable, then put in the
/// journal's place (a rename, with the directory synced): a crash leaves
/// either the old journal or the new one, never half of one.
fn rewrite(dir: &Path, path: &Path, replay: &Replay) -> Result<File, JournalError> {
    let io = |source| JournalError::Io { path: path.display().to_string(), source };
    let tmp = dir.join("journal.log.new");
    let mut buf = Vec::new();
    for k in &replay.commands {
        let id = &k.command.command_id;
        let mut entries = vec![Entry::Accepted { command: k.command.clone() }];
        match &k.finished {
            Some(f) => entries.push(Entry::Finished { command_id: id.clone(), outcome: f.outcome, at: f.at, detail: f.detail.clone() }),
            None if k.started => entries.push(Entry::Started { command_id: id.clone(), at: Utc::now() }),
            None => {}
        }
        if k.reported {
            entries.push(Entry::Reported { command_id: id.clone(), at: Utc::now() });
        }
        for e in entries {
            if let Ok(line) = serde_json::to_vec(&e) {
                buf.extend_from_slice(&line);
                buf.push(b'\n');
            }
        }
    }
    let mut new = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io)?;
    new.write_all(&buf).and_then(|_| new.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    OpenOptions::new().read(true).append(true).open(path).map_err(io)
}

fn read(path: &Path, file: &File) -> Result<(Replay, u64), JournalError> {
    let io = |source| JournalError::Io { path: path.display().to_string(), source };
    let mut replay = Replay::default();
    let mut index = HashMap::new();
    let mut reader = BufReader::new(file);
    let (mut good_len, mut line_no) = (0u64, 0usize);
    let mut pending_error: Option<JournalError> = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        // A line after a bad one: the bad one was not a torn tail.
        if let Some(e) = pending_error.take() {
            return Err(e);
        }
        let complete = line.last() == Some(&b'\n');
        match serde_json::from_slice::<Entry>(&line) {
            Ok(entry) if complete => {
                replay.apply(&mut index, entry);
                good_len += n as u64;
            }
            Ok(_) => {}
            Err(e) => pending_error = Some(JournalError::Damaged { path: path.display().to_string(), line: line_no, message: e.to_string() }),
        }
    }
    Ok((replay, good_len))
}

fn append_loop(mut file: File, path: PathBuf, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < GROUP {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let mut buf = Vec::new();
        for (entry, _) in &group {
            // Entries are plain data: serializing them cannot fail.
            if let Ok(line) = serde_json::to_vec(entry) {
                buf.extend_from_slice(&line);
                buf.push(b'\n');
            }
        }
        let written = file.write_all(&buf).and_then(|_| file.sync_data());
        for (_, reply) in group {
            let answer = match &written {
                Ok(()) => Ok(()),
                Err(e) => Err(JournalError::Io { path: path.display().to_string(), source: std::io::Error::new(e.kind(), e.to_string()) }),
            };
            // A caller that gave up (shutdown) needs no answer.
            drop(reply.send(answer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::CommandAction;

    fn command(instance: &str, cause: &str) -> Command {
        Command::new(instance, "k", CommandAction::Revoke, None, cause, Utc::now(), None)
    }

    #[tokio::test]
    async fn what_was_made_durable_is_read_back_in_order_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (command("db-1", "e1"), command("db-2", "e1"));
        {
            let (journal, replay, _thread) = Journal::open(dir.path(), None).unwrap();
            assert!(replay.commands.is_empty());
            journal.append(Entry::Accepted { command: a.clone() }).await.unwrap();
            journal.append(Entry::Accepted { command: b.clone() }).await.unwrap();
            journal.append(Entry::Accepted { command: a.clone() }).await.unwrap();
            journal.append(Entry::Started { command_id: a.command_id.clone(), at: Utc::now() }).await.unwrap();
            journal
                .append(Entry::Finished { command_id: a.command_id.clone(), outcome: DataPlaneOutcome::Enforced, at: Utc::now(), detail: String::new() })
                .await
                .unwrap();
            journal.append(Entry::Started { command_id: b.command_id.clone(), at: Utc::now() }).await.unwrap();
        }
        // A kill mid-append: half a line at the end.
        let path = dir.path().join("journal.log");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"step":"finished","command_id":"#).unwrap();
        drop(f);
        let (journal, replay, _thread) = Journal::open(dir.path(), None).unwrap();
        let ids: Vec<&str> = replay.commands.iter().map(|k| k.command.command_id.as_str()).collect();
        assert_eq!(ids, [a.command_id.as_str(), b.command_id.as_str()], "accepted once each, in order");
        assert!(replay.commands[0].finished.is_some() && !replay.commands[0].reported);
        assert!(replay.commands[1].started && replay.commands[1].finished.is_none(), "an interrupted run is known as one");
        // Appending after the cut gives whole lines again.
        journal.append(Entry::Reported { command_id: a.command_id.clone(), at: Utc::now() }).await.unwrap();
        drop(journal);
        let (_j, replay, _t) = Journal::open(dir.path(), None).unwrap();
        assert!(replay.commands[0].reported);
    }

    #[test]
    fn a_damaged_line_before_the_end_is_refused_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let good = serde_json::to_string(&Entry::Accepted { command: command("db-1", "e1") }).unwrap();
        std::fs::write(dir.path().join("journal.log"), format!("{good}\nnot json\n{good}\n")).unwrap();
        let err = Journal::open(dir.path(), None).err().expect("refused");
        assert!(matches!(err, JournalError::Damaged { line: 2, .. }), "{err}");
    }
}

#[cfg(test)]
mod compaction {
    use super::*;
    use crate::engine::CommandAction;

    #[tokio::test]
    async fn old_finished_and_reported_commands_are_forgotten_and_the_rest_kept_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let long_ago = Utc::now() - chrono::Duration::days(60);
        let old_done = Command::new("db-1", "k", CommandAction::Revoke, None, "e-old", long_ago, None);
        let old_pending = Command::new("db-1", "k", CommandAction::Restore, None, "e-old2", long_ago, None);
        let recent = Command::new("db-1", "k", CommandAction::Revoke, None, "e-new", Utc::now(), None);
        {
            let (j, _, _t) = Journal::open(dir.path(), None).unwrap();
            for c in [&old_done, &old_pending, &recent] {
                j.append(Entry::Accepted { command: c.clone() }).await.unwrap();
            }
            for c in [&old_done, &recent] {
                j.append(Entry::Finished { command_id: c.command_id.clone(), outcome: DataPlaneOutcome::Enforced, at: Utc::now(), detail: "ok".into() })
                    .await
                    .unwrap();
                j.append(Entry::Reported { command_id: c.command_id.clone(), at: Utc::now() }).await.unwrap();
            }
            j.append(Entry::Started { command_id: old_pending.command_id.clone(), at: Utc::now() }).await.unwrap();
        }
        let cutoff = Utc::now() - chrono::Duration::days(30);
        let (j, replay, _t) = Journal::open(dir.path(), Some(cutoff)).unwrap();
        let ids: Vec<&str> = replay.commands.iter().map(|k| k.command.command_id.as_str()).collect();
        assert_eq!(ids, [old_pending.command_id.as_str(), recent.command_id.as_str()], "an old command not finished is never forgotten");
        j.append(Entry::Reported { command_id: old_pending.command_id.clone(), at: Utc::now() }).await.unwrap();
        drop(j);
        let (_j, again, _t) = Journal::open(dir.path(), None).unwrap();
        assert_eq!(again.commands.len(), 2);
        assert!(again.commands[0].started && again.commands[0].finished.is_none() && again.commands[0].reported);
        assert!(again.commands[1].finished.is_some() && again.commands[1].reported);
        assert!(!dir.path().join("journal.log.new").exists());
    }
}
