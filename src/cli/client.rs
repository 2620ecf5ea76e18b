//! The admin API client behind `keywarden key …`, `instance …` and `event …`.

use std::process::ExitCode;

use anyhow::anyhow;
use reqwest::blocking::Client;
use reqwest::Method;
use serde_json::{json, Value};

use super::{Command, InstanceCommand, KeyCommand, Output};

pub fn run(base: &str, output: Output, command: Command) -> anyhow::Result<ExitCode> {
    let (method, path, body) = match command {
        Command::Key(k) => match k {
            KeyCommand::Create { key_id } => (Method::POST, "/v1/keys".to_string(), Some(json!({ "key_id": key_id }))),
            KeyCommand::Show { key_id } => (Method::GET, format!("/v1/keys/{}", enc(&key_id)), None),
            KeyCommand::Rotate { key_id } => (Method::POST, format!("/v1/keys/{}/rotate", enc(&key_id)), None),
            KeyCommand::Disable { key_id } => (Method::POST, format!("/v1/keys/{}/disable", enc(&key_id)), None),
            KeyCommand::Enable { key_id } => (Method::POST, format!("/v1/keys/{}/enable", enc(&key_id)), None),
            KeyCommand::Delete { key_id } => (Method::POST, format!("/v1/keys/{}/delete", enc(&key_id)), None),
            KeyCommand::Restore { key_id } => (Method::POST, format!("/v1/keys/{}/restore", enc(&key_id)), None),
            KeyCommand::Retry { key_id } => (Method::POST, format!("/v1/keys/{}/retry", enc(&key_id)), None),
            KeyCommand::Sync { key_id } => (Method::POST, format!("/v1/keys/{}/sync", enc(&key_id)), None),
        },
        Command::Instance(i) => match i {
            InstanceCommand::Create { instance_id, key } => {
                (Method::POST, "/v1/instances".to_string(), Some(json!({"instance_id": instance_id, "key_id": key})))
            }
            InstanceCommand::Show { instance_id } => (Method::GET, format!("/v1/instances/{}", enc(&instance_id)), None),
            InstanceCommand::List { key } => match key {
                Some(k) => (Method::GET, format!("/v1/instances?key_id={}", enc(&k)), None),
                None => (Method::GET, "/v1/instances".to_string(), None),
            },
            InstanceCommand::Delete { instance_id } => (Method::DELETE, format!("/v1/instances/{}", enc(&instance_id)), None),
            InstanceCommand::Dek { instance_id } => (Method::POST, format!("/v1/instances/{}/dek", enc(&instance_id)), None),
        },
        Command::Event { event_id } => (Method::GET, format!("/v1/events/{}", enc(&event_id)), None),
        Command::Run | Command::CheckConfig | Command::Demo { .. } => unreachable!("handled by the caller"),
    };
    let client = Client::builder().timeout(std::time::Duration::from_secs(30)).build()?;
    let url = format!("{base}{path}");
    let mut req = client.request(method, &url);
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
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Text => print_text(&value),
    }
    Ok(ExitCode::SUCCESS)
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
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
