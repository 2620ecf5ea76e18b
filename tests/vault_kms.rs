//! The Vault Transit provider against a contract server that follows the
//! published API (https://developer.hashicorp.com/vault/api-docs/secret/transit
//! and https://developer.hashicorp.com/vault/api-docs for errors): paths,
//! X-Vault-Token, `{"data": ...}` bodies, `batch_input`/`batch_results`,
//! `vault:v<N>:` ciphertexts and `{"errors": [...]}` with 403/429/5xx. Vault
//! itself cannot be installed here.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::{engine::general_purpose::STANDARD, Engine};
use common::*;
use rand::RngCore;
use serde_json::{json, Value};

#[derive(Default)]
struct Transit {
    token: Mutex<String>,
    /// key name -> versions' material (index 0 is version 1)
    keys: Mutex<HashMap<String, Vec<[u8; 32]>>>,
    throttle_next: AtomicUsize,
    fail_next: AtomicUsize,
    rewrap_requests: AtomicUsize,
    rewrap_items: AtomicUsize,
    forbidden: AtomicUsize,
}

type S = State<Arc<Transit>>;

fn errors(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "errors": [msg] }))).into_response()
}

fn gate(t: &Transit, headers: &HeaderMap) -> Option<Response> {
    if headers.get("x-vault-token").and_then(|v| v.to_str().ok()) != Some(t.token.lock().unwrap().as_str()) {
        t.forbidden.fetch_add(1, Ordering::SeqCst);
        return Some(errors(StatusCode::FORBIDDEN, "permission denied"));
    }
    if t.throttle_next.load(Ordering::SeqCst) > 0 {
        t.throttle_next.fetch_sub(1, Ordering::SeqCst);
        return Some(errors(StatusCode::TOO_MANY_REQUESTS, "request path \"transit/rewrap\": rate limit quota exceeded"));
    }
    if t.fail_next.load(Ordering::SeqCst) > 0 {
        t.fail_next.fetch_sub(1, Ordering::SeqCst);
        return Some(errors(StatusCode::SERVICE_UNAVAILABLE, "Vault is sealed"));
    }
    None
}

fn seal(material: &[u8; 32], version: usize, plain: &[u8], context: &str) -> String {
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = Aes256Gcm::new_from_slice(material).unwrap().encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad: context.as_bytes() }).unwrap();
    let mut out = nonce.to_vec();
    out.extend(ct);
    format!("vault:v{version}:{}", STANDARD.encode(out))
}

fn open(versions: &[[u8; 32]], ciphertext: &str, context: &str) -> Result<Vec<u8>, String> {
    let rest = ciphertext.strip_prefix("vault:v").ok_or("invalid ciphertext: no prefix")?;
    let (v, b64) = rest.split_once(':').ok_or("invalid ciphertext")?;
    let v: usize = v.parse().map_err(|_| "invalid ciphertext version")?;
    let material = versions.get(v - 1).ok_or("invalid key version")?;
    let raw = STANDARD.decode(b64).map_err(|_| "invalid ciphertext: bad base64")?;
    Aes256Gcm::new_from_slice(material)
        .unwrap()
        .decrypt(Nonce::from_slice(&raw[..12]), Payload { msg: &raw[12..], aad: context.as_bytes() })
        .map_err(|_| "cipher: message authentication failed".to_string())
}

async fn encrypt(State(t): S, headers: HeaderMap, Path(name): Path<String>, Json(b): Json<Value>) -> Response {
    if let Some(r) = gate(&t, &headers) {
        return r;
    }
    let keys = t.keys.lock().unwrap();
    let Some(versions) = keys.get(&name) else { return errors(StatusCode::BAD_REQUEST, "encryption key not found") };
    let Some(plain) = b["plaintext"].as_str().and_then(|p| STANDARD.decode(p).ok()) else {
        return errors(StatusCode::BAD_REQUEST, "failed to base64-decode plaintext");
    };
    let ctx = b["context"].as_str().unwrap_or_default();
    let v = versions.len();
    Json(json!({"data": {"ciphertext": seal(&versions[v - 1], v, &plain, ctx), "key_version": v}})).into_response()
}

async fn decrypt(State(t): S, headers: HeaderMap, Path(name): Path<String>, Json(b): Json<Value>) -> Response {
    if let Some(r) = gate(&t, &headers) {
        return r;
    }
    let keys = t.keys.lock().unwrap();
    let Some(versions) = keys.get(&name) else { return errors(StatusCode::BAD_REQUEST, "encryption key not found") };
    match open(versions, b["ciphertext"].as_str().unwrap_or_default(), b["context"].as_str().unwrap_or_default()) {
        Ok(p) => Json(json!({"data": {"plaintext": STANDARD.encode(p)}})).into_response(),
        Err(e) => errors(StatusCode::BAD_REQUEST, &e),
    }
}

async fn rewrap(State(t): S, headers: HeaderMap, Path(name): Path<String>, Json(b): Json<Value>) -> Response {
    if let Some(r) = gate(&t, &headers) {
        return r;
    }
    let keys = t.keys.lock().unwrap();
    let Some(versions) = keys.get(&name) else { return errors(StatusCode::BAD_REQUEST, "encryption key not found") };
    let latest = versions.len();
    let Some(batch) = b["batch_input"].as_array() else { return errors(StatusCode::BAD_REQUEST, "missing batch_input") };
    t.rewrap_requests.fetch_add(1, Ordering::SeqCst);
    t.rewrap_items.fetch_add(batch.len(), Ordering::SeqCst);
    let results: Vec<Value> = batch
        .iter()
        .map(|item| {
            let ctx = item["context"].as_str().unwrap_or_default();
            match open(versions, item["ciphertext"].as_str().unwrap_or_default(), ctx) {
                Ok(p) => json!({"ciphertext": seal(&versions[latest - 1], latest, &p, ctx), "key_version": latest}),
                Err(e) => json!({"error": e}),
            }
        })
        .collect();
    // As the source does: 200 even when single items carry an error.
    Json(json!({"data": {"batch_results": results}})).into_response()
}

async fn read_key(State(t): S, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if let Some(r) = gate(&t, &headers) {
        return r;
    }
    match t.keys.lock().unwrap().get(&name) {
        Some(v) => {
            let versions: HashMap<String, u64> = (1..=v.len()).map(|n| (n.to_string(), 1_700_000_000)).collect();
            Json(json!({"data": {"name": name, "type": "aes256-gcm96", "derived": true, "keys": versions,
                "latest_version": v.len(), "min_decryption_version": 1, "min_encryption_version": 0,
                "deletion_allowed": false, "supports_encryption": true, "supports_decryption": true}}))
            .into_response()
        }
        None => (StatusCode::NOT_FOUND, Json(json!({"errors": []}))).into_response(),
    }
}

async fn rotate(State(t): S, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if let Some(r) = gate(&t, &headers) {
        return r;
    }
    let mut m = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut m);
    t.keys.lock().unwrap().entry(name).or_default().push(m);
    StatusCode::NO_CONTENT.into_response()
}

fn start_transit(rt: &tokio::runtime::Runtime, transit: Arc<Transit>) -> String {
    let app = Router::new()
        .route("/v1/transit/encrypt/{name}", post(encrypt))
        .route("/v1/transit/decrypt/{name}", post(decrypt))
        .route("/v1/transit/rewrap/{name}", post(rewrap))
        .route("/v1/transit/keys/{name}", get(read_key))
        .route("/v1/transit/keys/{name}/rotate", post(rotate))
        .with_state(transit);
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[test]
fn vault_transit_lifecycle_with_batched_rewrap_throttling_outage_and_token_renewal() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let transit = Arc::new(Transit::default());
    *transit.token.lock().unwrap() = "s.first-token".into();
    let mut m = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut m);
    transit.keys.lock().unwrap().insert("orders".into(), vec![m]);
    let address = start_transit(&rt, transit.clone());

    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, "s.first-token\n").unwrap();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[kms]\nroutes = [{{ prefix = \"vault:\", provider = \"vault\", strip_prefix = true }}]\n[kms.vault]\naddress = \"{address}\"\ntoken_file = \"{}\"\nderived = true\nbatch = 16\n",
            token_file.display()
        ),
    )
    .unwrap();
    let d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_CONFIG", config.to_str().unwrap()), ("KEYWARDEN_ROTATION_CONCURRENCY", "32")]);

    let n = 40;
    let ids: Vec<String> = (0..n).map(|i| format!("v-{i}")).collect();
    for id in &ids {
        let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": id, "key_id": "vault:orders"})));
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["key_version"], "1");
    }
    let deks: Vec<String> = ids.iter().map(|id| d.dek(id).1["dek"].as_str().unwrap().to_string()).collect();
    let (_, key) = d.get("/v1/keys/vault:orders");
    assert_eq!(key["kms"]["provider"], "vault", "{key}");

    // The customer rotates in Vault; Vault would emit an event; keywarden rewraps
    // in batches, through throttling and a burst of 503s.
    let client = reqwest::blocking::Client::new();
    let r = client.post(format!("{address}/v1/transit/keys/orders/rotate")).header("X-Vault-Token", "s.first-token").send().unwrap();
    assert_eq!(r.status(), 204);
    transit.throttle_next.store(3, Ordering::SeqCst);
    transit.fail_next.store(4, Ordering::SeqCst);
    let p = producer(&broker.bootstrap);
    produce(&p, "key-lifecycle", Some("vault:orders"), &event("vr-1", "rotate", "vault:orders", Some("2"), &soon(1)));
    d.wait_rotated("vault:orders", "2");
    for (i, id) in ids.iter().enumerate() {
        let (s, v) = d.dek(id);
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["dek"].as_str().unwrap(), deks[i], "the DEK is the same after Vault's rewrap");
        assert_eq!(v["key_version"], "2");
    }
    let (reqs, items) = (transit.rewrap_requests.load(Ordering::SeqCst), transit.rewrap_items.load(Ordering::SeqCst));
    println!("VAULT: {items} rewraps in {reqs} batch requests");
    assert!(items >= n && reqs < n, "rewraps were batched: {items} items in {reqs} requests");

    // The token is renewed by an agent: the file changes and the old one stops working.
    *transit.token.lock().unwrap() = "s.second-token".into();
    std::fs::write(&token_file, "s.second-token\n").unwrap();
    produce(&p, "key-lifecycle", Some("vault:orders"), &event("vr-2", "disable", "vault:orders", None, &soon(2)));
    d.wait_state("v-0", "revoked");
    assert_eq!(d.dek("v-0").0, 423);
    produce(&p, "key-lifecycle", Some("vault:orders"), &event("vr-3", "enable", "vault:orders", None, &soon(3)));
    d.wait_state("v-0", "active");
    // The cache was dropped at the disable: this decrypt uses the renewed token.
    assert_eq!(d.dek("v-0").1["dek"].as_str().unwrap(), deks[0]);
    assert!(transit.forbidden.load(Ordering::SeqCst) >= 1, "the old token was refused once, then the file was read again");

    // The key is deleted in Vault (keywarden erases only what the KMS confirms),
    // and later restored from a backup.
    let backup = transit.keys.lock().unwrap().remove("orders").unwrap();
    produce(&p, "key-lifecycle", Some("vault:orders"), &event("vr-4", "delete", "vault:orders", None, &soon(4)));
    d.wait_state("v-1", "erased");
    assert_eq!(d.dek("v-1").0, 410);
    transit.keys.lock().unwrap().insert("orders".into(), backup);
    produce(&p, "key-lifecycle", Some("vault:orders"), &event("vr-5", "restore", "vault:orders", None, &soon(5)));
    d.wait_state("v-1", "active");
    assert_eq!(d.dek("v-1").1["dek"].as_str().unwrap(), deks[1]);

    // An unknown Vault key is a clear 404 at instance creation.
    let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": "v-x", "key_id": "vault:nope"})));
    assert_eq!(s, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    drop(rt);
}

#[test]
fn vault_contract_server_speaks_the_documented_shapes() {
    // Guards the contract server itself against drifting from the docs.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let transit = Arc::new(Transit::default());
    *transit.token.lock().unwrap() = "t".into();
    transit.keys.lock().unwrap().insert("k".into(), vec![[7u8; 32]]);
    let address = start_transit(&rt, transit.clone());
    let c = reqwest::blocking::Client::new();
    let enc: Value = c
        .post(format!("{address}/v1/transit/encrypt/k"))
        .header("X-Vault-Token", "t")
        .json(&json!({"plaintext": STANDARD.encode(b"hello")}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(enc["data"]["ciphertext"].as_str().unwrap().starts_with("vault:v1:"));
    let denied = c.post(format!("{address}/v1/transit/encrypt/k")).header("X-Vault-Token", "wrong").json(&json!({})).send().unwrap();
    assert_eq!(denied.status(), 403);
    let body: Value = denied.json().unwrap();
    assert_eq!(body["errors"][0], "permission denied");
    let key: Value = c.get(format!("{address}/v1/transit/keys/k")).header("X-Vault-Token", "t").send().unwrap().json().unwrap();
    assert_eq!(key["data"]["latest_version"], 1);
    std::thread::sleep(Duration::from_millis(1));
}
