//! IBM Key Protect (API v2): wrap, unwrap and rewrap through
//! `POST /api/v2/keys/{id}/actions/{action}` with the instance id as AAD, key
//! state from `GET /api/v2/keys/{id}/metadata`, authenticated with an IAM token
//! exchanged for the API key and refreshed before it expires. A key id may be a
//! bare key UUID (with `kms.keyprotect.instance_id`) or the key's CRN.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::{engine::general_purpose::STANDARD, Engine};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::governor::{Governed, RemoteLimits};
use super::{Dek, Kms, KmsError, KmsKeyState, Provider};
use crate::config::ConfigError;
use crate::engine::{AdopterState, KeyStatus, Notice, WrappedDek};
use crate::text::percent_encode;

/// The `[kms.keyprotect]` section of the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyProtectConfig {
    /// Regional endpoint, https://<region>.kms.cloud.ibm.com.
    pub endpoint: String,
    /// IBM Cloud IAM, where the API key is exchanged for tokens.
    pub iam_endpoint: String,
    /// Key Protect instance GUID (bluemix-instance) for keys given by bare id;
    /// a key given by CRN carries its own.
    pub instance_id: String,
    /// File holding the IBM Cloud API key of keywarden's service ID.
    pub api_key_file: PathBuf,
    /// Key ring (x-kms-key-ring); empty searches all rings.
    pub key_ring: String,
    /// Registrations ask Key Protect to refuse deleting a key that still protects instances.
    pub prevent_key_deletion: bool,
    /// Prepended to an instance id to form the resource CRN of its registration
    /// (empty when instance ids are CRNs already).
    pub resource_crn_prefix: String,
    pub limits: RemoteLimits,
}

impl Default for KeyProtectConfig {
    fn default() -> Self {
        Self {
            endpoint: "https://us-south.kms.cloud.ibm.com".into(),
            iam_endpoint: "https://iam.cloud.ibm.com".into(),
            instance_id: String::new(),
            api_key_file: PathBuf::new(),
            key_ring: String::new(),
            prevent_key_deletion: false,
            resource_crn_prefix: String::new(),
            limits: RemoteLimits::default(),
        }
    }
}

/// What `kms.default` and routes call this provider.
pub const NAME: &str = "keyprotect";

/// This provider's line in the table of `kms/mod.rs`.
pub static PROVIDER: Provider = Provider { name: NAME, validate: |k| k.keyprotect.validate(k.uses(NAME)), build: |k| build(&k.keyprotect) };

/// Behind its own governor, so that a throttling or failing Key Protect never holds up another KMS.
pub fn build(config: &KeyProtectConfig) -> Result<Arc<dyn Kms>, KmsError> {
    Ok(Arc::new(Governed::new(KeyProtect::new(config)?, config.limits.governor())))
}

impl KeyProtectConfig {
    /// `used`: a route or `kms.default` names keyprotect. Only then is an API
    /// key required, so that a config that leaves Key Protect unused needs none.
    pub fn validate(&self, used: bool) -> Result<(), ConfigError> {
        if used && self.api_key_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid("kms.keyprotect.api_key_file", "", "the path of a file holding an IBM Cloud API key"));
        }
        self.limits.validate("kms.keyprotect.limits")
    }
}

const KEY_ACTION: &str = "application/vnd.ibm.kms.key_action+json";

struct Token {
    value: Zeroizing<String>,
    refresh_at: Instant,
}

pub struct KeyProtect {
    http: reqwest::Client,
    endpoint: String,
    iam_endpoint: String,
    instance_id: String,
    key_ring: String,
    api_key_file: PathBuf,
    prevent_key_deletion: bool,
    resource_crn_prefix: String,
    token: Mutex<Option<Token>>,
}

/// (service instance, key id) of a key given as a CRN or a bare id.
fn locate<'a>(key_id: &'a str, default_instance: &'a str) -> (&'a str, &'a str) {
    // crn:v1:bluemix:public:kms:<region>:a/<account>:<instance>:key:<key id>
    let parts: Vec<&str> = key_id.split(':').collect();
    if parts.len() == 10 && parts[0] == "crn" && parts[8] == "key" {
        return (parts[7], parts[9]);
    }
    (default_instance, key_id)
}

fn kp_state(state: i64) -> KeyStatus {
    match state {
        1 => KeyStatus::Active,
        5 => KeyStatus::Deleted,
        // 0 pre-activation, 2 suspended, 3 deactivated: no wrap is possible.
        _ => KeyStatus::Disabled,
    }
}

impl KeyProtect {
    pub fn new(config: &KeyProtectConfig) -> Result<KeyProtect, KmsError> {
        let http = reqwest::Client::builder()
            .timeout(config.limits.timeout.0)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| KmsError::Setup(format!("key protect http client: {e}")))?;
        if std::fs::metadata(&config.api_key_file).is_err() {
            return Err(KmsError::Setup(format!(
                "cannot read the IBM Cloud API key from {}; check kms.keyprotect.api_key_file",
                config.api_key_file.display()
            )));
        }
        Ok(KeyProtect {
            http,
            endpoint: config.endpoint.trim_end_matches('/').to_string(),
            iam_endpoint: config.iam_endpoint.trim_end_matches('/').to_string(),
            instance_id: config.instance_id.clone(),
            key_ring: config.key_ring.clone(),
            api_key_file: config.api_key_file.clone(),
            prevent_key_deletion: config.prevent_key_deletion,
            resource_crn_prefix: config.resource_crn_prefix.clone(),
            token: Mutex::new(None),
        })
    }

    /// A valid IAM token, exchanged anew when the cached one is within 20% of
    /// its lifetime from expiring (as IBM's SDKs do) or was rejected.
    async fn token(&self, force: bool) -> Result<Zeroizing<String>, KmsError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| !force && Instant::now() < t.refresh_at) {
            return Ok(t.value.clone());
        }
        let api_key = Zeroizing::new(
            std::fs::read_to_string(&self.api_key_file)
                .map_err(|e| KmsError::Setup(format!("cannot read {}: {e}; check kms.keyprotect.api_key_file", self.api_key_file.display())))?
                .trim()
                .to_string(),
        );
        let form = [("grant_type", "urn:ibm:params:oauth:grant-type:apikey"), ("apikey", api_key.as_str())];
        let resp = self
            .http
            .post(format!("{}/identity/token", self.iam_endpoint))
            .header("accept", "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| KmsError::Unavailable(format!("IBM Cloud IAM is unreachable: {e}")))?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status == 400 || status == 401 || status == 403 {
            return Err(KmsError::Refused(format!(
                "IAM API key rejected ({}): check kms.keyprotect.api_key_file",
                body["errorCode"].as_str().unwrap_or("no error code")
            )));
        }
        if status == 429 {
            return Err(KmsError::Throttled("IBM Cloud IAM: 429 too many requests".into()));
        }
        let (Some(access), Some(expires_in)) = (body["access_token"].as_str(), body["expires_in"].as_u64()) else {
            return Err(KmsError::Unavailable(format!("IBM Cloud IAM answered {status} without a token")));
        };
        let value = Zeroizing::new(access.to_string());
        let refresh_at = Instant::now() + Duration::from_secs(expires_in) * 8 / 10;
        *cached = Some(Token { value: value.clone(), refresh_at });
        Ok(value)
    }

    /// A call under the key: `path` follows `/api/v2/keys/{id}`.
    async fn call(&self, method: reqwest::Method, key_id: &str, path: &str, body: Option<Value>) -> Result<Value, KmsError> {
        let (_, key) = locate(key_id, &self.instance_id);
        self.request(method, key_id, &format!("/keys/{key}{path}"), path, body, KEY_ACTION, None).await
    }

    /// Any call on the key's instance: `api_path` follows `/api/v2`.
    #[allow(clippy::too_many_arguments)]
    async fn request(
        &self,
        method: reqwest::Method,
        key_id: &str,
        api_path: &str,
        path: &str,
        body: Option<Value>,
        content_type: &str,
        correlation_id: Option<&str>,
    ) -> Result<Value, KmsError> {
        let (instance, _) = locate(key_id, &self.instance_id);
        let url = format!("{}/api/v2{api_path}", self.endpoint);
        let mut force = false;
        loop {
            let token = self.token(force).await?;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("authorization", format!("Bearer {}", token.as_str()))
                .header("bluemix-instance", instance)
                // Key Protect asks adopters to answer an event under its own id.
                .header("correlation-id", correlation_id.map(str::to_owned).unwrap_or_else(|| uuid::Uuid::new_v4().to_string()))
                .header("accept", "application/json");
            if !self.key_ring.is_empty() {
                req = req.header("x-kms-key-ring", &self.key_ring);
            }
            if let Some(b) = &body {
                req = req.header("content-type", content_type).body(serde_json::to_vec(b).expect("json serializes"));
            }
            let resp = req.send().await.map_err(|e| KmsError::Unavailable(format!("key protect {path} for key {key_id}: {e}")))?;
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            if (200..300).contains(&status) {
                return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
            }
            // An expired or revoked token: exchange the API key once more.
            if status == 401 && !force {
                force = true;
                continue;
            }
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let resource = &v["resources"][0];
            let message = resource["errorMsg"].as_str().unwrap_or(&text).to_string();
            let code = resource["reasons"][0]["code"].as_str().unwrap_or_default().to_string();
            return Err(map_error(status, &code, &message, path, key_id));
        }
    }
}

fn map_error(status: u16, code: &str, message: &str, path: &str, key_id: &str) -> KmsError {
    let what = format!("key protect {path} for key {key_id}: {status} {message}");
    match status {
        401 | 403 => KmsError::Refused(format!(
            "{what}; check that the service-to-service authorization grants keywarden's service the Reader role on this Key Protect instance"
        )),
        404 => KmsError::UnknownKey(key_id.to_string()),
        409 if code == "KEY_ACTION_INVALID_STATE_ERR" || message.contains("not in a valid state") || message.contains("not in an active state") => {
            KmsError::KeyDisabled(key_id.to_string())
        }
        410 => KmsError::KeyDeleted(key_id.to_string()),
        422 if code == "KEY_INVALID_STATE_ERR" => KmsError::KeyDisabled(key_id.to_string()),
        422 => KmsError::Integrity(key_id.to_string()),
        429 => KmsError::Throttled(what),
        s if s >= 500 => KmsError::Unavailable(what),
        _ => KmsError::Refused(what),
    }
}

fn aad(aad: &[u8]) -> Value {
    json!([String::from_utf8_lossy(aad)])
}

fn field_b64(v: &Value, field: &str, key_id: &str) -> Result<Vec<u8>, KmsError> {
    v[field]
        .as_str()
        .and_then(|s| STANDARD.decode(s).ok())
        .ok_or_else(|| KmsError::Unavailable(format!("key protect answered without {field} for key {key_id}")))
}

#[async_trait::async_trait]
impl Kms for KeyProtect {
    fn provider(&self) -> &'static str {
        NAME
    }

    async fn wrap(&self, key_id: &str, dek: &Dek, data: &[u8], _label: Option<&str>) -> Result<WrappedDek, KmsError> {
        let plaintext = Zeroizing::new(STANDARD.encode(dek.expose()));
        let v = self.call(reqwest::Method::POST, key_id, "/actions/wrap", Some(json!({"plaintext": plaintext.as_str(), "aad": aad(data)}))).await?;
        let version = v["keyVersion"]["id"].as_str().unwrap_or_default().to_string();
        Ok(WrappedDek { key_version: version, ciphertext: field_b64(&v, "ciphertext", key_id)? })
    }

    async fn unwrap(&self, key_id: &str, wrapped: &WrappedDek, data: &[u8]) -> Result<Dek, KmsError> {
        let v = self
            .call(reqwest::Method::POST, key_id, "/actions/unwrap", Some(json!({"ciphertext": STANDARD.encode(&wrapped.ciphertext), "aad": aad(data)})))
            .await?;
        let plain = Zeroizing::new(field_b64(&v, "plaintext", key_id)?);
        Dek::from_slice(&plain).ok_or_else(|| KmsError::Integrity(key_id.to_string()))
    }

    async fn rewrap(&self, key_id: &str, wrapped: &WrappedDek, data: &[u8], _label: Option<&str>) -> Result<WrappedDek, KmsError> {
        let v = self
            .call(reqwest::Method::POST, key_id, "/actions/rewrap", Some(json!({"ciphertext": STANDARD.encode(&wrapped.ciphertext), "aad": aad(data)})))
            .await?;
        let version = v["rewrappedKeyVersion"]["id"].as_str().unwrap_or_default().to_string();
        Ok(WrappedDek { key_version: version, ciphertext: field_b64(&v, "ciphertext", key_id)? })
    }

    fn wants_notices(&self, _key_id: &str) -> bool {
        true
    }

    /// Registrations tell Key Protect which resources a key protects (so that it
    /// can warn before deletion); acknowledgements confirm an event was handled.
    async fn notify(&self, key_id: &str, notice: &Notice) -> Result<(), KmsError> {
        let (_, key) = locate(key_id, &self.instance_id);
        let registration = |instance_id: &str| {
            let crn = format!("{}{instance_id}", self.resource_crn_prefix);
            format!("/keys/{key}/registrations/{}", percent_encode(&crn))
        };
        let input = |resource: Value| json!({"metadata": {"collectionType": "application/vnd.ibm.kms.registration_input+json", "collectionTotal": 1}, "resources": [resource]});
        let result = match notice {
            Notice::Registered { instance_id, .. } => {
                let body = input(json!({"description": format!("keywarden instance {instance_id}"), "preventKeyDeletion": self.prevent_key_deletion}));
                self.request(reqwest::Method::POST, key_id, &registration(instance_id), "registrations", Some(body), "application/json", None).await
            }
            Notice::Rewrapped { instance_id, key_version } => {
                let body = input(json!({"keyVersionId": key_version}));
                self.request(reqwest::Method::PATCH, key_id, &registration(instance_id), "registrations", Some(body), "application/json", None).await
            }
            Notice::Deregistered { instance_id } => {
                match self.request(reqwest::Method::DELETE, key_id, &registration(instance_id), "registrations", None, "application/json", None).await {
                    // Already gone (the key was purged, or a retry after a crash).
                    Err(KmsError::UnknownKey(_)) => Ok(Value::Null),
                    other => other,
                }
            }
            Notice::Acknowledge { event_id, state, key_version, at, correlation_id } => {
                let mut resource = json!({"eventId": event_id, "adopterKeyState": state, "timestamp": at.to_rfc3339()});
                if let (AdopterState::Enabled, Some(v)) = (state, key_version) {
                    resource["keyStateData"] = json!({"rewrappedKeyVersion": v});
                }
                let body =
                    json!({"metadata": {"collectionType": "application/vnd.ibm.kms.event_acknowledge+json", "collectionTotal": 1}, "resources": [resource]});
                self.request(reqwest::Method::POST, key_id, "/event_ack", "event_ack", Some(body), "application/json", correlation_id.as_deref()).await
            }
        };
        result.map(|_| ())
    }

    async fn sync(&self, key_id: &str) -> Result<(), KmsError> {
        match self.call(reqwest::Method::POST, key_id, "/actions/sync", None).await {
            Err(KmsError::Refused(m)) if m.contains(" 409 ") => Err(KmsError::Conflict(format!(
                "key protect notified the services of key {key_id} less than an hour ago; sync is allowed once an hour, try again later"
            ))),
            other => other.map(|_| ()),
        }
    }

    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
        let v = self.call(reqwest::Method::GET, key_id, "/metadata", None).await?;
        let r = &v["resources"][0];
        let state = r["state"].as_i64().ok_or_else(|| KmsError::Unavailable(format!("key protect metadata for {key_id} has no state")))?;
        Ok(KmsKeyState { status: kp_state(state), latest_version: r["keyVersion"]["id"].as_str().unwrap_or_default().to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crn_names_its_instance_and_key() {
        let crn = "crn:v1:bluemix:public:kms:us-south:a/acct123:inst-guid:key:key-uuid";
        assert_eq!(locate(crn, "default"), ("inst-guid", "key-uuid"));
        assert_eq!(locate("key-uuid", "default"), ("default", "key-uuid"));
    }

    #[test]
    fn key_protect_states_and_errors_map_to_keywarden() {
        assert_eq!(kp_state(1), KeyStatus::Active);
        assert_eq!(kp_state(2), KeyStatus::Disabled);
        assert_eq!(kp_state(5), KeyStatus::Deleted);
        assert!(matches!(map_error(409, "KEY_ACTION_INVALID_STATE_ERR", "", "/actions/wrap", "k"), KmsError::KeyDisabled(_)));
        assert!(matches!(map_error(429, "", "Too Many Requests", "/actions/rewrap", "k"), KmsError::Throttled(_)));
        assert!(matches!(map_error(404, "KEY_NOT_FOUND_ERR", "", "/metadata", "k"), KmsError::UnknownKey(_)));
        assert!(map_error(403, "", "", "/actions/wrap", "k").to_string().contains("Reader role"));
    }
}
