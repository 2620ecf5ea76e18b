//! Keeps keywarden a good client of a remote KMS: a request-rate limit (the
//! customer's quota), a concurrency limit that halves when the KMS throttles and
//! grows back one step at a time (AIMD), and a breaker that stops calling a KMS
//! that keeps failing, so that a rotation of 100,000 DEKs neither storms a KMS
//! nor hammers one that is down.

use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use tokio::sync::Notify;

use super::{Dek, Kms, KmsError, KmsKeyState};
use crate::config::{ConfigError, HumanDuration};
use crate::engine::{Notice, WrappedDek};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests per second at most; 0 means no limit.
    pub rate: f64,
    pub max_concurrency: usize,
    /// Consecutive transient failures that open the breaker.
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
}

/// How hard keywarden may press on a remote KMS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteLimits {
    /// Requests per second at most (the customer's KMS quota); 0 means unlimited.
    pub rate_limit: f64,
    /// Requests in flight at most; halved on throttling, regrown one at a time.
    pub max_concurrency: usize,
    /// Timeout of one KMS call.
    pub timeout: HumanDuration,
    /// Consecutive transient failures that open the breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker refuses calls before trying again.
    pub breaker_cooldown: HumanDuration,
}

impl Default for RemoteLimits {
    fn default() -> Self {
        Self {
            rate_limit: 0.0,
            max_concurrency: 32,
            timeout: HumanDuration(Duration::from_secs(10)),
            breaker_threshold: 20,
            breaker_cooldown: HumanDuration(Duration::from_secs(10)),
        }
    }
}

impl RemoteLimits {
    /// Refuses limits under which no call could ever be made (no concurrency,
    /// a zero timeout) or the breaker would open at once; `field` names the
    /// provider's table, such as "kms.aws.limits".
    pub fn validate(&self, field: &'static str) -> Result<(), ConfigError> {
        let l = self;
        if !(l.rate_limit >= 0.0 && l.rate_limit.is_finite()) || l.max_concurrency == 0 || l.timeout.0.is_zero() || l.breaker_threshold == 0 {
            return Err(ConfigError::invalid(field, format!("{l:?}"), "rate_limit >= 0, max_concurrency >= 1, timeout > 0, breaker_threshold >= 1"));
        }
        Ok(())
    }

    /// What the governor enforces; the timeout is not among them because each
    /// provider's HTTP client applies it to its own requests.
    pub fn governor(&self) -> Limits {
        Limits {
            rate: self.rate_limit,
            max_concurrency: self.max_concurrency,
            breaker_threshold: self.breaker_threshold,
            breaker_cooldown: self.breaker_cooldown.0,
        }
    }
}

/// Tokens the rate limit lets pile up while nothing is asked: 10 ms of the
/// rate. Any one second then admits at most the rate plus 1%. With a tenth of
/// a second's worth, a rotation that stalled (a slow store read) came back
/// with a burst that took a quota-sized second 10% over: `rate_limit = 1900`
/// against a 2,000/s quota drew 1.7–1.9% of 429s in two of five runs of B4.
fn burst(rate: f64) -> f64 {
    (rate / 100.0).max(1.0)
}

struct Gate {
    inflight: usize,
    limit: f64,
    successes_since_change: usize,
    tokens: f64,
    refilled: Instant,
    failures: u32,
    open_until: Option<Instant>,
}

pub struct Governed<K> {
    inner: K,
    limits: Limits,
    gate: Mutex<Gate>,
    freed: Notify,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GovernorState {
    pub concurrency_limit: usize,
    pub breaker_open: bool,
}

impl<K: Kms> Governed<K> {
    pub fn new(inner: K, limits: Limits) -> Governed<K> {
        let burst = burst(limits.rate);
        Governed {
            inner,
            limits,
            gate: Mutex::new(Gate {
                inflight: 0,
                limit: limits.max_concurrency as f64,
                successes_since_change: 0,
                tokens: burst,
                refilled: Instant::now(),
                failures: 0,
                open_until: None,
            }),
            freed: Notify::new(),
        }
    }

    pub fn state(&self) -> GovernorState {
        let g = self.gate.lock().expect("governor lock");
        GovernorState { concurrency_limit: g.limit as usize, breaker_open: g.open_until.is_some_and(|t| t > Instant::now()) }
    }

    async fn admit(&self) -> Result<(), KmsError> {
        loop {
            let freed = self.freed.notified();
            let wait = {
                let mut g = self.gate.lock().expect("governor lock");
                if let Some(until) = g.open_until {
                    if until > Instant::now() {
                        return Err(KmsError::Unavailable(format!(
                            "{} kms breaker is open after {} failures in a row; retrying in {:?}",
                            self.inner.provider(),
                            g.failures,
                            until - Instant::now()
                        )));
                    }
                }
                if (g.inflight as f64) >= g.limit.floor().max(1.0) {
                    None
                } else if self.limits.rate > 0.0 {
                    let burst = burst(self.limits.rate);
                    let now = Instant::now();
                    g.tokens = (g.tokens + now.duration_since(g.refilled).as_secs_f64() * self.limits.rate).min(burst);
                    g.refilled = now;
                    if g.tokens >= 1.0 {
                        g.tokens -= 1.0;
                        g.inflight += 1;
                        return Ok(());
                    }
                    // At least a millisecond: the timer cannot wait less, and a zero wait would spin.
                    Some(Duration::from_secs_f64((1.0 - g.tokens) / self.limits.rate).max(Duration::from_millis(1)))
                } else {
                    g.inflight += 1;
                    return Ok(());
                }
            };
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => freed.await,
            }
        }
    }

    fn release<T>(&self, result: &Result<T, KmsError>) {
        let mut g = self.gate.lock().expect("governor lock");
        g.inflight -= 1;
        match result {
            Err(KmsError::Throttled(_)) => {
                g.limit = (g.limit / 2.0).max(1.0);
                g.successes_since_change = 0;
                tracing::debug!(provider = self.inner.provider(), limit = g.limit, "kms throttled: concurrency halved");
            }
            Err(e) if e.retryable() => {
                g.failures += 1;
                if g.failures >= self.limits.breaker_threshold {
                    g.open_until = Some(Instant::now() + self.limits.breaker_cooldown);
                    tracing::warn!(provider = self.inner.provider(), failures = g.failures, "kms breaker opened");
                }
            }
            _ => {
                if g.open_until.take().is_some() {
                    tracing::info!(provider = self.inner.provider(), "kms breaker closed");
                }
                g.failures = 0;
                g.successes_since_change += 1;
                // Additive increase: one more in flight per "window" of successes.
                if g.successes_since_change >= g.limit as usize && g.limit < self.limits.max_concurrency as f64 {
                    g.limit += 1.0;
                    g.successes_since_change = 0;
                }
            }
        }
        drop(g);
        self.freed.notify_waiters();
    }

    async fn call<T>(&self, f: impl std::future::Future<Output = Result<T, KmsError>>) -> Result<T, KmsError> {
        self.admit().await?;
        let result = f.await;
        self.release(&result);
        result
    }
}

#[async_trait::async_trait]
impl<K: Kms> Kms for Governed<K> {
    fn provider(&self) -> &'static str {
        self.inner.provider()
    }
    async fn wrap(&self, key_id: &str, dek: &Dek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        self.call(self.inner.wrap(key_id, dek, aad, label)).await
    }
    async fn unwrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8]) -> Result<Dek, KmsError> {
        self.call(self.inner.unwrap(key_id, wrapped, aad)).await
    }
    async fn rewrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        self.call(self.inner.rewrap(key_id, wrapped, aad, label)).await
    }
    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
        self.call(self.inner.key_state(key_id)).await
    }
    async fn notify(&self, key_id: &str, notice: &Notice) -> Result<(), KmsError> {
        self.call(self.inner.notify(key_id, notice)).await
    }
    async fn sync(&self, key_id: &str) -> Result<(), KmsError> {
        self.call(self.inner.sync(key_id)).await
    }
    fn health(&self) -> Option<GovernorState> {
        Some(self.state())
    }
    fn wants_notices(&self, key_id: &str) -> bool {
        self.inner.wants_notices(key_id)
    }
    fn notice_deadline(&self, key_id: &str) -> Option<super::NoticeDeadline> {
        self.inner.notice_deadline(key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Throttling {
        calls: AtomicUsize,
        inflight: AtomicUsize,
        max_seen: AtomicUsize,
        capacity: usize,
    }

    #[async_trait::async_trait]
    impl Kms for Throttling {
        fn provider(&self) -> &'static str {
            "test"
        }
        async fn wrap(&self, _: &str, _: &Dek, _: &[u8], _: Option<&str>) -> Result<WrappedDek, KmsError> {
            unreachable!()
        }
        async fn unwrap(&self, _: &str, _: &WrappedDek, _: &[u8]) -> Result<Dek, KmsError> {
            unreachable!()
        }
        async fn rewrap(&self, _: &str, w: &WrappedDek, _: &[u8], _: Option<&str>) -> Result<WrappedDek, KmsError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_seen.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            if now > self.capacity {
                return Err(KmsError::Throttled("429 too many requests".into()));
            }
            Ok(w.clone())
        }
        async fn key_state(&self, _: &str) -> Result<KmsKeyState, KmsError> {
            Err(KmsError::Unavailable("down".into()))
        }
    }

    fn limits(rate: f64) -> Limits {
        Limits { rate, max_concurrency: 32, breaker_threshold: 3, breaker_cooldown: Duration::from_secs(60) }
    }

    #[tokio::test]
    async fn throttling_halves_concurrency() {
        let kms = Arc::new(Throttling { calls: 0.into(), inflight: 0.into(), max_seen: 0.into(), capacity: 4 });
        let g = Arc::new(Governed::new(kms.clone(), limits(0.0)));
        let w = WrappedDek { key_version: "1".into(), ciphertext: vec![] };
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let g = g.clone();
                let w = w.clone();
                tokio::spawn(async move { g.rewrap("k", &w, b"", None).await })
            })
            .collect();
        let mut throttled = 0;
        for t in tasks {
            if t.await.unwrap().is_err() {
                throttled += 1;
            }
        }
        assert!(g.state().concurrency_limit < 32, "{:?}", g.state());
        assert!(throttled < 200);
    }

    #[tokio::test]
    async fn a_failing_kms_opens_the_breaker_and_calls_stop() {
        let kms = Arc::new(Throttling { calls: 0.into(), inflight: 0.into(), max_seen: 0.into(), capacity: 1 });
        let g = Governed::new(kms.clone(), limits(0.0));
        for _ in 0..3 {
            assert!(g.key_state("k").await.is_err());
        }
        assert!(g.state().breaker_open);
        let err = g.key_state("k").await.unwrap_err();
        assert!(err.to_string().contains("breaker is open"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_spaces_requests() {
        let kms = Arc::new(Throttling { calls: 0.into(), inflight: 0.into(), max_seen: 0.into(), capacity: 100 });
        let g = Governed::new(kms.clone(), limits(100.0));
        let w = WrappedDek { key_version: "1".into(), ciphertext: vec![] };
        let start = tokio::time::Instant::now();
        for _ in 0..50 {
            g.rewrap("k", &w, b"", None).await.unwrap();
        }
        // 50 requests at 100/s with a burst of 1 need at least 0.49 s of virtual time.
        assert!(start.elapsed() >= Duration::from_millis(490), "{:?}", start.elapsed());
    }
}
