//! Writes on any node: a write for a key whose partition another node owns is
//! forwarded to that node's API, found through the owner's announcement in the
//! changelog. Forwarding keeps one writer per key (the owner), so no two nodes ever
//! decide about the same key, and the caller gets the owner's answer as is.
//! Reads are answered locally from the replica.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::cluster::Ownership;
use crate::store::Store;

const FORWARDED: &str = "x-keywarden-forwarded";
const MAX_BODY: usize = 64 * 1024;

pub struct Forwarder {
    pub ownership: Ownership,
    pub store: Store,
    /// This node's own advertised URL: a stale announcement naming it means
    /// the partition is between owners.
    pub me: String,
    pub http: reqwest::Client,
}

/// The key a write is about, if it is a write that must happen on the key's owner.
fn key_of(store: &Store, method: &Method, path: &str, body: &[u8]) -> Option<String> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let decode = |s: &str| percent_decode(s);
    match (method, parts.as_slice()) {
        (&Method::POST, ["v1", "keys"]) => serde_json::from_slice::<Value>(body).ok()?.get("key_id")?.as_str().map(str::to_owned),
        (&Method::POST, ["v1", "keys", key, _action]) => Some(decode(key)),
        (&Method::POST, ["v1", "instances"]) => serde_json::from_slice::<Value>(body).ok()?.get("key_id")?.as_str().map(str::to_owned),
        (&Method::DELETE, ["v1", "instances", id]) => crate::engine::View::instance(store, &decode(id)).map(|i| i.key_id),
        _ => None,
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn forward(State(f): State<Arc<Forwarder>>, req: Request, next: Next) -> Response {
    if !matches!(*req.method(), Method::POST | Method::DELETE) || req.uri().path().ends_with("/dek") {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, Json(json!({"error": "request body too large"}))).into_response();
    };
    // A key created without an id gets one here, so that its owner can be found.
    let bytes = if parts.method == Method::POST && parts.uri.path().trim_end_matches('/') == "/v1/keys" {
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
    let Some(key) = key_of(&f.store, &parts.method, parts.uri.path(), &bytes) else {
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
    let Some(owner) = f.store.owner_url(partition).filter(|url| *url != f.me) else {
        return unavailable(format!("no node owns partition {partition} of key {key} right now (the group is rebalancing); retry shortly"));
    };
    let url = format!("{}{}", owner.trim_end_matches('/'), parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut out = f.http.request(parts.method.clone(), &url).header(FORWARDED, HeaderValue::from_static("1")).body(Bytes::clone(&bytes));
    for name in [axum::http::header::AUTHORIZATION, axum::http::header::CONTENT_TYPE] {
        if let Some(v) = parts.headers.get(&name) {
            out = out.header(name, v);
        }
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
