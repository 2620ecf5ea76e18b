//! Running one hook: the configured argv, without a shell, with what the
//! command says only in KEYWARDEN_* environment variables (never
//! interpolated into a command line), a timeout, and its own process group so
//! that a timeout kills everything it started. The hook gets SIGKILL if the
//! agent dies (PR_SET_PDEATHSIG): a kill -9 of the agent mid-hook must not
//! leave the hook finishing on its own while the restarted agent runs it
//! again.

use std::process::Stdio;

use tokio::io::AsyncReadExt;

use super::config::{Hook, HostedInstance};
use crate::tell::Command;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot start hook {program}: {source}; check the hook's argv")]
    Spawn { program: String, source: std::io::Error },
    #[error("hook {program} exited with {status}: {output}")]
    Failed { program: String, status: String, output: String },
    #[error("hook {program} still ran after {seconds}s and was killed; raise its timeout or make it faster")]
    Timeout { program: String, seconds: u64 },
}

impl HookError {
    /// Every failure is retried: a database that would not stop may stop on
    /// the next try, and a missing program may be installed meanwhile.
    pub fn retryable(&self) -> bool {
        true
    }
}

/// The most of a hook's output kept (for the report and the log).
const OUTPUT_BYTES: usize = 2000;

pub fn action_name(command: &Command) -> String {
    serde_json::to_value(command.action).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// Runs the hook to its end; Ok is its (shortened) output when it exited 0.
pub async fn run(hook: &Hook, instance: &HostedInstance, command: &Command, interrupted: bool) -> Result<String, HookError> {
    let program = hook.argv.first().cloned().unwrap_or_default();
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(hook.argv.iter().skip(1))
        .envs(&instance.env)
        .env("KEYWARDEN_INSTANCE_ID", &command.instance_id)
        .env("KEYWARDEN_ACTION", action_name(command))
        .env("KEYWARDEN_KEY_ID", &command.key_id)
        .env("KEYWARDEN_COMMAND_ID", &command.command_id)
        .env("KEYWARDEN_INTERRUPTED", if interrupted { "1" } else { "0" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent may have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("the agent exited"));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn { program: program.clone(), source })?;
    let pid = child.id();
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let collect = async {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        if let Some(o) = out.as_mut() {
            drop(o.read_to_end(&mut a).await);
        }
        if let Some(e) = err.as_mut() {
            drop(e.read_to_end(&mut b).await);
        }
        a.extend_from_slice(&b);
        a
    };
    let waited = tokio::time::timeout(hook.timeout.0, async { tokio::join!(child.wait(), collect) }).await;
    match waited {
        Err(_) => {
            if let Some(pid) = pid {
                // The whole group: a shell script's children too.
                // SAFETY: a plain syscall on a process group this agent made.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            drop(child.wait().await);
            Err(HookError::Timeout { program, seconds: hook.timeout.0.as_secs() })
        }
        Ok((status, output)) => {
            let text = shorten(&output);
            match status {
                Ok(s) if s.success() => Ok(text),
                Ok(s) => Err(HookError::Failed { program, status: s.to_string(), output: text }),
                Err(source) => Err(HookError::Spawn { program, source }),
            }
        }
    }
}

fn shorten(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(&output[output.len().saturating_sub(OUTPUT_BYTES)..]);
    text.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;
    use crate::engine::CommandAction;
    use std::time::Duration;

    fn instance() -> HostedInstance {
        HostedInstance { id: "db-1".into(), credential_file: "/nonexistent".into(), env: [("DB_SOCKET".to_string(), "/run/db.sock".to_string())].into() }
    }

    #[tokio::test]
    async fn the_hook_gets_the_command_only_through_its_environment() {
        // A key id that a shell would expand, were one in the way.
        let command = Command::new("db-1", "k;$(touch /tmp/pwned)", CommandAction::Revoke, None, "e1", chrono::Utc::now(), None);
        // Only the variables that matter are printed: the whole environment
        // of a CI machine can be longer than the output a hook keeps.
        let hook = Hook {
            argv: vec!["/bin/sh".into(), "-c".into(), "env | grep -E '^(KEYWARDEN_|DB_SOCKET=)'".into()],
            timeout: HumanDuration(Duration::from_secs(10)),
        };
        let out = run(&hook, &instance(), &command, false).await.unwrap();
        assert!(out.contains("KEYWARDEN_KEY_ID=k;$(touch /tmp/pwned)"), "{out}");
        assert!(out.contains("KEYWARDEN_ACTION=revoke") && out.contains("KEYWARDEN_INSTANCE_ID=db-1") && out.contains("DB_SOCKET=/run/db.sock"), "{out}");
        assert!(out.contains(&format!("KEYWARDEN_COMMAND_ID={}", command.command_id)), "{out}");
    }

    #[tokio::test]
    async fn a_failing_or_hung_hook_is_an_error_and_a_hung_one_is_killed() {
        let command = Command::new("db-1", "k", CommandAction::Revoke, None, "e1", chrono::Utc::now(), None);
        let fails = Hook { argv: vec!["/bin/sh".into(), "-c".into(), "echo cannot stop; exit 3".into()], timeout: HumanDuration(Duration::from_secs(10)) };
        let err = run(&fails, &instance(), &command, false).await.unwrap_err();
        assert!(matches!(&err, HookError::Failed { output, .. } if output == "cannot stop"), "{err}");
        let hangs = Hook { argv: vec!["/bin/sleep".into(), "30".into()], timeout: HumanDuration(Duration::from_millis(300)) };
        let started = std::time::Instant::now();
        assert!(matches!(run(&hangs, &instance(), &command, false).await, Err(HookError::Timeout { .. })));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
