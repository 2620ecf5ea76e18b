//! The processes behind `keywarden demo --mariadb` and benchmark B8: a
//! private mariadbd configured from the shipped `config/mariadb/keywarden.cnf`,
//! and a real data-plane agent (`keywarden agent`) with the shipped hooks.
//! One place, so that the demo and the benchmark run the database exactly as
//! a deployment would, and stop it the same way on every exit path.
//!
//! Everything lives under a directory the caller owns: datadir, socket,
//! option files, hooks, the agent's config and journal, logs. No TCP port is
//! opened by mariadbd; the instance's token sits in a 0600 option file that
//! the server's option file `!include`s, never on a command line.

use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The plugin options every deployment uses, with @KEYWARDEN_KV@ and
/// @INSTANCE_ID@ to fill in.
pub const SHIPPED_CNF: &str = include_str!("../../../config/mariadb/keywarden.cnf");
/// The shipped agent hooks, written out executable next to the agent.
const HOOKS: [(&str, &str); 3] = [
    ("mariadb-stop", include_str!("../../../config/mariadb/hooks/mariadb-stop")),
    ("mariadb-start", include_str!("../../../config/mariadb/hooks/mariadb-start")),
    ("mariadb-rewrapped", include_str!("../../../config/mariadb/hooks/mariadb-rewrapped")),
];
/// Where Debian's mariadb-plugin-hashicorp-key-management puts the plugin.
pub const PLUGIN: &str = "/usr/lib/mysql/plugin/hashicorp_key_management.so";
/// How long a start or a stop may take before it counts as hung.
const PATIENCE: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum MariadbError {
    #[error("{0}: apt-get install mariadb-server mariadb-plugin-hashicorp-key-management")]
    Missing(String),
    #[error("cannot {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
}

type Result<T> = std::result::Result<T, MariadbError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MariadbError {
    let what = what.into();
    move |source| MariadbError::Io { what, source }
}

/// `mariadbd` (from PATH or /usr/sbin, which a non-root PATH lacks), once
/// the HashiCorp Vault key plugin is installed beside it.
pub fn mariadbd() -> Result<PathBuf> {
    if !Path::new(PLUGIN).exists() {
        return Err(MariadbError::Missing(format!("the MariaDB HashiCorp key plugin ({PLUGIN}) is not installed")));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path.split(':').chain(["/usr/sbin"]).map(|d| PathBuf::from(d).join("mariadbd")).find(|p| p.exists());
    found.ok_or_else(|| MariadbError::Missing("mariadbd is not installed (looked in PATH and /usr/sbin)".into()))
}

/// PATH for the hooks, which run `mariadbd` and `mariadb-admin`.
fn hook_path(mariadbd: &Path) -> String {
    let mut path = std::env::var("PATH").unwrap_or_default();
    if let Some(dir) = mariadbd.parent() {
        path = format!("{path}:{}", dir.display());
    }
    path
}

fn write_private(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(io(format!("write {}", path.display())))?;
    f.write_all(text.as_bytes()).map_err(io(format!("write {}", path.display())))?;
    // The mode of an existing file is not changed by open.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {}", path.display())))
}

/// Has the child get SIGTERM (a clean shutdown, for mariadbd and the agent
/// alike) when the thread that spawned it ends, so that a demo killed with
/// SIGKILL leaves neither behind. Both are started and stopped by one thread
/// (the demo's walk, the bench's main), which outlives them. A server the
/// agent's start hook started is not covered: `Mariadb::stop` finds it by
/// its pid file.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// How a start ended.
#[derive(Debug)]
pub enum Start {
    /// Accepting connections, after this long.
    Ready(Duration),
    /// mariadbd exited before it accepted one; the end of its error log.
    Exited(String),
}

/// One private MariaDB server whose keys come from keywarden's Vault KV
/// endpoint. Stopped (cleanly if it can be, killed if not) on drop, whoever
/// started it: this process, or the agent's start hook.
pub struct Mariadb {
    bin: PathBuf,
    pub datadir: PathBuf,
    pub socket: PathBuf,
    /// The option file mariadbd is started with (MARIADB_DEFAULTS of the hooks).
    pub defaults: PathBuf,
    pub error_log: PathBuf,
    pid_file: PathBuf,
    /// The server this process started, to reap it; one the start hook
    /// started is found through its pid file.
    child: Option<Child>,
}

impl Mariadb {
    /// A fresh datadir under `dir` (`mariadb-install-db`, root through
    /// unix_socket auth), configured to read instance `instance_id`'s keys
    /// from keywarden's Vault KV endpoint at `kv` (host:port) with `token`,
    /// the instance's own dek_token. Not started.
    pub fn install(bin: PathBuf, dir: &Path, kv: &str, instance_id: &str, token: &str) -> Result<Mariadb> {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let datadir = dir.join("data");
        // A temporary directory of its own: a starting mariadbd removes the
        // `#sql` temporary files it finds in its tmpdir, another server's too.
        let tmpdir = dir.join("tmp");
        std::fs::create_dir_all(&tmpdir).map_err(io(format!("create {}", tmpdir.display())))?;
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--tmpdir={}", tmpdir.display()))
            .arg("--user=root")
            .arg("--auth-root-authentication-method=socket")
            .output()
            .map_err(|e| MariadbError::Missing(format!("cannot run mariadb-install-db ({e})")))?;
        if !out.status.success() {
            return Err(MariadbError::Failed {
                what: "mariadb-install-db".into(),
                detail: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            });
        }
        let plugin = dir.join("keywarden.cnf");
        write_private(&plugin, &SHIPPED_CNF.replace("@KEYWARDEN_KV@", kv).replace("@INSTANCE_ID@", instance_id), 0o644)?;
        // The token only in a file of its own, readable by its owner alone.
        let token_cnf = dir.join("token.cnf");
        write_private(&token_cnf, &format!("[mariadbd]\nhashicorp-key-management-token = {token}\n"), 0o600)?;
        let m = Mariadb {
            bin,
            socket: dir.join("mysqld.sock"),
            defaults: dir.join("my.cnf"),
            error_log: dir.join("error.log"),
            pid_file: dir.join("mysqld.pid"),
            datadir,
            child: None,
        };
        // Everything a start needs is in the file, so that the agent's start
        // hook (`mariadbd --defaults-file=$MARIADB_DEFAULTS`) starts the very
        // same server.
        let cnf = format!(
            "[mariadbd]\nuser = root\ndatadir = {}\ntmpdir = {}\nsocket = {}\npid-file = {}\nlog-error = {}\nskip-networking\ninnodb-buffer-pool-size = 32M\n!include {}\n!include {}\n",
            m.datadir.display(),
            tmpdir.display(),
            m.socket.display(),
            m.pid_file.display(),
            m.error_log.display(),
            plugin.display(),
            token_cnf.display(),
        );
        write_private(&m.defaults, &cnf, 0o644)?;
        Ok(m)
    }

    /// Starts mariadbd and waits until it accepts a connection, or exits.
    pub fn start(&mut self) -> Result<Start> {
        self.reap();
        let started = Instant::now();
        let child = die_with_parent(&mut Command::new(&self.bin))
            .arg(format!("--defaults-file={}", self.defaults.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(format!("start {}", self.bin.display())))?;
        self.child = Some(child);
        loop {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().map_err(io("wait for mariadbd"))?.is_some() {
                    self.child = None;
                    return Ok(Start::Exited(self.log_tail(8)));
                }
            }
            if self.accepting() {
                return Ok(Start::Ready(started.elapsed()));
            }
            if started.elapsed() > PATIENCE {
                return Err(MariadbError::Timeout { what: "mariadbd to accept connections".into(), after: PATIENCE });
            }
            // Fine enough for B8, which measures starts against this.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the server accepts connections now: its socket takes a
    /// connection and sends the protocol's greeting (version 10), not an
    /// error packet (as during start-up or shutdown).
    pub fn accepting(&self) -> bool {
        let Ok(mut s) = UnixStream::connect(&self.socket) else { return false };
        if s.set_read_timeout(Some(Duration::from_secs(2))).is_err() {
            return false;
        }
        // 3 bytes of length, 1 of sequence number, then the payload's first byte.
        let mut head = [0u8; 5];
        s.read_exact(&mut head).is_ok() && head[4] == 10
    }

    /// The pid of a running server (from its pid file), whoever started it.
    pub fn pid(&mut self) -> Option<i32> {
        self.reap();
        let pid: i32 = std::fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()?;
        // SAFETY: signal 0 only checks that the process exists.
        (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
    }

    /// Waits for a server this process started and that has exited, so that
    /// it does not linger as a zombie that still looks alive.
    fn reap(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if matches!(c.try_wait(), Ok(Some(_)) | Err(_)) {
                self.child = None;
            }
        }
    }

    /// A clean `mariadb-admin shutdown`, then waits until the process is
    /// gone; returns how long it took.
    pub fn shutdown(&mut self) -> Result<Duration> {
        let started = Instant::now();
        let pid = self.pid();
        let out = Command::new("mariadb-admin")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["--user=root", "--connect-timeout=2", "shutdown"])
            .output()
            .map_err(|e| MariadbError::Missing(format!("cannot run mariadb-admin ({e})")))?;
        if !out.status.success() {
            return Err(MariadbError::Failed { what: "mariadb-admin shutdown".into(), detail: String::from_utf8_lossy(&out.stderr).trim().to_string() });
        }
        if pid.is_some() {
            self.wait_gone(PATIENCE)?;
        }
        Ok(started.elapsed())
    }

    /// Waits until no server runs (stopped by the agent's hook, say).
    pub fn wait_gone(&mut self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        while self.pid().is_some() {
            if started.elapsed() > timeout {
                return Err(MariadbError::Timeout { what: "mariadbd to exit".into(), after: timeout });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(started.elapsed())
    }

    /// Runs SQL through the `mariadb` client over the socket: tab-separated
    /// rows without a header, or the client's error text.
    pub fn query(&self, sql: &str) -> std::result::Result<String, String> {
        let out = Command::new("mariadb")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["--user=root", "--batch", "--skip-column-names", "-e", sql])
            .output()
            .map_err(|e| format!("cannot run the mariadb client ({e}): apt-get install mariadb-client"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// The last `n` lines of the error log.
    pub fn log_tail(&self, n: usize) -> String {
        let all = std::fs::read_to_string(&self.error_log).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops a running server: cleanly if it answers, killed if it does not
    /// go within the patience. Returns once it is gone.
    pub fn stop(&mut self) {
        if self.pid().is_none() {
            return;
        }
        if self.shutdown().is_ok() {
            return;
        }
        if let Some(pid) = self.pid() {
            // SAFETY: a plain kill(2) of the server's own pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if let Some(mut c) = self.child.take() {
                let _ = c.wait();
            }
            let _ = self.wait_gone(Duration::from_secs(10));
        }
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the agent reads commands and reports outcomes, and the instance it
/// enforces them for.
pub struct AgentSpec<'a> {
    /// keywarden's Kafka bootstrap servers.
    pub brokers: &'a str,
    /// keywarden's commands topic.
    pub commands_topic: &'a str,
    /// The key keywarden signs commands with: its id and its file
    /// (signatures.hmac_key_id and hmac_key_file).
    pub key_id: &'a str,
    pub key_file: &'a Path,
    /// keywarden's API base URL (http://host:port).
    pub keywarden_url: &'a str,
    pub instance_id: &'a str,
    /// The instance's own dek_token, which authenticates its reports.
    pub credential: &'a str,
}

/// A real `keywarden agent` process enforcing one instance's commands on
/// `db` with the shipped hooks; killed on drop.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    /// Writes the hooks, the credential (0600) and the agent's config under
    /// `dir`, then starts `exe agent --config`.
    pub fn start(exe: &Path, dir: &Path, spec: &AgentSpec, db: &Mariadb) -> Result<Agent> {
        let hooks = dir.join("hooks");
        std::fs::create_dir_all(&hooks).map_err(io(format!("create {}", hooks.display())))?;
        for (name, text) in HOOKS {
            write_private(&hooks.join(name), text, 0o755)?;
        }
        let credential = dir.join(format!("{}.token", spec.instance_id));
        write_private(&credential, spec.credential, 0o600)?;
        let env = [
            ("MARIADB_SOCKET", db.socket.display().to_string()),
            ("MARIADB_DEFAULTS", db.defaults.display().to_string()),
            // The stop hook reports "stopped" only once this process has exited.
            ("MARIADB_PID_FILE", db.pid_file.display().to_string()),
            ("MARIADB_USER", "root".to_string()),
            ("PATH", hook_path(&db.bin)),
        ];
        let env = env.iter().map(|(k, v)| format!("{k} = {}", toml_str(v))).collect::<Vec<_>>().join(", ");
        let hook = |action: &str, name: &str| format!("[hooks.{action}]\nargv = [{}]\ntimeout = \"120s\"\n", toml_str(&hooks.join(name).display().to_string()));
        let config = format!(
            "journal_dir = {}\n\
             [kafka]\nbrokers = {}\ncommands_topic = {}\ngroup_id = {}\nstart_from = \"earliest\"\n\
             [signature]\nkey_id = {}\nkey_file = {}\n\
             [keywarden]\nurl = {}\n\
             [retry]\nfirst = \"200ms\"\nmax = \"2s\"\n\
             [log]\nlevel = \"info\"\n\
             [[instances]]\nid = {}\ncredential_file = {}\nenv = {{ {env} }}\n\
             {}{}{}{}",
            toml_str(&dir.join("journal").display().to_string()),
            toml_str(spec.brokers),
            toml_str(spec.commands_topic),
            toml_str(&format!("keywarden-agent-{}", uuid::Uuid::new_v4())),
            toml_str(spec.key_id),
            toml_str(&spec.key_file.display().to_string()),
            toml_str(spec.keywarden_url),
            toml_str(spec.instance_id),
            toml_str(&credential.display().to_string()),
            hook("revoke", "mariadb-stop"),
            hook("erase", "mariadb-stop"),
            hook("restore", "mariadb-start"),
            hook("rewrapped", "mariadb-rewrapped"),
        );
        let path = dir.join("agent.toml");
        write_private(&path, &config, 0o600)?;
        let log = dir.join("agent.log");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).map_err(io(format!("open {}", log.display())))?;
        let err = out.try_clone().map_err(io("duplicate the agent's log"))?;
        let child = die_with_parent(&mut Command::new(exe))
            .args(["agent", "--config"])
            .arg(&path)
            .env_remove("KEYWARDEN_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("start {} agent", exe.display())))?;
        Ok(Agent { child: Some(child), log })
    }

    /// Still running (it must not stop by itself).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let all = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TOML basic string: the path or value quoted and escaped.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_option_file_keeps_its_placeholders_and_the_token_out_of_it() {
        assert!(SHIPPED_CNF.contains("@KEYWARDEN_KV@") && SHIPPED_CNF.contains("@INSTANCE_ID@"));
        let active: Vec<&str> = SHIPPED_CNF.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
        assert!(!active.iter().any(|l| l.contains("hashicorp-key-management-token")), "a token line in the shipped file");
    }

    #[test]
    fn a_value_with_quotes_stays_one_toml_string() {
        let v: toml::Value = toml::from_str(&format!("x = {}", toml_str("a\"b\\c"))).unwrap();
        assert_eq!(v["x"].as_str(), Some("a\"b\\c"));
    }
}
