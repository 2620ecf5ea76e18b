//! Alert sinks: Alertmanager's v2 API and plain JSON webhooks (optionally with
//! a Slack-compatible body). An alert leaves the outbox only once every sink
//! took it, so none is lost to a crash or a sink that is down; a repeat is
//! harmless, because Alertmanager deduplicates on the labels.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::AlertSink;
use crate::engine::Alert;
use crate::store::writer::Writer;
use crate::store::{Queue, SentEntry, Store};

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("alert sink {url} is unreachable: {message}; alerts wait in the outbox and are retried")]
    Unreachable { url: String, message: String },
    #[error("alert sink {url} answered {status}: {body}; check alerts.sinks")]
    Refused { url: String, status: u16, body: String },
}

impl AlertError {
    pub fn retryable(&self) -> bool {
        true
    }
}

/// What the receiving end gets besides the alert itself.
#[derive(Clone)]
pub struct Context {
    /// The node that raised it (kafka.instance_id).
    pub node: String,
    /// Base URL of the admin API, for links back.
    pub api: String,
}

/// The configured sinks; swapped whole on SIGHUP.
#[derive(Clone)]
pub struct Sinks {
    sinks: Arc<RwLock<Vec<AlertSink>>>,
    http: reqwest::Client,
    context: Context,
}

impl Sinks {
    pub fn new(sinks: Vec<AlertSink>, context: Context) -> Sinks {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("http client builds");
        Sinks { sinks: Arc::new(RwLock::new(sinks)), http, context }
    }

    pub fn replace(&self, sinks: Vec<AlertSink>) {
        *self.sinks.write().expect("sinks lock") = sinks;
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.read().expect("sinks lock").is_empty()
    }

    /// Sends to every sink; the first failure is returned after all were tried.
    /// `instances` is the instance count of the key, when the alert asks for it.
    pub async fn send(&self, alert: &Alert, instances: Option<usize>) -> Result<(), AlertError> {
        let sinks = self.sinks.read().expect("sinks lock").clone();
        let mut first_error = None;
        for sink in &sinks {
            let (url, body) = match sink.kind.as_str() {
                "alertmanager" => (format!("{}/api/v2/alerts", sink.url.trim_end_matches('/')), json!([alertmanager_body(alert, instances, &self.context)])),
                _ if sink.slack => (sink.url.clone(), slack_body(alert, instances)),
                _ => (sink.url.clone(), webhook_body(alert, instances, &self.context)),
            };
            let result = match self.http.post(&url).json(&body).send().await {
                Err(e) => Err(AlertError::Unreachable { url: url.clone(), message: e.to_string() }),
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => {
                    let status = r.status().as_u16();
                    Err(AlertError::Refused { url: url.clone(), status, body: r.text().await.unwrap_or_default().chars().take(200).collect() })
                }
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Delivers queued alerts in commit order; a sink that fails is retried with
/// backoff and the alert stays queued (and durable) until every sink took it.
/// The queue holds one record per commit, removed once every alert in it is
/// delivered: a crash half-way through a record sends its first alerts again.
pub async fn deliver_loop(store: Store, writer: Writer, sinks: Sinks, notify: Arc<Notify>, shutdown: CancellationToken) {
    let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let cursor = super::Cursor::default();
    // A record whose first alerts were delivered before a sink failed.
    let mut resume = super::Resume::default();
    loop {
        let notified = notify.notified();
        let records = match store.alerts_from(cursor.at(), RECORDS_PER_ROUND) {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the alert queue; retrying");
                if !super::pause(&shutdown, tokio::time::sleep(backoff.next_delay())).await {
                    return;
                }
                continue;
            }
        };
        if records.is_empty() {
            if !super::idle(&shutdown, notified).await {
                return;
            }
            continue;
        }
        let mut done = Vec::new();
        let mut failed = None;
        'records: for (id, alerts) in records {
            let skip = resume.sent_of(id);
            for (i, alert) in alerts.iter().enumerate().skip(skip) {
                if sinks.is_empty() {
                    tracing::warn!(alert = %alert.name, labels = ?alert.labels, resolved = alert.ends_at.is_some(), summary = %alert.summary, "alert (no alerts.sinks configured)");
                    continue;
                }
                let instances = instance_count(&store, alert).await;
                match sinks.send(alert, instances).await {
                    Ok(()) => tracing::info!(alert = %alert.name, fingerprint = %alert.fingerprint(), resolved = alert.ends_at.is_some(), "alert sent"),
                    Err(e) => {
                        resume.stopped(id, i);
                        failed = Some(e);
                        break 'records;
                    }
                }
            }
            done.push(id);
        }
        // What was delivered is a prefix of what was read.
        let last = done.last().copied();
        if let Err(e) = writer.sent(Queue::Alerts, done.into_iter().map(SentEntry::id).collect()).await {
            tracing::error!(error = %e, "cannot remove delivered alerts; they will be sent again");
            cursor.reset();
        } else {
            cursor.removed(last.map(|id| (id, true)));
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, "alert delivery failed");
            if !super::pause(&shutdown, tokio::time::sleep(backoff.next_delay())).await {
                return;
            }
        } else {
            backoff.reset();
        }
    }
}

/// Alert records read per round: each holds one commit's alerts (up to a
/// batch's worth), and is removed only once all of them are delivered.
const RECORDS_PER_ROUND: usize = 4;

/// Sends every firing alert again now and then: Alertmanager drops an alert
/// that is not repeated within its resolve_timeout.
pub async fn resend_loop(store: Store, sinks: Sinks, every: Duration, shutdown: CancellationToken) {
    while super::pause(&shutdown, tokio::time::sleep(every)).await {
        let firing = match store.firing_alerts() {
            Ok(firing) => firing,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the firing alerts; the next round tries again");
                continue;
            }
        };
        for alert in firing {
            let instances = instance_count(&store, &alert).await;
            if let Err(e) = sinks.send(&alert, instances).await {
                tracing::debug!(error = %e, "alert re-send failed; the next round tries again");
            }
        }
    }
}

/// How many instances the alert's key protects, when the alert says so;
/// counted on a blocking thread. On a runtime worker the count of a key with
/// 10,000 instances held it ~5 ms, and the DEK fetch queued behind it there
/// (the one that first saw a revocation) waited as long (B2's tail). An alert
/// goes out without the count when the store cannot be read.
async fn instance_count(store: &Store, alert: &Alert) -> Option<usize> {
    let key_id = alert.count_instances_of.clone()?;
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.instance_count(&key_id)).await.ok()?.ok()
}

fn labels(alert: &Alert, context: &Context) -> serde_json::Map<String, Value> {
    let mut labels = serde_json::Map::new();
    labels.insert("alertname".into(), alert.name.clone().into());
    labels.insert("severity".into(), alert.severity.as_str().into());
    labels.insert("service".into(), "keywarden".into());
    labels.insert("node".into(), context.node.clone().into());
    for (k, v) in &alert.labels {
        labels.insert(k.clone(), v.clone().into());
    }
    labels
}

fn description(alert: &Alert, instances: Option<usize>) -> String {
    match instances {
        Some(n) => format!("{} ({n} instance(s) affected)", alert.description),
        None => alert.description.clone(),
    }
}

fn alertmanager_body(alert: &Alert, instances: Option<usize>, context: &Context) -> Value {
    let mut annotations = json!({"summary": alert.summary, "description": description(alert, instances), "fingerprint": alert.fingerprint()});
    if let Some(n) = instances {
        annotations["instances"] = n.to_string().into();
    }
    let mut body = json!({
        "labels": labels(alert, context),
        "annotations": annotations,
        "startsAt": alert.starts_at.to_rfc3339(),
        "generatorURL": match alert.labels.get("key_id") {
            Some(k) => format!("{}/v1/keys/{}", context.api, crate::text::percent_encode(k)),
            None => format!("{}/metrics", context.api),
        },
    });
    if let Some(end) = alert.ends_at {
        body["endsAt"] = end.to_rfc3339().into();
    }
    body
}

fn webhook_body(alert: &Alert, instances: Option<usize>, context: &Context) -> Value {
    json!({
        "status": if alert.ends_at.is_some() { "resolved" } else { "firing" },
        "fingerprint": alert.fingerprint(),
        "labels": labels(alert, context),
        "summary": alert.summary,
        "description": description(alert, instances),
        "instances": instances,
        "startsAt": alert.starts_at.to_rfc3339(),
        "endsAt": alert.ends_at.map(|t| t.to_rfc3339()),
    })
}

fn slack_body(alert: &Alert, instances: Option<usize>) -> Value {
    let icon = match (alert.ends_at.is_some(), alert.severity.as_str()) {
        (true, _) => ":white_check_mark: RESOLVED",
        (false, "critical") => ":rotating_light: CRITICAL",
        _ => ":warning: WARNING",
    };
    json!({"text": format!("{icon} {}: {}", alert.summary, description(alert, instances))})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Effect, Severity};

    fn alert() -> Alert {
        Alert::new("KeywardenKeyDeleted", Severity::Critical, &[("key_id", "k/1")], "root key k/1 was deleted".into(), "gone".into(), chrono::Utc::now())
    }

    #[test]
    fn bodies_carry_the_labels_that_identify_the_alert_and_say_when_it_ended() {
        let context = Context { node: "n1".into(), api: "http://127.0.0.1:8420".into() };
        let firing = alertmanager_body(&alert(), Some(3), &context);
        assert_eq!(firing["labels"]["alertname"], "KeywardenKeyDeleted");
        assert_eq!(firing["labels"]["severity"], "critical");
        assert_eq!(firing["labels"]["key_id"], "k/1");
        assert_eq!(firing["annotations"]["instances"], "3");
        assert_eq!(firing["generatorURL"], "http://127.0.0.1:8420/v1/keys/k%2F1");
        assert!(firing.get("endsAt").is_none());
        let resolved = alertmanager_body(&alert().resolved(chrono::Utc::now()), None, &context);
        assert!(resolved["endsAt"].is_string());
        assert_eq!(webhook_body(&alert().resolved(chrono::Utc::now()), None, &context)["status"], "resolved");
        assert!(slack_body(&alert(), Some(3))["text"].as_str().unwrap().contains("CRITICAL"));
        // The same condition, raised twice, is the same alert.
        assert_eq!(alert().fingerprint(), alert().resolved(chrono::Utc::now()).fingerprint());
    }

    type Took = Arc<std::sync::Mutex<Vec<String>>>;

    /// A webhook that refuses its second request once, and records the key
    /// of every alert it took.
    async fn flaky_webhook() -> (String, Took) {
        let took = Arc::new(std::sync::Mutex::new(Vec::new()));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let state = (took.clone(), calls);
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                |axum::extract::State((took, calls)): axum::extract::State<(Took, Arc<std::sync::atomic::AtomicUsize>)>,
                 axum::Json(body): axum::Json<Value>| async move {
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    took.lock().unwrap().push(body["labels"]["key_id"].as_str().unwrap_or_default().to_string());
                    axum::http::StatusCode::OK
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app.with_state(state)).await });
        (url, took)
    }

    #[tokio::test]
    async fn a_sink_that_fails_half_way_through_a_commits_alerts_gets_the_rest_and_not_the_first_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fence = Arc::new(crate::cluster::Fence::default());
        fence.assign(&[("events".to_string(), 0)]);
        let (writer, _) = Writer::start(store.clone(), crate::cluster::Ownership::shared(fence, "events", 1), 16, Box::new(|_| {}));
        let raised = |key: &str| Alert::new("KeywardenKeyDisabled", Severity::Warning, &[("key_id", key)], "s".into(), "d".into(), chrono::Utc::now());
        writer.import(["a", "b", "c"].map(|k| crate::engine::Record::Outbox(Effect::Alert(raised(k)))).to_vec()).await.unwrap();
        let (url, took) = flaky_webhook().await;
        let sinks = Sinks::new(vec![AlertSink { kind: "webhook".into(), url, slack: false }], Context { node: "n1".into(), api: "http://127.0.0.1:1".into() });
        let shutdown = CancellationToken::new();
        let relay = tokio::spawn(deliver_loop(store.clone(), writer, sinks, Arc::new(Notify::new()), shutdown.clone()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !store.alerts_from(0, 10).unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the commit's alerts were not all delivered: {:?}", took.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        relay.await.unwrap();
        assert_eq!(*took.lock().unwrap(), ["a", "b", "c"], "each alert delivered once, in order, b after its refusal");
    }
}
