//! The README's first command: the daemon on embedded defaults (librdkafka's mock
//! cluster, embedded KMS) walking one key's lifecycle.

mod common;

use std::process::Command;

#[test]
fn demo_walks_the_whole_lifecycle_on_the_embedded_broker() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_keywarden")).args(["demo", "--exit"]).env("KEYWARDEN_API_LISTEN", format!("127.0.0.1:{port}")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for expected in [
        "embedded in-memory mock broker",
        "rotated: every DEK rewrapped under version 2",
        "byte-for-byte the ones from before the rotation",
        "state=revoked",
        "refused: 423 revoked",
        "state=erased",
        "refused: 410 gone",
        "the DEKs are the same as at the start",
    ] {
        assert!(stdout.contains(expected), "demo output lacks {expected:?}:\n{stdout}");
    }
    // A clean exit: every Kafka client is gone before the embedded broker, so
    // none logs a failed connection to it. A reference cycle (store → notice
    // filter → KMS router → embedded KMS → store) once kept the store and its
    // changelog producer alive past shutdown, and every exit logged one.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "the demo logged errors:\n{}", errors.join("\n"));
}

/// `demo --mariadb`: a real mariadbd and a real agent (both stopped at exit),
/// the rows back after enable and unreachable after the purge.
#[test]
fn demo_with_mariadb_stops_the_database_on_disable_brings_the_rows_back_on_enable_and_loses_them_at_purge() {
    let found = keywarden::cli::demo::mariadb::mariadbd().ok();
    if common::required(found, "mariadbd with the hashicorp key plugin", "apt-get install mariadb-server mariadb-plugin-hashicorp-key-management").is_none() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_keywarden"))
        .args(["demo", "--mariadb", "--exit"])
        .env("KEYWARDEN_API_LISTEN", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "demo --mariadb failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows = "KW-DEMO-SECRET-ROW-1, KW-DEMO-SECRET-ROW-2, KW-DEMO-SECRET-ROW-3";
    for expected in [
        &format!("rows written to shop.secret (ENCRYPTED=YES ENCRYPTION_KEY_ID=1): {rows}"),
        "raw shop/secret.ibd   does not contain",
        "raw ib_logfile0       does not contain",
        "raw shop/plain.ibd    CONTAINS",
        "data_plane: action=revoke outcome=enforced",
        "disabled: the agent stopped the database cleanly",
        "the KV endpoint now answers key 1 with 403",
        "enabled: the agent started the database",
        &format!("rows back: {rows}"),
        "data_plane: action=erase outcome=enforced",
        "state=destroyed",
        "Key not found (key id: 1)",
        "gone for good",
    ] {
        assert!(stdout.contains(expected), "demo --mariadb output lacks {expected:?}:\n{stdout}");
    }
    // Two refused starts: after the disable and after the purge.
    assert_eq!(stdout.matches("a start attempt: mariadbd exits at once").count(), 2, "{stdout}");
    // Every process it started is gone, and so is its directory.
    let dir = stdout.lines().find_map(|l| l.trim().strip_prefix("store")).map(|d| d.trim().to_string()).expect("the demo names its directory");
    assert!(!std::path::Path::new(&dir).exists(), "the demo left {dir} behind");
    let ps = Command::new("pgrep").args(["-f", &dir]).output().unwrap();
    assert!(ps.stdout.is_empty(), "processes of the demo still run: {}", String::from_utf8_lossy(&ps.stdout));
}

#[test]
fn check_config_accepts_the_shipped_file_and_names_a_bad_field() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/keywarden.toml");
    let ok = Command::new(env!("CARGO_BIN_EXE_keywarden")).args(["check-config", "--config", shipped]).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let bad =
        Command::new(env!("CARGO_BIN_EXE_keywarden")).args(["check-config", "--config", shipped]).env("KEYWARDEN_ROTATION_CONCURRENCY", "0").output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("rotation.concurrency") && err.contains("1 to 1024"), "{err}");
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/keywarden.service")).unwrap();
    // Point ExecStart at the binary under test: verify checks that it exists.
    let unit = unit.replace("/usr/local/bin/keywarden", env!("CARGO_BIN_EXE_keywarden"));
    let path = dir.path().join("keywarden.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze is installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = stderr.lines().filter(|l| l.contains("keywarden.service")).collect();
    assert!(out.status.success() && problems.is_empty(), "systemd-analyze verify: {stderr}");
}
