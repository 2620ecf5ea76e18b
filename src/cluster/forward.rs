//! Writes on any node: a write for a key whose partition another node owns is
//! forwarded to that node's API, found through the owner's announcement in the
//! changelog. Forwarding keeps one writer per key (the owner), so no two nodes ever
//! decide about the same key, and the caller gets the owner's answer as is.
//! Reads are answered locally from the replica.
//!
//! The caller's bearer token never leaves the node it was sent to: the
//! forwarded request carries instead a signature of this node under the
//! cluster secret (`NodeAuth`), over the method, path, body, a time and a
//! nonce, which the owner checks in place of a token. A captured forwarded
//! request is refused once its nonce was seen or its time is 30 s old.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::changelog::ChangelogKey;
use super::{Ownership, Peers};
use crate::store::Store;
use crate::text::{hex, unhex};

const FORWARDED: &str = "x-keywarden-forwarded";
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot build the http client that forwards writes to their owner: {0}")]
    Client(reqwest::Error),
}

pub struct Forwarder {
    ownership: Ownership,
    store: Store,
    /// This node's own advertised URL: a stale announcement naming it means
    /// the partition is between owners.
    me: String,
    http: reqwest::Client,
    auth: Arc<NodeAuth>,
    peers: Peers,
}

impl Forwarder {
    pub fn new(ownership: Ownership, store: Store, me: String, auth: Arc<NodeAuth>, peers: Peers) -> Result<Forwarder, ForwardError> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().map_err(ForwardError::Client)?;
        Ok(Forwarder { ownership, store, me, http, auth, peers })
    }
}

const NODE_TIME: &str = "x-keywarden-node-time";
const NODE_NONCE: &str = "x-keywarden-node-nonce";
const NODE_MAC: &str = "x-keywarden-node-mac";
const NODE_DOMAIN: &[u8] = b"keywarden forwarded request v1";
/// How old (or how far ahead) a forwarded request's time may be.
const NODE_SKEW: Duration = Duration::from_secs(30);
/// Nonces remembered at most; past it, forwarded requests are refused until
/// old ones expire (a flood, not traffic).
const NONCES: usize = 100_000;

/// Node-to-node authentication of forwarded writes, under the cluster secret.
pub struct NodeAuth {
    key: Arc<ChangelogKey>,
    /// Nonces seen within `NODE_SKEW`, with when.
    seen: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl NodeAuth {
    pub fn new(key: Arc<ChangelogKey>) -> NodeAuth {
        NodeAuth { key, seen: Default::default() }
    }

    fn sign(&self, method: &str, path: &str, time: &str, nonce: &str, body: &[u8]) -> String {
        hex(&self.key.sign_parts(NODE_DOMAIN, &[method.as_bytes(), path.as_bytes(), time.as_bytes(), nonce.as_bytes(), body]))
    }

    /// Whether the request carries a node signature at all (then it must verify).
    pub fn presented(headers: &axum::http::HeaderMap) -> bool {
        headers.contains_key(NODE_MAC)
    }

    /// Checks a forwarded request's signature, freshness and nonce.
    pub fn verify(&self, method: &str, path: &str, headers: &axum::http::HeaderMap, body: &[u8]) -> Result<(), &'static str> {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(time), Some(nonce), Some(mac)) = (get(NODE_TIME), get(NODE_NONCE), get(NODE_MAC)) else {
            return Err("incomplete node signature");
        };
        let Some(mac) = unhex(mac) else { return Err("malformed node signature") };
        if !self.key.verify_parts(NODE_DOMAIN, &[method.as_bytes(), path.as_bytes(), time.as_bytes(), nonce.as_bytes(), body], &mac) {
            return Err("node signature does not verify");
        }
        let sent = time.parse::<i64>().map_err(|_| "malformed node time")?;
        let age = (chrono::Utc::now().timestamp_millis() - sent).unsigned_abs();
        if age > NODE_SKEW.as_millis() as u64 {
            return Err("node signature too old");
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, at| at.elapsed() <= NODE_SKEW * 2);
        if seen.len() >= NONCES {
            return Err("too many forwarded requests");
        }
        if seen.insert(nonce.to_string(), std::time::Instant::now()).is_some() {
            return Err("node signature replayed");
        }
        Ok(())
    }
}

/// Where a write route finds the key it is about. Each write route of the
/// API's route table names one, so a new write route is forwarded with no
/// edit here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFrom {
    /// The JSON body's `key_id`; with `mint`, one is chosen here when the
    /// body has none, so that the key's owner can be found.
    Body { mint: bool },
    /// A path parameter naming the key.
    Path(&'static str),
    /// A path parameter naming an instance, whose key the store knows.
    InstancePath(&'static str),
}

/// The key a write is about.
fn key_of(store: &Store, from: KeyFrom, params: &RawPathParams, body: &[u8]) -> Option<String> {
    let param = |name: &str| params.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
    match from {
        KeyFrom::Body { .. } => serde_json::from_slice::<Value>(body).ok()?.get("key_id")?.as_str().map(str::to_owned),
        KeyFrom::Path(name) => param(name),
        KeyFrom::InstancePath(name) => store.instance(&param(name)?).ok().flatten().map(|i| i.key_id),
    }
}

/// The layer of every write route (see `KeyFrom`).
pub async fn forward(State((f, from)): State<(Arc<Forwarder>, KeyFrom)>, params: RawPathParams, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, Json(json!({"error": "request body too large"}))).into_response();
    };
    // A key created without an id gets one here, so that its owner can be found.
    let bytes = if from == (KeyFrom::Body { mint: true }) {
        let mut body: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({}));
        match body.as_object_mut() {
            Some(map) if !map.contains_key("key_id") || map["key_id"].is_null() => {
                map.insert("key_id".into(), uuid::Uuid::new_v4().to_string().into());
                Bytes::from(serde_json::to_vec(&body).expect("json serializes"))
            }
            _ => bytes,
        }
    } else {
        bytes
    };
    let Some(key) = key_of(&f.store, from, &params, &bytes) else {
        return next.run(Request::from_parts(parts, Body::from(bytes))).await;
    };
    if f.ownership.owns_key(&key) {
        return next.run(Request::from_parts(parts, Body::from(bytes))).await;
    }
    let partition = f.ownership.partition(&key).unwrap_or_default();
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": why}))).into_response();
    if parts.headers.contains_key(FORWARDED) {
        return unavailable(format!("partition {partition} of key {key} changed owner while this request was forwarded; retry"));
    }
    // Owners announce themselves through the changelog when they take a partition.
    let announced = f.store.owner_url(partition).ok().flatten().filter(|url| *url != f.me);
    let owner = match announced {
        None => return unavailable(format!("no node owns partition {partition} of key {key} right now (the group is rebalancing); retry shortly")),
        Some(url) if !f.peers.admits(&url) => {
            tracing::warn!(partition, %url, "ignoring an owner announcement that names a URL not in cluster.peers");
            return unavailable(format!("the owner announced for partition {partition} of key {key} ({url}) is not in cluster.peers; list every node there"));
        }
        Some(url) => url,
    };
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = format!("{}{}", owner.trim_end_matches('/'), path);
    // Signed by this node; the caller's token stays here.
    let time = chrono::Utc::now().timestamp_millis().to_string();
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let mac = f.auth.sign(parts.method.as_str(), path, &time, &nonce, &bytes);
    let mut out = f
        .http
        .request(parts.method.clone(), &url)
        .header(FORWARDED, HeaderValue::from_static("1"))
        .header(NODE_TIME, time)
        .header(NODE_NONCE, nonce)
        .header(NODE_MAC, mac)
        .body(Bytes::clone(&bytes));
    if let Some(v) = parts.headers.get(axum::http::header::CONTENT_TYPE) {
        out = out.header(axum::http::header::CONTENT_TYPE, v);
    }
    match out.send().await {
        Ok(resp) => {
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
            let body = resp.bytes().await.unwrap_or_default();
            let mut response = (status, body).into_response();
            if let Some(ct) = content_type.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
                response.headers_mut().insert(axum::http::header::CONTENT_TYPE, ct);
            }
            tracing::debug!(%key, %owner, %url, status = status.as_u16(), "write forwarded to the key's owner");
            response
        }
        Err(e) => unavailable(format!("the owner of key {key} ({owner}) did not answer: {e}; retry")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> NodeAuth {
        NodeAuth::new(Arc::new(ChangelogKey::new(zeroize::Zeroizing::new(b"0123456789abcdef0123456789abcdef".to_vec()))))
    }

    fn signed(a: &NodeAuth, method: &str, path: &str, time: i64, nonce: &str, body: &[u8]) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        let time = time.to_string();
        h.insert(NODE_TIME, time.parse().unwrap());
        h.insert(NODE_NONCE, nonce.parse().unwrap());
        h.insert(NODE_MAC, a.sign(method, path, &time, nonce, body).parse().unwrap());
        h
    }

    #[test]
    fn a_forwarded_request_verifies_once_and_only_as_signed() {
        let a = auth();
        let now = chrono::Utc::now().timestamp_millis();
        let h = signed(&a, "POST", "/v1/keys/k/disable", now, "n1", b"");
        assert_eq!(a.verify("POST", "/v1/keys/k/disable", &h, b""), Ok(()));
        assert_eq!(a.verify("POST", "/v1/keys/k/disable", &h, b""), Err("node signature replayed"));
        let h = signed(&a, "POST", "/v1/keys/k/disable", now, "n2", b"");
        assert_eq!(a.verify("POST", "/v1/keys/k/enable", &h, b""), Err("node signature does not verify"), "another path");
        assert_eq!(a.verify("POST", "/v1/keys/k/disable", &h, b"{}"), Err("node signature does not verify"), "another body");
        let old = signed(&a, "POST", "/v1/keys/k/disable", now - 60_000, "n3", b"");
        assert_eq!(a.verify("POST", "/v1/keys/k/disable", &old, b""), Err("node signature too old"));
        let other = NodeAuth::new(Arc::new(ChangelogKey::new(zeroize::Zeroizing::new(b"another cluster's secret, 32 bytes".to_vec()))));
        let theirs = signed(&other, "POST", "/v1/keys/k/disable", now, "n4", b"");
        assert_eq!(a.verify("POST", "/v1/keys/k/disable", &theirs, b""), Err("node signature does not verify"));
        assert_eq!(a.verify("POST", "/v1/keys/k/disable", &axum::http::HeaderMap::new(), b""), Err("incomplete node signature"));
    }
}
