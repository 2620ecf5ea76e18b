//! A private, real mariadbd per test: its own datadir, socket and error log
//! in a temporary directory, no TCP port, started with the shipped
//! `config/mariadb/keywarden.cnf` (placeholders filled in) as its only
//! option file and the instance's token in `VAULT_TOKEN`, never on a command
//! line. Queries go through the `mariadb` client over the socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// `mariadbd`, from PATH or /usr/sbin (which a non-root PATH lacks), with
/// the HashiCorp Vault key plugin beside it; `None` when either is missing.
pub fn installed() -> Option<PathBuf> {
    let plugin = Path::new("/usr/lib/mysql/plugin/hashicorp_key_management.so");
    if !plugin.exists() {
        return None;
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path.split(':').chain(["/usr/sbin"]).map(|d| PathBuf::from(d).join("mariadbd")).find(|p| p.exists());
    found
}

/// How a start ended.
#[derive(Debug)]
pub enum Start {
    /// Answering queries on its socket, after this long.
    Ready(Duration),
    /// The process exited before it answered.
    Exited(ExitStatus),
}

pub struct Mariadb {
    bin: PathBuf,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub datadir: PathBuf,
    pub socket: PathBuf,
    pub error_log: PathBuf,
    cnf: PathBuf,
    token: String,
    /// Options after the shipped file's, for a test that changes one.
    extra: Vec<String>,
}

impl Mariadb {
    /// A fresh datadir (`mariadb-install-db`), configured to read instance
    /// `instance_id`'s keys from keywarden's Vault KV endpoint at `kv`
    /// (host:port) with `token`. Not started.
    pub fn install(bin: PathBuf, kv: &str, instance_id: &str, token: &str, extra: &[&str]) -> Mariadb {
        let dir = tempfile::tempdir().unwrap();
        let datadir = dir.path().join("data");
        // A temporary directory of its own: a starting mariadbd removes the
        // `#sql` temporary files it finds in its tmpdir, so servers of tests
        // running at once in a shared /tmp broke each other's installs.
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--tmpdir={}", dir.path().join("tmp").display()))
            .arg("--user=root")
            .arg("--auth-root-authentication-method=socket")
            .output()
            .expect("mariadb-install-db (apt-get install mariadb-server)");
        assert!(out.status.success(), "mariadb-install-db failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/mariadb/keywarden.cnf")).unwrap();
        assert!(shipped.contains("@KEYWARDEN_KV@") && shipped.contains("@INSTANCE_ID@"), "the shipped keywarden.cnf lost its placeholders");
        let cnf = dir.path().join("keywarden.cnf");
        std::fs::write(&cnf, shipped.replace("@KEYWARDEN_KV@", kv).replace("@INSTANCE_ID@", instance_id)).unwrap();
        Mariadb {
            bin,
            child: None,
            socket: dir.path().join("mysqld.sock"),
            error_log: dir.path().join("error.log"),
            datadir,
            cnf,
            dir,
            token: token.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Starts mariadbd and waits until it answers a query, or exits.
    pub fn start(&mut self) -> Start {
        assert!(self.child.is_none(), "mariadbd is already running");
        let started = Instant::now();
        let child = Command::new(&self.bin)
            // Must come first: the shipped file is the only one read.
            .arg(format!("--defaults-file={}", self.cnf.display()))
            .arg("--user=root")
            .arg(format!("--datadir={}", self.datadir.display()))
            .arg(format!("--socket={}", self.socket.display()))
            .arg(format!("--tmpdir={}", self.dir.path().join("tmp").display()))
            .arg(format!("--pid-file={}", self.pid_file().display()))
            .arg(format!("--log-error={}", self.error_log.display()))
            .arg("--skip-networking")
            .arg("--innodb-buffer-pool-size=32M")
            .args(&self.extra)
            .env("VAULT_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        self.child = Some(child);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Start::Exited(status);
            }
            if self.query("SELECT 1").is_ok() {
                return Start::Ready(started.elapsed());
            }
            assert!(started.elapsed() < Duration::from_secs(90), "mariadbd did not answer within 90s; its log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts it and insists that it answers; returns how long it took.
    pub fn start_ready(&mut self) -> Duration {
        match self.start() {
            Start::Ready(took) => took,
            Start::Exited(status) => panic!("mariadbd exited with {status} during start-up; its log:\n{}", self.log()),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// A clean shutdown (`mariadb-admin shutdown`, which waits for it), then
    /// the process's exit; returns how long it took.
    pub fn shutdown(&mut self) -> Duration {
        let started = Instant::now();
        let out = Command::new("mariadb-admin").arg(format!("--socket={}", self.socket.display())).args(["-uroot", "shutdown"]).output().unwrap();
        assert!(out.status.success(), "mariadb-admin shutdown: {}; log:\n{}", String::from_utf8_lossy(&out.stderr), self.log());
        let status = self.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "mariadbd exited with {status} on a clean shutdown; log:\n{}", self.log());
        started.elapsed()
    }

    /// Waits for the process to end by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("mariadbd is running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mariadbd did not exit within {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs SQL through the `mariadb` client over the socket: tab-separated
    /// rows without a header, or the client's error text.
    pub fn query(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("mariadb")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-uroot", "--batch", "--skip-column-names", "-e", sql])
            .output()
            .expect("the mariadb client (apt-get install mariadb-client)");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// As `query`, failing the test on an error.
    pub fn sql(&self, sql: &str) -> String {
        self.query(sql).unwrap_or_else(|e| panic!("{sql}: {e}; log:\n{}", self.log()))
    }

    /// The last 60 lines of the error log.
    pub fn log(&self) -> String {
        let all = std::fs::read_to_string(&self.error_log).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The whole error log, for markers.
    pub fn full_log(&self) -> String {
        std::fs::read_to_string(&self.error_log).unwrap_or_default()
    }

    /// A complete option file for a mariadbd that the agent's shipped hooks
    /// start (`mariadbd --defaults-file=`, MARIADB_DEFAULTS): the shipped
    /// file, this server's paths and options, and the instance's token in a
    /// 0600 option file of its own that it includes.
    pub fn hook_defaults(&self) -> PathBuf {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let token = self.dir.path().join("token.cnf");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&token).unwrap();
        writeln!(f, "[mariadbd]\nhashicorp-key-management-token = {}", self.token).unwrap();
        let mut cnf = format!(
            "!include {}\n[mariadbd]\nuser = root\ndatadir = {}\ntmpdir = {}\nsocket = {}\npid-file = {}\nlog-error = {}\nskip-networking\ninnodb-buffer-pool-size = 32M\n",
            self.cnf.display(),
            self.datadir.display(),
            self.dir.path().join("tmp").display(),
            self.socket.display(),
            self.pid_file().display(),
            self.error_log.display()
        );
        for opt in &self.extra {
            cnf.push_str(opt.trim_start_matches("--"));
            cnf.push('\n');
        }
        cnf.push_str(&format!("!include {}\n", token.display()));
        let file = self.dir.path().join("hooks.cnf");
        std::fs::write(&file, cnf).unwrap();
        file
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("mysqld.pid")
    }

    /// The pid of a server running from this datadir, whoever started it
    /// (the test or a hook): from its pid file, which a clean shutdown
    /// removes, if that process is alive.
    pub fn running_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file()).ok()?.trim().parse().ok()?;
        // SAFETY: signal 0 only checks that the process exists.
        (unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
    }

    /// Whether it answers a query on its socket.
    pub fn answers(&self) -> bool {
        self.query("SELECT 1").is_ok()
    }

    /// Every regular file under the datadir, with its bytes.
    pub fn data_files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        files_under(&self.datadir)
    }
}

/// Every regular file under `dir`, recursively, with its bytes.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(path);
            } else if kind.is_file() {
                if let Ok(bytes) = std::fs::read(&path) {
                    out.push((path, bytes));
                }
            }
        }
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        } else if let Some(pid) = self.running_pid() {
            // Started detached by a hook: not this process's child.
            // SAFETY: a plain kill of a pid read from this test's own pid file.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if std::thread::panicking() {
            eprintln!("---- mariadbd log ----\n{}", self.log());
        }
    }
}
