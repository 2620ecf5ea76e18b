//! IBM Key Protect (API v2): wrap, unwrap and rewrap through
//! `POST /api/v2/keys/{id}/actions/{action}` with the instance id as AAD, key
//! state from `GET /api/v2/keys/{id}/metadata`, authenticated with an IAM token
//! exchanged for the API key and refreshed before it expires. A key id may be a
//! bare key UUID (with `kms.keyprotect.instance_id` and `region`) or the key's
//! CRN, whose region picks the endpoint.
//!
//! Registrations and event acknowledgements are service-to-service calls
//! (`SERVICE_ONLY_ERR` for anyone else, ibm-cloud-docs/key-protect
//! `error-messages.md`): they are sent only with the onboarded service's own
//! credential, `service_api_key_file`, and are off without it.

use std::collections::BTreeMap;
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
use crate::config::{ConfigError, HumanDuration};
use crate::engine::{AdopterState, KeyStatus, Notice, WrappedDek};
use crate::text::percent_encode;

/// The `[kms.keyprotect]` section of the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyProtectConfig {
    /// Endpoint of a key's region: `{region}` is replaced by the region of the
    /// key's CRN (IBM's cheat sheet asks adopters to serve keys from any
    /// region; a key is only known to its own region's endpoint).
    pub endpoint: String,
    /// Region -> endpoint, overriding `endpoint` (private endpoints,
    /// `https://private.<region>.kms.cloud.ibm.com`, or a test double).
    pub endpoints: BTreeMap<String, String>,
    /// Region of keys given by bare id.
    pub region: String,
    /// IBM Cloud IAM, where the API keys are exchanged for tokens.
    pub iam_endpoint: String,
    /// Key Protect instance GUID (bluemix-instance) for keys given by bare id;
    /// a key given by CRN carries its own.
    pub instance_id: String,
    /// File holding the IBM Cloud API key of the customer's service ID that
    /// keywarden wraps and unwraps with (Reader on the Key Protect instance).
    pub api_key_file: PathBuf,
    /// File holding the API key of keywarden's own service, onboarded with IBM:
    /// registrations and event acknowledgements are refused to any other
    /// credential. Empty: neither is sent (`check-config` says so).
    pub service_api_key_file: PathBuf,
    /// Key ring (x-kms-key-ring); empty searches all rings.
    pub key_ring: String,
    /// Registrations ask Key Protect to refuse deleting a key that still protects instances.
    pub prevent_key_deletion: bool,
    /// The resource CRN of an instance's registration. `{instance_id}` is the
    /// instance, `{region}` the key's region; Key Protect requires a CRN that
    /// names at least the service instance (crn:v1:...:<service instance>).
    pub resource_crn_template: String,
    /// An acknowledgement still unsent this long after its event raises an
    /// alert: Key Protect expects one within 4 hours (`dek-rewrapping.md`).
    pub ack_warn_after: HumanDuration,
    pub limits: RemoteLimits,
}

impl Default for KeyProtectConfig {
    fn default() -> Self {
        Self {
            endpoint: "https://{region}.kms.cloud.ibm.com".into(),
            endpoints: BTreeMap::new(),
            region: "us-south".into(),
            iam_endpoint: "https://iam.cloud.ibm.com".into(),
            instance_id: String::new(),
            api_key_file: PathBuf::new(),
            service_api_key_file: PathBuf::new(),
            key_ring: String::new(),
            prevent_key_deletion: false,
            resource_crn_template: String::new(),
            ack_warn_after: HumanDuration(Duration::from_secs(3 * 3600)),
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

/// Key Protect's limit on an AAD string (`aad` of wrap, unwrap and rewrap):
/// the instance id is the AAD, so an instance id must fit.
pub const MAX_AAD: usize = 255;

/// Key Protect's time for an adopter to acknowledge an event (`dek-rewrapping.md`).
const ACK_DEADLINE: Duration = Duration::from_secs(4 * 3600);

impl KeyProtectConfig {
    /// `used`: a route or `kms.default` names keyprotect. Only then is an API
    /// key required, so that a config that leaves Key Protect unused needs none.
    pub fn validate(&self, used: bool) -> Result<(), ConfigError> {
        if used && self.api_key_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid("kms.keyprotect.api_key_file", "", "the path of a file holding an IBM Cloud API key"));
        }
        if !self.endpoint.starts_with("http") {
            return Err(ConfigError::invalid("kms.keyprotect.endpoint", &self.endpoint, "a URL, https://{region}.kms.cloud.ibm.com"));
        }
        if let Some((region, url)) = self.endpoints.iter().find(|(_, u)| !u.starts_with("http")) {
            return Err(ConfigError::invalid("kms.keyprotect.endpoints", url, format!("a URL for region {region}")));
        }
        if self.ack_warn_after.0 >= ACK_DEADLINE {
            return Err(ConfigError::invalid(
                "kms.keyprotect.ack_warn_after",
                humantime::format_duration(self.ack_warn_after.0),
                "less than Key Protect's 4h deadline",
            ));
        }
        if !self.service_api_key_file.as_os_str().is_empty() {
            let t = &self.resource_crn_template;
            let segments = t.split(':').count();
            if !t.starts_with("crn:v1:") || !t.contains("{instance_id}") || segments < 8 {
                return Err(ConfigError::invalid(
                    "kms.keyprotect.resource_crn_template",
                    t,
                    "a resource CRN naming the service instance, with {instance_id}: crn:v1:bluemix:public:<service>:{region}:a/<account>:<service instance>:deployment:{instance_id}",
                ));
            }
        }
        self.limits.validate("kms.keyprotect.limits")
    }

    /// What `check-config` tells an operator about this section.
    pub fn notes(&self, used: bool) -> Vec<String> {
        if used && self.service_api_key_file.as_os_str().is_empty() {
            return vec!["kms.keyprotect.service_api_key_file is not set: keywarden neither registers instances with their Key Protect keys nor acknowledges Key Protect's events (both are service-to-service calls, for services onboarded with IBM)".into()];
        }
        vec![]
    }
}

const KEY_ACTION: &str = "application/vnd.ibm.kms.key_action+json";

struct Token {
    value: Zeroizing<String>,
    refresh_at: Instant,
}

/// One IBM Cloud credential and its cached IAM token.
struct Credential {
    file: PathBuf,
    setting: &'static str,
    token: Mutex<Option<Token>>,
}

pub struct KeyProtect {
    http: reqwest::Client,
    endpoint: String,
    endpoints: BTreeMap<String, String>,
    region: String,
    iam_endpoint: String,
    instance_id: String,
    key_ring: String,
    customer: Credential,
    service: Option<Credential>,
    prevent_key_deletion: bool,
    resource_crn_template: String,
    ack_warn_after: Duration,
}

/// Where a key lives: its region, service instance and key id.
#[derive(Debug, PartialEq, Eq)]
struct Located<'a> {
    region: &'a str,
    instance: &'a str,
    key: &'a str,
}

/// Where a key given as a CRN or a bare id lives.
fn locate<'a>(key_id: &'a str, default_region: &'a str, default_instance: &'a str) -> Located<'a> {
    // crn:v1:bluemix:public:kms:<region>:a/<account>:<instance>:key:<key id>
    let parts: Vec<&str> = key_id.split(':').collect();
    if let [crn, _, _, _, _, region, _, instance, kind, key] = parts.as_slice() {
        if *crn == "crn" && *kind == "key" && !region.is_empty() {
            return Located { region, instance, key };
        }
    }
    Located { region: default_region, instance: default_instance, key: key_id }
}

/// keywarden's view of a key from its metadata, per IBM's key-states table
/// (`concepts/key-states.md`): 1 Active wraps and unwraps; 2 Suspended
/// (disabled) does neither; 3 Deactivated (expired) still unwraps, rewraps and
/// rotates, so its DEKs keep being served; 5 Destroyed is deleted. A deleted
/// key may read Deactivated for a while (`delete-keys.md`), so `deleted` or a
/// `deletionDate` decide before the state number. 0 Pre-activation wraps nothing yet.
fn kp_state(resource: &Value) -> Option<(KeyStatus, bool)> {
    let state = resource["state"].as_i64()?;
    let deleted = resource["deleted"].as_bool() == Some(true) || resource["deletionDate"].as_str().is_some_and(|d| !d.is_empty());
    Some(match state {
        _ if deleted => (KeyStatus::Deleted, false),
        5 => (KeyStatus::Deleted, false),
        1 => (KeyStatus::Active, false),
        3 => (KeyStatus::Active, true),
        _ => (KeyStatus::Disabled, false),
    })
}

/// Key Protect's event ids are UUIDs; ids that keywarden or a producer made
/// (`reconcile:...`, Activity Tracker's `<correlation id>:<action>`) name no
/// event Key Protect could match, so they are not acknowledged.
fn is_key_protect_event_id(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.get_version_num() == 4)
}

/// The correlation id to send: Key Protect asks for a v4 UUID. A producer's
/// own id that is not one is replaced (the log keeps both).
fn v4_correlation(original: Option<&str>) -> String {
    match original {
        Some(c) if uuid::Uuid::parse_str(c).is_ok_and(|u| u.get_version_num() == 4) => c.to_string(),
        Some(c) => {
            let sent = uuid::Uuid::new_v4().to_string();
            tracing::info!(correlation_id = %c, sent_correlation_id = %sent, "the correlation id is not a v4 UUID; Key Protect gets a new one");
            sent
        }
        None => uuid::Uuid::new_v4().to_string(),
    }
}

impl KeyProtect {
    pub fn new(config: &KeyProtectConfig) -> Result<KeyProtect, KmsError> {
        let http = reqwest::Client::builder()
            .timeout(config.limits.timeout.0)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| KmsError::Setup(format!("key protect http client: {e}")))?;
        let credential = |file: &PathBuf, setting: &'static str| -> Result<Credential, KmsError> {
            if std::fs::metadata(file).is_err() {
                return Err(KmsError::Setup(format!("cannot read the IBM Cloud API key from {}; check {setting}", file.display())));
            }
            Ok(Credential { file: file.clone(), setting, token: Mutex::new(None) })
        };
        let service = if config.service_api_key_file.as_os_str().is_empty() {
            None
        } else {
            Some(credential(&config.service_api_key_file, "kms.keyprotect.service_api_key_file")?)
        };
        Ok(KeyProtect {
            http,
            endpoint: config.endpoint.trim_end_matches('/').to_string(),
            endpoints: config.endpoints.iter().map(|(r, u)| (r.clone(), u.trim_end_matches('/').to_string())).collect(),
            region: config.region.clone(),
            iam_endpoint: config.iam_endpoint.trim_end_matches('/').to_string(),
            instance_id: config.instance_id.clone(),
            key_ring: config.key_ring.clone(),
            customer: credential(&config.api_key_file, "kms.keyprotect.api_key_file")?,
            service,
            prevent_key_deletion: config.prevent_key_deletion,
            resource_crn_template: config.resource_crn_template.clone(),
            ack_warn_after: config.ack_warn_after.0,
        })
    }

    fn locate<'a>(&'a self, key_id: &'a str) -> Located<'a> {
        locate(key_id, &self.region, &self.instance_id)
    }

    /// The endpoint serving keys of `region`.
    fn endpoint_of(&self, region: &str) -> String {
        self.endpoints.get(region).cloned().unwrap_or_else(|| self.endpoint.replace("{region}", region))
    }

    /// A valid IAM token, exchanged anew when the cached one is within 20% of
    /// its lifetime from expiring (as IBM's SDKs do) or was rejected.
    async fn token(&self, credential: &Credential, force: bool) -> Result<Zeroizing<String>, KmsError> {
        let mut cached = credential.token.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| !force && Instant::now() < t.refresh_at) {
            return Ok(t.value.clone());
        }
        let file = credential.file.clone();
        let api_key = tokio::task::spawn_blocking(move || std::fs::read_to_string(&file))
            .await
            .map_err(|e| KmsError::Setup(format!("reading the IBM Cloud API key: {e}")))?
            .map_err(|e| KmsError::Setup(format!("cannot read {}: {e}; check {}", credential.file.display(), credential.setting)))?;
        let api_key = Zeroizing::new(api_key.trim().to_string());
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
                "IAM API key rejected ({}): check {}",
                body["errorCode"].as_str().unwrap_or("no error code"),
                credential.setting
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
        let key = self.locate(key_id).key;
        self.request(&self.customer, method, key_id, &format!("/keys/{key}{path}"), path, body, KEY_ACTION, None).await
    }

    /// Any call on the key's instance: `api_path` follows `/api/v2`.
    #[allow(clippy::too_many_arguments)]
    async fn request(
        &self,
        credential: &Credential,
        method: reqwest::Method,
        key_id: &str,
        api_path: &str,
        path: &str,
        body: Option<Value>,
        content_type: &str,
        correlation_id: Option<&str>,
    ) -> Result<Value, KmsError> {
        let at = self.locate(key_id);
        let url = format!("{}/api/v2{api_path}", self.endpoint_of(at.region));
        let correlation = v4_correlation(correlation_id);
        let body = match &body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| KmsError::Setup(format!("key protect request body: {e}")))?),
            None => None,
        };
        let mut force = false;
        loop {
            let token = self.token(credential, force).await?;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("authorization", format!("Bearer {}", token.as_str()))
                .header("bluemix-instance", at.instance)
                .header("correlation-id", &correlation)
                .header("accept", "application/json");
            if !self.key_ring.is_empty() {
                req = req.header("x-kms-key-ring", &self.key_ring);
            }
            if let Some(b) = &body {
                req = req.header("content-type", content_type).body(b.clone());
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

    /// The resource CRN that registers `instance_id` under a key of `region`.
    fn resource_crn(&self, instance_id: &str, region: &str) -> String {
        self.resource_crn_template.replace("{region}", region).replace("{instance_id}", instance_id)
    }
}

fn map_error(status: u16, code: &str, message: &str, path: &str, key_id: &str) -> KmsError {
    let what = format!("key protect {path} for key {key_id}: {status} {message}");
    match status {
        403 if code == "SERVICE_ONLY_ERR" => KmsError::Refused(format!(
            "{what}; registrations and acknowledgements are service-to-service calls: set kms.keyprotect.service_api_key_file to the API key of a service onboarded with IBM"
        )),
        401 | 403 => KmsError::Refused(format!(
            "{what}; check that the service-to-service authorization grants keywarden's service the Reader role on this Key Protect instance"
        )),
        // Key Protect's own 404 (with its reason code): a key it does not know,
        // or one purged (`delete-purge-keys.md`: every call on a purged key is
        // a 404). A 404 without the envelope comes from something else on the way.
        404 if code == "KEY_NOT_FOUND_ERR" => KmsError::UnknownKey(key_id.to_string()),
        404 => KmsError::Unavailable(format!("{what}; the answer is not Key Protect's: check kms.keyprotect.endpoint and endpoints")),
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
        if data.len() > MAX_AAD {
            return Err(KmsError::Refused(format!(
                "key protect takes additional authenticated data of at most {MAX_AAD} characters, and the instance id is {}; use a shorter instance id",
                data.len()
            )));
        }
        let plaintext = Zeroizing::new(STANDARD.encode(dek.expose()));
        let v = match self.call(reqwest::Method::POST, key_id, "/actions/wrap", Some(json!({"plaintext": plaintext.as_str(), "aad": aad(data)}))).await {
            // Deactivated refuses wrap like Suspended does; say which it is.
            Err(KmsError::KeyDisabled(_)) if self.key_state(key_id).await.is_ok_and(|s| s.expired) => {
                return Err(KmsError::Conflict(format!(
                    "key {key_id} has passed its expiration date (Key Protect: Deactivated): its DEKs are still served, but nothing new can be wrapped under it; create the instance under another key"
                )))
            }
            other => other?,
        };
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

    /// Only with the service credential: Key Protect refuses registrations
    /// and acknowledgements to any other.
    fn wants_notices(&self, _key_id: &str) -> bool {
        self.service.is_some()
    }

    fn notice_deadline(&self, _key_id: &str) -> Option<super::NoticeDeadline> {
        self.service.as_ref().map(|_| super::NoticeDeadline { deadline: ACK_DEADLINE, warn_after: self.ack_warn_after })
    }

    /// Registrations tell Key Protect which resources a key protects (so that it
    /// can warn before deletion); acknowledgements confirm an event was handled.
    async fn notify(&self, key_id: &str, notice: &Notice) -> Result<(), KmsError> {
        let Some(service) = &self.service else { return Ok(()) };
        let at = self.locate(key_id);
        let registration = |instance_id: &str| format!("/keys/{}/registrations/{}", at.key, percent_encode(&self.resource_crn(instance_id, at.region)));
        let input = |resource: Value| json!({"metadata": {"collectionType": "application/vnd.ibm.kms.registration_input+json", "collectionTotal": 1}, "resources": [resource]});
        let send = |method: reqwest::Method, api_path: String, what: &'static str, body: Option<Value>, correlation: Option<String>| async move {
            self.request(service, method, key_id, &api_path, what, body, "application/json", correlation.as_deref()).await
        };
        let result = match notice {
            Notice::Registered { instance_id, .. } => {
                let body = input(json!({"description": format!("keywarden instance {instance_id}"), "preventKeyDeletion": self.prevent_key_deletion}));
                send(reqwest::Method::POST, registration(instance_id), "registrations", Some(body), None).await
            }
            Notice::Rewrapped { instance_id, key_version } => {
                let body = input(json!({"keyVersionId": key_version}));
                send(reqwest::Method::PATCH, registration(instance_id), "registrations", Some(body), None).await
            }
            Notice::Deregistered { instance_id } => match send(reqwest::Method::DELETE, registration(instance_id), "registrations", None, None).await {
                // Already gone (the key was purged, or a retry after a crash).
                Err(KmsError::UnknownKey(_)) => Ok(Value::Null),
                // Key Protect deletes registrations only while the key is active
                // or suspended (`key-registration.md`); a deleted key's go with its purge.
                Err(KmsError::KeyDisabled(_) | KmsError::KeyDeleted(_)) => {
                    tracing::info!(%key_id, %instance_id, "the key no longer allows deleting its registration; Key Protect removes it with the key");
                    Ok(Value::Null)
                }
                other => other,
            },
            Notice::Acknowledge { event_id, .. } if !is_key_protect_event_id(event_id) => {
                tracing::debug!(%key_id, %event_id, "not acknowledged: the event does not carry a Key Protect event id");
                Ok(Value::Null)
            }
            Notice::Acknowledge { event_id, state, key_version, at, correlation_id } => {
                let mut resource = json!({"eventId": event_id, "adopterKeyState": state, "timestamp": at.to_rfc3339()});
                if let (AdopterState::Enabled, Some(v)) = (state, key_version) {
                    resource["keyStateData"] = json!({"rewrappedKeyVersion": v});
                }
                let body =
                    json!({"metadata": {"collectionType": "application/vnd.ibm.kms.event_acknowledge+json", "collectionTotal": 1}, "resources": [resource]});
                send(reqwest::Method::POST, "/event_ack".into(), "event_ack", Some(body), correlation_id.clone()).await
            }
        };
        result.map(|_| ())
    }

    async fn sync(&self, key_id: &str) -> Result<(), KmsError> {
        match self.call(reqwest::Method::POST, key_id, "/actions/sync", None).await {
            Err(KmsError::Refused(m)) if m.contains(" 409 ") => Err(KmsError::Conflict(format!(
                "key protect notified the services of key {key_id} less than an hour ago, or the key changed within the hour; sync is allowed once an hour, try again later"
            ))),
            Err(KmsError::KeyDisabled(_)) => Err(KmsError::Conflict(format!(
                "key protect notified the services of key {key_id} less than an hour ago, or the key changed within the hour; sync is allowed once an hour, try again later"
            ))),
            other => other.map(|_| ()),
        }
    }

    /// A purged key answers every call with Key Protect's 404: its material is
    /// destroyed, which is a state, not an outage.
    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
        let v = match self.call(reqwest::Method::GET, key_id, "/metadata", None).await {
            Ok(v) => v,
            Err(KmsError::UnknownKey(_)) => {
                return Ok(KmsKeyState { status: KeyStatus::Deleted, latest_version: String::new(), expired: false, material_destroyed: true })
            }
            Err(e) => return Err(e),
        };
        let r = &v["resources"][0];
        let (status, expired) = kp_state(r).ok_or_else(|| KmsError::Unavailable(format!("key protect metadata for {key_id} has no state")))?;
        Ok(KmsKeyState { status, latest_version: r["keyVersion"]["id"].as_str().unwrap_or_default().to_string(), expired, material_destroyed: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crn_names_its_instance_and_key() {
        let crn = "crn:v1:bluemix:public:kms:us-south:a/acct123:inst-guid:key:key-uuid";
        assert_eq!(locate(crn, "eu-de", "default"), Located { region: "us-south", instance: "inst-guid", key: "key-uuid" });
        assert_eq!(locate("key-uuid", "eu-de", "default"), Located { region: "eu-de", instance: "default", key: "key-uuid" });
    }

    #[test]
    fn key_protect_states_and_errors_map_to_keywarden() {
        let state = |v: Value| kp_state(&v);
        assert_eq!(state(json!({"state": 1})), Some((KeyStatus::Active, false)));
        assert_eq!(state(json!({"state": 2})), Some((KeyStatus::Disabled, false)));
        // Expired keys still unwrap and rewrap (key-states.md): served, flagged.
        assert_eq!(state(json!({"state": 3, "deleted": false})), Some((KeyStatus::Active, true)));
        // A deleted key may still read Deactivated (delete-keys.md).
        assert_eq!(state(json!({"state": 3, "deleted": true})), Some((KeyStatus::Deleted, false)));
        assert_eq!(state(json!({"state": 3, "deletionDate": "2026-12-01T00:00:00Z"})), Some((KeyStatus::Deleted, false)));
        assert_eq!(state(json!({"state": 5})), Some((KeyStatus::Deleted, false)));
        assert_eq!(state(json!({})), None);
        assert!(matches!(map_error(409, "KEY_ACTION_INVALID_STATE_ERR", "", "/actions/wrap", "k"), KmsError::KeyDisabled(_)));
        assert!(matches!(map_error(429, "", "Too Many Requests", "/actions/rewrap", "k"), KmsError::Throttled(_)));
        assert!(matches!(map_error(404, "KEY_NOT_FOUND_ERR", "", "/metadata", "k"), KmsError::UnknownKey(_)));
        assert!(matches!(map_error(404, "", "<html>", "/metadata", "k"), KmsError::Unavailable(_)), "a 404 that is not Key Protect's is not a purge");
        assert!(map_error(403, "SERVICE_ONLY_ERR", "", "event_ack", "k").to_string().contains("service_api_key_file"));
        assert!(map_error(403, "", "", "/actions/wrap", "k").to_string().contains("Reader role"));
    }

    #[test]
    fn only_key_protect_event_ids_are_acknowledged_and_correlation_ids_are_v4() {
        assert!(is_key_protect_event_id("a3afd231-f9d3-4f95-afc5-fc84389fffff"));
        assert!(!is_key_protect_event_id("reconcile:crn:v1:x:disable:1"));
        assert!(!is_key_protect_event_id("8c2b1a4e-3f5d-4e8a-9b7c-1d2e3f4a5b6c:kms.secrets.disable"));
        let kept = "8c2b1a4e-3f5d-4e8a-9b7c-1d2e3f4a5b6c";
        assert_eq!(v4_correlation(Some(kept)), kept);
        for original in [Some("corr-at-2"), Some("reconcile-1"), None] {
            let sent = v4_correlation(original);
            assert_eq!(uuid::Uuid::parse_str(&sent).unwrap().get_version_num(), 4, "{original:?} -> {sent}");
        }
    }

    #[test]
    fn each_region_has_its_endpoint_and_registrations_name_a_crn() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "x").unwrap();
        let mut config = KeyProtectConfig { api_key_file: key.clone(), ..Default::default() };
        config.endpoints.insert("eu-de".into(), "https://private.eu-de.kms.cloud.ibm.com/".into());
        let kp = KeyProtect::new(&config).unwrap();
        assert_eq!(kp.endpoint_of("us-east"), "https://us-east.kms.cloud.ibm.com");
        assert_eq!(kp.endpoint_of("eu-de"), "https://private.eu-de.kms.cloud.ibm.com");
        assert!(!kp.wants_notices("k"), "no service credential: no registrations, no acknowledgements");
        config.service_api_key_file = key;
        assert!(config.validate(true).unwrap_err().to_string().contains("resource_crn_template"));
        config.resource_crn_template = "crn:v1:bluemix:public:databases-for-mysql:{region}:a/acct:svc-instance:deployment:{instance_id}".into();
        config.validate(true).unwrap();
        assert!(config.notes(true).is_empty());
        let kp = KeyProtect::new(&config).unwrap();
        assert!(kp.wants_notices("k"));
        assert_eq!(kp.resource_crn("db-1", "eu-de"), "crn:v1:bluemix:public:databases-for-mysql:eu-de:a/acct:svc-instance:deployment:db-1");
        assert!(KeyProtectConfig { api_key_file: "x".into(), ..Default::default() }.notes(true)[0].contains("service_api_key_file is not set"));
    }
}
