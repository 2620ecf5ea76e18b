//! Prometheus metrics, emitted next to the log line of the thing they count.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    pub events: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub security_events: IntCounterVec,
    pub commands: IntCounterVec,
    pub rewraps: IntCounterVec,
    pub dek_requests: IntCounterVec,
    pub commit_seconds: Histogram,
    pub outbox_depth: IntGauge,
    pub build_info: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let events = IntCounterVec::new(
            Opts::new("keywarden_events_total", "Lifecycle events consumed, by type and outcome"),
            &["type", "outcome"],
        )
        .expect("metric");
        let dead_letters = IntCounterVec::new(
            Opts::new("keywarden_dead_letters_total", "Messages sent to the dead-letter topic, by reason class"),
            &["reason"],
        )
        .expect("metric");
        let security_events = IntCounterVec::new(
            Opts::new("keywarden_security_events_total", "Messages refused for a missing, unknown or forged signature, by reason"),
            &["reason"],
        )
        .expect("metric");
        let commands = IntCounterVec::new(
            Opts::new("keywarden_commands_published_total", "Data-plane commands published, by action"),
            &["action"],
        )
        .expect("metric");
        let rewraps = IntCounterVec::new(Opts::new("keywarden_rewraps_total", "DEK rewraps, by provider and result"), &["provider", "result"])
            .expect("metric");
        let dek_requests =
            IntCounterVec::new(Opts::new("keywarden_dek_requests_total", "DEK requests from the data plane, by result"), &["result"])
                .expect("metric");
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new("keywarden_store_commit_seconds", "Time to apply and flush one batch to the store")
                .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
        )
        .expect("metric");
        let outbox_depth = IntGauge::new("keywarden_outbox_depth", "Effects committed but not yet published").expect("metric");
        let build_info = IntGaugeVec::new(Opts::new("keywarden_build_info", "Build information"), &["version"]).expect("metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for c in [&events, &dead_letters, &security_events, &commands, &rewraps, &dek_requests] {
            registry.register(Box::new(c.clone())).expect("register");
        }
        registry.register(Box::new(commit_seconds.clone())).expect("register");
        registry.register(Box::new(outbox_depth.clone())).expect("register");
        registry.register(Box::new(build_info.clone())).expect("register");
        Metrics { registry, events, dead_letters, security_events, commands, rewraps, dek_requests, commit_seconds, outbox_depth, build_info }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
