//! `keywarden event sign|emit|keygen`: correctly signed test events for
//! operators, made with the same code the daemon verifies with.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, ValueEnum};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::config::{Config, SignatureAlgorithm};
use crate::intake::signature::{ed25519_keypair, Signer, HEADER};

#[derive(Args, Debug)]
pub struct KeyArgs {
    /// Sign with this key file instead of signatures.hmac_key_file.
    #[arg(long, requires = "key_id")]
    pub key_file: Option<PathBuf>,
    /// The key id named in the header (with --key-file).
    #[arg(long)]
    pub key_id: Option<String>,
    #[arg(long, value_enum, default_value_t = SignatureAlgorithm::HmacSha256)]
    pub algorithm: SignatureAlgorithm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Envelope {
    Native,
    /// CloudEvents 1.0, structured mode.
    Cloudevents,
    /// CloudEvents 1.0, binary mode (ce_ headers).
    CloudeventsBinary,
}

#[derive(Args, Debug)]
pub struct EmitArgs {
    /// rotate, disable, enable, delete or restore.
    #[arg(long = "type")]
    pub kind: String,
    #[arg(long)]
    pub key: String,
    /// The new version, for rotate.
    #[arg(long)]
    pub version: Option<String>,
    /// Defaults to a random UUID.
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long)]
    pub correlation_id: Option<String>,
    #[arg(long, value_enum, default_value_t = Envelope::Native)]
    pub envelope: Envelope,
    /// Produce without a signature (to see the daemon refuse it).
    #[arg(long)]
    pub unsigned: bool,
    /// Print the message instead of producing it.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub key_args: KeyArgs,
}

fn signer(config: &Config, key: &KeyArgs) -> anyhow::Result<Signer> {
    match (&key.key_file, &key.key_id) {
        (Some(file), Some(id)) => Ok(Signer::from_file(id, key.algorithm, file)?),
        _ => Signer::from_config(&config.signatures)?.ok_or_else(|| anyhow!("signatures.hmac_key_file is empty; pass --key-file and --key-id")),
    }
}

pub fn sign(config: &Config, file: &str, key: &KeyArgs) -> anyhow::Result<ExitCode> {
    let mut payload = Vec::new();
    if file == "-" {
        std::io::stdin().read_to_end(&mut payload)?;
    } else {
        payload = std::fs::read(file).with_context(|| format!("cannot read {file}"))?;
    }
    println!("{HEADER}: {}", signer(config, key)?.sign(&payload));
    Ok(ExitCode::SUCCESS)
}

pub fn emit(config: &Config, args: &EmitArgs) -> anyhow::Result<ExitCode> {
    let id = args.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut event = serde_json::json!({
        "event_id": id,
        "type": args.kind,
        "key_id": args.key,
        "occurred_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    });
    if let Some(v) = &args.version {
        event["key_version"] = v.clone().into();
    }
    if let Some(c) = &args.correlation_id {
        event["correlation_id"] = c.clone().into();
    }
    // Check it the way the daemon will, so a mistake shows here and not in the DLQ.
    crate::intake::native::decode(&serde_json::to_vec(&event)?)?;
    let mut headers: Vec<(String, String)> = Vec::new();
    let payload = match args.envelope {
        Envelope::Native => serde_json::to_vec(&event)?,
        Envelope::Cloudevents => serde_json::to_vec(&serde_json::json!({
            "specversion": "1.0",
            "id": id,
            "source": "keywarden-cli",
            "type": format!("keywarden.key.{}", args.kind),
            "datacontenttype": "application/json",
            "data": event,
        }))?,
        Envelope::CloudeventsBinary => {
            for (k, v) in [("ce_specversion", "1.0"), ("ce_id", &id), ("ce_source", "keywarden-cli"), ("ce_type", &format!("keywarden.key.{}", args.kind))] {
                headers.push((k.to_string(), v.to_string()));
            }
            serde_json::to_vec(&event)?
        }
    };
    if !args.unsigned {
        headers.push((HEADER.to_string(), signer(config, &args.key_args)?.sign(&payload)));
    }
    if args.dry_run {
        for (k, v) in &headers {
            println!("{k}: {v}");
        }
        println!("{}", String::from_utf8_lossy(&payload));
        return Ok(ExitCode::SUCCESS);
    }
    let k = &config.kafka;
    if k.brokers == "embedded" {
        bail!("the embedded broker lives inside the daemon; set kafka.brokers to a real broker, or use --dry-run");
    }
    let mut props = k.clone();
    props.properties.extend(k.read_secrets()?);
    let producer: BaseProducer = crate::broker::client_config(&props, &k.brokers).set("partitioner", crate::cluster::PARTITIONER).create()?;
    let mut owned = OwnedHeaders::new();
    for (name, value) in &headers {
        owned = owned.insert(Header { key: name, value: Some(value.as_str()) });
    }
    producer
        .send(BaseRecord::to(&k.events_topic).key(&args.key).payload(&payload).headers(owned))
        .map_err(|(e, _)| anyhow!("cannot produce to {}: {e}", k.events_topic))?;
    producer.flush(Duration::from_secs(10)).map_err(|e| anyhow!("the broker did not confirm the event: {e}"))?;
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}

pub fn keygen(out: &std::path::Path) -> anyhow::Result<ExitCode> {
    let (private, public) = ed25519_keypair();
    let key_path = out.with_extension("key");
    let pub_path = out.with_extension("pub");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .with_context(|| format!("cannot create {}", key_path.display()))?;
    f.write_all(format!("{}\n", private.as_str()).as_bytes())?;
    std::fs::write(&pub_path, format!("{public}\n"))?;
    println!("private key (give to the producer): {}", key_path.display());
    println!("public key (add to signatures.keys with algorithm = \"ed25519\"): {}", pub_path.display());
    Ok(ExitCode::SUCCESS)
}
