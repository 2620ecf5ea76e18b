//! The Key Protect provider against a contract server that follows IBM's published
//! API: IAM token exchange (https://cloud.ibm.com/docs/account?topic=account-iamtoken_from_apikey),
//! key actions (https://cloud.ibm.com/docs/key-protect?topic=key-protect-wrap-keys,
//! -unwrap-keys, -rewrap-keys), key metadata and states (-key-states) and the
//! error envelope (-error-messages). Key Protect cannot be installed here.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::{engine::general_purpose::STANDARD, Engine};
use common::*;
use rand::RngCore;
use serde_json::{json, Value};

const INSTANCE: &str = "7d2a5c47-instance";
const API_KEY: &str = "keywarden-service-id-api-key";

struct RootKey {
    state: i64,
    /// (version id, material), oldest first
    versions: Vec<(String, [u8; 32])>,
}

#[derive(Default)]
struct KeyProtect {
    tokens: Mutex<HashMap<String, Instant>>,
    token_lifetime: Mutex<Duration>,
    exchanges: AtomicUsize,
    keys: Mutex<HashMap<String, RootKey>>,
    throttle_next: AtomicUsize,
    fail_next: AtomicUsize,
    rewraps: AtomicUsize,
    /// (key id, resource CRN) -> registered key version, if updated
    registrations: Mutex<HashMap<(String, String), Option<String>>>,
    acks: Mutex<Vec<Value>>,
    last_sync: Mutex<Option<Instant>>,
}

type S = State<Arc<KeyProtect>>;

fn kp_error(status: StatusCode, code: &str, msg: &str) -> Response {
    let mut resource = json!({ "errorMsg": msg });
    if !code.is_empty() {
        resource["reasons"] = json!([{ "code": code, "message": msg, "status": status.as_u16(), "moreInfo": "https://cloud.ibm.com/apidocs/key-protect" }]);
    }
    (status, Json(json!({ "metadata": { "collectionType": "application/vnd.ibm.kms.error+json", "collectionTotal": 1 }, "resources": [resource] })))
        .into_response()
}

async fn token(State(kp): S, Form(form): Form<HashMap<String, String>>) -> Response {
    if form.get("grant_type").map(String::as_str) != Some("urn:ibm:params:oauth:grant-type:apikey") || form.get("apikey").map(String::as_str) != Some(API_KEY) {
        return (StatusCode::BAD_REQUEST, Json(json!({"errorCode": "BXNIM0415E", "errorMessage": "Provided API key could not be found."}))).into_response();
    }
    kp.exchanges.fetch_add(1, Ordering::SeqCst);
    let lifetime = *kp.token_lifetime.lock().unwrap();
    let token = format!("eyJ.{}", uuid::Uuid::new_v4());
    kp.tokens.lock().unwrap().insert(token.clone(), Instant::now() + lifetime);
    Json(json!({"access_token": token, "refresh_token": "not_supported", "token_type": "Bearer",
        "expires_in": lifetime.as_secs(), "expiration": 0, "scope": "ibm openid"}))
    .into_response()
}

fn check(kp: &KeyProtect, headers: &HeaderMap) -> Option<Response> {
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    let valid = kp.tokens.lock().unwrap().get(bearer).is_some_and(|exp| *exp > Instant::now());
    if !valid || headers.get("bluemix-instance").and_then(|v| v.to_str().ok()) != Some(INSTANCE) {
        return Some(kp_error(StatusCode::UNAUTHORIZED, "", "Unauthorized: The user does not have access to the specified resource"));
    }
    if kp.throttle_next.load(Ordering::SeqCst) > 0 {
        kp.throttle_next.fetch_sub(1, Ordering::SeqCst);
        return Some(kp_error(StatusCode::TOO_MANY_REQUESTS, "", "Too Many Requests: Please wait a few minutes and try again."));
    }
    if kp.fail_next.load(Ordering::SeqCst) > 0 {
        kp.fail_next.fetch_sub(1, Ordering::SeqCst);
        return Some(kp_error(StatusCode::SERVICE_UNAVAILABLE, "", "Service Unavailable"));
    }
    None
}

fn seal(material: &[u8; 32], plain: &[u8], aad: &str) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = Aes256Gcm::new_from_slice(material).unwrap().encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad: aad.as_bytes() }).unwrap();
    [nonce.to_vec(), ct].concat()
}

async fn action(State(kp): S, headers: HeaderMap, Path((id, action)): Path<(String, String)>, body: axum::body::Bytes) -> Response {
    if let Some(r) = check(&kp, &headers) {
        return r;
    }
    // https://cloud.ibm.com/docs/key-protect?topic=key-protect-sync-associated-resources:
    // 204, or 409 within an hour of the last notification.
    if action == "sync" {
        let mut last = kp.last_sync.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
            return kp_error(StatusCode::CONFLICT, "REQ_TOO_EARLY_ERR", "Conflict: The key was updated recently: Please wait and try again");
        }
        *last = Some(Instant::now());
        return StatusCode::NO_CONTENT.into_response();
    }
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/vnd.ibm.kms.key_action+json") {
        return kp_error(StatusCode::BAD_REQUEST, "BAD_BODY_ERR", "Bad Request: content-type must be application/vnd.ibm.kms.key_action+json");
    }
    let Ok(b) = serde_json::from_slice::<Value>(&body) else { return kp_error(StatusCode::BAD_REQUEST, "BAD_BODY_ERR", "Bad Request") };
    let keys = kp.keys.lock().unwrap();
    let Some(key) = keys.get(&id) else {
        return kp_error(
            StatusCode::NOT_FOUND,
            "KEY_NOT_FOUND_ERR",
            "Not Found: Key could not be retrieved: Please see 'reasons' for more details (KEY_NOT_FOUND_ERR)",
        );
    };
    if key.state == 5 {
        return kp_error(StatusCode::GONE, "KEY_DELETED_ERR", "Gone: Key has already been deleted: Please delete references to this key");
    }
    if key.state != 1 {
        return kp_error(StatusCode::CONFLICT, "KEY_ACTION_INVALID_STATE_ERR", "Conflict: Key is not in a valid state");
    }
    let aad = b["aad"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\u{0}")).unwrap_or_default();
    let (latest_id, latest) = key.versions.last().unwrap();
    let open = |ciphertext: &str| -> Option<(String, Vec<u8>)> {
        let raw = STANDARD.decode(ciphertext).ok()?;
        let (vid, rest) = raw.split_at(36);
        let vid = String::from_utf8(vid.to_vec()).ok()?;
        let (_, material) = key.versions.iter().find(|(v, _)| *v == vid)?;
        let plain =
            Aes256Gcm::new_from_slice(material).ok()?.decrypt(Nonce::from_slice(&rest[..12]), Payload { msg: &rest[12..], aad: aad.as_bytes() }).ok()?;
        Some((vid, plain))
    };
    let wrap = |plain: &[u8]| STANDARD.encode([latest_id.as_bytes().to_vec(), seal(latest, plain, &aad)].concat());
    let unprocessable =
        || kp_error(StatusCode::UNPROCESSABLE_ENTITY, "UNPROCESSABLE_CIPHERTEXT_ERR", "Unprocessable Entity: The provided ciphertext is invalid or corrupted");
    match action.as_str() {
        "wrap" => {
            let Some(plain) = b["plaintext"].as_str().and_then(|p| STANDARD.decode(p).ok()) else {
                return kp_error(StatusCode::BAD_REQUEST, "INVALID_FIELD_ERR", "The field 'plaintext' must be: a base64 encoded key material");
            };
            Json(json!({"ciphertext": wrap(&plain), "keyVersion": {"id": latest_id}})).into_response()
        }
        "unwrap" => match open(b["ciphertext"].as_str().unwrap_or_default()) {
            Some((vid, plain)) => Json(json!({"plaintext": STANDARD.encode(plain), "keyVersion": {"id": vid}})).into_response(),
            None => unprocessable(),
        },
        "rewrap" => match open(b["ciphertext"].as_str().unwrap_or_default()) {
            Some((vid, plain)) => {
                kp.rewraps.fetch_add(1, Ordering::SeqCst);
                Json(json!({"ciphertext": wrap(&plain), "keyVersion": {"id": vid}, "rewrappedKeyVersion": {"id": latest_id}})).into_response()
            }
            None => unprocessable(),
        },
        _ => kp_error(StatusCode::BAD_REQUEST, "INVALID_QUERY_PARAM_ERR", "Bad Request: unknown action"),
    }
}

async fn metadata(State(kp): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = check(&kp, &headers) {
        return r;
    }
    let keys = kp.keys.lock().unwrap();
    let Some(key) = keys.get(&id) else {
        return kp_error(StatusCode::NOT_FOUND, "KEY_NOT_FOUND_ERR", "Not Found: Key could not be retrieved");
    };
    Json(json!({"metadata": {"collectionType": "application/vnd.ibm.kms.key+json", "collectionTotal": 1},
        "resources": [{"type": "application/vnd.ibm.kms.key+json", "id": id, "state": key.state, "extractable": false,
            "crn": format!("crn:v1:bluemix:public:kms:us-south:a/acct:{INSTANCE}:key:{id}"), "keyRingID": "default",
            "keyVersion": {"id": key.versions.last().unwrap().0, "creationDate": "2026-11-27T00:00:00Z"}, "deleted": key.state == 5}]}))
    .into_response()
}

/// Registrations: POST creates, PATCH updates the key version, DELETE removes
/// (https://cloud.ibm.com/apidocs/key-protect#createregistration and siblings).
async fn registration(
    State(kp): S,
    method: axum::http::Method,
    headers: HeaderMap,
    Path((id, crn)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = check(&kp, &headers) {
        return r;
    }
    let state = kp.keys.lock().unwrap().get(&id).map(|k| k.state);
    let Some(state) = state else { return kp_error(StatusCode::NOT_FOUND, "KEY_NOT_FOUND_ERR", "Not Found: Key could not be retrieved") };
    let mut regs = kp.registrations.lock().unwrap();
    let entry = (id.clone(), crn.clone());
    let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let input_ok = b["metadata"]["collectionType"] == "application/vnd.ibm.kms.registration_input+json";
    match method.as_str() {
        "POST" | "PATCH" if !input_ok => kp_error(StatusCode::BAD_REQUEST, "BAD_BODY_ERR", "Bad Request: registration_input collection expected"),
        "POST" | "PATCH" if state != 1 => kp_error(StatusCode::UNPROCESSABLE_ENTITY, "KEY_INVALID_STATE_ERR", "Unprocessable: key is not active"),
        "POST" => {
            regs.insert(entry, None);
            (StatusCode::CREATED, Json(json!({"resources": [{"keyId": id, "resourceCrn": crn}]}))).into_response()
        }
        "PATCH" if regs.contains_key(&entry) => {
            regs.insert(entry, b["resources"][0]["keyVersionId"].as_str().map(str::to_owned));
            Json(json!({"resources": [{"keyId": id, "resourceCrn": crn}]})).into_response()
        }
        "DELETE" if regs.remove(&entry).is_some() => StatusCode::NO_CONTENT.into_response(),
        _ => kp_error(StatusCode::NOT_FOUND, "NOT_FOUND_ERR", "Not Found: registration"),
    }
}

async fn event_ack(State(kp): S, headers: HeaderMap, Json(b): Json<Value>) -> Response {
    if let Some(r) = check(&kp, &headers) {
        return r;
    }
    let r = &b["resources"][0];
    if b["metadata"]["collectionType"] != "application/vnd.ibm.kms.event_acknowledge+json"
        || r["eventId"].as_str().is_none()
        || r["adopterKeyState"].as_str().is_none()
        || r["timestamp"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).is_none()
        || (r["adopterKeyState"] == "DEK_ENABLED" && r["keyStateData"]["rewrappedKeyVersion"].as_str().is_none())
    {
        return kp_error(
            StatusCode::BAD_REQUEST,
            "BAD_BODY_ERR",
            "Bad Request: eventId, adopterKeyState, timestamp and, for DEK_ENABLED, keyStateData are required",
        );
    }
    kp.acks.lock().unwrap().push(r.clone());
    StatusCode::NO_CONTENT.into_response()
}

fn start(rt: &tokio::runtime::Runtime, kp: Arc<KeyProtect>) -> String {
    let app = Router::new()
        .route("/identity/token", post(token))
        .route("/api/v2/keys/{id}/registrations/{crn}", post(registration).patch(registration).delete(registration))
        .route("/api/v2/event_ack", post(event_ack))
        .route("/api/v2/keys/{id}/actions/{action}", post(action))
        .route("/api/v2/keys/{id}/metadata", get(metadata))
        .with_state(kp);
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn new_version(kp: &KeyProtect, key: &str) -> String {
    let mut m = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut m);
    let id = uuid::Uuid::new_v4().to_string();
    kp.keys.lock().unwrap().entry(key.to_string()).or_insert(RootKey { state: 1, versions: vec![] }).versions.push((id.clone(), m));
    id
}

fn set_state(kp: &KeyProtect, key: &str, state: i64) {
    kp.keys.lock().unwrap().get_mut(key).unwrap().state = state;
}

/// A daemon whose CRN-named keys go to the double at `url`, with `extra`
/// appended to its config; the returned directory holds the config and the
/// API key file (`ibm-api-key`).
fn daemon_on_key_protect(broker: &Broker, url: &str, extra: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let api_key = dir.path().join("ibm-api-key");
    std::fs::write(&api_key, format!("{API_KEY}\n")).unwrap();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[kms]\nroutes = [{{ prefix = \"crn:v1:\", provider = \"keyprotect\" }}]\n[kms.keyprotect]\nendpoint = \"{url}\"\niam_endpoint = \"{url}\"\napi_key_file = \"{}\"\n{extra}",
            api_key.display()
        ),
    )
    .unwrap();
    (Daemon::start(&broker.bootstrap, &[("KEYWARDEN_CONFIG", config.to_str().unwrap())]), dir)
}

#[test]
fn key_protect_lifecycle_with_token_refresh_throttling_and_state_checks() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kp = Arc::new(KeyProtect::default());
    *kp.token_lifetime.lock().unwrap() = Duration::from_secs(3);
    let key = "0e4b9d1c-root-key";
    new_version(&kp, key);
    let url = start(&rt, kp.clone());
    let crn = format!("crn:v1:bluemix:public:kms:us-south:a/acct:{INSTANCE}:key:{key}");

    let broker = Broker::start();
    let (d, dir) = daemon_on_key_protect(&broker, &url, "");
    let api_key = dir.path().join("ibm-api-key");
    let enc = crn.replace('/', "%2F");

    let ids: Vec<String> = (0..30).map(|i| format!("kp-{i}")).collect();
    for id in &ids {
        let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": id, "key_id": crn})));
        assert_eq!(s, 201, "{v}");
    }
    let deks: Vec<String> = ids.iter().map(|id| d.dek(id).1["dek"].as_str().unwrap().to_string()).collect();

    // Rotation, through throttling and a burst of 503s, after the token expired.
    std::thread::sleep(Duration::from_secs(3));
    let v2 = new_version(&kp, key);
    kp.throttle_next.store(5, Ordering::SeqCst);
    kp.fail_next.store(5, Ordering::SeqCst);
    let p = producer(&broker.bootstrap);
    produce(&p, "key-lifecycle", Some(&crn), &event("kp-1", "rotate", &crn, Some(&v2), &soon(1)));
    let k = d.wait_rotated(&enc, &v2);
    assert_eq!(k["kms"]["provider"], "keyprotect", "{k}");
    for (i, id) in ids.iter().enumerate() {
        let (s, v) = d.dek(id);
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["dek"].as_str().unwrap(), deks[i]);
        assert_eq!(v["key_version"], v2.as_str());
    }
    assert!(kp.exchanges.load(Ordering::SeqCst) >= 2, "the IAM token was refreshed");

    // A rotation while Key Protect reports the key suspended waits: rewrap only when active.
    set_state(&kp, key, 2);
    let v3 = new_version(&kp, key);
    let before = kp.rewraps.load(Ordering::SeqCst);
    produce(&p, "key-lifecycle", Some(&crn), &event("kp-2", "rotate", &crn, Some(&v3), &soon(2)));
    d.wait_event("kp-2");
    // The marker: the rotation asked Key Protect and decided to wait.
    wait_until("the rotation to wait for the key", Duration::from_secs(30), || {
        d.log().contains("kms reports the key not active; rotation waits").then_some(())
    });
    assert_eq!(kp.rewraps.load(Ordering::SeqCst), before, "no rewrap against a suspended key");
    set_state(&kp, key, 1);
    d.wait_rotated(&enc, &v3);
    // Registrations follow the instances and their key versions (updates need an
    // active key, so this is checked before the key is suspended again).
    wait_until("registrations updated to the newest version", Duration::from_secs(30), || {
        let regs = kp.registrations.lock().unwrap();
        (regs.len() == ids.len() && regs.values().all(|v| v.as_deref() == Some(v3.as_str()))).then_some(())
    });

    // Disable, enable, delete and restore, with the KMS's state following the customer.
    set_state(&kp, key, 2);
    produce(&p, "key-lifecycle", Some(&crn), &event("kp-3", "disable", &crn, None, &soon(3)));
    d.wait_state("kp-0", "revoked");
    assert_eq!(d.dek("kp-0").0, 423);
    set_state(&kp, key, 1);
    produce(&p, "key-lifecycle", Some(&crn), &event("kp-4", "enable", &crn, None, &soon(4)));
    d.wait_state("kp-0", "active");
    assert_eq!(d.dek("kp-0").1["dek"].as_str().unwrap(), deks[0], "a real unwrap after the cache was dropped");
    set_state(&kp, key, 5);
    produce(&p, "key-lifecycle", Some(&crn), &event("kp-5", "delete", &crn, None, &soon(5)));
    d.wait_state("kp-1", "erased");
    assert_eq!(d.dek("kp-1").0, 410);
    set_state(&kp, key, 1);
    produce(&p, "key-lifecycle", Some(&crn), &event("kp-6", "restore", &crn, None, &soon(6)));
    d.wait_state("kp-1", "active");
    assert_eq!(d.dek("kp-1").1["dek"].as_str().unwrap(), deks[1]);

    // Registrations follow the instances and their key versions; every event was
    // acknowledged with the adopter's state; sync obeys the hourly cooldown.
    let (s, _) = d.delete("/v1/instances/kp-29");
    assert_eq!(s, 204);
    wait_until("the deleted instance deregistered", Duration::from_secs(30), || (kp.registrations.lock().unwrap().len() == ids.len() - 1).then_some(()));
    let ack_of =
        |id: &str| wait_until(&format!("ack of {id}"), Duration::from_secs(30), || kp.acks.lock().unwrap().iter().find(|a| a["eventId"] == id).cloned());
    let rotated = ack_of("kp-1");
    assert_eq!(rotated["adopterKeyState"], "DEK_ENABLED");
    assert_eq!(rotated["keyStateData"]["rewrappedKeyVersion"], v2.as_str(), "{rotated}");
    assert_eq!(ack_of("kp-3")["adopterKeyState"], "DEK_DISABLED");
    assert_eq!(ack_of("kp-4")["adopterKeyState"], "DEK_ENABLED");
    assert_eq!(ack_of("kp-5")["adopterKeyState"], "DEK_DELETED");
    assert_eq!(ack_of("kp-6")["adopterKeyState"], "DEK_ENABLED");
    let (s, v) = d.post(&format!("/v1/keys/{enc}/sync"), None);
    assert_eq!(s, 202, "{v}");
    let (s, v) = d.post(&format!("/v1/keys/{enc}/sync"), None);
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("once an hour"), "{v}");

    // Errors name the provider and what to check.
    let (s, v) =
        d.post("/v1/instances", Some(json!({"instance_id": "kp-x", "key_id": format!("crn:v1:bluemix:public:kms:us-south:a/acct:{INSTANCE}:key:missing")})));
    assert_eq!(s, 404, "{v}");
    std::fs::write(&api_key, "revoked-key\n").unwrap();
    kp.tokens.lock().unwrap().clear();
    let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": "kp-y", "key_id": crn})));
    assert_eq!(s, 502, "{v}");
    assert!(v["error"].as_str().unwrap().contains("IAM API key rejected") && v["error"].as_str().unwrap().contains("kms.keyprotect.api_key_file"), "{v}");
    drop(rt);
}

/// An Activity Tracker record of a Key Protect call, as IBM Cloud routes it:
/// CADF, unsigned.
fn at_record(id: &str, action: &str, crn: &str, at: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "action": action, "outcome": "success", "eventTime": at, "correlationId": format!("corr-{id}"),
        "initiator": {"id": "IBMid-550006NJ23", "typeURI": "service/security/account/user"},
        "target": {"id": crn, "typeURI": "kms/secrets"}, "observer": {"name": "ActivityTracker"}, "eventType": "activity"
    }))
    .unwrap()
}

/// Activity Tracker records cannot be signed, so anyone who can produce to the
/// topic could write one. Each is a hint Key Protect must confirm: produced
/// by kafka-python, a disable while the key is active changes nothing; once
/// Key Protect reports the key suspended the same claim revokes. An enable, a
/// delete and a restore each wait for the state they claim; a rotation goes to
/// the version Key Protect reports, not to one the record names. While Key
/// Protect answers 503, a disable still revokes and an enable waits.
#[test]
fn activity_tracker_records_are_hints_that_key_protect_must_confirm() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kp = Arc::new(KeyProtect::default());
    *kp.token_lifetime.lock().unwrap() = Duration::from_secs(3600);
    let key = "5c1f0e2a-hinted-key";
    let v1 = new_version(&kp, key);
    let url = start(&rt, kp.clone());
    let crn = format!("crn:v1:bluemix:public:kms:us-south:a/acct:{INSTANCE}:key:{key}");
    let broker = Broker::start();
    let (d, _config) = daemon_on_key_protect(&broker, &url, "[signatures]\nhint_topics = [\"key-lifecycle\"]\n");
    let enc = crn.replace('/', "%2F");
    d.create_instance("at-db", &crn);
    let dek = d.dek("at-db").1["dek"].as_str().unwrap().to_string();
    let mut dlq = TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq");
    let send = |id: &str, action: &str, secs: i64| produce_as_outsider(&broker.bootstrap, "key-lifecycle", &crn, &at_record(id, action, &crn, &soon(secs)));

    send("at-1", "kms.secrets.disable", 1);
    let reason = wait_dead_letter(&mut dlq, "at-1");
    assert!(reason.contains("reports it active"), "{reason}");
    assert_eq!(d.dek("at-db").0, 200, "a disable Key Protect does not confirm changes nothing");

    set_state(&kp, key, 2);
    send("at-2", "kms.secrets.disable", 2);
    d.wait_state("at-db", "revoked");
    assert_eq!(d.wait_event("at-2")["correlation_id"], "corr-at-2");
    send("at-3", "kms.secrets.enable", 3);
    assert!(wait_dead_letter(&mut dlq, "at-3").contains("reports it disabled"));
    set_state(&kp, key, 1);
    send("at-4", "kms.secrets.enable", 4);
    d.wait_state("at-db", "active");

    send("at-5", "kms.secrets.delete", 5);
    assert!(wait_dead_letter(&mut dlq, "at-5").contains("claims the key deleted"));
    set_state(&kp, key, 5);
    send("at-6", "kms.secrets.delete", 6);
    d.wait_state("at-db", "erased");
    send("at-7", "kms.secrets.restore", 7);
    assert!(wait_dead_letter(&mut dlq, "at-7").contains("claims the key restored"));
    set_state(&kp, key, 1);
    send("at-8", "kms.secrets.restore", 8);
    d.wait_state("at-db", "active");
    assert_eq!(d.dek("at-db").1["dek"].as_str().unwrap(), dek);

    // A rotation record names no version that keywarden believes: it rotates
    // to the one Key Protect reports. With none newer, it changes nothing.
    send("at-9", "kms.secrets.rotate", 9);
    assert!(wait_dead_letter(&mut dlq, "at-9").contains(&format!("at version {v1}, which keywarden already holds")));
    let v2 = new_version(&kp, key);
    send("at-10", "kms.secrets.rotate", 10);
    d.wait_rotated(&enc, &v2);
    assert_eq!(d.dek("at-db").1["key_version"], v2.as_str());

    // Key Protect answers 503 to everything: a disable is applied, an enable waits.
    kp.fail_next.store(usize::MAX / 2, Ordering::SeqCst);
    send("at-11", "kms.secrets.disable", 11);
    d.wait_state("at-db", "revoked");
    send("at-12", "kms.secrets.enable", 12);
    assert!(wait_dead_letter(&mut dlq, "at-12").contains("waits for the kms"));
    assert_eq!(d.state("at-db"), "revoked");
    assert_eq!(security_events(&d, "hint_contradicted"), 5, "at-1, at-3, at-5, at-7 and at-9; the unanswered at-12 is not one");
    drop(rt);
}
