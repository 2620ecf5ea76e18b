//! A Key Protect double, written from IBM's documentation and judged by IBM's
//! own Python client (`tests/keyprotect_conformance.rs`), not by keywarden.
//!
//! Sources, cited at each rule as `[page]`:
//! - `[key-states]`: ibm-cloud-docs/key-protect `concepts/key-states.md` (the
//!   table of actions allowed per state);
//! - `[delete-purge]`: `delete-purge-keys.md` (restore for 30 days, purge four
//!   hours after deletion, then 404 for every call);
//! - `[sync]`: `integrations/sync-resources.md` (409 within an hour of the last
//!   sync or lifecycle action);
//! - `[errors]`: `error-messages.md` (the envelope, the reason codes and their
//!   statuses, the 30 seconds between an action and an enable or restore,
//!   service-to-service only actions);
//! - `[registration]`: `internal/key-registration.md` at 57f478d^ (registration
//!   actions allowed per key state);
//! - `[rewrap]`: `internal/dek-rewrapping.md` at 57f478d^ (the event_ack body);
//! - `[api-cli]`: `internal/api-cli.md` at 57f478d^ (event_ack and
//!   registrations are service-to-service calls; `keyStateData.keyVersion`);
//! - `[iam]`: https://cloud.ibm.com/docs/account?topic=account-iamtoken_from_apikey
//!   (form exchange; tokens are JWTs whose `exp` and `iat` IBM's SDK core reads);
//! - `[python]`: PyPI `keyprotect` 3.0.1 (per-action content types, or none for
//!   enable, disable and sync) and IBM/keyprotect-go-client (`/oidc/token`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::RngCore;
use serde_json::{json, Value};

/// The API key of a customer's service ID: key actions, no service-to-service calls.
pub const API_KEY: &str = "keywarden-service-id-api-key";
/// The API key of a service onboarded with IBM: registrations and event_ack too.
pub const SERVICE_API_KEY: &str = "keywarden-onboarded-service-api-key";
pub const INSTANCE: &str = "7d2a5c47-instance";
pub const ACCOUNT: &str = "acct";

pub struct RootKey {
    pub state: i64,
    /// (version id, material), oldest first.
    pub versions: Vec<(String, [u8; 32])>,
    pub deletion_date: Option<chrono::DateTime<chrono::Utc>>,
    /// When the last lifecycle action happened, for [sync] and [errors] 26.
    pub last_action: Option<Instant>,
    pub last_sync: Option<Instant>,
    pub name: String,
}

struct Token {
    expires: Instant,
    service: bool,
}

pub struct Inner {
    pub region: String,
    /// IAM is global: doubles of several regions share one token registry.
    tokens: Arc<Mutex<HashMap<String, Token>>>,
    pub token_lifetime: Mutex<Duration>,
    pub exchanges: AtomicUsize,
    pub keys: Mutex<HashMap<String, RootKey>>,
    /// Key ids purged: every call on them answers 404 [delete-purge].
    pub purged: Mutex<Vec<String>>,
    pub throttle_next: AtomicUsize,
    /// Throttle only event_ack calls for this key id (the 429 burst test).
    pub throttle_acks_of: Mutex<Option<(String, usize)>>,
    pub fail_next: AtomicUsize,
    /// Instances (by AAD) whose rewraps are refused as Key Protect refuses a
    /// ciphertext it cannot open (422 [errors]): a fault a test injects.
    pub refuse_rewraps_of: Mutex<Vec<String>>,
    pub rewraps: AtomicUsize,
    /// (key id, resource CRN) -> registered key version, if updated.
    pub registrations: Mutex<HashMap<(String, String), Option<String>>>,
    /// Acks accepted, as sent.
    pub acks: Mutex<Vec<Value>>,
    /// Every request refused, as "METHOD path: status reason", so that a test
    /// can say which documented request was refused.
    pub refusals: Mutex<Vec<String>>,
    /// Event ids issued to registered services: (event id, key id, action).
    pub events: Mutex<Vec<(String, String, String)>>,
    /// [errors] 26: 30 seconds between an action and an enable or restore.
    pub action_gap: Mutex<Duration>,
    /// [delete-purge]: a purge four hours after deletion.
    pub purge_wait: Mutex<chrono::Duration>,
}

#[derive(Clone)]
pub struct KeyProtectDouble {
    pub kp: Arc<Inner>,
    pub url: String,
}

type S = State<Arc<Inner>>;

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

/// [errors]: every error is this collection, with a reason code where one is documented.
fn kp_error(status: StatusCode, code: &str, msg: &str) -> Response {
    let mut resource = json!({ "errorMsg": msg });
    if !code.is_empty() {
        resource["reasons"] = json!([{ "code": code, "message": msg, "status": status.as_u16(), "moreInfo": "https://cloud.ibm.com/apidocs/key-protect" }]);
    }
    (status, Json(json!({ "metadata": { "collectionType": "application/vnd.ibm.kms.error+json", "collectionTotal": 1 }, "resources": [resource] })))
        .into_response()
}

fn not_found() -> Response {
    kp_error(StatusCode::NOT_FOUND, "KEY_NOT_FOUND_ERR", "Not Found: Key could not be retrieved: Please see 'reasons' for more details (KEY_NOT_FOUND_ERR)")
}

fn invalid_state() -> Response {
    kp_error(StatusCode::CONFLICT, "KEY_ACTION_INVALID_STATE_ERR", "Conflict: Key is not in a valid state")
}

fn jwt(lifetime: Duration, service: bool) -> String {
    let iat = now().timestamp();
    let header = URL_SAFE_NO_PAD.encode(br#"{"kid":"20261201","alg":"RS256","typ":"JWT"}"#);
    let sub = if service { "crn-onboarded-service" } else { "ServiceId-keywarden" };
    let payload = URL_SAFE_NO_PAD.encode(
        json!({"iam_id": format!("iam-{sub}"), "id": format!("iam-{sub}"), "sub": sub, "sub_type": "ServiceId", "account": {"bss": ACCOUNT},
            "iat": iat, "exp": iat + lifetime.as_secs() as i64, "iss": "https://iam.cloud.ibm.com/identity", "grant_type": "urn:ibm:params:oauth:grant-type:apikey",
            "scope": "ibm openid", "client_id": "default", "jti": uuid::Uuid::new_v4().to_string()})
        .to_string(),
    );
    let mut sig = [0u8; 64];
    rand::rngs::OsRng.fill_bytes(&mut sig);
    format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// [iam]: `grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey=...`, at
/// `/identity/token` (IBM's Python and Java SDK cores) or `/oidc/token` (the Go client).
async fn token(State(kp): S, Form(form): Form<HashMap<String, String>>) -> Response {
    let service = match form.get("apikey").map(String::as_str) {
        Some(API_KEY) => false,
        Some(SERVICE_API_KEY) => true,
        _ => {
            return (StatusCode::BAD_REQUEST, Json(json!({"errorCode": "BXNIM0415E", "errorMessage": "Provided API key could not be found."}))).into_response()
        }
    };
    if form.get("grant_type").map(String::as_str) != Some("urn:ibm:params:oauth:grant-type:apikey") {
        return (StatusCode::BAD_REQUEST, Json(json!({"errorCode": "BXNIM0103E", "errorMessage": "Unsupported grant type."}))).into_response();
    }
    kp.exchanges.fetch_add(1, Ordering::SeqCst);
    let lifetime = *kp.token_lifetime.lock().unwrap();
    let token = jwt(lifetime, service);
    kp.tokens.lock().unwrap().insert(token.clone(), Token { expires: Instant::now() + lifetime, service });
    Json(json!({"access_token": token, "refresh_token": "not_supported", "token_type": "Bearer",
        "expires_in": lifetime.as_secs(), "expiration": now().timestamp() + lifetime.as_secs() as i64, "scope": "ibm openid"}))
    .into_response()
}

impl Inner {
    fn refuse(&self, what: &str, r: Response) -> Response {
        self.refusals.lock().unwrap().push(format!("{what}: {}", r.status()));
        r
    }

    /// The bearer token and the instance; `Ok(service)` says whether the
    /// caller holds a service-to-service token. Injected throttling and
    /// failures come after authentication, as the service's would.
    // The refusal is the HTTP answer itself, returned as is by every handler.
    #[allow(clippy::result_large_err)]
    fn check(&self, headers: &HeaderMap, what: &str) -> Result<bool, Response> {
        let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
        let service = self.tokens.lock().unwrap().get(bearer).filter(|t| t.expires > Instant::now()).map(|t| t.service);
        let instance = headers.get("bluemix-instance").and_then(|v| v.to_str().ok());
        let Some(service) = service.filter(|_| instance == Some(INSTANCE)) else {
            return Err(self.refuse(what, kp_error(StatusCode::UNAUTHORIZED, "", "Unauthorized: The user does not have access to the specified resource")));
        };
        if self.throttle_next.load(Ordering::SeqCst) > 0 {
            self.throttle_next.fetch_sub(1, Ordering::SeqCst);
            return Err(kp_error(StatusCode::TOO_MANY_REQUESTS, "", "Too Many Requests: Please wait a few minutes and try again."));
        }
        if self.fail_next.load(Ordering::SeqCst) > 0 {
            self.fail_next.fetch_sub(1, Ordering::SeqCst);
            return Err(kp_error(StatusCode::SERVICE_UNAVAILABLE, "", "Service Unavailable"));
        }
        Ok(service)
    }

    fn is_purged(&self, id: &str) -> bool {
        self.purged.lock().unwrap().iter().any(|p| p == id)
    }

    /// A lifecycle action notifies the registered services under an event id
    /// of Key Protect's own, which is the only one event_ack accepts [rewrap].
    fn issue_event(&self, key: &str, action: &str) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.events.lock().unwrap().push((id.clone(), key.to_string(), action.to_string()));
        id
    }

    fn crn(&self, id: &str) -> String {
        format!("crn:v1:bluemix:public:kms:{}:a/{ACCOUNT}:{INSTANCE}:key:{id}", self.region)
    }

    fn representation(&self, id: &str, key: &RootKey) -> Value {
        let (vid, _) = key.versions.last().expect("a key has a version");
        let mut r = json!({"type": "application/vnd.ibm.kms.key+json", "id": id, "name": key.name, "state": key.state, "extractable": false,
            "crn": self.crn(id), "keyRingID": "default", "creationDate": "2026-11-27T00:00:00Z", "lastUpdateDate": now().to_rfc3339(),
            "keyVersion": {"id": vid, "creationDate": "2026-11-27T00:00:00Z"}, "deleted": key.state == 5, "dualAuthDelete": {"enabled": false}});
        if let Some(d) = key.deletion_date {
            r["deletionDate"] = json!(d.to_rfc3339());
        }
        r
    }
}

fn collection(kind: &str, resources: Vec<Value>) -> Value {
    json!({"metadata": {"collectionType": kind, "collectionTotal": resources.len()}, "resources": resources})
}

fn seal(material: &[u8; 32], plain: &[u8], aad: &str) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = Aes256Gcm::new_from_slice(material).unwrap().encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad: aad.as_bytes() }).unwrap();
    [nonce.to_vec(), ct].concat()
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get("content-type").and_then(|v| v.to_str().ok()).map(|v| v.split(';').next().unwrap_or_default().trim())
}

/// [python], [api-cli]: the generic key_action type, the per-action types
/// IBM's Python and Java clients send, plain JSON, or none (the Go client;
/// the Python client for enable, disable and sync, which have no body).
fn action_type_ok(headers: &HeaderMap, action: &str) -> bool {
    match content_type(headers) {
        None => true,
        Some("application/json" | "application/vnd.ibm.kms.key_action+json") => true,
        Some(t) => t == format!("application/vnd.ibm.kms.key_action_{}+json", action.to_ascii_lowercase()),
    }
}

/// `POST /api/v2/keys`: create a root key (no material: Key Protect generates it).
async fn create(State(kp): S, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(r) = kp.check(&headers, "POST /keys") {
        return r;
    }
    if !matches!(content_type(&headers), Some("application/vnd.ibm.kms.key+json" | "application/json")) {
        return kp
            .refuse("POST /keys", kp_error(StatusCode::BAD_REQUEST, "BAD_BODY_ERR", "Bad Request: content-type must be application/vnd.ibm.kms.key+json"));
    }
    let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(name) = b["resources"][0]["name"].as_str() else {
        return kp.refuse("POST /keys", kp_error(StatusCode::BAD_REQUEST, "BAD_BODY_ERR", "Bad Request: resources[0].name is required"));
    };
    let id = uuid::Uuid::new_v4().to_string();
    let mut m = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut m);
    let key =
        RootKey { state: 1, versions: vec![(uuid::Uuid::new_v4().to_string(), m)], deletion_date: None, last_action: None, last_sync: None, name: name.into() };
    let r = kp.representation(&id, &key);
    kp.keys.lock().unwrap().insert(id, key);
    (StatusCode::CREATED, Json(collection("application/vnd.ibm.kms.key+json", vec![r]))).into_response()
}

/// `GET /api/v2/keys/{id}` and `.../metadata`: allowed in every state [key-states].
async fn metadata(State(kp): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = kp.check(&headers, "GET /keys/{id}") {
        return r;
    }
    let keys = kp.keys.lock().unwrap();
    match keys.get(&id) {
        Some(key) if !kp.is_purged(&id) => Json(collection("application/vnd.ibm.kms.key+json", vec![kp.representation(&id, key)])).into_response(),
        _ => kp.refuse("GET /keys/{id}", not_found()),
    }
}

/// `DELETE /api/v2/keys/{id}`: Active, Suspended or Deactivated [key-states].
async fn delete(State(kp): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = kp.check(&headers, "DELETE /keys/{id}") {
        return r;
    }
    let mut keys = kp.keys.lock().unwrap();
    let Some(key) = keys.get_mut(&id).filter(|_| !kp.is_purged(&id)) else { return kp.refuse("DELETE /keys/{id}", not_found()) };
    if key.state == 5 {
        return kp.refuse(
            "DELETE /keys/{id}",
            kp_error(StatusCode::GONE, "KEY_DELETED_ERR", "Gone: Key has already been deleted: Please delete references to this key"),
        );
    }
    key.state = 5;
    key.deletion_date = Some(now());
    key.last_action = Some(Instant::now());
    let r = kp.representation(&id, key);
    drop(keys);
    kp.issue_event(&id, "delete");
    if headers.get("prefer").and_then(|v| v.to_str().ok()) == Some("return=representation") {
        return Json(collection("application/vnd.ibm.kms.key+json", vec![r])).into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

/// `DELETE /api/v2/keys/{id}/purge`: four hours after deletion, then every
/// call on the key answers 404 [delete-purge].
async fn purge(State(kp): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = kp.check(&headers, "DELETE /keys/{id}/purge") {
        return r;
    }
    let wait = *kp.purge_wait.lock().unwrap();
    let keys = kp.keys.lock().unwrap();
    let Some(key) = keys.get(&id).filter(|_| !kp.is_purged(&id)) else { return kp.refuse("purge", not_found()) };
    if key.state != 5 || key.deletion_date.is_some_and(|d| d + wait > now()) {
        return kp
            .refuse("purge", kp_error(StatusCode::CONFLICT, "KEY_ACTION_INVALID_STATE_ERR", "Conflict: a key can be purged four hours after it was deleted"));
    }
    drop(keys);
    kp.purged.lock().unwrap().push(id.clone());
    kp.issue_event(&id, "purge");
    StatusCode::NO_CONTENT.into_response()
}

/// `POST /api/v2/keys/{id}/restore`: Destroyed keys, for 30 days [key-states],
/// [delete-purge]; not within 30 seconds of the last action [errors] 26.
async fn restore(State(kp): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = kp.check(&headers, "POST /keys/{id}/restore") {
        return r;
    }
    let gap = *kp.action_gap.lock().unwrap();
    let mut keys = kp.keys.lock().unwrap();
    let Some(key) = keys.get_mut(&id).filter(|_| !kp.is_purged(&id)) else { return kp.refuse("restore", not_found()) };
    if key.state != 5 {
        return kp.refuse("restore", invalid_state());
    }
    if key.deletion_date.is_some_and(|d| d + chrono::Duration::days(30) < now()) {
        return kp.refuse("restore", kp_error(StatusCode::GONE, "KEY_RESTORE_EXPIRED", "Gone: Key restoration has expired"));
    }
    if key.last_action.is_some_and(|t| t.elapsed() < gap) {
        return kp.refuse("restore", kp_error(StatusCode::CONFLICT, "REQ_TOO_EARLY_ERR", "Conflict: The key was updated recently: Please wait and try again"));
    }
    key.state = 1;
    key.deletion_date = None;
    key.last_action = Some(Instant::now());
    let r = kp.representation(&id, key);
    drop(keys);
    kp.issue_event(&id, "restore");
    (StatusCode::CREATED, Json(collection("application/vnd.ibm.kms.key+json", vec![r]))).into_response()
}

/// `POST /api/v2/keys/{id}/actions/{action}`, and the older
/// `POST /api/v2/keys/{id}?action=` form the Go client can send.
async fn action_query(kp: S, headers: HeaderMap, Path(id): Path<String>, Query(q): Query<HashMap<String, String>>, body: axum::body::Bytes) -> Response {
    let name = q.get("action").cloned().unwrap_or_default();
    action(kp, headers, Path((id, name)), body).await
}

async fn action(State(kp): S, headers: HeaderMap, Path((id, action)): Path<(String, String)>, body: axum::body::Bytes) -> Response {
    let what = format!("POST /keys/{{id}}/actions/{action}");
    if let Err(r) = kp.check(&headers, &what) {
        return r;
    }
    if !action_type_ok(&headers, &action) {
        return kp.refuse(&what, kp_error(StatusCode::BAD_REQUEST, "BAD_BODY_ERR", "Bad Request: unsupported content-type for this action"));
    }
    let b: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
    let gap = *kp.action_gap.lock().unwrap();
    let mut keys = kp.keys.lock().unwrap();
    let Some(key) = keys.get_mut(&id).filter(|_| !kp.is_purged(&id)) else { return kp.refuse(&what, not_found()) };
    // [key-states]: which actions each state allows. A Destroyed key answers
    // 410 to crypto actions [errors] 7.
    let allowed: &[i64] = match action.as_str() {
        "wrap" | "disable" => &[1],
        "unwrap" | "rewrap" | "rotate" => &[1, 3],
        "enable" => &[2],
        "sync" => &[1, 2, 3, 5],
        "setKeyForDeletion" | "unsetKeyForDeletion" => &[1, 2, 3],
        _ => return kp.refuse(&what, kp_error(StatusCode::BAD_REQUEST, "INVALID_QUERY_PARAM_ERR", "Bad Request: unknown action")),
    };
    if !allowed.contains(&key.state) {
        if key.state == 5 {
            return kp.refuse(&what, kp_error(StatusCode::GONE, "KEY_DELETED_ERR", "Gone: Key has already been deleted: Please delete references to this key"));
        }
        return kp.refuse(&what, invalid_state());
    }
    let aad = b["aad"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\u{0}")).unwrap_or_default();
    let lifecycle = |key: &mut RootKey| key.last_action = Some(Instant::now());
    match action.as_str() {
        // [sync]: 409 within an hour of the last sync or of any lifecycle action.
        "sync" => {
            let recent = |t: Option<Instant>| t.is_some_and(|t| t.elapsed() < Duration::from_secs(3600));
            if recent(key.last_sync) || recent(key.last_action) {
                return kp
                    .refuse(&what, kp_error(StatusCode::CONFLICT, "REQ_TOO_EARLY_ERR", "Conflict: The key was updated recently: Please wait and try again"));
            }
            key.last_sync = Some(Instant::now());
            StatusCode::NO_CONTENT.into_response()
        }
        "disable" => {
            key.state = 2;
            lifecycle(key);
            drop(keys);
            kp.issue_event(&id, "disable");
            StatusCode::NO_CONTENT.into_response()
        }
        "enable" => {
            if key.last_action.is_some_and(|t| t.elapsed() < gap) {
                return kp
                    .refuse(&what, kp_error(StatusCode::CONFLICT, "REQ_TOO_EARLY_ERR", "Conflict: The key was updated recently: Please wait and try again"));
            }
            key.state = 1;
            lifecycle(key);
            drop(keys);
            kp.issue_event(&id, "enable");
            StatusCode::NO_CONTENT.into_response()
        }
        "rotate" => {
            let mut m = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut m);
            key.versions.push((uuid::Uuid::new_v4().to_string(), m));
            lifecycle(key);
            drop(keys);
            kp.issue_event(&id, "rotate");
            StatusCode::NO_CONTENT.into_response()
        }
        "setKeyForDeletion" | "unsetKeyForDeletion" => StatusCode::NO_CONTENT.into_response(),
        _ => {
            let (latest_id, latest) = key.versions.last().expect("a key has a version").clone();
            let open = |ciphertext: &str| -> Option<(String, Vec<u8>)> {
                let raw = STANDARD.decode(ciphertext).ok()?;
                if raw.len() < 36 + 12 {
                    return None;
                }
                let (vid, rest) = raw.split_at(36);
                let vid = String::from_utf8(vid.to_vec()).ok()?;
                let (_, material) = key.versions.iter().find(|(v, _)| *v == vid)?;
                let plain = Aes256Gcm::new_from_slice(material)
                    .ok()?
                    .decrypt(Nonce::from_slice(&rest[..12]), Payload { msg: &rest[12..], aad: aad.as_bytes() })
                    .ok()?;
                Some((vid, plain))
            };
            let wrap = |plain: &[u8]| STANDARD.encode([latest_id.as_bytes().to_vec(), seal(&latest, plain, &aad)].concat());
            let unprocessable = || {
                kp_error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "UNPROCESSABLE_CIPHERTEXT_ERR",
                    "Unprocessable Entity: The provided ciphertext is invalid or corrupted",
                )
            };
            match action.as_str() {
                "wrap" => {
                    // No plaintext: Key Protect generates a DEK and returns it.
                    let plain = match b["plaintext"].as_str() {
                        Some(p) => match STANDARD.decode(p) {
                            Ok(p) => p,
                            Err(_) => {
                                return kp.refuse(
                                    &what,
                                    kp_error(StatusCode::BAD_REQUEST, "INVALID_FIELD_ERR", "The field 'plaintext' must be: a base64 encoded key material"),
                                )
                            }
                        },
                        None => {
                            let mut d = vec![0u8; 32];
                            rand::rngs::OsRng.fill_bytes(&mut d);
                            d
                        }
                    };
                    Json(json!({"plaintext": STANDARD.encode(&plain), "ciphertext": wrap(&plain), "keyVersion": {"id": latest_id}})).into_response()
                }
                "unwrap" => match open(b["ciphertext"].as_str().unwrap_or_default()) {
                    Some((vid, plain)) => {
                        let rewrapped = (vid != latest_id).then(|| wrap(&plain));
                        let mut r = json!({"plaintext": STANDARD.encode(plain), "keyVersion": {"id": vid}});
                        if let Some(c) = rewrapped {
                            r["rewrappedKeyVersion"] = json!({"id": latest_id});
                            r["ciphertext"] = json!(c);
                        }
                        Json(r).into_response()
                    }
                    None => kp.refuse(&what, unprocessable()),
                },
                _ => match open(b["ciphertext"].as_str().unwrap_or_default()) {
                    _ if kp.refuse_rewraps_of.lock().unwrap().contains(&aad) => kp.refuse(&what, unprocessable()),
                    Some((vid, plain)) => {
                        kp.rewraps.fetch_add(1, Ordering::SeqCst);
                        Json(json!({"ciphertext": wrap(&plain), "keyVersion": {"id": vid}, "rewrappedKeyVersion": {"id": latest_id}})).into_response()
                    }
                    None => kp.refuse(&what, unprocessable()),
                },
            }
        }
    }
}

/// A resource CRN up to at least its service-instance segment:
/// `crn:v1:<cloud>:<type>:<service>:<region>:<scope>:<service instance>[:...]`.
fn resource_crn_ok(crn: &str) -> bool {
    let parts: Vec<&str> = crn.split(':').collect();
    parts.len() >= 8 && parts[0] == "crn" && parts[1] == "v1" && !parts[4].is_empty() && !parts[7].is_empty()
}

/// Registrations: create (POST), replace (PUT), update (PATCH), delete.
/// Service-to-service only [errors] 30; create, replace and update in Active,
/// delete in Active or Suspended [registration].
async fn registration(State(kp): S, method: Method, headers: HeaderMap, Path((id, crn)): Path<(String, String)>, body: axum::body::Bytes) -> Response {
    let what = format!("{method} /keys/{{id}}/registrations/{{crn}}");
    let service = match kp.check(&headers, &what) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if !service {
        return kp
            .refuse(&what, kp_error(StatusCode::FORBIDDEN, "SERVICE_ONLY_ERR", "Forbidden: This action can only be done by a service (service to service)"));
    }
    let state = kp.keys.lock().unwrap().get(&id).filter(|_| !kp.is_purged(&id)).map(|k| k.state);
    let Some(state) = state else { return kp.refuse(&what, not_found()) };
    if !resource_crn_ok(&crn) {
        return kp.refuse(&what, kp_error(StatusCode::BAD_REQUEST, "INVALID_RESOURCE_CRN_ERR", "Bad Request: the resource CRN must name a service instance"));
    }
    let allowed: &[i64] = if method == Method::DELETE { &[1, 2] } else { &[1] };
    if !allowed.contains(&state) {
        return kp.refuse(
            &what,
            kp_error(StatusCode::CONFLICT, "KEY_ACTION_INVALID_STATE_ERR", "Conflict: Key is not in a valid state for this registration action"),
        );
    }
    let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let input_ok = b["metadata"]["collectionType"] == "application/vnd.ibm.kms.registration_input+json";
    let mut regs = kp.registrations.lock().unwrap();
    let entry = (id.clone(), crn.clone());
    let version = b["resources"][0]["keyVersionId"].as_str().map(str::to_owned);
    let done = json!({"resources": [{"keyId": id, "resourceCrn": crn}]});
    match method.as_str() {
        "POST" | "PUT" | "PATCH" if !input_ok => {
            kp.refuse(&what, kp_error(StatusCode::BAD_REQUEST, "BAD_BODY_ERR", "Bad Request: registration_input collection expected"))
        }
        "POST" | "PUT" => {
            let created = regs.insert(entry, version).is_none();
            (if created { StatusCode::CREATED } else { StatusCode::OK }, Json(done)).into_response()
        }
        "PATCH" if regs.contains_key(&entry) => {
            regs.insert(entry, version);
            Json(done).into_response()
        }
        "DELETE" if regs.remove(&entry).is_some() => StatusCode::NO_CONTENT.into_response(),
        _ => kp.refuse(&what, kp_error(StatusCode::NOT_FOUND, "NOT_FOUND_ERR", "Not Found: registration")),
    }
}

/// `POST /api/v2/event_ack`: service-to-service only [api-cli], for an event
/// Key Protect issued, with `keyStateData.rewrappedKeyVersion` [rewrap] or
/// `keyStateData.keyVersion` [api-cli] when DEKs were rewrapped.
async fn event_ack(State(kp): S, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let what = "POST /event_ack";
    let service = match kp.check(&headers, what) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if !service {
        return kp
            .refuse(what, kp_error(StatusCode::FORBIDDEN, "SERVICE_ONLY_ERR", "Forbidden: This action can only be done by a service (service to service)"));
    }
    let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let r = &b["resources"][0];
    let version = r["keyStateData"]["rewrappedKeyVersion"].as_str().or_else(|| r["keyStateData"]["keyVersion"].as_str());
    if b["metadata"]["collectionType"] != "application/vnd.ibm.kms.event_acknowledge+json"
        || !matches!(r["adopterKeyState"].as_str(), Some("DEK_ENABLED" | "DEK_DISABLED" | "DEK_DELETED" | "DEK_RESTORED" | "DEK_ROTATED"))
        || r["timestamp"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).is_none()
    {
        return kp.refuse(what, kp_error(StatusCode::BAD_REQUEST, "BAD_BODY_ERR", "Bad Request: eventId, adopterKeyState and timestamp are required"));
    }
    let event_id = r["eventId"].as_str().unwrap_or_default();
    let issued = kp.events.lock().unwrap().iter().find(|(e, _, _)| e == event_id).map(|(_, k, a)| (k.clone(), a.clone()));
    let Some((key, action)) = issued else {
        return kp.refuse(what, kp_error(StatusCode::NOT_FOUND, "NOT_FOUND_ERR", "Not Found: no such event"));
    };
    if action == "rotate" && version.is_none() {
        return kp.refuse(what, kp_error(StatusCode::BAD_REQUEST, "BAD_BODY_ERR", "Bad Request: keyStateData.keyVersion is required after a rotation"));
    }
    {
        let mut t = kp.throttle_acks_of.lock().unwrap();
        if let Some((_, n)) = t.as_mut().filter(|(k, n)| *k == key && *n > 0) {
            *n -= 1;
            return kp_error(StatusCode::TOO_MANY_REQUESTS, "", "Too Many Requests: Please wait a few minutes and try again.");
        }
    }
    let mut accepted = r.clone();
    accepted["keyId"] = json!(key);
    kp.acks.lock().unwrap().push(accepted);
    StatusCode::NO_CONTENT.into_response()
}

impl KeyProtectDouble {
    /// A double for `region`, listening on a free local port.
    pub fn start(rt: &tokio::runtime::Runtime, region: &str) -> KeyProtectDouble {
        KeyProtectDouble::start_with(rt, region, Arc::default())
    }

    /// A double for another region, trusting the tokens `iam` issues (IBM
    /// Cloud IAM is one service for every region).
    pub fn start_sharing_iam(rt: &tokio::runtime::Runtime, region: &str, iam: &KeyProtectDouble) -> KeyProtectDouble {
        KeyProtectDouble::start_with(rt, region, iam.kp.tokens.clone())
    }

    fn start_with(rt: &tokio::runtime::Runtime, region: &str, tokens: Arc<Mutex<HashMap<String, Token>>>) -> KeyProtectDouble {
        let kp = Arc::new(Inner {
            region: region.into(),
            tokens,
            token_lifetime: Mutex::new(Duration::from_secs(3600)),
            exchanges: AtomicUsize::new(0),
            keys: Mutex::default(),
            purged: Mutex::default(),
            throttle_next: AtomicUsize::new(0),
            throttle_acks_of: Mutex::new(None),
            fail_next: AtomicUsize::new(0),
            refuse_rewraps_of: Mutex::default(),
            rewraps: AtomicUsize::new(0),
            registrations: Mutex::default(),
            acks: Mutex::default(),
            refusals: Mutex::default(),
            events: Mutex::default(),
            action_gap: Mutex::new(Duration::from_secs(30)),
            purge_wait: Mutex::new(chrono::Duration::hours(4)),
        });
        let app = Router::new()
            .route("/identity/token", post(token))
            .route("/oidc/token", post(token))
            .route("/api/v2/keys", post(create))
            .route("/api/v2/keys/{id}", get(metadata).delete(delete).post(action_query))
            .route("/api/v2/keys/{id}/metadata", get(metadata))
            .route("/api/v2/keys/{id}/purge", axum::routing::delete(purge))
            .route("/api/v2/keys/{id}/restore", post(restore))
            .route("/api/v2/keys/{id}/registrations/{crn}", post(registration).put(registration).patch(registration).delete(registration))
            .route("/api/v2/event_ack", post(event_ack))
            .route("/api/v2/keys/{id}/actions/{action}", post(action))
            .with_state(kp.clone());
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        KeyProtectDouble { kp, url: format!("http://{addr}") }
    }

    pub fn crn(&self, id: &str) -> String {
        self.kp.crn(id)
    }

    /// A root key made by the customer, with its first version.
    pub fn add_key(&self, id: &str) -> String {
        let mut m = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut m);
        let v = uuid::Uuid::new_v4().to_string();
        let key = RootKey { state: 1, versions: vec![(v.clone(), m)], deletion_date: None, last_action: None, last_sync: None, name: id.into() };
        self.kp.keys.lock().unwrap().insert(id.into(), key);
        v
    }

    fn with_key<T>(&self, id: &str, f: impl FnOnce(&mut RootKey) -> T) -> T {
        f(self.kp.keys.lock().unwrap().get_mut(id).expect("the test made this key"))
    }

    /// The customer's lifecycle actions, as the service performs them: each
    /// issues an event id to registered services and returns it.
    pub fn rotate(&self, id: &str) -> (String, String) {
        let mut m = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut m);
        let v = uuid::Uuid::new_v4().to_string();
        self.with_key(id, |k| {
            k.versions.push((v.clone(), m));
            k.last_action = Some(Instant::now());
        });
        (v, self.kp.issue_event(id, "rotate"))
    }

    pub fn set_state(&self, id: &str, state: i64, action: &str) -> String {
        self.with_key(id, |k| {
            k.state = state;
            k.last_action = Some(Instant::now());
            k.deletion_date = (state == 5).then(now);
        });
        self.kp.issue_event(id, action)
    }

    /// [key-states]: Deactivated within an hour past the expiration date.
    pub fn expire(&self, id: &str) {
        self.with_key(id, |k| k.state = 3);
    }

    /// [delete-purge]: the purge, four hours after deletion (the test stands in for the wait).
    pub fn purge(&self, id: &str) {
        self.with_key(id, |k| assert_eq!(k.state, 5, "only a deleted key can be purged"));
        self.kp.purged.lock().unwrap().push(id.into());
    }

    /// Every token issued so far stops working (a revoked API key's tokens).
    pub fn revoke_tokens(&self) {
        self.kp.tokens.lock().unwrap().clear();
    }

    pub fn acks(&self) -> Vec<Value> {
        self.kp.acks.lock().unwrap().clone()
    }

    pub fn refusals(&self) -> Vec<String> {
        self.kp.refusals.lock().unwrap().clone()
    }
}
