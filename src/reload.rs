//! SIGHUP: re-read the config file and apply what can change without a
//! restart (log level, alert sinks, API tokens) without dropping any work. A
//! config that also changes anything else is refused whole, with the fields
//! named, so the running daemon never runs half of a new config.

use std::sync::{Arc, Mutex, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::api::auth::Tokens;
use crate::config::Config;
use crate::tell::alerts::Sinks;

type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_LEVEL: OnceLock<SetLevel> = OnceLock::new();

/// Called once by whoever installs the log filter.
pub fn register_log_level(set: SetLevel) {
    let _ = LOG_LEVEL.set(set);
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot reload: {0}; the running config is kept")]
    Load(#[from] crate::config::ConfigError),
    #[error("cannot reload: {} changed, and only log.level, alerts.sinks and the token files' contents can change without a restart; restart keywarden to apply it, nothing was reloaded", .0.join(", "))]
    NotReloadable(Vec<String>),
    #[error("cannot reload the api tokens: {0}; the old tokens stay valid")]
    Tokens(#[from] crate::api::auth::AuthError),
    #[error("cannot set the log level: {0}")]
    LogLevel(String),
}

pub struct Reloader {
    pub current: Mutex<Config>,
    pub sinks: Sinks,
    pub tokens: Arc<Tokens>,
}

impl Reloader {
    pub async fn run(self, shutdown: CancellationToken) {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; config reload is off");
            shutdown.cancelled().await;
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            match self.reload() {
                Ok(()) => tracing::info!("config reloaded: log.level, alerts.sinks and api tokens"),
                Err(e) => tracing::error!(error = %e, "config reload refused"),
            }
        }
    }

    pub fn reload(&self) -> Result<(), ReloadError> {
        let mut current = self.current.lock().expect("config lock");
        let mut next = Config::load(current.source.as_deref())?;
        // Derived at load when not set; the same derivation, so not a change.
        next.kafka.instance_id.clone_from(&current.kafka.instance_id);
        let fixed = current.not_reloadable(&next);
        if !fixed.is_empty() {
            return Err(ReloadError::NotReloadable(fixed));
        }
        self.tokens.reload(&next.api.admin_token_file, next.api.shared_dek_token.then_some(next.api.dek_token_file.as_path()))?;
        // KEYWARDEN_LOG, when set, wins over log.level, at start as on reload.
        if std::env::var("KEYWARDEN_LOG").map_or(true, |v| v.trim().is_empty()) {
            if let Some(set) = LOG_LEVEL.get() {
                set(&next.log.level).map_err(ReloadError::LogLevel)?;
            }
        }
        self.sinks.replace(next.alerts.sinks.clone());
        *current = next;
        Ok(())
    }
}
