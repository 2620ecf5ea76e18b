//! `keywarden demo`: the daemon on embedded defaults (mock broker, embedded KMS,
//! a fresh store) and a live walk through one key's lifecycle over the real API;
//! with `--mariadb`, the walk against a real MariaDB and a real data-plane agent
//! (`mariadb_walk`, on the processes of `mariadb`).

pub mod mariadb;
mod mariadb_walk;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// How long the `--mariadb` walk's restore window is, so that its purge comes
/// within the demo (the default is 30 days).
const MARIADB_PURGE_AFTER: Duration = Duration::from_secs(5);

pub fn run(mut config: Config, exit: bool, with_mariadb: bool) -> anyhow::Result<ExitCode> {
    // Before anything starts: without the database there is nothing to show.
    let mariadbd = if with_mariadb { Some(mariadb::mariadbd()?) } else { None };
    let dir = std::env::temp_dir().join(format!("keywarden-demo-{}", uuid::Uuid::new_v4()));
    config.store.path = dir.join("store");
    config.kms.local.master_key_file = dir.join("master.key");
    config.api.admin_token_file = dir.join("admin.token");
    config.api.dek_token_file = dir.join("dek.token");
    // Everything the demo creates stays in its temporary directory.
    config.signatures.hmac_key_file = dir.join("event-hmac.key");
    if std::net::TcpListener::bind(&config.api.listen).is_err() {
        config.api.listen = "127.0.0.1:0".into();
    }
    let mut kv = String::new();
    if mariadbd.is_some() {
        // The plugin needs the address in its option file before the daemon
        // starts, so the port is picked here rather than bound as :0.
        kv = format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
        config.data_plane.vault_kv_listen = kv.clone();
        config.policy.purge_after = crate::config::HumanDuration(MARIADB_PURGE_AFTER);
        config.policy.purge_schedule = "* * * * * *".into();
    }
    let signing = (config.signatures.hmac_key_id.clone(), config.signatures.hmac_key_file.clone(), config.kafka.commands_topic.clone());
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        super::spawn_signal_handler(shutdown.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let daemon = tokio::spawn(crate::daemon::run(config, shutdown.clone(), move |s| {
            let _ = tx.send(s);
        }));
        let started = match rx.await {
            Ok(s) => s,
            Err(_) => return Err(daemon.await?.err().map(anyhow::Error::from).unwrap_or_else(|| anyhow!("daemon did not start"))),
        };
        println!("keywarden demo");
        println!("  admin API     http://{}", started.api);
        if started.embedded {
            println!("  kafka         {} (embedded in-memory mock broker: for trying keywarden out; nothing survives exit)", started.bootstrap);
        } else {
            println!("  kafka         {}", started.bootstrap);
        }
        println!("  store         {}", dir.display());
        if mariadbd.is_some() {
            println!("  vault kv      http://{kv} (MariaDB's hashicorp_key_management plugin reads its keys here)");
        }
        println!();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).map(|t| t.trim().to_string());
        let outcome = match mariadbd {
            Some(mariadbd) => {
                let setup = mariadb_walk::Setup {
                    mariadbd,
                    dir: dir.clone(),
                    api: format!("http://{}", started.api),
                    kv,
                    admin: read("admin.token")?,
                    bootstrap: started.bootstrap.clone(),
                    commands_topic: signing.2,
                    signing_key_id: signing.0,
                    signing_key_file: signing.1,
                    purge_after: MARIADB_PURGE_AFTER,
                    shutdown: shutdown.clone(),
                };
                // Child processes and files: a blocking thread, never the runtime's.
                tokio::task::spawn_blocking(move || mariadb_walk::run(&setup)).await.map_err(|e| anyhow!("the walk died: {e}"))?
            }
            None => {
                let walk =
                    Walk { http: reqwest::Client::new(), base: format!("http://{}", started.api), admin: read("admin.token")?, deks: Default::default() };
                walk.run().await
            }
        };
        if let Err(e) = &outcome {
            println!("demo failed: {e:#}");
        } else if !exit {
            println!();
            println!(
                "The daemon keeps running. Try: keywarden --api http://{} --token $(cat {}) key show demo-key",
                started.api,
                dir.join("admin.token").display()
            );
            println!("Press Ctrl-C to stop.");
            shutdown.cancelled().await;
        }
        shutdown.cancel();
        daemon.await??;
        let _ = std::fs::remove_dir_all(&dir);
        outcome
    });
    result.map(|_| ExitCode::SUCCESS)
}

struct Walk {
    http: reqwest::Client,
    base: String,
    admin: String,
    /// Each instance's own DEK token, as its creation answered it: a data-plane
    /// node holds only its instance's.
    deks: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

const INSTANCES: [&str; 3] = ["orders-db", "billing-db", "audit-db"];
const KEY: &str = "demo-key";

impl Walk {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let instance = path.strip_prefix("/v1/instances/").and_then(|p| p.strip_suffix("/dek"));
        let token = match instance {
            Some(id) => self.deks.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned().unwrap_or_default(),
            None => self.admin.clone(),
        };
        let mut req = self.http.request(method, format!("{}{}", self.base, path)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("calling {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((status, if text.is_empty() { json!({}) } else { serde_json::from_str(&text).unwrap_or(json!({"raw": text})) }))
    }

    async fn wait_for(&self, what: &str, mut check: impl FnMut(&Value) -> bool, path: &str) -> anyhow::Result<(Value, Duration)> {
        let start = Instant::now();
        loop {
            let (status, v) = self.call(reqwest::Method::GET, path, None).await?;
            if status == 200 && check(&v) {
                return Ok((v, start.elapsed()));
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("timed out waiting for {what}; last answer: {v}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn all_in(&self, state: &str) -> anyhow::Result<Duration> {
        let (_, took) = self
            .wait_for(
                &format!("every instance to be {state}"),
                |v| v["instances"].as_array().is_some_and(|a| a.len() == INSTANCES.len() && a.iter().all(|i| i["state"] == state)),
                &format!("/v1/instances?key_id={KEY}"),
            )
            .await?;
        Ok(took)
    }

    async fn deks(&self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        for id in INSTANCES {
            let (status, v) = self.call(reqwest::Method::POST, &format!("/v1/instances/{id}/dek"), None).await?;
            out.push(match status {
                200 => v["dek"].as_str().unwrap_or_default().to_string(),
                423 => "refused: 423 revoked".into(),
                410 => "refused: 410 gone".into(),
                other => format!("refused: {other}"),
            });
        }
        Ok(out)
    }

    async fn table(&self, title: &str) -> anyhow::Result<()> {
        let (_, key) = self.call(reqwest::Method::GET, &format!("/v1/keys/{KEY}"), None).await?;
        let deks = self.deks().await?;
        println!("== {title}");
        println!(
            "   key {KEY}: state={} version={} pending_rewraps={}",
            key["state"].as_str().unwrap_or("?"),
            key["version"].as_str().unwrap_or("?"),
            key["pending_rewraps"]
        );
        for (id, dek) in INSTANCES.iter().zip(deks) {
            let (_, inst) = self.call(reqwest::Method::GET, &format!("/v1/instances/{id}"), None).await?;
            let dek_shown = if dek.starts_with("refused") { dek } else { format!("served, fingerprint {}", inst["dek_fingerprint"].as_str().unwrap_or("")) };
            println!(
                "   {:<11} state={:<9} wrapped under version {:<2} DEK {}",
                id,
                inst["state"].as_str().unwrap_or("?"),
                inst["key_version"].as_str().unwrap_or("?"),
                dek_shown
            );
        }
        Ok(())
    }

    async fn act(&self, action: &str) -> anyhow::Result<Value> {
        let (status, v) = self.call(reqwest::Method::POST, &format!("/v1/keys/{KEY}/{action}"), None).await?;
        if status != 202 {
            bail!("{action} answered {status}: {v}");
        }
        println!();
        println!("-> {action}: the embedded KMS published event {} to Kafka; keywarden consumes it", v["event_id"].as_str().unwrap_or("?"));
        Ok(v)
    }

    async fn run(&self) -> anyhow::Result<()> {
        self.wait_for("readiness", |_| true, "/readyz").await?;
        let (status, v) = self.call(reqwest::Method::POST, "/v1/keys", Some(json!({"key_id": KEY}))).await?;
        if status != 201 {
            bail!("creating the key answered {status}: {v}");
        }
        for id in INSTANCES {
            let (status, v) = self.call(reqwest::Method::POST, "/v1/instances", Some(json!({"instance_id": id, "key_id": KEY}))).await?;
            if status != 201 {
                bail!("creating {id} answered {status}: {v}");
            }
            let token = v["dek_token"].as_str().ok_or_else(|| anyhow!("creating {id} answered no dek_token: {v}"))?;
            self.deks.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), token.to_string());
        }
        println!("each instance got its own dek_token, which fetches its DEK and no other's");
        self.table("one root key, three instances, each with its own DEK").await?;
        let original = self.deks().await?;

        let ev = self.act("rotate").await?;
        let version = ev["key_version"].as_str().unwrap_or_default().to_string();
        let (_, took) = self.wait_for("the rotation", |k| k["pending_rewraps"] == 0 && k["version"] == version.as_str(), &format!("/v1/keys/{KEY}")).await?;
        self.table(&format!("rotated: every DEK rewrapped under version {version} in {took:.1?}")).await?;
        if self.deks().await? != original {
            bail!("a DEK changed across rotation");
        }
        println!("   the DEKs are byte-for-byte the ones from before the rotation");

        self.act("disable").await?;
        let took = self.all_in("revoked").await?;
        self.table(&format!("disabled: DEKs refused {took:.1?} after the request")).await?;

        self.act("enable").await?;
        let took = self.all_in("active").await?;
        self.table(&format!("enabled: DEKs served again after {took:.1?}")).await?;

        self.act("delete").await?;
        let took = self.all_in("erased").await?;
        self.table(&format!("deleted: crypto-erased after {took:.1?}; wrapped DEKs kept for the restore window")).await?;

        self.act("restore").await?;
        let took = self.all_in("active").await?;
        self.table(&format!("restored within the window after {took:.1?}")).await?;
        if self.deks().await? != original {
            bail!("a DEK changed across delete and restore");
        }
        println!("   the DEKs are the same as at the start: the data is readable again");
        Ok(())
    }
}
