//! Plaintext hygiene and hostile API input, against the real binary and broker.

mod common;

use std::time::Duration;

use base64::{engine::general_purpose::STANDARD, Engine};
use common::*;
use serde_json::json;

fn files_under(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_dek_plaintext_reaches_logs_the_store_or_any_topic() {
    let broker = Broker::start();
    let mut d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_LOG", "trace")]);
    d.create_key("hk");
    let ids: Vec<String> = (0..5).map(|i| format!("h-{i}")).collect();
    for id in &ids {
        d.create_instance(id, "hk");
    }
    // One credential rotated too: its old and its new token are searched for.
    let retired = d.dek_token_for("h-0");
    let (s, v) = d.post("/v1/instances/h-0/credential", None);
    assert_eq!(s, 200, "{v}");
    let mut tokens: Vec<String> = ids.iter().map(|id| d.dek_token_for(id)).collect();
    tokens.push(retired);
    // A whole lifecycle, fetching the DEKs along the way.
    let mut deks: Vec<Vec<u8>> = Vec::new();
    let mut fetch_all = |d: &Daemon| {
        for id in &ids {
            let (s, v) = d.dek(id);
            assert_eq!(s, 200, "{v}");
            deks.push(STANDARD.decode(v["dek"].as_str().unwrap()).unwrap());
        }
    };
    fetch_all(&d);
    d.act("hk", "rotate");
    d.wait_rotated("hk", "2");
    fetch_all(&d);
    for action in ["disable", "enable", "delete", "restore"] {
        let ev = d.act("hk", action);
        d.wait_event(ev["event_id"].as_str().unwrap());
    }
    for id in &ids {
        d.wait_state(id, "active");
    }
    fetch_all(&d);
    // A malformed message too, so the dead-letter topic has content.
    produce(&producer(&broker.bootstrap), "key-lifecycle", Some("hk"), b"{not json");
    TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq").read_until("the dead letter", Duration::from_secs(60), |r| !r.is_empty());
    assert_eq!(d.terminate(), Some(0));

    let mut haystacks: Vec<(String, Vec<u8>)> = Vec::new();
    let mut files = Vec::new();
    files_under(d.dir.path(), &mut files);
    for f in files {
        haystacks.push((f.display().to_string(), std::fs::read(&f).unwrap()));
    }
    for topic in ["key-lifecycle", "instance-commands", "key-lifecycle.dlq", "keywarden-state"] {
        let mut r = TopicReader::new(&broker.bootstrap, topic);
        r.read_until(&format!("{topic} to have content"), Duration::from_secs(30), |m| !m.is_empty());
        r.drain(Duration::from_secs(1));
        let mut all = Vec::new();
        for m in &r.seen {
            all.extend_from_slice(m.key.as_deref().unwrap_or_default().as_bytes());
            all.extend_from_slice(&m.payload);
            for (k, v) in &m.headers {
                all.extend_from_slice(k.as_bytes());
                all.extend_from_slice(v.as_bytes());
            }
        }
        haystacks.push((format!("topic {topic}"), all));
    }
    let log_size = haystacks.iter().find(|(n, _)| n.ends_with("keywarden.log")).map(|(_, h)| h.len()).unwrap_or(0);
    assert!(log_size > 10_000, "the trace log was written ({log_size} bytes)");
    let unique: std::collections::HashSet<Vec<u8>> = deks.into_iter().collect();
    assert_eq!(unique.len(), ids.len(), "the DEKs never changed across the lifecycle");
    for dek in &unique {
        let b64 = STANDARD.encode(dek);
        let b64_url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(dek);
        let hex: String = dek.iter().map(|b| format!("{b:02x}")).collect();
        let hex_upper = hex.to_uppercase();
        for (name, hay) in &haystacks {
            assert!(!contains(hay, dek), "raw DEK bytes found in {name}");
            assert!(!contains(hay, b64.as_bytes()), "base64 DEK found in {name}");
            assert!(!contains(hay, b64_url.as_bytes()), "URL-safe unpadded base64 DEK found in {name}");
            assert!(!contains(hay, hex.as_bytes()), "hex DEK found in {name}");
            assert!(!contains(hay, hex_upper.as_bytes()), "upper-case hex DEK found in {name}");
        }
    }
    // The instances' DEK tokens: keywarden keeps only their hashes.
    for token in &tokens {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).expect("a dek_token is unpadded base64url");
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        for (name, hay) in &haystacks {
            assert!(!contains(hay, token.as_bytes()), "a dek_token found in {name}");
            assert!(!contains(hay, &raw), "a dek_token's raw bytes found in {name}");
            assert!(!contains(hay, STANDARD.encode(&raw).as_bytes()), "a base64 dek_token found in {name}");
            assert!(!contains(hay, hex.as_bytes()) && !contains(hay, hex.to_uppercase().as_bytes()), "a hex dek_token found in {name}");
        }
    }
    println!(
        "HYGIENE: {} DEKs and {} dek_tokens searched in {} places ({} bytes of trace log): none found",
        unique.len(),
        tokens.len(),
        haystacks.len(),
        log_size
    );
}

#[test]
fn hostile_api_requests_get_4xx_never_5xx() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("fk");
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let huge = format!(r#"{{"instance_id":"{}","key_id":"fk"}}"#, "x".repeat(3 << 20));
    let huge_len = huge.len();
    let long_id = "y".repeat(10_000);
    let bodies: Vec<String> = vec![
        "".into(),
        "null".into(),
        "[]".into(),
        "{".into(),
        deep,
        huge,
        r#"{"instance_id":"a\u0000b","key_id":"fk"}"#.into(),
        r#"{"instance_id":"ïñståñce-✓-🔑","key_id":"fk"}"#.into(),
        format!(r#"{{"instance_id":"{long_id}","key_id":"fk"}}"#),
        r#"{"instance_id":"../../etc/passwd","key_id":"../../etc/shadow"}"#.into(),
        r#"{"instance_id":1,"key_id":{"$ne":null}}"#.into(),
        r#"{"instance_id":"dup","instance_id":"dup2","key_id":"fk"}"#.into(),
    ];
    let mut seen = Vec::new();
    for body in &bodies {
        for path in ["/v1/instances", "/v1/keys"] {
            let send =
                || d.http.post(format!("{}{path}", d.api)).bearer_auth(&d.admin_token).header("content-type", "application/json").body(body.clone()).send();
            // The daemon answers 413 to a body over its limit as soon as it
            // has the headers, and closes; a client still writing the 3 MiB
            // may see the pipe break before it reads that answer (CI saw it
            // once). Sent again until an answer is read; nothing else is
            // excused.
            let mut tries = 0;
            let r = loop {
                match send() {
                    Err(e) if body.len() == huge_len && e.is_request() && tries < 10 => tries += 1,
                    result => break result.unwrap(),
                }
            };
            let status = r.status().as_u16();
            assert!(status < 500, "POST {path} with {:?}... answered {status}", &body[..body.len().min(60)]);
            seen.push(status);
        }
    }
    for path in [
        "/v1/instances/..%2F..%2Fetc%2Fpasswd",
        "/v1/instances/%00",
        "/v1/instances/%F0%9F%94%91",
        "/v1/keys/..%2F..",
        "/v1/keys/%FF%FE",
        "/v1/instances/x/dek/../../keys",
        "/v1/events/%2e%2e",
    ] {
        for method in [reqwest::Method::GET, reqwest::Method::POST, reqwest::Method::DELETE] {
            let r = d.http.request(method.clone(), format!("{}{path}", d.api)).bearer_auth(&d.admin_token).send().unwrap();
            assert!(r.status().as_u16() < 500, "{method} {path} answered {}", r.status());
        }
    }
    assert!(seen.contains(&413), "a body over the limit is refused with 413: {seen:?}");
    assert_eq!(d.get("/healthz").0, 200, "still serving");
    // The unicode id was accepted and is served back intact.
    let (s, v) = d.get("/v1/instances/%C3%AF%C3%B1st%C3%A5%C3%B1ce-%E2%9C%93-%F0%9F%94%91");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["instance_id"], json!("ïñståñce-✓-🔑"));
}
