//! The real data-plane agent (`keywarden agent --config FILE`) beside a test
//! daemon: its config written from the daemon's API, signing secret and the
//! instances' own DEK tokens, hooks given as argv, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Daemon, TEST_EVENT_SECRET};

pub struct Agent {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

/// A hook: argv and its timeout.
pub struct HookSpec<'a> {
    pub action: &'a str,
    pub argv: Vec<String>,
    pub timeout: &'a str,
}

/// A POSIX sh hook (run as `/bin/sh -c SCRIPT`, the script fixed by the
/// test: nothing of a command is interpolated into it).
pub fn sh_hook<'a>(action: &'a str, script: &str) -> HookSpec<'a> {
    HookSpec { action, argv: vec!["/bin/sh".into(), "-c".into(), script.into()], timeout: "30s" }
}

impl Agent {
    /// An agent hosting `instances` of the daemon `d`, with `extra` TOML
    /// appended (alerts, retry). Each instance's hooks get HOOK_DIR, the
    /// directory the test reads their effects from.
    pub fn start(bootstrap: &str, d: &Daemon, instances: &[&str], hooks: &[HookSpec], hook_dir: &Path, extra: &str) -> Agent {
        let hook_dir = hook_dir.display().to_string();
        let hosted: Vec<(&str, Vec<(&str, &str)>)> = instances.iter().map(|id| (*id, vec![("HOOK_DIR", hook_dir.as_str())])).collect();
        Agent::hosting(bootstrap, d, &hosted, hooks, extra)
    }

    /// An agent hosting each instance with its hooks' own environment.
    pub fn hosting(bootstrap: &str, d: &Daemon, instances: &[(&str, Vec<(&str, &str)>)], hooks: &[HookSpec], extra: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("command-hmac.key");
        std::fs::write(&key, TEST_EVENT_SECRET).unwrap();
        let mut toml = format!(
            "journal_dir = {:?}\n[kafka]\nbrokers = {bootstrap:?}\ngroup_id = \"agent-{}\"\nstart_from = \"earliest\"\n[signature]\nkey_id = \"local\"\nkey_file = {key:?}\n[keywarden]\nurl = {:?}\n[retry]\nfirst = \"200ms\"\nmax = \"1s\"\n[log]\nlevel = \"info,keywarden=debug\"\n",
            dir.path().join("journal"),
            uuid::Uuid::new_v4(),
            d.api,
        );
        for (id, env) in instances {
            let cred = dir.path().join(format!("{id}.token"));
            std::fs::write(&cred, d.dek_token_for(id)).unwrap();
            let env: Vec<String> = env.iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
            toml.push_str(&format!("[[instances]]\nid = {id:?}\ncredential_file = {cred:?}\nenv = {{ {} }}\n", env.join(", ")));
        }
        for h in hooks {
            toml.push_str(&format!("[hooks.{}]\nargv = {:?}\ntimeout = {:?}\n", h.action, h.argv, h.timeout));
        }
        toml.push_str(extra);
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, toml).unwrap();
        let mut a = Agent { child: None, dir, config };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keywarden"))
            .args(["agent", "--config"])
            .arg(&self.config)
            .env_remove("KEYWARDEN_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start keywarden agent");
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// kill -9: no chance to finish, flush or commit anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    /// Still running (it must never stop on a bad command).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
        self.kill();
    }
}

/// The instance's `data_plane` once it names `action` with `outcome`.
pub fn wait_data_plane(d: &Daemon, id: &str, action: &str, outcome: &str) -> serde_json::Value {
    super::wait_until(&format!("{id} to report {action} {outcome}"), Duration::from_secs(60), || {
        let (s, v) = d.get(&format!("/v1/instances/{id}"));
        (s == 200 && v["data_plane"]["action"] == action && v["data_plane"]["outcome"] == outcome).then(|| v["data_plane"].clone())
    })
}

/// The lines a hook appended to HOOK_DIR/<name>.
pub fn lines(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default().lines().map(str::to_owned).collect()
}
