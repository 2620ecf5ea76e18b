//! A test KMS speaking the AWS KMS JSON protocol (X-Amz-Target
//! TrentService.{ReEncrypt,Encrypt,Decrypt,DescribeKey}) with a fixed latency and
//! a hard request quota: above `quota` admitted requests in one wall-clock second
//! it answers 429 ThrottlingException at once, as AWS does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use base64::{engine::general_purpose::STANDARD, Engine};
use serde_json::{json, Value};

#[derive(Default)]
pub struct Stats {
    pub reencrypt_ok: AtomicU64,
    pub throttled: AtomicU64,
    pub other: AtomicU64,
    /// First and last admitted ReEncrypt, for the sustained rate.
    pub window: Mutex<Option<(Instant, Instant)>>,
}

struct Quota {
    second: u64,
    admitted: u64,
}

struct Shared {
    latency: Duration,
    quota: u64,
    epoch: Instant,
    gate: Mutex<Quota>,
    stats: Arc<Stats>,
}

pub struct FakeKms {
    pub endpoint: String,
    pub stats: Arc<Stats>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeKms {
    pub fn start(latency: Duration, quota: u64) -> super::harness::Res<FakeKms> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let stats = Arc::new(Stats::default());
        let shared = Arc::new(Shared { latency, quota, epoch: Instant::now(), gate: Mutex::new(Quota { second: 0, admitted: 0 }), stats: stats.clone() });
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: axum::body::Bytes| {
            let shared = shared.clone();
            async move { handle(shared, headers, body).await }
        });
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeKms { endpoint, stats, _runtime: runtime })
    }
}

async fn handle(s: Arc<Shared>, headers: HeaderMap, body: axum::body::Bytes) -> axum::response::Response {
    let arrived = Instant::now();
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let admitted = {
        let mut g = s.gate.lock().unwrap();
        let second = arrived.duration_since(s.epoch).as_secs();
        if second != g.second {
            g.second = second;
            g.admitted = 0;
        }
        g.admitted += 1;
        g.admitted <= s.quota
    };
    if !admitted {
        s.stats.throttled.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::TOO_MANY_REQUESTS, Json(json!({"__type": "ThrottlingException", "message": "Rate exceeded"}))).into_response();
    }
    tokio::time::sleep(s.latency).await;
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match target.as_str() {
        "TrentService.ReEncrypt" => {
            s.stats.reencrypt_ok.fetch_add(1, Ordering::Relaxed);
            {
                let mut w = s.stats.window.lock().unwrap();
                let now = Instant::now();
                *w = Some(match *w {
                    None => (arrived, now),
                    Some((first, _)) => (first, now),
                });
            }
            // The "new" ciphertext: the old one, reversed, so it differs and stays opaque.
            let mut blob = req["CiphertextBlob"].as_str().and_then(|b| STANDARD.decode(b).ok()).unwrap_or_default();
            blob.reverse();
            Json(json!({"CiphertextBlob": STANDARD.encode(blob), "KeyId": req["DestinationKeyId"], "SourceKeyId": req["SourceKeyId"]})).into_response()
        }
        "TrentService.Encrypt" => {
            s.stats.other.fetch_add(1, Ordering::Relaxed);
            let blob = req["Plaintext"].as_str().and_then(|b| STANDARD.decode(b).ok()).unwrap_or_default();
            Json(json!({"CiphertextBlob": STANDARD.encode(blob), "KeyId": req["KeyId"]})).into_response()
        }
        "TrentService.Decrypt" => {
            s.stats.other.fetch_add(1, Ordering::Relaxed);
            let blob = req["CiphertextBlob"].as_str().and_then(|b| STANDARD.decode(b).ok()).unwrap_or_default();
            Json(json!({"Plaintext": STANDARD.encode(blob), "KeyId": req["KeyId"]})).into_response()
        }
        "TrentService.DescribeKey" => {
            s.stats.other.fetch_add(1, Ordering::Relaxed);
            Json(json!({"KeyMetadata": {"KeyId": req["KeyId"], "KeyState": "Enabled", "Enabled": true}})).into_response()
        }
        other => (StatusCode::BAD_REQUEST, Json(json!({"__type": "UnknownOperationException", "message": other}))).into_response(),
    }
}
