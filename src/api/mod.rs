//! api: the admin and data-plane HTTP API (axum). Reads come from the store;
//! every change goes through the single writer, so the API never races the intake.

pub mod auth;
pub mod credential;
mod data_plane;
mod dek;
mod impact;
mod progress;
pub mod releases;
pub mod tls;

pub use dek::{no_store, open_dek, Released};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::cluster::forward::{self, Forwarder, KeyFrom};
use crate::engine::{instance_state, EventType, Input, InstanceRecord, KeyStatus, Reply};
use crate::intake::format::valid_id;
use crate::intake::Health;
use crate::kms::cache::DekCache;
use crate::kms::local::LocalKms;
use crate::kms::router::KmsRouter;
use crate::kms::{Dek, Kms, KmsError};
use crate::metrics::Metrics;
use crate::store::audit::AuditFact;
use crate::store::writer::{Writer, WriterError};
use crate::store::Store;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// Serves the data plane: wrap and unwrap.
    pub kms: Arc<dyn Kms>,
    /// Which provider serves a key, for status.
    pub router: Arc<KmsRouter>,
    /// Operates keys; only the embedded KMS is operated through keywarden.
    pub local: Arc<LocalKms>,
    pub writer: Writer,
    pub cache: Arc<DekCache>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub relay: Arc<Notify>,
    /// Named in `GET /v1/keys/{id}/impact`: where the data plane's commands go.
    pub commands_topic: String,
    pub reconciler: Arc<crate::schedule::reconcile::Reconciler>,
    /// With several nodes: DEKs of keys another node writes are refused while
    /// the replica of their partition is this far behind.
    pub replica: Option<(Arc<crate::cluster::replica::Replica>, std::time::Duration)>,
    pub ownership: crate::cluster::Ownership,
    /// How long a write may wait for the broker before it is answered 503
    /// unapplied (`api.write_timeout`).
    pub write_timeout: std::time::Duration,
    /// Where every DEK release is audited.
    pub releases: releases::Releases,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }

    /// Why a DEK was not opened, as the data plane's endpoints tell it
    /// apart: the DEK endpoint answers 423 and 410 itself, the Vault KV
    /// endpoint says the same as 403 and 404.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The reason, as the API's JSON error says it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<WriterError> for ApiError {
    fn from(e: WriterError) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

/// A store that cannot be read answers 500, naming the record, and nothing is decided.
impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "a request could not read the store");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl From<KmsError> for ApiError {
    fn from(e: KmsError) -> Self {
        let status = match &e {
            KmsError::UnknownKey(_) => StatusCode::NOT_FOUND,
            KmsError::KeyDisabled(_) => StatusCode::LOCKED,
            KmsError::KeyDeleted(_) | KmsError::MaterialDestroyed { .. } => StatusCode::GONE,
            KmsError::Conflict(_) => StatusCode::CONFLICT,
            KmsError::Refused(_) => StatusCode::BAD_GATEWAY,
            KmsError::Store(e) if e.retryable() => StatusCode::SERVICE_UNAVAILABLE,
            KmsError::UnknownVersion { .. } | KmsError::Integrity(_) | KmsError::Setup(_) | KmsError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            KmsError::Unavailable(_) | KmsError::Throttled(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

type ApiResult = Result<Response, ApiError>;

/// Where a route is answered. Every route names it, so a write route added to
/// the table is forwarded to its key's owner without a second edit.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// Any node answers: reads (from its replica), DEK fetches, node-local actions.
    Here,
    /// A write about one key: decided by the node that owns the key.
    Owner(KeyFrom),
}

/// The API: every route, its method and where it is answered; beside them,
/// the DEK route (`dek::route`), a read of the data plane answered here from
/// this node's replica.
fn routes() -> Vec<(&'static str, MethodRouter<AppState>, Placement)> {
    use Placement::*;
    vec![
        ("/healthz", get(|| async { Json(json!({"status": "ok"})) }), Here),
        ("/readyz", get(readyz), Here),
        ("/metrics", get(metrics), Here),
        ("/v1/keys", post(create_key), Owner(KeyFrom::Body { mint: true })),
        ("/v1/keys/{key_id}", get(show_key), Here),
        ("/v1/keys/{key_id}/impact", get(impact::show_impact), Here),
        ("/v1/keys/{key_id}/{action}", post(operate_key), Owner(KeyFrom::Path("key_id"))),
        ("/v1/events/{event_id}", get(show_event), Here),
        // Each node reconciles the keys it owns.
        ("/v1/reconcile", post(reconcile), Here),
        ("/v1/audit", get(show_audit), Here),
        ("/v1/audit/export", get(export_audit), Here),
        ("/v1/audit/verify", get(verify_audit), Here),
        ("/v1/instances", post(create_instance), Owner(KeyFrom::Body { mint: false })),
        ("/v1/instances", get(list_instances), Here),
        ("/v1/instances/{id}", get(show_instance), Here),
        ("/v1/instances/{id}", delete(delete_instance), Owner(KeyFrom::InstancePath("id"))),
        ("/v1/instances/{id}/credential", post(rotate_credential), Owner(KeyFrom::InstancePath("id"))),
        // Authenticated by the instance's own credential, which a forwarded
        // request no longer carries: answered here, and on a node that does
        // not own the key refused (503, retryable) until the agent reaches
        // the owner.
        ("/v1/instances/{id}/data-plane", post(data_plane::report), Here),
    ]
}

pub fn router(state: AppState, tokens: Arc<auth::Tokens>, forwarder: Option<Arc<Forwarder>>) -> Router {
    let writer = state.writer.clone();
    let write_timeout = state.write_timeout;
    let mut router = Router::new();
    for (path, route, placement) in routes() {
        let route = match (placement, &forwarder) {
            (Placement::Owner(from), Some(f)) => route.layer(axum::middleware::from_fn_with_state((f.clone(), from), forward::forward)),
            _ => route,
        };
        router = router.route(path, route);
    }
    let dek = dek::route(state.clone(), tokens.clone());
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint; see the README for the API") })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(tokens, auth::require))
        // Outside the token check, so that refused writes are audited too.
        .layer(axum::middleware::from_fn_with_state(
            Audit { writer, timeout: write_timeout, in_flight: Arc::new(tokio::sync::Semaphore::new(AUDITS_IN_FLIGHT)) },
            record_writes,
        ))
        // Added after the layers, so none of them wraps it.
        .merge(dek)
}

/// How many audit entries may wait for the writer at once; more wait for a place.
const AUDITS_IN_FLIGHT: usize = 1024;
/// How long an answer waits for its audit entry to be committed.
const AUDIT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Clone)]
struct Audit {
    writer: Writer,
    timeout: std::time::Duration,
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// Every write through the API lands in the hash-chained audit trail: which
/// token, what, and the status answered. DEK fetches are reads, audited as
/// releases (`releases`), and their route is not wrapped by this layer.
async fn record_writes(State(audit): State<Audit>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    let who = match response.extensions().get::<auth::Caller>() {
        Some(auth::Caller::Admin) => "admin",
        Some(auth::Caller::Node) => "node",
        Some(auth::Caller::Instance) => "instance",
        None => "anonymous",
    };
    let is_write = matches!(method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE");
    if is_write {
        let fact = AuditFact { who: who.into(), what: format!("{method} {path}"), outcome: response.status().as_u16().to_string(), ..Default::default() };
        // Usually committed before the answer goes (a later read of the trail
        // sees it), but never held for long: the writer may be busy with a
        // batch that waits for the broker, and the caller's answer (a 503
        // within api.write_timeout) must not wait for that too. Then it is
        // committed behind the answer. Bounded: past AUDITS_IN_FLIGHT, a
        // write waits here for a place.
        match audit.in_flight.clone().acquire_owned().await {
            Ok(place) => {
                let mut committed = tokio::spawn(async move {
                    if let Err(e) = audit.writer.audit(fact, audit.timeout).await {
                        tracing::error!(%path, error = %e, "cannot write the audit trail; check the store");
                    }
                    drop(place);
                });
                if tokio::time::timeout(AUDIT_WAIT, &mut committed).await.is_err() {
                    tracing::debug!("the audit entry is committed behind the answer");
                }
            }
            Err(_) => tracing::error!(%path, "cannot write the audit trail: the api is shutting down"),
        }
    }
    response
}

#[derive(Deserialize)]
struct ReconcileQuery {
    #[serde(default)]
    confirm: bool,
}

/// Runs a reconciliation now; `?confirm=true` applies a plan held back for
/// touching more instances than `reconcile.confirm_above`.
async fn reconcile(State(s): State<AppState>, Query(q): Query<ReconcileQuery>) -> ApiResult {
    use crate::schedule::reconcile::ReconcileError;
    match s.reconciler.reconcile(q.confirm).await {
        Ok(report) => Ok(Json(report).into_response()),
        Err(e @ ReconcileError::Busy) => Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
        Err(e) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
    since: Option<chrono::DateTime<Utc>>,
}

async fn show_audit(State(s): State<AppState>, Query(q): Query<AuditQuery>) -> ApiResult {
    let entries = s.store.audit(q.limit.unwrap_or(100).min(10_000))?;
    let verified = s.store.verify_audit(&entries, false);
    Ok(Json(json!({"entries": entries, "chain": match verified { Ok(_) => "intact".to_string(), Err(e) => e }})).into_response())
}

/// JSON lines, oldest first: one entry per line, ready for a SIEM.
async fn export_audit(State(s): State<AppState>, Query(q): Query<AuditQuery>) -> ApiResult {
    let store = s.store.clone();
    let entries = tokio::task::spawn_blocking(move || store.audit_since(q.since, q.limit.unwrap_or(usize::MAX)))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "audit export failed; see the log"))??;
    let mut body = String::new();
    for e in &entries {
        body.push_str(&serde_json::to_string(e).expect("audit entries serialize"));
        body.push('\n');
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// Checks the whole chain, from the first entry ever written, and every seal
/// under this daemon's audit secret (which only the daemon holds, so the CLI
/// asks here rather than reading the store). `legacy` counts the entries from
/// before the trail was keyed that its anchor vouches for.
async fn verify_audit(State(s): State<AppState>) -> ApiResult {
    let store = s.store.clone();
    let (entries, verified) = tokio::task::spawn_blocking(move || {
        store.audit_since(None, usize::MAX).map(|entries| {
            let verified = store.verify_audit(&entries, true);
            (entries, verified)
        })
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "audit verification failed; see the log"))??;
    let last = entries.last().map(|e| e.hash.clone());
    Ok(match verified {
        Ok(v) => Json(json!({"chain": "intact", "entries": entries.len(), "legacy": v.legacy, "last_hash": last})).into_response(),
        Err(e) => (StatusCode::CONFLICT, Json(json!({"chain": "broken", "error": e, "entries": entries.len()}))).into_response(),
    })
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.health.ready() {
        Json(json!({"status": "ready"})).into_response()
    } else if let Some(reason) = s.health.failure.get() {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}; keywarden is exiting so that it is restarted")).into_response()
    } else if !s.health.broker_ok.load(Ordering::SeqCst) {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not ready: kafka is unreachable; state is kept and intake resumes when it is back").into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for the consumer group to assign partitions, and for this node to take them over")
            .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let (m, store) = (s.metrics.clone(), s.store.clone());
    // The store gauges scan the store (throttled inside): off the runtime.
    let _ = tokio::task::spawn_blocking(move || m.refresh_store_gauges(&store)).await;
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes, allow_empty: bool) -> Result<Option<T>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return if allow_empty { Ok(None) } else { Err(ApiError::new(StatusCode::BAD_REQUEST, "request body is empty; send a JSON object")) };
    }
    serde_json::from_slice(body).map(Some).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("request body is not valid: {e}")))
}

fn check_id(name: &'static str, value: &str, max: usize) -> Result<(), ApiError> {
    valid_id(name, value, max).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    key_id: Option<String>,
}

async fn create_key(State(s): State<AppState>, body: Bytes) -> ApiResult {
    let req: Option<CreateKey> = parse_body(&body, true)?;
    let key_id = req.and_then(|r| r.key_id);
    if let Some(id) = &key_id {
        check_id("key_id", id, 256)?;
    }
    let local = s.local.clone();
    let (key_id, version) = local.create_key(key_id).await?;
    s.writer.submit_within(Input::RegisterKey { key_id: key_id.clone(), version: version.clone(), at: Utc::now() }, s.write_timeout).await?;
    Ok((StatusCode::CREATED, Json(json!({"key_id": key_id, "version": version, "state": "active"}))).into_response())
}

async fn operate_key(State(s): State<AppState>, Path((key_id, action)): Path<(String, String)>) -> ApiResult {
    let kind = match action.as_str() {
        "rotate" => EventType::Rotate,
        "disable" => EventType::Disable,
        "enable" => EventType::Enable,
        "delete" => EventType::Delete,
        "restore" => EventType::Restore,
        "retry" => return retry_failed(&s, &key_id).await,
        "sync" => {
            s.kms.sync(&key_id).await?;
            return Ok(
                (StatusCode::ACCEPTED, Json(json!({"key_id": key_id, "type": "sync", "detail": "the kms will re-send the key's last event"}))).into_response()
            );
        }
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("{other:?} is not a key action; use rotate, disable, enable, delete, restore, retry or sync"),
            ))
        }
    };
    let local = s.local.clone();
    let id = key_id.clone();
    let emitted = local.operate(&id, kind).await?;
    s.relay.notify_waiters();
    let e = emitted.event;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "event_id": e.event_id,
            "key_id": e.key_id,
            "type": e.kind,
            "key_version": e.key_version,
            "occurred_at": e.occurred_at,
        })),
    )
        .into_response())
}

/// Re-runs a finished rotation for the instances whose rewrap failed.
async fn retry_failed(s: &AppState, key_id: &str) -> ApiResult {
    let event_id = format!("retry-{}", uuid::Uuid::new_v4());
    let input = Input::RetryRewraps { key_id: key_id.to_string(), request_id: event_id.clone(), at: Utc::now() };
    match s.writer.submit_within(input, s.write_timeout).await? {
        Reply::NotFound(m) => return Err(ApiError::new(StatusCode::NOT_FOUND, m)),
        Reply::Conflict(m) => return Err(ApiError::new(StatusCode::CONFLICT, m)),
        _ => {}
    }
    Ok((StatusCode::ACCEPTED, Json(json!({"event_id": event_id, "key_id": key_id, "type": "retry"}))).into_response())
}

async fn show_key(State(s): State<AppState>, Path(key_id): Path<String>) -> ApiResult {
    let record = s.store.key(&key_id)?;
    let kms_state = s.local.state(&key_id).ok();
    if record.is_none() && kms_state.is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("key {key_id} is unknown; create it with POST /v1/keys")));
    }
    let store = s.store.clone();
    let id = key_id.clone();
    let instances = off_runtime(move || Ok(store.instances_of(&id)?)).await?;
    let live: Vec<&InstanceRecord> = instances.iter().filter(|i| i.wrapped.is_some()).collect();
    let version = record.as_ref().and_then(|k| k.version.clone()).or_else(|| kms_state.as_ref().map(|k| k.1.clone()));
    let pending = live.iter().filter(|i| Some(&i.key_version) != version.as_ref()).count();
    let failures: Vec<Value> = live.iter().filter_map(|i| i.rewrap_error.as_ref().map(|e| json!({"instance_id": i.instance_id, "error": e}))).collect();
    let status = record.as_ref().map(|k| k.status).or(kms_state.as_ref().map(|k| k.0)).unwrap_or(KeyStatus::Active);
    let job = s.store.job(&key_id)?;
    let (provider, governor) = s.router.describe(&key_id);
    Ok(Json(json!({
        "key_id": key_id,
        "state": status,
        "version": version,
        "instances": live.len(),
        "pending_rewraps": pending,
        "rewrap_failures": failures,
        "rotation": job.map(|j| progress::rotation_view(&j, status, Utc::now())),
        "last_event_id": record.as_ref().and_then(|k| k.last_event_id.clone()),
        "last_event_at": record.as_ref().and_then(|k| k.last_event_at),
        "deleted_at": record.as_ref().and_then(|k| k.deleted_at),
        "purged_at": record.as_ref().and_then(|k| k.purged_at),
        "kms_state": kms_state.map(|k| k.0),
        // Set once the embedded KMS destroyed the key's material (the proof of erasure).
        "kms_material_destroyed_at": s.local.material_destroyed_at(&key_id).ok().flatten(),
        "kms": {"provider": provider, "limits": governor},
    }))
    .into_response())
}

async fn show_event(State(s): State<AppState>, Path(event_id): Path<String>) -> ApiResult {
    match s.store.event(&event_id)? {
        Some(e) => Ok(Json(e).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("event {event_id} has not been consumed (yet)"))),
    }
}

fn instance_json(s: &AppState, inst: &InstanceRecord) -> Result<Value, ApiError> {
    let key = s.store.key(&inst.key_id)?;
    Ok(json!({
        "instance_id": inst.instance_id,
        "key_id": inst.key_id,
        "key_version": inst.key_version,
        "state": instance_state(inst, key.as_ref()).as_str(),
        "dek_fingerprint": inst.dek_fingerprint,
        "created_at": inst.created_at,
        "updated_at": inst.updated_at,
        "destroyed_at": inst.destroyed_at,
        "destroyed_reason": inst.destroyed_reason,
        "rewrap_status": match (&inst.rewrap_error, key.as_ref().and_then(|k| k.version.as_ref())) {
            (Some(_), _) => "rewrap_failed",
            (None, Some(v)) if inst.wrapped.is_some() && *v != inst.key_version => "pending",
            _ => "ok",
        },
        "rewrap_error": inst.rewrap_error,
        // Names the credential in DEK release audits; null for an instance
        // created before credentials, until its credential is rotated.
        "dek_credential_id": inst.credential.as_ref().map(|c| &c.id),
        // What the instance's data-plane agent last reported enforcing.
        "data_plane": inst.data_plane.as_ref().map(|d| json!({
            "command_id": d.command_id,
            "action": d.action,
            "outcome": d.outcome,
            "at": d.at,
            "detail": d.detail,
            "received_at": d.received_at,
        })),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateInstance {
    instance_id: String,
    key_id: String,
}

async fn create_instance(State(s): State<AppState>, body: Bytes) -> ApiResult {
    let req: CreateInstance = parse_body(&body, false)?.expect("body required");
    check_id("instance_id", &req.instance_id, 256)?;
    check_id("key_id", &req.key_id, 256)?;
    // The instance id is the AAD of every wrap, and Key Protect's AAD strings
    // are at most 255 characters: refused here, before any KMS call.
    if s.kms.provider_for(&req.key_id) == crate::kms::keyprotect::NAME && req.instance_id.len() > crate::kms::keyprotect::MAX_AAD {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "instance_id is {} characters; instances under a Key Protect key take at most {} (it is the AAD of their wrapped DEK)",
                req.instance_id.len(),
                crate::kms::keyprotect::MAX_AAD
            ),
        ));
    }
    if s.store.instance(&req.instance_id)?.is_some() {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("instance {} already exists; pick another id or delete it first", req.instance_id)));
    }
    let dek = Dek::generate();
    let issued = credential::issue(Utc::now());
    let label = s.store.key(&req.key_id)?.and_then(|k| k.version);
    let wrapped = match s.kms.wrap(&req.key_id, &dek, req.instance_id.as_bytes(), label.as_deref()).await {
        Ok(w) => w,
        Err(KmsError::KeyDisabled(k)) => {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("key {k} is disabled; enable it before creating instances under it")))
        }
        Err(KmsError::KeyDeleted(k)) => return Err(ApiError::new(StatusCode::CONFLICT, format!("key {k} is deleted; restore it or choose another key"))),
        Err(e @ KmsError::MaterialDestroyed { .. }) => return Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
        Err(e) => return Err(e.into()),
    };
    let reply = s
        .writer
        .submit_within(
            Input::CreateInstance {
                instance_id: req.instance_id.clone(),
                key_id: req.key_id,
                wrapped,
                fingerprint: dek.fingerprint(),
                credential: issued.credential,
                at: Utc::now(),
            },
            s.write_timeout,
        )
        .await?;
    match reply {
        Reply::Created(inst) => {
            // The only time the token is said: keywarden keeps its hash alone.
            let mut body = instance_json(&s, &inst)?;
            body["dek_token"] = json!(issued.token.as_str());
            Ok((StatusCode::CREATED, Json(body)).into_response())
        }
        Reply::Conflict(m) => Err(ApiError::new(StatusCode::CONFLICT, m)),
        other => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("unexpected engine reply {other:?}"))),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    key_id: Option<String>,
}

async fn list_instances(State(s): State<AppState>, Query(q): Query<ListQuery>) -> ApiResult {
    // A scan of every instance: off the runtime.
    off_runtime(move || {
        let list = match &q.key_id {
            Some(k) => s.store.instances_of(k)?,
            None => s.store.instances()?,
        };
        let items = list.iter().map(|i| instance_json(&s, i)).collect::<Result<Vec<Value>, ApiError>>()?;
        Ok(Json(json!({ "instances": items })).into_response())
    })
    .await
}

/// Runs a read that scans the store on a blocking thread: a scan of a large
/// store must not hold up an async worker (and the DEK requests it serves).
async fn off_runtime<T: Send + 'static>(read: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(read).await.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}")))?
}

async fn show_instance(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    match s.store.instance(&id)? {
        Some(inst) => Ok(Json(instance_json(&s, &inst)?).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("instance {id} does not exist"))),
    }
}

/// Issues the instance a new DEK credential; the old one is refused from the
/// moment this is committed. The token is in this answer only.
async fn rotate_credential(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let issued = credential::issue(Utc::now());
    let credential_id = issued.credential.id.clone();
    let input = Input::RotateCredential { instance_id: id.clone(), credential: issued.credential, at: Utc::now() };
    match s.writer.submit_within(input, s.write_timeout).await? {
        Reply::NotFound(m) => Err(ApiError::new(StatusCode::NOT_FOUND, m)),
        Reply::Conflict(m) => Err(ApiError::new(StatusCode::CONFLICT, m)),
        _ => Ok(Json(json!({"instance_id": id, "dek_credential_id": credential_id, "dek_token": issued.token.as_str()})).into_response()),
    }
}

async fn delete_instance(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let reply = s
        .writer
        .submit_within(
            Input::DeleteInstance { instance_id: id.clone(), request_id: format!("{}{}", data_plane::API_DELETE, uuid::Uuid::new_v4()), at: Utc::now() },
            s.write_timeout,
        )
        .await?;
    match reply {
        Reply::NotFound(m) => Err(ApiError::new(StatusCode::NOT_FOUND, m)),
        _ => {
            s.cache.forget(&id);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}
