//! `keywarden demo --mariadb`: the key's lifecycle walked against a real
//! MariaDB whose data at rest opens only while the key allows it, with a real
//! data-plane agent enforcing each command through the shipped hooks.
//! Blocking from start to end (child processes, files, a blocking HTTP
//! client): it runs on a blocking thread, never on the runtime.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::mariadb::{contains, Agent, AgentSpec, Mariadb, Start};

const KEY: &str = "demo-key";
const INSTANCE: &str = "shop-db";
const ENC_MARKER: &str = "KW-DEMO-SECRET-ROW";
const PLAIN_MARKER: &str = "KW-DEMO-PLAIN-ROW";
const ROWS: usize = 3;

/// What the walk needs of the running daemon.
pub struct Setup {
    pub mariadbd: PathBuf,
    pub dir: PathBuf,
    pub api: String,
    pub kv: String,
    pub admin: String,
    pub bootstrap: String,
    pub commands_topic: String,
    pub signing_key_id: String,
    pub signing_key_file: PathBuf,
    /// How long after the delete the purge comes (the demo's policy.purge_after).
    pub purge_after: Duration,
    /// Cancelled by Ctrl-C: every wait gives up, and the processes are stopped.
    pub shutdown: CancellationToken,
}

struct Walk<'a> {
    s: &'a Setup,
    http: reqwest::blocking::Client,
    dek_token: String,
}

/// Runs the walk; the database and the agent are stopped when it returns,
/// however it returns.
pub fn run(s: &Setup) -> anyhow::Result<()> {
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let mut w = Walk { s, http, dek_token: String::new() };
    w.wait("readiness", Duration::from_secs(30), || Ok(w.call(reqwest::Method::GET, "/readyz", None)?.0 == 200))?;
    let (status, v) = w.call(reqwest::Method::POST, "/v1/keys", Some(json!({"key_id": KEY})))?;
    if status != 201 {
        bail!("creating the key answered {status}: {v}");
    }
    let (status, v) = w.call(reqwest::Method::POST, "/v1/instances", Some(json!({"instance_id": INSTANCE, "key_id": KEY})))?;
    if status != 201 {
        bail!("creating {INSTANCE} answered {status}: {v}");
    }
    w.dek_token = v["dek_token"].as_str().ok_or_else(|| anyhow!("creating {INSTANCE} answered no dek_token: {v}"))?.to_string();
    println!("key {KEY}, instance {INSTANCE} (its own dek_token is MariaDB's Vault token, in a 0600 option file)");

    let t = Instant::now();
    let mut db = Mariadb::install(s.mariadbd.clone(), &s.dir.join("mariadb"), &s.kv, INSTANCE, &w.dek_token)?;
    println!("  mariadb-install-db: a private datadir, socket only, in {:.1?}", t.elapsed());
    match db.start()? {
        Start::Exited(_) if s.shutdown.is_cancelled() => bail!("interrupted"),
        Start::Ready(took) => println!("  mariadbd started with the shipped keywarden.cnf in {took:.1?}; its keys come from http://{}/v1/{INSTANCE}", s.kv),
        Start::Exited(log) => bail!("mariadbd did not start; its log:\n{log}"),
    }
    let mut agent = Agent::start(
        &std::env::current_exe().context("finding the keywarden binary for the agent")?,
        &s.dir.join("agent"),
        &AgentSpec {
            brokers: &s.bootstrap,
            commands_topic: &s.commands_topic,
            key_id: &s.signing_key_id,
            key_file: &s.signing_key_file,
            keywarden_url: &s.api,
            instance_id: INSTANCE,
            credential: &w.dek_token,
        },
        &db,
    )?;
    println!("  keywarden agent started with the shipped hooks (mariadb-stop, mariadb-start, mariadb-rewrapped)");
    let outcome = w.database(&mut db, &mut agent);
    // Ctrl-C also stops the daemon, whose refusals then fail whatever step
    // was running: that is the interruption, not a finding.
    if outcome.is_err() && s.shutdown.is_cancelled() {
        bail!("interrupted; the database and the agent are stopped");
    }
    if outcome.is_err() {
        println!("--- agent log (last lines) ---\n{}", agent.log_tail(20));
        println!("--- mariadbd log (last lines) ---\n{}", db.log_tail(20));
    }
    outcome
}

impl Walk<'_> {
    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.s.api)).bearer_auth(&self.s.admin);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().with_context(|| format!("calling {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.text()?;
        Ok((status, if text.is_empty() { json!({}) } else { serde_json::from_str(&text).unwrap_or(json!({"raw": text})) }))
    }

    /// What the KV endpoint answers the plugin for key 1.
    fn kv_status(&self) -> anyhow::Result<u16> {
        let r = self.http.get(format!("http://{}/v1/{INSTANCE}/data/1", self.s.kv)).header("X-Vault-Token", &self.dek_token).send()?;
        Ok(r.status().as_u16())
    }

    fn wait(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if self.s.shutdown.is_cancelled() {
                bail!("interrupted while waiting for {what}");
            }
            if check()? {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn act(&self, action: &str) -> anyhow::Result<()> {
        let (status, v) = self.call(reqwest::Method::POST, &format!("/v1/keys/{KEY}/{action}"), None)?;
        if status != 202 {
            bail!("{action} answered {status}: {v}");
        }
        println!();
        println!("-> {action}: event {} to Kafka; keywarden consumes it", v["event_id"].as_str().unwrap_or("?"));
        Ok(())
    }

    /// Waits until the agent reported `action` enforced, and prints it as
    /// GET /v1/instances/{id} shows it.
    fn enforced(&self, action: &str) -> anyhow::Result<Duration> {
        let mut last = Value::Null;
        let took = self.wait(&format!("the agent to report {action} enforced"), Duration::from_secs(60), || {
            let (_, v) = self.call(reqwest::Method::GET, &format!("/v1/instances/{INSTANCE}"), None)?;
            last = v["data_plane"].clone();
            Ok(last["action"] == action && last["outcome"] == "enforced")
        })?;
        println!(
            "   data_plane: action={} outcome={} at={} command_id={}",
            last["action"].as_str().unwrap_or("?"),
            last["outcome"].as_str().unwrap_or("?"),
            last["at"].as_str().unwrap_or("?"),
            last["command_id"].as_str().unwrap_or("?")
        );
        Ok(took)
    }

    fn rows(&self, db: &Mariadb) -> anyhow::Result<Vec<String>> {
        let out = db.query("SELECT v FROM shop.secret ORDER BY id").map_err(|e| anyhow!("reading the encrypted table: {e}"))?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// A start while the key is refused: mariadbd must exit, and why.
    fn start_refused(&self, db: &mut Mariadb) -> anyhow::Result<()> {
        match db.start()? {
            Start::Ready(_) => bail!("mariadbd started although keywarden refuses its key"),
            Start::Exited(log) => {
                let why = log.lines().find(|l| l.contains("hashicorp") || l.contains("encryption")).unwrap_or("(see its error log)");
                println!("   a start attempt: mariadbd exits at once: {}", why.trim());
            }
        }
        Ok(())
    }

    fn database(&self, db: &mut Mariadb, agent: &mut Agent) -> anyhow::Result<()> {
        let values: Vec<String> = (1..=ROWS).map(|i| format!("({i}, '{ENC_MARKER}-{i}')")).collect();
        let plain: Vec<String> = (1..=ROWS).map(|i| format!("({i}, '{PLAIN_MARKER}-{i}')")).collect();
        db.query(&format!(
            "CREATE DATABASE shop; \
             CREATE TABLE shop.secret (id INT PRIMARY KEY, v VARCHAR(100)) ENGINE=InnoDB ENCRYPTED=YES ENCRYPTION_KEY_ID=1; \
             CREATE TABLE shop.plain (id INT PRIMARY KEY, v VARCHAR(100)) ENGINE=InnoDB ENCRYPTED=NO; \
             INSERT INTO shop.secret VALUES {}; INSERT INTO shop.plain VALUES {}; \
             FLUSH TABLES shop.secret, shop.plain FOR EXPORT; UNLOCK TABLES;",
            values.join(", "),
            plain.join(", ")
        ))
        .map_err(|e| anyhow!("writing the tables: {e}"))?;
        let written = self.rows(db)?;
        println!();
        println!("== rows written to shop.secret (ENCRYPTED=YES ENCRYPTION_KEY_ID=1): {}", written.join(", "));
        println!("   and to the control table shop.plain (ENCRYPTED=NO)");
        // FLUSH ... FOR EXPORT wrote the tables' pages; the redo log is
        // written at each commit.
        let file = |name: &str| -> anyhow::Result<Vec<u8>> { std::fs::read(db.datadir.join(name)).with_context(|| format!("reading {name}")) };
        let show = |name: &str, marker: &str| -> anyhow::Result<bool> {
            let found = contains(&file(name)?, marker.as_bytes());
            println!("   raw {name:<17} {} {marker:?}", if found { "CONTAINS" } else { "does not contain" });
            Ok(found)
        };
        if show("shop/secret.ibd", ENC_MARKER)? || show("ib_logfile0", ENC_MARKER)? {
            bail!("an encrypted table's rows are readable on disk");
        }
        if !show("shop/plain.ibd", PLAIN_MARKER)? {
            bail!("the control table's rows are not in its file: the search proves nothing");
        }

        self.act("rotate")?;
        let took = self.enforced("rewrapped")?;
        println!("== rotated: the agent ran mariadb-rewrapped {took:.1?} after the request; the database kept running ({} rows read)", self.rows(db)?.len());

        self.act("disable")?;
        let took = self.enforced("revoke")?;
        if db.pid().is_some() {
            bail!("the agent reported revoke enforced but mariadbd still runs");
        }
        println!("== disabled: the agent stopped the database cleanly {took:.1?} after the request");
        println!("   the KV endpoint now answers key 1 with {}", self.kv_status()?);
        self.start_refused(db)?;

        self.act("enable")?;
        let took = self.enforced("restore")?;
        if !db.accepting() {
            bail!("the agent reported restore enforced but the database refuses connections");
        }
        let back = self.rows(db)?;
        println!("== enabled: the agent started the database {took:.1?} after the request; rows back: {}", back.join(", "));
        if back != written {
            bail!("the rows read back differ from those written");
        }

        self.act("delete")?;
        let took = self.enforced("erase")?;
        if db.pid().is_some() {
            bail!("the agent reported erase enforced but mariadbd still runs");
        }
        println!("== deleted: the agent stopped the database {took:.1?} after the request; the KV endpoint answers {}", self.kv_status()?);

        println!();
        println!("-> purge: this demo's restore window (policy.purge_after) is {:?}, not 30 days; waiting for the purge sweep", self.s.purge_after);
        let took = self.wait("the purge", self.s.purge_after + Duration::from_secs(60), || {
            let (_, k) = self.call(reqwest::Method::GET, &format!("/v1/keys/{KEY}"), None)?;
            Ok(!k["purged_at"].is_null())
        })?;
        let (_, inst) = self.call(reqwest::Method::GET, &format!("/v1/instances/{INSTANCE}"), None)?;
        println!("== purged ({took:.1?} into the wait): the wrapped DEK is destroyed; {INSTANCE} state={}", inst["state"].as_str().unwrap_or("?"));
        let (status, _) = self.call(reqwest::Method::POST, &format!("/v1/keys/{KEY}/restore"), None)?;
        println!("   restore now answers {status}; the KV endpoint answers {}", self.kv_status()?);
        self.start_refused(db)?;
        if !agent.running() {
            bail!("the agent stopped during the walk");
        }
        println!("   the rows of shop.secret are gone for good: no key that opens them exists any more");
        Ok(())
    }
}
