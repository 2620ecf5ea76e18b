//! Wires the stages together and owns the one shutdown path: cancel, drain the
//! intake (acknowledging only what is durable), stop the workers, then let the
//! writer commit its last batch and flush the store.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::act::rotation::Rotator;
use crate::api::auth::{AuthError, Tokens};
use crate::api::{router, AppState};
use crate::broker::{ensure_topics, BrokerError, EmbeddedBroker};
use crate::cluster::changelog::{ChangelogKey, ChangelogPublisher};
use crate::cluster::forward::{Forwarder, NodeAuth};
use crate::cluster::replica::Replica;
use crate::cluster::{Fence, Ownership, Peers};
use crate::config::Config;
use crate::engine::{KeyStatus, Record};
use crate::intake::signature::{SignatureError, Signer, Verifier};
use crate::intake::{Health, Intake, IntakeError};
use crate::kms::cache::DekCache;
use crate::kms::local::LocalKms;
use crate::kms::router::{KmsRouter, Route};
use crate::kms::{Kms, KmsError, PROVIDERS};
use crate::metrics::Metrics;
use crate::notify::{Notifier, NotifyError, Watched};
use crate::schedule::reconcile::Reconciler;
use crate::store::writer::{Committed, Writer};
use crate::store::{Store, StoreError, Touched};
use crate::supervise::Supervisor;
use crate::tell::alerts::{self, Context as AlertContext, Sinks};
use crate::tell::monitor::Monitor;
use crate::tell::{Relay, TellError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Intake(#[from] IntakeError),
    #[error(transparent)]
    Tell(#[from] TellError),
    #[error("cannot listen on {addr}: {source}; is another keywarden running? set api.listen")]
    Listen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Tls(#[from] crate::api::tls::TlsError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Notify(#[from] NotifyError),
    #[error("cannot anchor the audit trail: {0}; check the store, then remove the new audit secret (see audit.secret_file) before the next start so that it anchors again")]
    AuditAnchor(crate::store::writer::WriterError),
    #[error("the store writer stopped unexpectedly; see the log above")]
    WriterDied,
    #[error("{0}; see the log above (systemd restarts keywarden)")]
    TaskFailed(String),
    #[error(transparent)]
    Replica(#[from] crate::cluster::replica::ReplicaError),
    #[error(transparent)]
    Forward(#[from] crate::cluster::forward::ForwardError),
    #[error(transparent)]
    DataPlane(#[from] crate::data_plane::DataPlaneError),
}

/// Facts a caller (the CLI's demo, tests) may want once the daemon is up.
#[derive(Debug, Clone)]
pub struct Started {
    pub api: SocketAddr,
    pub bootstrap: String,
    pub embedded: bool,
}

/// Runs until `shutdown` is cancelled. `on_started` is called once the API listens.
pub async fn run(mut config: Config, shutdown: CancellationToken, on_started: impl FnOnce(Started) + Send) -> Result<(), DaemonError> {
    let notifier = Notifier::from_env()?;
    notifier.send("STATUS=starting: opening the store");
    let secrets = config.kafka.read_secrets()?;
    config.kafka.properties.extend(secrets);
    // Declared before everything else so that it is dropped last: every client
    // (the changelog producer lives as long as the store) disconnects first,
    // and none logs a failed connection to a broker that went away.
    let embedded = start_embedded_broker(&config)?;
    let bootstrap = embedded.as_ref().map(|e| e.bootstrap.clone()).unwrap_or_else(|| config.kafka.brokers.clone());
    // sled reads its page table at open, ~0.1 s for a million instances: it
    // overlaps the broker's topic checks instead of preceding them, on a
    // blocking thread. Whichever fails first ends the start (a store another
    // daemon holds is not hidden behind retries for a broker that is away).
    let (path, cache_capacity) = (config.store.path.clone(), config.store.cache_capacity);
    let opening = tokio::task::spawn_blocking(move || open_store(&path, cache_capacity));
    let opened = async {
        let opened = opening.await.unwrap_or_else(|e| {
            Err(StoreError::Open {
                path: config.store.path.display().to_string(),
                source: sled::Error::ReportableBug(format!("the store's opening thread failed: {e}")),
            })
        });
        Ok::<_, DaemonError>(opened?)
    };
    let topics = async {
        if config.kafka.create_topics && embedded.is_none() {
            create_topics_with_retry(&config, &bootstrap, &shutdown).await?;
        }
        Ok::<_, DaemonError>(())
    };
    let (store, ()) = tokio::try_join!(opened, topics)?;

    let tasks = CancellationToken::new();
    let failure = Arc::new(crate::supervise::Failure::default());
    let mut supervisor = Supervisor::new(shutdown.clone(), tasks.clone(), failure.clone());
    let metrics = Arc::new(Metrics::new());
    let cache = Arc::new(DekCache::new(config.policy.max_dek_cache_age.0, config.policy.dek_cache_size));
    let fence = Arc::new(Fence::default());
    // With a changelog, the key's partition decides which node writes it; the
    // changelog has as many partitions as the events topic.
    let connected = match Some(config.cluster.changelog_topic.as_str()).filter(|t| !t.is_empty()) {
        Some(topic) => Some(Replica::connect(&store, &config.kafka, &bootstrap, topic)?),
        None => None,
    };
    let ownership = match &connected {
        Some(c) => Ownership::shared(fence.clone(), &config.kafka.events_topic, c.partitions().len() as i32),
        None => Ownership::single(fence.clone()),
    };
    let relay_notify = Arc::new(Notify::new());
    let rotation_notify = Arc::new(Notify::new());
    let on_commit = wake_on_commit(cache.clone(), relay_notify.clone(), rotation_notify.clone());
    let (writer, writer_thread) = Writer::start_timed(store.clone(), ownership.clone(), config.kafka.max_batch, on_commit, metrics.commit_seconds.clone());
    // Nothing is audited before this, and nothing that may fail on the broker
    // comes between creating the secret and anchoring under it.
    let created = load_audit_secret(&config, &store)?;
    anchor_audit_trail(&store, &writer, created, config.api.write_timeout.0).await?;
    // Before anything reads the store: other nodes' changes (and, on a fresh
    // node, everything) come from the changelog first; then this node's own
    // changes that had not been published yet go back on top, being newer.
    let (replica, changelog_stop, node_auth) = match connected {
        Some(connected) => {
            notifier.send("STATUS=starting: catching up with the changelog");
            let (replica, stop, key) = catch_up(connected, &config, &bootstrap, &store, &writer, &metrics, &mut supervisor).await?;
            (Some(replica), Some(stop), Some(Arc::new(NodeAuth::new(key))))
        }
        None => (None, None, None),
    };
    let local = Arc::new(
        LocalKms::open(store.clone(), writer.clone(), &config.kms.local.master_key_file, config.policy.purge_after.0)?
            .with_write_timeout(config.api.write_timeout.0),
    );
    let kms_router = Arc::new(build_router(&config, local.clone())?);
    let kms: Arc<dyn Kms> = kms_router.clone();
    // Weak, because the store keeps this filter and the router keeps the store
    // (the embedded KMS): a strong reference made a cycle that kept the store,
    // and with it the changelog's producer, alive past shutdown, still
    // connecting to a broker that had gone. Once the router is gone a notice is
    // kept: queuing one nobody wants is harmless, dropping a wanted one is not.
    let wants = Arc::downgrade(&kms_router);
    store.keep_notices_only_for(Box::new(move |key_id| wants.upgrade().is_none_or(|router| router.wants_notices(key_id))));

    let health = Arc::new(Health { failure, ..Health::default() });
    let scheme = if config.api.tls.enabled() { "https" } else { "http" };
    let advertise = if config.cluster.advertise_url.is_empty() { format!("{scheme}://{}", config.api.listen) } else { config.cluster.advertise_url.clone() };
    let verifier = Arc::new(Verifier::load(&config.signatures)?);
    let signer = Signer::from_config(&config.signatures)?.map(Arc::new);
    let watched = Watched { health: health.clone(), fence: fence.clone(), store: store.clone() };
    let intake = Intake::new(
        &config.kafka,
        &bootstrap,
        store.clone(),
        writer.clone(),
        fence.clone(),
        health.clone(),
        metrics.clone(),
        kms.clone(),
        verifier,
        crate::intake::Admission {
            max_clock_skew: config.signatures.max_clock_skew.0,
            hint_topics: config.signatures.hint_topics.clone(),
            confirm_above: config.reconcile.confirm_above,
        },
        replica.clone(),
        &advertise,
        config.cluster.rejoin_after.0,
        config.assigns_every_partition(),
    )?;
    let relay = Relay::new(store.clone(), writer.clone(), kms.clone(), &config.kafka, &bootstrap, relay_notify.clone(), metrics.clone(), signer)?
        .awaiting_agents(!config.data_plane.enforce_within.0.is_zero());
    let rotator = Rotator {
        store: store.clone(),
        kms: kms.clone(),
        writer: writer.clone(),
        notify: rotation_notify,
        config: config.rotation.clone(),
        metrics: metrics.clone(),
        ownership: ownership.clone(),
    };

    let reconciler = Arc::new(Reconciler::new(store.clone(), writer.clone(), kms.clone(), config.reconcile.clone(), ownership.clone()));
    let (releases, audit_releases) = crate::api::releases::Releases::start(writer.clone(), metrics.clone(), tasks.clone());
    supervisor.spawn("dek-audit", audit_releases);
    let state = AppState {
        store: store.clone(),
        kms,
        router: kms_router.clone(),
        local: local.clone(),
        writer: writer.clone(),
        cache,
        metrics: metrics.clone(),
        health: health.clone(),
        relay: relay_notify.clone(),
        commands_topic: config.kafka.commands_topic.clone(),
        reconciler: reconciler.clone(),
        replica: replica.clone().map(|r| (r, config.cluster.max_replica_lag.0)),
        ownership: ownership.clone(),
        write_timeout: config.api.write_timeout.0,
        releases,
    };
    let forwarder = match &node_auth {
        Some(auth) => Some(Arc::new(Forwarder::new(ownership.clone(), store.clone(), advertise.clone(), auth.clone(), Peers::new(&config.cluster.peers))?)),
        None => None,
    };
    // Bound before the API serves, so that a taken port stops the start.
    let vault_kv = crate::data_plane::bind_vault_kv(&config.data_plane, state.clone()).await?;
    let (api_addr, tokens) = serve_api(&config, state, forwarder, node_auth, &mut supervisor, &tasks).await?;
    if let Some(kv) = vault_kv {
        tracing::info!(vault_kv = %kv.addr, tls = kv.acceptor.is_some(), "vault kv endpoint listening");
        spawn_listener("vault-kv", kv.listener, kv.acceptor, kv.app, &mut supervisor, tasks.clone());
    }
    tracing::info!(api = %api_addr, bootstrap = %bootstrap, events = %config.kafka.events_topic, "keywarden started");
    intake.spawn_watchers(&mut supervisor, tasks.clone(), Peers::new(&config.cluster.peers));
    supervisor.spawn("relay", relay.run(tasks.clone()));
    supervisor.spawn("rotation", rotator.run(tasks.clone()));
    supervisor.spawn(
        "purge",
        crate::schedule::purge_loop(
            store.clone(),
            writer.clone(),
            ownership.clone(),
            config.policy.purge_schedule.clone(),
            config.policy.purge_after.0,
            crate::schedule::Embedded { router: kms_router.clone(), local },
            tasks.clone(),
        ),
    );
    supervisor.spawn("notify", crate::notify::supervise(notifier, watched, shutdown.clone(), tasks.clone()));
    let sinks = Sinks::new(config.alerts.sinks.clone(), AlertContext { node: config.kafka.instance_id.clone(), api: format!("{scheme}://{api_addr}") });
    {
        let (store, writer, sinks, notify, stop) = (store.clone(), writer.clone(), sinks.clone(), relay_notify.clone(), tasks.clone());
        supervisor.spawn("alerts", alerts::deliver_loop(store, writer, sinks, notify, stop));
    }
    supervisor.spawn("alert-resend", alerts::resend_loop(store.clone(), sinks.clone(), config.alerts.resend_every.0, tasks.clone()));
    let monitor = Monitor {
        store: store.clone(),
        writer: writer.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        kms: kms_router.clone(),
        config: config.alerts.clone(),
        enforce_within: config.data_plane.enforce_within.0,
        ownership: ownership.clone(),
    };
    supervisor.spawn("monitor", monitor.run(tasks.clone()));
    let reloader = crate::reload::Reloader { current: std::sync::Mutex::new(config.clone()), sinks: sinks.clone(), tokens };
    supervisor.spawn("reconcile", reconciler.run(tasks.clone()));
    supervisor.spawn("reload", reloader.run(tasks.clone()));
    resolve_earlier_failure(&store, &writer).await;
    on_started(Started { api: api_addr, bootstrap: bootstrap.clone(), embedded: embedded.is_some() });

    let (intake_result, failed) = consume(intake, &mut supervisor, &writer, &shutdown, config.kafka.drain_timeout.0).await;
    tracing::info!("shutting down: intake drained");
    tasks.cancel();
    if let Some(r) = &replica {
        r.stop();
    }
    if let Some(stop) = &changelog_stop {
        // A batch still waiting for the broker gives up; it was not applied.
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    supervisor.join(config.kafka.drain_timeout.0).await;
    drop(writer);
    let writer_result = tokio::task::spawn_blocking(move || writer_thread.close()).await;
    if let Some(reason) = failed {
        return Err(DaemonError::TaskFailed(reason));
    }
    intake_result?;
    match writer_result {
        Ok(Ok(())) => {
            tracing::info!("store flushed; bye");
            Ok(())
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(DaemonError::WriterDied),
    }
}

/// The in-memory mock broker, when no brokers are configured.
fn start_embedded_broker(config: &Config) -> Result<Option<EmbeddedBroker>, DaemonError> {
    if !config.embedded_broker() {
        return Ok(None);
    }
    let k = &config.kafka;
    let topics = [&k.events_topic, &k.commands_topic, &k.dlq_topic, &config.cluster.changelog_topic]
        .iter()
        .filter(|t| !t.is_empty())
        .map(|t| (t.to_string(), k.partitions))
        .collect();
    let broker = EmbeddedBroker::start(topics)?;
    tracing::warn!(bootstrap = %broker.bootstrap, "using the embedded in-memory mock broker: for trying keywarden out only, all events are lost on exit; set kafka.brokers for production");
    Ok(Some(broker))
}

fn open_store(path: &std::path::Path, cache_capacity: u64) -> Result<Store, StoreError> {
    std::fs::create_dir_all(path).map_err(|e| StoreError::Open { path: path.display().to_string(), source: sled::Error::Io(e) })?;
    Store::open_with_cache(path, cache_capacity)
}

/// Hands the store its audit secret, from outside the store. Returns whether
/// this start created it: only then may the trail's unsealed entries (from
/// before it was keyed) be anchored, or stripping the seals off a trail would
/// be a way to rewrite it.
fn load_audit_secret(config: &Config, store: &Store) -> Result<bool, DaemonError> {
    let path = config.audit_secret_file();
    let created = !crate::intake::signature::secret_exists(&path);
    let secret = crate::intake::signature::load_or_create_secret(
        "audit",
        &path,
        "created the audit secret (mode 0600): every audit entry is sealed under it; keep it out of the store's reach and its backups, or `audit verify` proves nothing",
    )?;
    store.set_audit_key(crate::store::audit::AuditKey::new(secret), created)?;
    Ok(created)
}

/// A trail that ends in unsealed entries is either from before the trail was
/// keyed (the start that created the secret anchors it, through the writer)
/// or had its seals stripped: that is said at once, and `audit verify` fails.
async fn anchor_audit_trail(store: &Store, writer: &Writer, created: bool, timeout: Duration) -> Result<(), DaemonError> {
    let Some(last) = store.audit_unsealed() else { return Ok(()) };
    if !created {
        tracing::error!(
            last,
            "the audit trail ends in entries without a seal, and the audit secret is not new: they were rewritten by someone without it, or the store is older than the secret; `keywarden audit verify` names them"
        );
        return Ok(());
    }
    let anchor = crate::store::audit::AuditFact {
        who: "keywarden".into(),
        what: "audit trail keyed".into(),
        outcome: "anchored".into(),
        detail: Some(format!("entries 1 to {last} were written before the trail was keyed: they verify by their hash chain, which this entry's seal fixes")),
        ..Default::default()
    };
    writer.audit(anchor, timeout).await.map_err(DaemonError::AuditAnchor)?;
    tracing::warn!(legacy = last, "the audit trail is keyed now; its older entries are vouched for by an anchor");
    Ok(())
}

/// After each commit: caches forget what changed, the relay and the rotation
/// worker wake for what is theirs.
fn wake_on_commit(cache: Arc<DekCache>, relay: Arc<Notify>, rotation: Arc<Notify>) -> crate::store::writer::OnCommit {
    Box::new(move |committed: &Committed| {
        let mut wake_relay = false;
        let mut wake_rotation = false;
        for r in committed.records {
            match r {
                Record::Key(k) if k.status != KeyStatus::Active => cache.forget_key(&k.key_id),
                Record::Key(_) => wake_rotation = true,
                Record::Instance(i) => cache.forget(&i.instance_id),
                Record::Job(_) => wake_rotation = true,
                Record::Outbox(_) => wake_relay = true,
                Record::Event(_) | Record::Offset { .. } | Record::Audit(_) => {}
            }
        }
        // Another node changed these: the plaintext cached here may be stale.
        for t in committed.replicated {
            match t {
                Touched::Key(key_id) => cache.forget_key(key_id),
                Touched::Instance(instance_id) => cache.forget(instance_id),
            }
        }
        if wake_relay {
            relay.notify_waiters();
        }
        if wake_rotation {
            rotation.notify_one();
        }
    })
}

/// Follows the changelog until the replica holds everything, then turns the
/// changelog on for this node's own writes. Returns the replica and the flag
/// that makes a publish waiting for the broker give up at shutdown.
async fn catch_up(
    connected: crate::cluster::replica::Connected,
    config: &Config,
    bootstrap: &str,
    store: &Store,
    writer: &Writer,
    metrics: &Arc<Metrics>,
    supervisor: &mut Supervisor,
) -> Result<(Arc<Replica>, Arc<std::sync::atomic::AtomicBool>, Arc<ChangelogKey>), DaemonError> {
    let topic = &config.cluster.changelog_topic;
    let secret = crate::intake::signature::load_or_create_secret(
        "cluster",
        &config.cluster_secret_file(),
        "created the cluster secret (mode 0600): every node of this deployment needs the same file as its cluster.secret_file",
    )?;
    let key = Arc::new(ChangelogKey::new(secret));
    let publisher =
        Arc::new(ChangelogPublisher::new(&config.kafka, bootstrap, topic, connected.partitions().len() as i32, key.clone()).map_err(TellError::Producer)?);
    let stop = publisher.stop.clone();
    // What a previous run (a group of one) applied and did not see published
    // goes out first, before anything newer.
    let backlog = store.last_unpublished()?;
    let alone = config.cluster.group_of_one();
    if !alone && backlog.is_some() {
        tracing::info!("publishing the changelog records applied before the last stop, before following the changelog");
        let (changelog, drained, stopping) = (publisher.clone(), store.clone(), stop.clone());
        let published = tokio::task::spawn_blocking(move || {
            let mut published = Vec::new();
            crate::cluster::deferred::publish_backlog(&*changelog, &drained, backlog, &stopping, &mut |p| {
                published.push(p);
                Ok(())
            })
            .map(|_| published)
        })
        .await
        .map_err(|_| DaemonError::WriterDied)?
        .map_err(|e| StoreError::Changelog(e.to_string()))?;
        writer.published(published).await.map_err(|_| DaemonError::WriterDied)?;
    }
    let replica = connected.follow(store.clone(), writer.clone(), key.clone(), metrics.clone(), supervisor);
    let waiting = replica.clone();
    let caught_up = tokio::task::spawn_blocking(move || waiting.wait_caught_up(None, Duration::from_secs(120)));
    tokio::select! {
        r = caught_up => r.map_err(|_| DaemonError::WriterDied)??,
        // The replica's own loops are supervised from here on.
        reason = supervisor.failed() => {
            replica.stop();
            return Err(DaemonError::TaskFailed(reason));
        }
    }
    if alone {
        let deferred = Arc::new(crate::cluster::deferred::Deferred::default());
        store.set_publishing(crate::store::Publishing::After(publisher.clone(), deferred.clone()));
        let (store, writer, stop) = (store.clone(), writer.clone(), stop.clone());
        supervisor.spawn_blocking("changelog", move || deferred.run(publisher, store, writer, backlog, stop));
    } else {
        store.set_changelog(publisher);
    }
    tracing::info!(%topic, partitions = replica.partitions().len(), group_of_one = alone, "replica caught up with the changelog");
    Ok((replica, stop, key))
}

/// Binds the API and serves it under the supervisor. Returns its address and
/// the tokens (reloaded on SIGHUP).
async fn serve_api(
    config: &Config,
    state: AppState,
    forwarder: Option<Arc<Forwarder>>,
    node_auth: Option<Arc<NodeAuth>>,
    supervisor: &mut Supervisor,
    tasks: &CancellationToken,
) -> Result<(SocketAddr, Arc<Tokens>), DaemonError> {
    let tls = &config.api.tls;
    let acceptor = if tls.enabled() { Some(crate::api::tls::acceptor(tls)?) } else { None };
    let tokens = Arc::new(
        Tokens::load(&config.api.admin_token_file, config.api.shared_dek_token.then_some(config.api.dek_token_file.as_path()))?
            .with_client_certs_for_dek(!tls.client_ca_file.as_os_str().is_empty())
            .with_client_identity(crate::api::credential::IdentityPattern::parse(&config.api.client_identity))
            .with_node_auth(node_auth),
    );
    let listener = tokio::net::TcpListener::bind(&config.api.listen).await.map_err(|source| DaemonError::Listen { addr: config.api.listen.clone(), source })?;
    let api_addr = listener.local_addr().map_err(|source| DaemonError::Listen { addr: config.api.listen.clone(), source })?;
    tracing::info!(api = %api_addr, tls = acceptor.is_some(), "api listening");
    spawn_listener("api", listener, acceptor, router(state, tokens.clone(), forwarder), supervisor, tasks.clone());
    Ok((api_addr, tokens))
}

/// Serves `app` on `listener` (over TLS with an acceptor) under the
/// supervisor until `stop`; the API and the data-plane listeners alike.
fn spawn_listener(
    name: &'static str,
    listener: tokio::net::TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
    supervisor: &mut Supervisor,
    stop: CancellationToken,
) {
    supervisor.spawn(name, async move {
        match acceptor {
            Some(acceptor) => crate::api::tls::serve(listener, acceptor, app, stop).await,
            None => {
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned()).await {
                    tracing::error!(listener = name, error = %e, "the http server failed");
                }
            }
        }
        // The server also returns when its listener fails: then keywarden must
        // not go on without it; until shutdown that is a failure.
    });
}

/// Consumes until shutdown, until the intake stops on its own (the writer
/// failed), or until the supervisor saw a critical task stop: the one
/// shutdown path follows. Returns the intake's result and the failure, if any.
async fn consume(
    intake: Intake,
    supervisor: &mut Supervisor,
    writer: &Writer,
    shutdown: &CancellationToken,
    drain_timeout: Duration,
) -> (Result<(), IntakeError>, Option<String>) {
    let stop = shutdown.child_token();
    let intake_run = intake.run(stop.clone());
    tokio::pin!(intake_run);
    let mut failed = None;
    let result = loop {
        tokio::select! {
            r = &mut intake_run => break r,
            reason = supervisor.failed(), if failed.is_none() => {
                raise_failure(writer, &reason).await;
                failed = Some(reason);
                // A moment with /readyz answering 503 and the reason, so that a
                // load balancer or an operator sees why before the node goes.
                tokio::time::sleep(FAILURE_GRACE.min(drain_timeout / 2)).await;
                stop.cancel();
            }
        }
    };
    (result, failed)
}

const TASK_FAILED: &str = "KeywardenTaskFailed";
const FAILURE_GRACE: Duration = Duration::from_secs(1);

/// Tells the operator, durably: the alert is queued with the store's other
/// alerts, so it is delivered even if the task that died was the alert sender
/// (by the restarted daemon, which then resolves it).
async fn raise_failure(writer: &Writer, reason: &str) {
    let alert = crate::engine::Alert::new(
        TASK_FAILED,
        crate::engine::Severity::Critical,
        &[],
        "a critical keywarden task stopped; keywarden exits to be restarted".into(),
        reason.to_string(),
        chrono::Utc::now(),
    );
    if let Err(e) = writer.submit_within(crate::engine::Input::Alert(alert), Duration::from_secs(2)).await {
        tracing::error!(error = %e, "cannot queue the task-failure alert");
    }
}

/// A daemon that starts again has recovered from the failure that stopped it.
async fn resolve_earlier_failure(store: &Store, writer: &Writer) {
    let firing = {
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.firing_alerts()).await {
            Ok(Ok(firing)) => firing,
            _ => {
                tracing::warn!("cannot read the firing alerts; an earlier task-failure alert stays firing");
                Vec::new()
            }
        }
    };
    for alert in firing.into_iter().filter(|a| a.name == TASK_FAILED) {
        if let Err(e) = writer.submit(crate::engine::Input::Alert(alert.resolved(chrono::Utc::now()))).await {
            tracing::warn!(error = %e, "cannot resolve the earlier task-failure alert");
        }
    }
}

/// One instance per provider in use, each behind its own governor, so that a
/// slow or throttling KMS never holds up another.
fn build_router(config: &Config, local: Arc<LocalKms>) -> Result<KmsRouter, KmsError> {
    let mut providers: HashMap<&str, Arc<dyn Kms>> = HashMap::new();
    providers.insert(crate::kms::local::NAME, local);
    for provider in PROVIDERS.iter().filter(|p| config.uses(p.name)) {
        providers.insert(provider.name, (provider.build)(&config.kms)?);
    }
    let pick = |name: &str| providers.get(name).cloned().ok_or_else(|| KmsError::Setup(format!("kms provider {name} is not configured")));
    let routes = config
        .kms
        .routes
        .iter()
        .map(|r| Ok(Route { prefix: r.prefix.clone(), strip: r.strip_prefix, kms: pick(&r.provider)? }))
        .collect::<Result<Vec<_>, KmsError>>()?;
    Ok(KmsRouter::new(routes, pick(&config.kms.default)?))
}

async fn create_topics_with_retry(config: &Config, bootstrap: &str, shutdown: &CancellationToken) -> Result<(), BrokerError> {
    let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut tries = 0;
    loop {
        let changelog = Some(config.cluster.changelog_topic.as_str()).filter(|t| !t.is_empty());
        match ensure_topics(&config.kafka, bootstrap, changelog).await {
            Ok(()) => return Ok(()),
            Err(e) if e.retryable() && tries < 30 && !shutdown.is_cancelled() => {
                tracing::warn!(error = %e, "topic creation failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
