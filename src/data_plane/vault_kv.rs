//! A HashiCorp Vault KV v2 endpoint, as MariaDB's `hashicorp_key_management`
//! plugin reads it (plugin/hashicorp_key_management in MariaDB's sources):
//!
//! - at load, `GET /v1/sys/mounts/<mount>/tune`, which must hold
//!   `options.version` >= 2 (a string or a number);
//! - `GET /v1/<mount>/data/<key id>` for the latest version and
//!   `...?version=N` for an older one, which must hold `data.data.data` (the
//!   key, in hex) and `data.metadata.version` (a number);
//! - 404 means "no such key"; any other non-2xx is logged as a server error.
//!
//! The mount is the instance id and `X-Vault-Token` the instance's own DEK
//! token. Key id `n` of an instance is derived from its DEK, so a rotation
//! of the root key (which rewraps the DEK and never changes it) changes no
//! key the database holds; only version 1 of each exists. A wrong token and
//! an unknown instance are refused alike (403); a revoked instance is refused
//! with 403, an erased or destroyed one answered 404.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use hkdf::Hkdf;
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::api::credential::{self, Opener, Presented};
use crate::api::tls::ClientCert;
use crate::api::{open_dek, AppState};
use crate::kms::Dek;

/// The header Vault clients carry their token in.
const TOKEN_HEADER: &str = "x-vault-token";

/// Binds every derived key to this use, so that no other derivation from a
/// DEK (today or later) can give the same bytes.
const SALT: &[u8] = b"keywarden vault-kv v1";

/// The only version of a key: keys never change (see the module comment).
const VERSION: u32 = 1;

#[derive(Clone)]
struct Kv {
    app: AppState,
    /// `data_plane.tls.client_ca_file` is set: a key is served only over a
    /// connection whose client certificate chains to it.
    needs_client_cert: bool,
}

/// The Vault KV v2 routes and nothing else: any other path is Vault's 404.
pub fn router(app: AppState, needs_client_cert: bool) -> Router {
    Router::new()
        .route("/v1/sys/mounts/{mount}/tune", get(tune))
        .route("/v1/{mount}/data/{name}", get(read))
        .fallback(|| async { not_found() })
        .with_state(Kv { app, needs_client_cert })
        // A key cached by a proxy would outlive its revocation.
        .layer(axum::middleware::map_response(crate::api::no_store))
}

/// Key id `n` of `instance_id`: HKDF-SHA256 of the DEK, with the instance
/// and `n` in the info (length-prefixed, so that no two pairs read alike).
pub fn derive_key(dek: &Dek, instance_id: &str, n: u32) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(SALT), dek.expose());
    let mut info = Vec::with_capacity(4 + instance_id.len() + 4);
    info.extend_from_slice(&(instance_id.len() as u32).to_be_bytes());
    info.extend_from_slice(instance_id.as_bytes());
    info.extend_from_slice(&n.to_be_bytes());
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: never an error.
    hk.expand(&info, key.as_mut()).expect("hkdf-sha256 expands to 32 bytes");
    key
}

/// Vault's refusal of a token: the same for a wrong token, an unknown
/// instance and a revoked one, so that the answer tells no one which exist.
fn permission_denied() -> Response {
    (StatusCode::FORBIDDEN, axum::Json(json!({"errors": ["permission denied"]}))).into_response()
}

/// Vault's "no such secret", which the plugin reads as "key not found".
fn not_found() -> Response {
    (StatusCode::NOT_FOUND, axum::Json(json!({"errors": []}))).into_response()
}

/// What a request's token opens.
enum Caller {
    /// The instance the token is the own credential of (over a connection
    /// with the client certificate asked for, if one is).
    Opens(std::sync::Arc<crate::engine::InstanceRecord>, Opener),
    /// Nothing: a wrong or missing token, or an unknown instance, alike.
    Denied,
    /// The store could not be read; nothing is decided.
    Unreadable,
}

/// A token is compared even for an unknown instance, so that timing tells
/// no one which instances exist either.
fn authenticate(kv: &Kv, mount: &str, headers: &HeaderMap, cert: Option<&ClientCert>) -> Caller {
    let inst = match kv.app.store.instance_shared(mount) {
        Ok(inst) => inst,
        Err(e) => {
            tracing::error!(error = %e, instance_id = %mount, "the vault kv endpoint could not read the store");
            return Caller::Unreadable;
        }
    };
    let token = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
    let presented = Presented { bearer: token.map(credential::digest), ..Default::default() };
    let opener = presented.opener(mount, inst.as_ref().and_then(|i| i.credential.as_ref()));
    match (inst, opener) {
        (Some(inst), Some(opener)) if cert.is_some() || !kv.needs_client_cert => Caller::Opens(inst, opener),
        _ => {
            kv.app.metrics.dek_requests.with_label_values(&["unauthorized"]).inc();
            Caller::Denied
        }
    }
}

fn unreadable() -> Response {
    server_error(StatusCode::INTERNAL_SERVER_ERROR, "keywarden could not read its store; see its log")
}

fn server_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"errors": [message]}))).into_response()
}

/// What Vault answers for a KV v2 mount (the plugin checks `options.version`).
async fn tune(State(kv): State<Kv>, Path(mount): Path<String>, headers: HeaderMap, cert: Option<Extension<ClientCert>>) -> Response {
    match authenticate(&kv, &mount, &headers, cert.as_deref()) {
        Caller::Unreadable => unreadable(),
        Caller::Denied => permission_denied(),
        // Answered whatever the instance's state: it holds no key, and the
        // refusal is said where a key is asked for.
        Caller::Opens(..) => axum::Json(tune_body()).into_response(),
    }
}

fn tune_body() -> serde_json::Value {
    let body = json!({
        "default_lease_ttl": 0,
        "max_lease_ttl": 0,
        "force_no_cache": false,
        "description": "keywarden: instance keys derived from the instance's DEK",
        "options": {"version": "2"},
    });
    // Vault says it twice: at the top level and under `data`.
    let mut with_data = body.clone();
    with_data["data"] = body;
    with_data
}

#[derive(Deserialize)]
struct ReadQuery {
    version: Option<String>,
}

async fn read(
    State(kv): State<Kv>,
    Path((mount, name)): Path<(String, String)>,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
    cert: Option<Extension<ClientCert>>,
) -> Response {
    let (inst, opener) = match authenticate(&kv, &mount, &headers, cert.as_deref()) {
        Caller::Unreadable => return unreadable(),
        Caller::Denied => return permission_denied(),
        Caller::Opens(inst, opener) => (inst, opener),
    };
    // MariaDB's key ids are 32-bit numbers; anything else is no key of ours.
    // Version 0 is Vault's "the latest".
    let (Ok(n), true) = (name.parse::<u32>(), q.version.as_deref().is_none_or(|v| matches!(v.parse::<u32>(), Ok(0 | VERSION)))) else {
        return not_found();
    };
    let created = inst.created_at;
    match open_dek(&kv.app, &mount, &inst, &opener).await {
        Ok(released) => {
            let key = derive_key(&released.dek, &mount, n);
            let metadata = json!({
                "created_time": created,
                "custom_metadata": null,
                "deletion_time": "",
                "destroyed": false,
                "version": VERSION,
            });
            key_response(&key, &metadata)
        }
        Err(e) => {
            tracing::info!(instance_id = %mount, key = n, status = e.status().as_u16(), "vault kv: key refused");
            refusal(e.status(), e.message())
        }
    }
}

/// A DEK the API would refuse, said the way Vault says it: revoked is a
/// refusal of the token (403), erased or destroyed is no key (404); the
/// rest (503 behind or unavailable, 500) keep their status and reason.
fn refusal(status: StatusCode, message: &str) -> Response {
    match status {
        StatusCode::LOCKED => permission_denied(),
        StatusCode::GONE | StatusCode::NOT_FOUND => not_found(),
        status => server_error(status, message),
    }
}

/// Vault's KV v2 read answer, with the key in hex. Written into one
/// zeroizing buffer sized up front (no copy left behind by a reallocation);
/// the copy handed to hyper is its own.
fn key_response(key: &[u8; 32], metadata: &serde_json::Value) -> Response {
    let metadata = metadata.to_string();
    const HEAD: &str = r#"{"request_id":"","lease_id":"","renewable":false,"lease_duration":0,"data":{"data":{"data":""#;
    const MIDDLE: &str = r#""},"metadata":"#;
    const TAIL: &str = r#"},"wrap_info":null,"warnings":null,"auth":null}"#;
    let mut body = Zeroizing::new(String::with_capacity(HEAD.len() + 64 + MIDDLE.len() + metadata.len() + TAIL.len()));
    body.push_str(HEAD);
    for b in key {
        body.push(char::from(HEX[usize::from(b >> 4)]));
        body.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    body.push_str(MIDDLE);
    body.push_str(&metadata);
    body.push_str(TAIL);
    let mut response = axum::body::Body::from(body.as_bytes().to_vec()).into_response();
    response.headers_mut().insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    fn dek(byte: u8) -> Dek {
        Dek::from_slice(&[byte; 32]).unwrap()
    }

    #[test]
    fn each_key_id_and_each_instance_gets_its_own_key_and_the_same_one_every_time() {
        let d = dek(7);
        let a1 = derive_key(&d, "db-a", 1);
        assert_eq!(*a1, *derive_key(&d, "db-a", 1), "stable: the same DEK gives the same key");
        assert_eq!(*a1, *derive_key(&dek(7), "db-a", 1), "depends on the DEK's bytes alone, not on the copy");
        assert_ne!(*a1, *derive_key(&d, "db-a", 2), "distinct per key id");
        assert_ne!(*a1, *derive_key(&d, "db-b", 1), "distinct per instance");
        assert_ne!(*a1, *derive_key(&dek(8), "db-a", 1), "distinct per DEK");
        assert_ne!(&a1[..], &d.expose()[..], "never the DEK itself");
        // The length prefix keeps ("db-a", n) apart from an instance whose
        // id ends in the bytes of n.
        assert_ne!(*derive_key(&d, "x", 1), *derive_key(&d, "x\0\0\0", 1));
    }

    #[test]
    fn the_read_answer_is_what_the_plugin_parses() {
        let key = derive_key(&dek(1), "db-a", 1);
        let response = key_response(&key, &json!({"version": 1, "destroyed": false}));
        assert_eq!(response.headers()[axum::http::header::CONTENT_TYPE], "application/json");
        let body = futures::executor::block_on(axum::body::to_bytes(response.into_body(), 1 << 16)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let hex = v["data"]["data"]["data"].as_str().unwrap();
        assert_eq!(hex.len(), 64, "AES-256: 64 hex digits");
        assert_eq!(hex, key.iter().map(|b| format!("{b:02x}")).collect::<String>());
        assert_eq!(v["data"]["metadata"]["version"], 1);
    }

    #[test]
    fn the_tune_answer_says_kv_version_2() {
        let v = tune_body();
        assert_eq!(v["options"]["version"], "2");
        assert_eq!(v["data"]["options"]["version"], "2");
    }

    #[test]
    fn refusals_carry_vaults_error_envelope() {
        let body = |r: Response| {
            let status = r.status();
            let bytes = futures::executor::block_on(axum::body::to_bytes(r.into_body(), 1 << 16)).unwrap();
            (status, serde_json::from_slice::<serde_json::Value>(&bytes).unwrap())
        };
        assert_eq!(body(permission_denied()), (StatusCode::FORBIDDEN, json!({"errors": ["permission denied"]})));
        assert_eq!(body(not_found()), (StatusCode::NOT_FOUND, json!({"errors": []})));
        assert_eq!(body(refusal(StatusCode::LOCKED, "instance db-a is revoked")), (StatusCode::FORBIDDEN, json!({"errors": ["permission denied"]})));
        assert_eq!(body(refusal(StatusCode::GONE, "instance db-a is erased")), (StatusCode::NOT_FOUND, json!({"errors": []})));
        assert_eq!(body(refusal(StatusCode::NOT_FOUND, "key unknown to the kms")), (StatusCode::NOT_FOUND, json!({"errors": []})));
        assert_eq!(body(refusal(StatusCode::SERVICE_UNAVAILABLE, "kms down")), (StatusCode::SERVICE_UNAVAILABLE, json!({"errors": ["kms down"]})));
    }
}
