//! The data plane's DEK endpoint, `POST /v1/instances/{id}/dek`, and
//! [`open_dek`], through which every data-plane endpoint opens a DEK.
//!
//! It is the API's hot path, so it is routed beside the general middleware
//! rather than inside it: the API-write audit records no reads, and the token
//! layer would only gather what the request presented, which the handler does
//! itself ([`Tokens::dek_presented`]). Its state is one `Arc`, so a fetch
//! clones one pointer, not the API's state and a stack of middleware
//! services: at four clients that stack was most of what a fetch cost beyond
//! `/healthz` (B5 in BENCHMARKS.md).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::{engine::general_purpose::STANDARD, Engine};
use zeroize::Zeroizing;

use super::auth::{self, Tokens};
use super::{credential, ApiError, AppState};
use crate::engine::{instance_state, InstanceRecord, InstanceState};
use crate::kms::{Dek, Kms};

/// What the DEK route reads: the API's state and the tokens.
struct DekRoute {
    app: AppState,
    tokens: Arc<Tokens>,
}

/// The DEK route, to be merged beside the API's layered routes.
pub fn route(app: AppState, tokens: Arc<Tokens>) -> Router {
    Router::new().route("/v1/instances/{id}/dek", post(fetch)).with_state(Arc::new(DekRoute { app, tokens }))
}

/// Every answer of the DEK endpoint, a plaintext DEK or a refusal, tells
/// browsers, proxies and HTTP client caches not to keep it: a cached copy of a
/// DEK would outlive its revocation and its erasure.
pub async fn no_store(mut response: Response) -> Response {
    set_no_store(&mut response);
    response
}

fn set_no_store(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

async fn fetch(State(r): State<Arc<DekRoute>>, Path(id): Path<String>, req: Request) -> Response {
    let presented = r.tokens.dek_presented(req.headers(), req.extensions());
    drop(req);
    let mut response = match answer(&r, &id, presented).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    set_no_store(&mut response);
    response
}

/// The DEK's JSON answer.
#[derive(serde::Serialize)]
struct Answer<'a> {
    dek: &'a str,
    key_version: &'a str,
}

async fn answer(r: &DekRoute, id: &str, presented: Option<credential::Presented>) -> Result<Response, ApiError> {
    let s = &r.app;
    let refused = || {
        s.metrics.dek_requests.with_label_values(&["unauthorized"]).inc();
        Ok(auth::unauthorized())
    };
    let Some(presented) = presented else { return refused() };
    let inst = s.store.instance_shared(id)?;
    // Before anything that could tell an unknown instance from a known one:
    // both are refused alike when the credential does not open this instance.
    let opener = presented.opener(id, inst.as_ref().and_then(|i| i.credential.as_ref()));
    let (Some(inst), Some(opener)) = (inst, opener) else {
        return refused();
    };
    let released = open_dek(s, id, &inst, &opener).await?;
    let dek = Zeroizing::new(STANDARD.encode(released.dek.expose()));
    Ok(Json(Answer { dek: &dek, key_version: &released.key_version }).into_response())
}

/// A DEK opened for the data plane, and the root-key version it was
/// wrapped under (which the release audit names).
pub struct Released {
    pub dek: Dek,
    pub key_version: String,
}

/// Opens an instance's DEK for a caller already matched to it (`opener`),
/// for every data-plane endpoint (`POST /v1/instances/{id}/dek` and the
/// Vault KV listener): the replica's lag, the instance's state from the
/// committed key record, then the cache, then the KMS; every release is
/// audited and counted in `keywarden_dek_requests_total`. Refusals are
/// errors: 423 revoked, 410 erased or destroyed, 503 behind or unavailable.
pub async fn open_dek(s: &AppState, id: &str, inst: &InstanceRecord, opener: &credential::Opener) -> Result<Released, ApiError> {
    let partition = Some(inst).filter(|i| !s.ownership.owns_key(&i.key_id)).and_then(|i| s.ownership.partition(&i.key_id));
    if let (Some((replica, max)), Some(partition)) = (&s.replica, partition) {
        // A key this node writes itself is never behind here.
        let lag = replica.lag(partition);
        if lag > *max {
            s.metrics.dek_requests.with_label_values(&["replica_behind"]).inc();
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "this node's replica is {}ms behind the changelog (more than cluster.max_replica_lag); ask another node",
                    lag.as_millis().min(u64::MAX as u128)
                ),
            ));
        }
    }
    let result = release_dek(s, id, inst, opener).await;
    let label = match &result {
        Ok(_) => "served",
        Err(e) if e.status == StatusCode::LOCKED => "revoked",
        Err(e) if e.status == StatusCode::GONE => "erased",
        Err(e) if e.status == StatusCode::NOT_FOUND => "unknown",
        Err(_) => "error",
    };
    s.metrics.dek_requests.with_label_values(&[label]).inc();
    result
}

async fn release_dek(s: &AppState, id: &str, inst: &InstanceRecord, opener: &credential::Opener) -> Result<Released, ApiError> {
    // The state check comes first and reads the committed key record, so a
    // revocation is in force the moment its batch is durable.
    let key = s.store.key_shared(&inst.key_id)?;
    match instance_state(inst, key.as_deref()) {
        InstanceState::Active => {}
        InstanceState::Revoked => return Err(ApiError::new(StatusCode::LOCKED, format!("instance {id} is revoked: key {} is disabled", inst.key_id))),
        InstanceState::Erased => return Err(ApiError::new(StatusCode::GONE, format!("instance {id} is erased: key {} is deleted", inst.key_id))),
        InstanceState::Destroyed => {
            return Err(ApiError::new(
                StatusCode::GONE,
                format!("instance {id} is destroyed: {}", inst.destroyed_reason.as_deref().unwrap_or("its DEK no longer exists")),
            ))
        }
    }
    let Some(wrapped) = inst.wrapped.as_ref() else {
        return Err(ApiError::new(StatusCode::GONE, format!("instance {id} has no wrapped DEK")));
    };
    let dek = match s.cache.get(id, &wrapped.key_version) {
        Some(d) => d,
        None => {
            let d = s.kms.unwrap(&inst.key_id, wrapped, id.as_bytes()).await?;
            s.cache.put(id, &inst.key_id, &wrapped.key_version, d.clone());
            d
        }
    };
    s.releases.record(id, &inst.key_id, &wrapped.key_version, opener);
    Ok(Released { dek, key_version: wrapped.key_version.clone() })
}
