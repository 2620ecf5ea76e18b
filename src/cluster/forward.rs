//! Writes on any node: a write for a key whose partition another node owns is
//! forwarded to that node's API, found through the owner's announcement in the
//! changelog. Forwarding keeps one writer per key (the owner), so no two nodes ever
//! decide about the same key, and the caller gets the owner's answer as is.
//! Reads are answered locally from the replica.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::Ownership;
use crate::store::Store;

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
}

impl Forwarder {
    pub fn new(ownership: Ownership, store: Store, me: String) -> Result<Forwarder, ForwardError> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().map_err(ForwardError::Client)?;
        Ok(Forwarder { ownership, store, me, http })
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
    let Some(owner) = f.store.owner_url(partition).ok().flatten().filter(|url| *url != f.me) else {
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
