//! The AWS KMS provider against a real AWS KMS API implementation (moto_server),
//! end to end through the real broker: the key lives in "AWS", keywarden only
//! holds wrapped DEKs, and every lifecycle step goes through Kafka.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    fn start() -> Moto {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-p", &port.to_string(), "-H", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (pip install 'moto[server]')");
        let url = format!("http://127.0.0.1:{port}");
        wait_until("moto_server to listen", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        Moto { child, url }
    }

    /// Runs boto3 against moto, as the customer operating their key would.
    fn boto(&self, code: &str) -> String {
        let script = format!(
            "import boto3, sys\nkms = boto3.client('kms', region_name='us-east-1', endpoint_url='{}', aws_access_key_id='testing', aws_secret_access_key='testing')\n{code}\n",
            self.url
        );
        let out = Command::new("python3").args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn aws_key_lifecycle_through_moto_and_the_broker() {
    let broker = Broker::start();
    let moto = Moto::start();
    let arn = moto.boto("print(kms.create_key(Description='keywarden test')['KeyMetadata']['Arn'])");
    assert!(arn.starts_with("arn:aws:kms:"), "{arn}");
    // keywarden knows the key by its ARN (that is what routes it to AWS); the
    // customer's own calls use the bare key id, which moto handles everywhere.
    let key_id = arn.rsplit('/').next().unwrap().to_string();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[kms]\ndefault = \"local\"\nroutes = [{{ prefix = \"arn:aws:kms:\", provider = \"aws\" }}]\n[kms.aws]\nregion = \"us-east-1\"\nendpoint = \"{}\"\n",
            moto.url
        ),
    )
    .unwrap();
    let d = Daemon::start(
        &broker.bootstrap,
        &[("KEYWARDEN_CONFIG", config.to_str().unwrap()), ("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")],
    );
    let enc = |s: &str| s.replace(':', "%3A").replace('/', "%2F");
    let ids = ["aws-a", "aws-b", "aws-c"];
    for id in ids {
        let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": id, "key_id": arn})));
        assert_eq!(s, 201, "{v}");
    }
    let deks: Vec<String> = ids.iter().map(|id| d.dek(id).1["dek"].as_str().unwrap().to_string()).collect();
    let (_, key) = d.get(&format!("/v1/keys/{}", enc(&arn)));
    assert_eq!(key["kms"]["provider"], "aws", "{key}");

    let p = producer(&broker.bootstrap);
    let mut t = 0;
    let mut send = |kind: &str, version: Option<&str>| {
        t += 1;
        let id = format!("aws-ev-{t}");
        produce(&p, "key-lifecycle", Some(&arn), &event(&id, kind, &arn, version, &soon(t)));
        id
    };

    // AWS rotates key material inside the key; the rotation event makes keywarden
    // ReEncrypt every DEK, labelled with the event's version.
    moto.boto(&format!("kms.enable_key_rotation(KeyId='{key_id}')"));
    send("rotate", Some("2030-01-01"));
    d.wait_rotated(&enc(&arn), "2030-01-01");
    for (i, id) in ids.iter().enumerate() {
        let (s, v) = d.dek(id);
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["dek"].as_str().unwrap(), deks[i], "ReEncrypt kept the DEK");
        assert_eq!(v["key_version"], "2030-01-01");
    }

    moto.boto(&format!("kms.disable_key(KeyId='{key_id}')"));
    send("disable", None);
    for id in ids {
        d.wait_state(id, "revoked");
        assert_eq!(d.dek(id).0, 423);
    }
    moto.boto(&format!("kms.enable_key(KeyId='{key_id}')"));
    send("enable", None);
    for (i, id) in ids.iter().enumerate() {
        d.wait_state(id, "active");
        // The plaintext cache was dropped at the disable: this is a real Decrypt.
        assert_eq!(d.dek(id).1["dek"].as_str().unwrap(), deks[i]);
    }

    moto.boto(&format!("kms.schedule_key_deletion(KeyId='{key_id}', PendingWindowInDays=7)"));
    send("delete", None);
    for id in ids {
        d.wait_state(id, "erased");
        assert_eq!(d.dek(id).0, 410);
    }
    moto.boto(&format!("kms.cancel_key_deletion(KeyId='{key_id}')\nkms.enable_key(KeyId='{key_id}')"));
    send("restore", None);
    for (i, id) in ids.iter().enumerate() {
        d.wait_state(id, "active");
        assert_eq!(d.dek(id).1["dek"].as_str().unwrap(), deks[i], "restore brings back the same DEK");
    }
}

/// AWS events are best effort. Reconciliation finds what they missed: a key
/// disabled in AWS with no event is revoked within one interval, and a change
/// that would revoke more instances than the threshold waits for an operator.
#[test]
fn reconciliation_applies_what_events_missed_and_asks_before_revoking_many() {
    let broker = Broker::start();
    let moto = Moto::start();
    let create = "print(kms.create_key(Description='keywarden reconcile')['KeyMetadata']['Arn'])";
    let (small, large) = (moto.boto(create), moto.boto(create));
    let bare = |arn: &str| arn.rsplit('/').next().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[kms]\ndefault = \"local\"\nroutes = [{{ prefix = \"arn:aws:kms:\", provider = \"aws\" }}]\n[kms.aws]\nregion = \"us-east-1\"\nendpoint = \"{}\"\n[reconcile]\nconfirm_above = 2\n",
            moto.url
        ),
    )
    .unwrap();
    let d = Daemon::start(
        &broker.bootstrap,
        &[
            ("KEYWARDEN_CONFIG", config.to_str().unwrap()),
            ("KEYWARDEN_RECONCILE_SCHEDULE", "* * * * * *"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ],
    );
    d.create_instance("rc-small", &small);
    for i in 0..3 {
        d.create_instance(&format!("rc-large-{i}"), &large);
    }

    // Disabled in AWS, and the event never came.
    moto.boto(&format!("kms.disable_key(KeyId='{}')", bare(&small)));
    d.wait_state("rc-small", "revoked");
    let (_, audit) = d.get("/v1/audit?limit=200");
    let fixed = audit["entries"].as_array().unwrap().iter().find(|e| e["who"] == "schedule:reconcile" && e["key_id"] == small.as_str()).cloned();
    assert!(fixed.is_some_and(|e| e["what"] == "event disable" && e["outcome"] == "applied"), "{audit}");

    // Three instances is above the threshold of two: nothing happens until confirmed.
    moto.boto(&format!("kms.disable_key(KeyId='{}')", bare(&large)));
    std::thread::sleep(Duration::from_secs(4));
    for i in 0..3 {
        assert_eq!(d.state(&format!("rc-large-{i}")), "active", "held back for confirmation");
    }
    let (_, plan) = d.post("/v1/reconcile", None);
    assert_eq!(plan["awaiting_confirmation"], true, "{plan}");
    let confirm = Command::new(env!("CARGO_BIN_EXE_keywarden")).args(["--api", &d.api, "--token", &d.admin_token, "reconcile", "--confirm"]).output().unwrap();
    assert!(confirm.status.success(), "{}", String::from_utf8_lossy(&confirm.stderr));
    for i in 0..3 {
        d.wait_state(&format!("rc-large-{i}"), "revoked");
    }

    // Enabled again in AWS: reconciliation brings the small key back too.
    moto.boto(&format!("kms.enable_key(KeyId='{}')", bare(&small)));
    d.wait_state("rc-small", "active");
}
