//! The admin API client behind `keywarden key …`, `instance …` and `event …`.

use std::process::ExitCode;

use anyhow::anyhow;
use reqwest::blocking::Client;
use reqwest::Method;
use serde_json::{json, Value};

use super::{AuditCommand, Command, EventCommand, InstanceCommand, KeyCommand, Output};
use crate::text::percent_encode;

/// Trust and identity for an https API.
pub struct Tls {
    pub ca_cert: Option<std::path::PathBuf>,
    pub client_cert: Option<std::path::PathBuf>,
}

fn client(tls: &Tls) -> anyhow::Result<Client> {
    let mut builder = Client::builder().timeout(std::time::Duration::from_secs(30));
    if let Some(path) = &tls.ca_cert {
        let pem = std::fs::read(path).map_err(|e| anyhow!("cannot read --ca-cert {} ({e})", path.display()))?;
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    if let Some(path) = &tls.client_cert {
        let pem = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| anyhow!("cannot read --client-cert {} ({e})", path.display()))?);
        builder = builder.identity(
            reqwest::Identity::from_pem(&pem).map_err(|e| anyhow!("--client-cert {} must hold a PEM certificate and its key ({e})", path.display()))?,
        );
    }
    Ok(builder.build()?)
}

pub fn run(base: &str, token: &str, tls: &Tls, output: Output, command: Command) -> anyhow::Result<ExitCode> {
    let client = client(tls)?;
    if let Command::Key(KeyCommand::Show { key_id, watch: true }) = &command {
        return super::watch::run(&client, base, token, key_id, output);
    }
    if let Command::Audit(AuditCommand::Export { since, out }) = &command {
        let mut path = "/v1/audit/export".to_string();
        if let Some(t) = since {
            path.push_str(&format!("?since={}", percent_encode(&t.to_rfc3339())));
        }
        let resp = client.get(format!("{base}{path}")).bearer_auth(token).send().map_err(|e| anyhow!("cannot reach the admin API at {base} ({e})"))?;
        if !resp.status().is_success() {
            return Err(anyhow!("audit export failed ({})", resp.status().as_u16()));
        }
        let text = resp.text()?;
        match out {
            Some(file) => std::fs::write(file, &text).map_err(|e| anyhow!("cannot write {} ({e})", file.display()))?,
            None => print!("{text}"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let impact = matches!(command, Command::Key(KeyCommand::Impact { .. }));
    let (method, path, body) = match command {
        Command::Key(k) => match k {
            KeyCommand::Create { key_id } => (Method::POST, "/v1/keys".to_string(), Some(json!({ "key_id": key_id }))),
            KeyCommand::Show { key_id, .. } => (Method::GET, format!("/v1/keys/{}", percent_encode(&key_id)), None),
            KeyCommand::Impact { key_id, limit } => (Method::GET, format!("/v1/keys/{}/impact?limit={limit}", percent_encode(&key_id)), None),
            KeyCommand::Rotate { key_id } => (Method::POST, format!("/v1/keys/{}/rotate", percent_encode(&key_id)), None),
            KeyCommand::Disable { key_id } => (Method::POST, format!("/v1/keys/{}/disable", percent_encode(&key_id)), None),
            KeyCommand::Enable { key_id } => (Method::POST, format!("/v1/keys/{}/enable", percent_encode(&key_id)), None),
            KeyCommand::Delete { key_id } => (Method::POST, format!("/v1/keys/{}/delete", percent_encode(&key_id)), None),
            KeyCommand::Restore { key_id } => (Method::POST, format!("/v1/keys/{}/restore", percent_encode(&key_id)), None),
            KeyCommand::Retry { key_id } => (Method::POST, format!("/v1/keys/{}/retry", percent_encode(&key_id)), None),
            KeyCommand::Sync { key_id } => (Method::POST, format!("/v1/keys/{}/sync", percent_encode(&key_id)), None),
        },
        Command::Instance(i) => match i {
            InstanceCommand::Create { instance_id, key } => {
                (Method::POST, "/v1/instances".to_string(), Some(json!({"instance_id": instance_id, "key_id": key})))
            }
            InstanceCommand::Show { instance_id } => (Method::GET, format!("/v1/instances/{}", percent_encode(&instance_id)), None),
            InstanceCommand::List { key } => match key {
                Some(k) => (Method::GET, format!("/v1/instances?key_id={}", percent_encode(&k)), None),
                None => (Method::GET, "/v1/instances".to_string(), None),
            },
            InstanceCommand::Delete { instance_id } => (Method::DELETE, format!("/v1/instances/{}", percent_encode(&instance_id)), None),
            InstanceCommand::Dek { instance_id, .. } => (Method::POST, format!("/v1/instances/{}/dek", percent_encode(&instance_id)), None),
            InstanceCommand::Credential { instance_id } => (Method::POST, format!("/v1/instances/{}/credential", percent_encode(&instance_id)), None),
        },
        Command::Event(EventCommand::Show { event_id }) => (Method::GET, format!("/v1/events/{}", percent_encode(&event_id)), None),
        Command::Audit(AuditCommand::Verify) => (Method::GET, "/v1/audit/verify".to_string(), None),
        Command::Reconcile { confirm } => (Method::POST, format!("/v1/reconcile?confirm={confirm}"), None),
        Command::Run | Command::Agent | Command::CheckConfig | Command::Demo { .. } | Command::Event(_) | Command::Audit(_) | Command::DataPlane(_) => {
            unreachable!("handled by the caller")
        }
    };
    let value = request(&client, base, token, method, &path, body)?;
    if value.get("dek_token").is_some() {
        eprintln!("keywarden: the dek_token is shown this once (keywarden keeps only its hash); give it to the instance's data-plane node");
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Text if impact => super::impact::print_text(&value),
        Output::Text => print_text(&value),
    }
    Ok(ExitCode::SUCCESS)
}

/// One API call; a non-2xx answer becomes the API's error message.
pub(super) fn request(client: &Client, base: &str, token: &str, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let url = format!("{base}{path}");
    let mut req = client.request(method, &url).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().map_err(|e| anyhow!("cannot reach the admin API at {base} ({e}); is keywarden running? set --api"))?;
    let status = resp.status();
    let text = resp.text().unwrap_or_default();
    let value: Value = if text.trim().is_empty() { json!({}) } else { serde_json::from_str(&text).unwrap_or(json!({ "raw": text })) };
    if !status.is_success() {
        let reason = value.get("error").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| text.clone());
        return Err(anyhow!("{} ({})", reason, status.as_u16()));
    }
    Ok(value)
}

fn print_text(v: &Value) {
    match v {
        Value::Object(map) if map.is_empty() => println!("ok"),
        Value::Object(map) => {
            if let Some(Value::Array(items)) = map.get("instances") {
                if map.len() == 1 {
                    for item in items {
                        println!(
                            "{}\t{}\tkey={} version={}",
                            item["instance_id"].as_str().unwrap_or(""),
                            item["state"].as_str().unwrap_or(""),
                            item["key_id"].as_str().unwrap_or(""),
                            item["key_version"].as_str().unwrap_or("")
                        );
                    }
                    return;
                }
            }
            for (k, val) in map {
                match val {
                    Value::Null => {}
                    Value::String(s) => println!("{k}: {s}"),
                    other => println!("{k}: {other}"),
                }
            }
        }
        other => println!("{other}"),
    }
}
