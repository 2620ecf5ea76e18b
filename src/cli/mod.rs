//! cli: the `keywarden` command. `run` starts the daemon; every other subcommand
//! is a client of the admin API.

mod client;
mod command;
pub mod demo;
mod event;
mod impact;
mod watch;

/// The check a consumer of the commands topic makes, for the agent.
pub(crate) use command::check as check_command;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::Config;
use crate::telemetry::{TelemetryError, Traces};

#[derive(Parser, Debug)]
#[command(name = "keywarden", version, about = "Key-lifecycle daemon for customer-managed keys")]
pub struct Cli {
    /// Config file (TOML). Defaults work without one.
    #[arg(long, global = true, env = "KEYWARDEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin API base URL; defaults to http://<api.listen> from the config.
    #[arg(long, global = true)]
    pub api: Option<String>,
    /// Bearer token for the admin API; defaults to the contents of
    /// api.admin_token_file. For `instance dek`: the instance's dek_token
    /// (see `instance dek --token-file`).
    // An issued token is base64url: one in 64 begins with '-', which clap
    // would otherwise take for an option.
    #[arg(long, global = true, env = "KEYWARDEN_API_TOKEN", hide_env_values = true, allow_hyphen_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate to trust for an https admin API (a private CA).
    #[arg(long, global = true, env = "KEYWARDEN_API_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// PEM file with a client certificate and its key, for a DEK endpoint that
    /// requires one (api.tls.client_ca_file).
    #[arg(long, global = true, env = "KEYWARDEN_API_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Output format for client commands.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon.
    Run,
    /// Run the data-plane agent on a database host (its own config file:
    /// see config/agent.toml): enforce keywarden's commands through hooks.
    Agent,
    /// Load and validate the config, then print it.
    CheckConfig,
    /// Run the daemon on embedded defaults and walk a key's lifecycle live.
    Demo {
        /// Stop the daemon when the walk is done instead of leaving it running.
        #[arg(long)]
        exit: bool,
        /// Walk it against a real MariaDB (mariadbd and its HashiCorp key
        /// plugin must be installed) and a real data-plane agent.
        #[arg(long)]
        mariadb: bool,
    },
    /// Operate root keys (embedded KMS).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage instances and fetch their DEKs.
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Show consumed events, and sign or emit test events.
    #[command(subcommand)]
    Event(EventCommand),
    /// Check data-plane commands read from the commands topic.
    #[command(subcommand, name = "command")]
    DataPlane(DataPlaneCommand),
    /// Export or verify the hash-chained audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Compare every key in use with its KMS now, and apply what events missed.
    Reconcile {
        /// Apply a plan held back for touching more than reconcile.confirm_above instances.
        #[arg(long)]
        confirm: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Write the trail as JSON lines, oldest first.
    Export {
        /// Only entries at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check the whole chain; exits non-zero if any entry was altered or removed.
    Verify,
}

#[derive(Subcommand, Debug)]
pub enum DataPlaneCommand {
    /// Check one command's keywarden-signature header against a key; exits 1
    /// (printing why) when it is not a command signed with that key.
    Verify(command::VerifyArgs),
}

#[derive(Subcommand, Debug)]
pub enum EventCommand {
    /// Show what became of a consumed event.
    Show { event_id: String },
    /// Print the signature header for a payload (a file, or - for stdin).
    Sign {
        #[arg(default_value = "-")]
        file: String,
        #[command(flatten)]
        key: event::KeyArgs,
    },
    /// Build a native lifecycle event, sign it and produce it to the events topic.
    Emit(event::EmitArgs),
    /// Create an Ed25519 key pair for a producer: PREFIX.key (private, 0600) and PREFIX.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Create a root key (a random id unless given).
    Create {
        key_id: Option<String>,
    },
    Show {
        key_id: String,
        /// Follow the key's rotation with a progress bar until it finishes
        /// (exit 1 if instances failed to rewrap).
        #[arg(long)]
        watch: bool,
    },
    /// What a disable or delete of the key would affect, without doing it.
    Impact {
        key_id: String,
        /// Instance ids to list at most; the counts cover all of them.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    Rotate {
        key_id: String,
    },
    Disable {
        key_id: String,
    },
    Enable {
        key_id: String,
    },
    Delete {
        key_id: String,
    },
    Restore {
        key_id: String,
    },
    /// Retry the rewrap of instances whose rotation failed.
    Retry {
        key_id: String,
    },
    /// Ask the key's KMS to re-send its last lifecycle event (Key Protect).
    Sync {
        key_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum InstanceCommand {
    Create {
        instance_id: String,
        #[arg(long)]
        key: String,
    },
    Show {
        instance_id: String,
    },
    List {
        #[arg(long)]
        key: Option<String>,
    },
    Delete {
        instance_id: String,
    },
    /// Fetch the instance's plaintext DEK (base64), with the instance's own
    /// dek_token (from --token, --token-file, or api.dek_token_file when
    /// api.shared_dek_token is on), or a client certificate mapped to it.
    Dek {
        instance_id: String,
        /// File holding the instance's dek_token (as `instance create` or
        /// `instance credential` printed it).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Issue the instance a new dek_token (printed once); the old one stops working.
    Credential {
        instance_id: String,
    },
}

pub fn main(cli: Cli) -> ExitCode {
    match run_cli(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keywarden: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_cli(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Run => {
            let config = Config::load(cli.config.as_deref())?;
            // Declared before the runtime so that it is dropped after it: the
            // last spans are flushed once the daemon is done, outside async code.
            let _traces = init_tracing(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            let result = rt.block_on(async {
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone());
                crate::daemon::run(config, shutdown, |s| {
                    tracing::info!(api = %s.api, bootstrap = %s.bootstrap, "ready to serve");
                })
                .await
            });
            // A blocking call still stuck on the broker (the daemon gave up on
            // it) must not keep a failed daemon from exiting to be restarted.
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent => {
            let Some(path) = cli.config.as_deref() else {
                anyhow::bail!("keywarden agent needs its config: pass --config FILE (see config/agent.toml)");
            };
            let config = crate::agent::config::AgentConfig::load(path)?;
            init_tracing_with(&config.log.format, &config.log.level);
            let rt = tokio::runtime::Runtime::new()?;
            let result = rt.block_on(async {
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone());
                crate::agent::run(config, shutdown).await
            });
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig => {
            let config = Config::load(cli.config.as_deref())?;
            println!("{}", toml::to_string_pretty(&config)?);
            for note in config.kms.keyprotect.notes(config.kms.uses(crate::kms::keyprotect::NAME)) {
                eprintln!("note: {note}");
            }
            eprintln!("config is valid");
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { exit, mariadb } => {
            let config = Config::load(cli.config.as_deref())?;
            init_tracing_with(&config.log.format, "warn");
            demo::run(config, *exit, *mariadb)
        }
        Command::Event(EventCommand::Sign { file, key }) => event::sign(&Config::load(cli.config.as_deref())?, file, key),
        Command::Event(EventCommand::Emit(args)) => event::emit(&Config::load(cli.config.as_deref())?, args),
        Command::Event(EventCommand::Keygen { out }) => event::keygen(out),
        Command::DataPlane(DataPlaneCommand::Verify(args)) => command::verify(&Config::load(cli.config.as_deref())?, args, cli.output),
        _ => {
            let config = Config::load(cli.config.as_deref())?;
            let base = match &cli.api {
                Some(url) => url.trim_end_matches('/').to_string(),
                None if config.api.tls.enabled() => format!("https://{}", config.api.listen),
                None => format!("http://{}", config.api.listen),
            };
            let read = |file: &std::path::Path, hint: &str| -> anyhow::Result<String> {
                Ok(std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("cannot read the api token from {} ({e}); {hint}", file.display()))?
                    .trim()
                    .to_string())
            };
            let token = match (&cli.token, &cli.command) {
                (Some(t), _) => t.clone(),
                (None, Command::Instance(InstanceCommand::Dek { token_file: Some(file), .. })) => read(file, "pass the instance's dek_token file")?,
                (None, Command::Instance(InstanceCommand::Dek { .. })) if config.api.shared_dek_token => {
                    read(&config.api.dek_token_file, "pass --token-file or set api.dek_token_file")?
                }
                // A client certificate mapped to the instance needs no token.
                (None, Command::Instance(InstanceCommand::Dek { .. })) if cli.client_cert.is_some() => String::new(),
                (None, Command::Instance(InstanceCommand::Dek { .. })) => anyhow::bail!(
                    "instance dek needs the instance's dek_token: pass --token-file (or --token), as `instance create` or `instance credential` printed it"
                ),
                (None, _) => read(&config.api.admin_token_file, "pass --token or set api.admin_token_file")?,
            };
            let tls = client::Tls { ca_cert: cli.ca_cert.clone(), client_cert: cli.client_cert.clone() };
            client::run(&base, &token, &tls, cli.output, cli.command)
        }
    }
}

/// Logs, and traces when `telemetry.otlp_endpoint` is set; the returned
/// pipeline flushes its spans when dropped.
fn init_tracing(config: &Config) -> Result<Option<Traces>, TelemetryError> {
    let traces = Traces::start(&config.telemetry)?;
    // Traces get keywarden's spans whatever the log level: quieting the log
    // must not cut traces short.
    let otel = traces.as_ref().map(|t| t.layer().with_filter(Fresh(Targets::new().with_target("keywarden", tracing::Level::INFO))));
    tracing_subscriber::registry().with(log_layer(&config.log.format, &config.log.level)).with(otel).init();
    Ok(traces)
}

fn init_tracing_with(format: &str, level: &str) {
    tracing_subscriber::registry().with(log_layer(format, level)).init();
}

/// In JSON every line carries the fields of the spans it is logged in (the
/// event's event_id, key_id, correlation_id): "span" is the innermost, "spans"
/// all of them, outermost first; the line's own fields are at the top level.
fn log_layer<S>(format: &str, level: &str) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter = match std::env::var("KEYWARDEN_LOG").ok().filter(|v| !v.trim().is_empty()) {
        Some(directives) => EnvFilter::new(directives),
        None => EnvFilter::new(level),
    };
    // SIGHUP may set a new log.level.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    crate::reload::register_log_level(Box::new(move |level| handle.modify(|f| *f = EnvFilter::new(level)).map_err(|e| e.to_string())));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if format == "json" {
        fmt.json().flatten_event(true).with_current_span(true).with_span_list(true).with_filter(Fresh(filter)).boxed()
    } else {
        fmt.with_filter(Fresh(filter)).boxed()
    }
}

/// A per-layer filter that never lets a callsite's interest be cached as
/// "always", so that its decision is made again at every event. Without it,
/// tracing-subscriber 0.3 drops events (tokio-rs/tracing#2519): a `log`
/// crate `log_enabled!` check (librdkafka's client does one through
/// `tracing-log`) leaves a per-layer "disabled" mark that the next event of an
/// "always" callsite, which skips the check, reads as its own, and it goes
/// unlogged. That is how a start-up warning, and once the only log line of a
/// failing start, were lost. The cost is one filter check per event.
struct Fresh<F>(F);

impl<S, F: tracing_subscriber::layer::Filter<S>> tracing_subscriber::layer::Filter<S> for Fresh<F> {
    fn enabled(&self, meta: &tracing::Metadata<'_>, cx: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        self.0.enabled(meta, cx)
    }

    fn callsite_enabled(&self, meta: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        let interest = self.0.callsite_enabled(meta);
        if interest.is_always() {
            tracing::subscriber::Interest::sometimes()
        } else {
            interest
        }
    }

    fn event_enabled(&self, event: &tracing::Event<'_>, cx: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        self.0.event_enabled(event, cx)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.0.max_level_hint()
    }

    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_new_span(attrs, id, cx)
    }

    fn on_record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_record(id, values, cx)
    }

    fn on_enter(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_enter(id, cx)
    }

    fn on_exit(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_exit(id, cx)
    }

    fn on_close(&self, id: tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_close(id, cx)
    }
}

/// First SIGTERM/SIGINT drains and exits cleanly; a second one exits at once.
/// Exiting at once loses nothing: only durable work was ever acknowledged.
pub fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install SIGTERM handler");
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                tracing::info!("signal received: draining (send again to exit at once)");
                shutdown.cancel();
            } else {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_token_that_begins_with_a_hyphen_is_taken_as_the_token() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["keywarden", "--token", "-AbC_9", "instance", "dek", "db-1"]).expect("a base64url token may begin with '-'");
        assert_eq!(cli.token.as_deref(), Some("-AbC_9"));
        assert!(matches!(cli.command, Command::Instance(InstanceCommand::Dek { ref instance_id, .. }) if instance_id == "db-1"));
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A `log_enabled!` as librdkafka's client makes it: dynamic metadata,
    /// through the dispatcher's `enabled`, for a level the filter refuses.
    fn dynamic_check() {
        struct Cs;
        impl tracing::callsite::Callsite for Cs {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &tracing::Metadata<'_> {
                &META
            }
        }
        static CS: Cs = Cs;
        static META: tracing::Metadata<'static> = tracing::Metadata::new(
            "log event",
            "librdkafka",
            tracing::Level::DEBUG,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CS)),
            tracing::metadata::Kind::EVENT,
        );
        // With per-layer filters the dispatcher answers true and each filter
        // notes its own refusal for the event that is to follow (none does).
        tracing::dispatcher::get_default(|d| d.enabled(&META));
    }

    #[test]
    fn an_event_after_a_refused_log_enabled_check_is_still_logged() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let layer = tracing_subscriber::fmt::layer().with_writer(move || writer.clone()).with_filter(Fresh(EnvFilter::new("info")));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for n in 0..3 {
                dynamic_check();
                tracing::warn!(n, "the line after the check");
            }
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("the line after the check").count(), 3, "{text}");
    }
}
