//! HashiCorp Vault Transit: encrypt wraps, decrypt unwraps, rewrap rewraps
//! without the plaintext leaving Vault, `GET keys/:name` reads the versions.
//! Concurrent rewraps are gathered into `batch_input` requests, so a rotation of
//! many DEKs costs one request per `kms.vault.batch` DEKs.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::{engine::general_purpose::STANDARD, Engine};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::governor::{Governed, RemoteLimits};
use super::{Dek, Kms, KmsError, KmsKeyState, Provider};
use crate::config::ConfigError;
use crate::engine::{KeyStatus, WrappedDek};

/// The `[kms.vault]` section of the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaultKmsConfig {
    pub address: String,
    /// File holding the Vault token (X-Vault-Token).
    pub token_file: PathBuf,
    /// Mount path of the transit secrets engine.
    pub mount: String,
    /// Rewraps sent in one batch_input request.
    pub batch: usize,
    /// The transit keys are derived keys: send the instance id as `context`,
    /// binding each DEK to its instance.
    pub derived: bool,
    pub limits: RemoteLimits,
}

impl Default for VaultKmsConfig {
    fn default() -> Self {
        Self {
            address: "http://127.0.0.1:8200".into(),
            token_file: PathBuf::new(),
            mount: "transit".into(),
            batch: 64,
            derived: false,
            limits: RemoteLimits::default(),
        }
    }
}

/// What `kms.default` and routes call this provider.
pub const NAME: &str = "vault";

/// This provider's line in the table of `kms/mod.rs`.
pub static PROVIDER: Provider = Provider { name: NAME, validate: |k| k.vault.validate(k.uses(NAME)), build: |k| build(&k.vault) };

/// Behind its own governor, so that a throttling or sealed Vault never holds up another KMS. Starts the rewrap batcher, so it must be called inside the runtime.
pub fn build(config: &VaultKmsConfig) -> Result<Arc<dyn Kms>, KmsError> {
    Ok(Arc::new(Governed::new(VaultKms::new(config)?, config.limits.governor())))
}

impl VaultKmsConfig {
    /// `used`: a route or `kms.default` names vault. Only then is a token
    /// required, so that a config that leaves vault unused needs no token file.
    pub fn validate(&self, used: bool) -> Result<(), ConfigError> {
        if used && self.token_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid("kms.vault.token_file", "", "the path of a file holding a Vault token"));
        }
        if !(1..=1000).contains(&self.batch) {
            return Err(ConfigError::invalid("kms.vault.batch", self.batch, "a whole number from 1 to 1000"));
        }
        self.limits.validate("kms.vault.limits")
    }
}

struct Client {
    http: reqwest::Client,
    address: String,
    mount: String,
    token_file: PathBuf,
    token: RwLock<String>,
    derived: bool,
}

struct RewrapItem {
    key: String,
    ciphertext: String,
    context: Option<String>,
    reply: oneshot::Sender<Result<WrappedDek, KmsError>>,
}

pub struct VaultKms {
    client: Arc<Client>,
    rewraps: mpsc::Sender<RewrapItem>,
}

fn read_token(path: &PathBuf) -> Result<String, KmsError> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| KmsError::Setup(format!("cannot read the vault token from {}: {e}; check kms.vault.token_file", path.display())))?;
    Ok(t.trim().to_string())
}

impl VaultKms {
    pub fn new(config: &VaultKmsConfig) -> Result<VaultKms, KmsError> {
        let http = reqwest::Client::builder()
            .timeout(config.limits.timeout.0)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| KmsError::Setup(format!("vault http client: {e}")))?;
        let client = Arc::new(Client {
            http,
            address: config.address.trim_end_matches('/').to_string(),
            mount: config.mount.trim_matches('/').to_string(),
            token: RwLock::new(read_token(&config.token_file)?),
            token_file: config.token_file.clone(),
            derived: config.derived,
        });
        let (tx, rx) = mpsc::channel(config.batch * 4);
        tokio::spawn(batch_rewraps(client.clone(), rx, config.batch));
        Ok(VaultKms { client, rewraps: tx })
    }

    fn context(&self, aad: &[u8]) -> Option<String> {
        self.client.derived.then(|| STANDARD.encode(aad))
    }
}

impl Client {
    async fn call(&self, method: reqwest::Method, path: &str, key: &str, body: Option<Value>) -> Result<Value, KmsError> {
        let mut reread = false;
        loop {
            let token = self.token.read().expect("token lock").clone();
            let url = format!("{}/v1/{}/{path}", self.address, self.mount);
            let mut req = self.http.request(method.clone(), &url).header("X-Vault-Token", token);
            if let Some(b) = &body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(|e| KmsError::Unavailable(format!("vault {path} for key {key}: {e}")))?;
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            if (200..300).contains(&status) {
                return Ok(if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::Null) });
            }
            // A token renewed by an agent lands in the file: read it once more.
            if status == 403 && !reread {
                reread = true;
                if let Ok(t) = read_token(&self.token_file) {
                    *self.token.write().expect("token lock") = t;
                    continue;
                }
            }
            let errors: Vec<String> = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["errors"].as_array().map(|a| a.iter().filter_map(|e| e.as_str().map(str::to_owned)).collect()))
                .unwrap_or_default();
            return Err(map_error(status, &errors.join("; "), path, key));
        }
    }
}

fn map_error(status: u16, message: &str, path: &str, key: &str) -> KmsError {
    let what = format!("vault {path} for key {key}: {status} {message}");
    match status {
        403 => KmsError::Refused(format!("{what}; check the token in kms.vault.token_file and its policy")),
        404 => KmsError::UnknownKey(key.to_string()),
        400 if message.contains("not found") => KmsError::UnknownKey(key.to_string()),
        400 if message.contains("cipher: message authentication failed") || message.contains("invalid ciphertext") => KmsError::Integrity(key.to_string()),
        412 | 429 => KmsError::Throttled(what),
        s if s >= 500 => KmsError::Unavailable(what),
        _ => KmsError::Refused(what),
    }
}

/// `vault:v3:...` was made by version 3.
fn version_of(ciphertext: &str) -> Option<String> {
    let rest = ciphertext.strip_prefix("vault:v")?;
    let (v, _) = rest.split_once(':')?;
    v.parse::<u64>().ok().map(|n| n.to_string())
}

fn wrapped_from(ciphertext: &str, key: &str) -> Result<WrappedDek, KmsError> {
    let version = version_of(ciphertext).ok_or_else(|| KmsError::Unavailable(format!("vault returned an unexpected ciphertext for key {key}")))?;
    Ok(WrappedDek { key_version: version, ciphertext: ciphertext.as_bytes().to_vec() })
}

fn ciphertext_of(w: &WrappedDek, key: &str) -> Result<String, KmsError> {
    String::from_utf8(w.ciphertext.clone()).map_err(|_| KmsError::Integrity(key.to_string()))
}

/// Gathers rewraps that arrive together (per key) into one `batch_input` call.
async fn batch_rewraps(client: Arc<Client>, mut rx: mpsc::Receiver<RewrapItem>, max: usize) {
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        // A short wait lets a rotation's concurrent calls join the same request.
        let deadline = tokio::time::sleep(Duration::from_millis(2));
        tokio::pin!(deadline);
        while items.len() < max {
            tokio::select! {
                _ = &mut deadline => break,
                next = rx.recv() => match next {
                    Some(i) => items.push(i),
                    None => break,
                },
            }
        }
        let mut by_key: std::collections::HashMap<String, Vec<RewrapItem>> = std::collections::HashMap::new();
        for i in items {
            by_key.entry(i.key.clone()).or_default().push(i);
        }
        for (key, items) in by_key {
            let client = client.clone();
            tokio::spawn(async move { send_batch(&client, &key, items).await });
        }
    }
}

async fn send_batch(client: &Client, key: &str, items: Vec<RewrapItem>) {
    let input: Vec<Value> = items
        .iter()
        .map(|i| {
            let mut v = json!({ "ciphertext": i.ciphertext });
            if let Some(c) = &i.context {
                v["context"] = json!(c);
            }
            v
        })
        .collect();
    let result = client.call(reqwest::Method::POST, &format!("rewrap/{key}"), key, Some(json!({ "batch_input": input }))).await;
    match result {
        Err(e) => {
            let text = e.to_string();
            for i in items {
                let err = match &e {
                    KmsError::Throttled(_) => KmsError::Throttled(text.clone()),
                    KmsError::Unavailable(_) => KmsError::Unavailable(text.clone()),
                    KmsError::UnknownKey(k) => KmsError::UnknownKey(k.clone()),
                    _ => KmsError::Refused(text.clone()),
                };
                let _ = i.reply.send(Err(err));
            }
        }
        Ok(v) => {
            let results = v["data"]["batch_results"].as_array().cloned().unwrap_or_default();
            for (n, i) in items.into_iter().enumerate() {
                // Vault answers 200 even when single items failed: check each.
                let r = match results.get(n) {
                    Some(r) if r["error"].as_str().is_some_and(|e| !e.is_empty()) => {
                        Err(map_error(400, r["error"].as_str().unwrap_or_default(), &format!("rewrap/{key}"), key))
                    }
                    Some(r) => r["ciphertext"]
                        .as_str()
                        .ok_or_else(|| KmsError::Unavailable(format!("vault rewrap for key {key} returned no ciphertext")))
                        .and_then(|c| wrapped_from(c, key)),
                    None => Err(KmsError::Unavailable(format!("vault rewrap for key {key} returned fewer results than inputs"))),
                };
                let _ = i.reply.send(r);
            }
        }
    }
}

#[async_trait::async_trait]
impl Kms for VaultKms {
    fn provider(&self) -> &'static str {
        NAME
    }

    async fn wrap(&self, key_id: &str, dek: &Dek, aad: &[u8], _label: Option<&str>) -> Result<WrappedDek, KmsError> {
        let plaintext = zeroize::Zeroizing::new(STANDARD.encode(dek.expose()));
        let mut body = json!({ "plaintext": plaintext.as_str() });
        if let Some(c) = self.context(aad) {
            body["context"] = json!(c);
        }
        let v = self.client.call(reqwest::Method::POST, &format!("encrypt/{key_id}"), key_id, Some(body)).await?;
        let c = v["data"]["ciphertext"].as_str().ok_or_else(|| KmsError::Unavailable(format!("vault encrypt for key {key_id} returned no ciphertext")))?;
        wrapped_from(c, key_id)
    }

    async fn unwrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8]) -> Result<Dek, KmsError> {
        let mut body = json!({ "ciphertext": ciphertext_of(wrapped, key_id)? });
        if let Some(c) = self.context(aad) {
            body["context"] = json!(c);
        }
        let v = self.client.call(reqwest::Method::POST, &format!("decrypt/{key_id}"), key_id, Some(body)).await?;
        let plain = zeroize::Zeroizing::new(
            v["data"]["plaintext"].as_str().and_then(|p| STANDARD.decode(p).ok()).ok_or_else(|| KmsError::Integrity(key_id.to_string()))?,
        );
        Dek::from_slice(&plain).ok_or_else(|| KmsError::Integrity(key_id.to_string()))
    }

    async fn rewrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8], _label: Option<&str>) -> Result<WrappedDek, KmsError> {
        let (reply, rx) = oneshot::channel();
        let item = RewrapItem { key: key_id.to_string(), ciphertext: ciphertext_of(wrapped, key_id)?, context: self.context(aad), reply };
        self.rewraps.send(item).await.map_err(|_| KmsError::Unavailable("vault rewrap batcher stopped".into()))?;
        rx.await.map_err(|_| KmsError::Unavailable("vault rewrap batcher stopped".into()))?
    }

    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
        let v = self.client.call(reqwest::Method::GET, &format!("keys/{key_id}"), key_id, None).await?;
        let latest = v["data"]["latest_version"].as_u64().ok_or_else(|| KmsError::Unavailable(format!("vault key {key_id} has no latest_version")))?;
        // Transit has no disabled state; a key that cannot decrypt its latest
        // version any more is as good as gone.
        let min_dec = v["data"]["min_decryption_version"].as_u64().unwrap_or(1);
        let status = if min_dec > latest { KeyStatus::Deleted } else { KeyStatus::Active };
        Ok(KmsKeyState::new(status, latest.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciphertext_names_its_version() {
        assert_eq!(version_of("vault:v12:abc").as_deref(), Some("12"));
        assert_eq!(version_of("nope"), None);
        assert!(matches!(map_error(403, "permission denied", "encrypt/k", "k"), KmsError::Refused(m) if m.contains("kms.vault.token_file")));
        assert!(matches!(map_error(429, "rate limit quota exceeded", "rewrap/k", "k"), KmsError::Throttled(_)));
        assert!(matches!(map_error(503, "Vault is sealed", "rewrap/k", "k"), KmsError::Unavailable(_)));
        assert!(matches!(map_error(400, "encryption key not found", "rewrap/k", "k"), KmsError::UnknownKey(_)));
    }
}
