//! A real MariaDB under keywarden, without the data-plane agent: a private
//! mariadbd started with the shipped `config/mariadb/keywarden.cnf` reads its
//! instance's keys from the real binary's Vault KV endpoint
//! (`[data_plane] vault_kv_listen`) over a real tansu broker, and every key
//! event is followed by what the database can still open.
//!
//! What a database does when keywarden refuses its key, measured here:
//! - a restart while refused does not start at all: with
//!   `innodb-encrypt-log=ON` (without which the rows of an encrypted table
//!   sit readable in ib_logfile0) the redo log needs key 1, InnoDB cannot
//!   start, and mariadbd aborts; no table, encrypted or not, is reachable
//!   (only with the log unencrypted do the plain tables open and the
//!   encrypted ones answer ERROR 1877);
//! - a running server goes on with its cached keys until an entry expires
//!   (the plugin measures that in CPU time of the process, clock()), then its
//!   next page write is refused and mariadbd aborts on an InnoDB assertion;
//!   crash recovery needs the key again, and finds every committed row.
//!
//! Needs mariadbd and its HashiCorp key plugin (scripts/install-test-deps.sh);
//! fails without them unless KEYWARDEN_TEST_SKIP_MISSING=1.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use common::mariadb::{contains, files_under, Mariadb, Start};
use common::*;

const MIN: Duration = Duration::from_secs(60);

fn mariadbd() -> Option<PathBuf> {
    required(common::mariadb::installed(), "mariadbd with the hashicorp key plugin", "apt-get install mariadb-server mariadb-plugin-hashicorp-key-management")
}

/// A daemon with the Vault KV endpoint on, and its address.
fn daemon(broker: &Broker, extra: &[(&str, &str)]) -> (Daemon, String) {
    let kv = format!("127.0.0.1:{}", free_port());
    let mut env = vec![("KEYWARDEN_DATA_PLANE_VAULT_KV_LISTEN", kv.as_str())];
    env.extend_from_slice(extra);
    (Daemon::start(&broker.bootstrap, &env), kv)
}

/// An answer of the KV endpoint: status, Cache-Control and the JSON body.
fn kv_get(d: &Daemon, kv: &str, path: &str, token: &str) -> (u16, Option<String>, serde_json::Value) {
    let r = d.http.get(format!("http://{kv}{path}")).header("X-Vault-Token", token).send().unwrap();
    let status = r.status().as_u16();
    let cache = r.headers().get("cache-control").and_then(|v| v.to_str().ok()).map(str::to_string);
    (status, cache, r.json().unwrap_or(serde_json::Value::Null))
}

/// The hex key `n` of `id`, as the plugin reads it.
fn kv_key(d: &Daemon, kv: &str, id: &str, n: u32) -> String {
    let (status, _, v) = kv_get(d, kv, &format!("/v1/{id}/data/{n}"), &d.dek_token_for(id));
    assert_eq!(status, 200, "{v}");
    v["data"]["data"]["data"].as_str().unwrap().to_string()
}

const ENC_MARKER: &str = "KWENC-4b1d-secret-row";
const PLAIN_MARKER: &str = "KWPLAIN-77aa-control-row";

/// One encrypted table (key 2) and one unencrypted control table, each with
/// `rows` rows holding its marker.
fn create_tables(db: &Mariadb, rows: usize) {
    db.sql(
        "CREATE DATABASE shop; \
         CREATE TABLE shop.secret (id INT PRIMARY KEY, v VARCHAR(200)) ENGINE=InnoDB ENCRYPTED=YES ENCRYPTION_KEY_ID=2; \
         CREATE TABLE shop.plain (id INT PRIMARY KEY, v VARCHAR(200)) ENGINE=InnoDB ENCRYPTED=NO;",
    );
    insert_rows(db, 1, rows);
}

fn insert_rows(db: &Mariadb, from: usize, to: usize) {
    for i in from..=to {
        db.sql(&format!("INSERT INTO shop.secret VALUES ({i}, '{ENC_MARKER}-{i}'); INSERT INTO shop.plain VALUES ({i}, '{PLAIN_MARKER}-{i}');"));
    }
}

fn count(db: &Mariadb, table: &str) -> usize {
    db.sql(&format!("SELECT COUNT(*) FROM shop.{table} WHERE v LIKE 'KW%'")).parse().unwrap()
}

fn setup(broker: &Broker, extra_env: &[(&str, &str)], id: &str, mariadb_extra: &[&str]) -> (Daemon, String, Mariadb) {
    let bin = mariadbd().expect("checked by the caller");
    let (d, kv) = daemon(broker, extra_env);
    d.create_key(&format!("key-{id}"));
    d.create_instance(id, &format!("key-{id}"));
    let db = Mariadb::install(bin, &kv, id, &d.dek_token_for(id), mariadb_extra);
    (d, kv, db)
}

#[test]
fn encrypted_rows_are_absent_from_the_table_file_and_the_redo_log_and_survive_a_rotation() {
    if mariadbd().is_none() {
        return;
    }
    let broker = Broker::start();
    let (d, kv, mut db) = setup(&broker, &[], "db-enc", &[]);
    let first = db.start_ready();
    create_tables(&db, 20);
    let plugin = db.sql("SELECT PLUGIN_STATUS FROM information_schema.PLUGINS WHERE PLUGIN_NAME = 'hashicorp_key_management'");
    assert_eq!(plugin, "ACTIVE");
    let encrypted = db.sql("SELECT CURRENT_KEY_ID, CURRENT_KEY_VERSION FROM information_schema.INNODB_TABLESPACES_ENCRYPTION WHERE NAME = 'shop/secret'");
    assert_eq!(encrypted, "2\t1", "the table is encrypted under key 2, version 1");
    // The plugin took its keys from keywarden, which audited each release.
    let releases = wait_until("the releases audited", MIN, || {
        let entries = d.get("/v1/audit?limit=1000").1["entries"].as_array().cloned().unwrap_or_default();
        let n = releases(&entries).iter().filter(|r| r["instance_id"] == "db-enc").count();
        (n >= 2).then_some(n)
    });
    db.shutdown();

    let read = |name: &str| std::fs::read(db.datadir.join(name)).unwrap();
    assert!(contains(&read("shop/plain.ibd"), PLAIN_MARKER.as_bytes()), "the control: an unencrypted table's rows are in its file, so the search can find one");
    assert!(!contains(&read("shop/secret.ibd"), ENC_MARKER.as_bytes()), "an encrypted table's rows must not be in its file");
    assert!(!contains(&read("ib_logfile0"), ENC_MARKER.as_bytes()), "an encrypted table's rows must not be in the redo log");
    assert!(!contains(&read("ib_logfile0"), PLAIN_MARKER.as_bytes()), "with innodb-encrypt-log the whole redo log is encrypted");
    let leaked: Vec<_> = db.data_files().into_iter().filter(|(_, bytes)| contains(bytes, ENC_MARKER.as_bytes())).map(|(p, _)| p).collect();
    assert!(leaked.is_empty(), "encrypted rows readable in {leaked:?}");

    // Rotate the root key while the database runs: the DEK is rewrapped and
    // never changes, so neither does any key the database holds.
    let restart = db.start_ready();
    let before = [kv_key(&d, &kv, "db-enc", 1), kv_key(&d, &kv, "db-enc", 2)];
    let version = d.act("key-db-enc", "rotate")["key_version"].as_str().unwrap().to_string();
    d.wait_rotated("key-db-enc", &version);
    assert_eq!([kv_key(&d, &kv, "db-enc", 1), kv_key(&d, &kv, "db-enc", 2)], before, "a rotation changes no database key");
    insert_rows(&db, 21, 25);
    assert_eq!(count(&db, "secret"), 25, "the database keeps running through the rotation");
    db.shutdown();
    let after_rotation = db.start_ready();
    assert_eq!((count(&db, "secret"), count(&db, "plain")), (25, 25), "every row reads back after a restart");
    println!(
        "mariadb: {releases} key releases audited; first start with keys from keywarden {} ms, restart {} ms, restart after a rotation {} ms",
        first.as_millis(),
        restart.as_millis(),
        after_rotation.as_millis()
    );
    db.shutdown();
}

#[test]
fn a_disabled_key_is_refused_and_the_database_cannot_start_until_it_is_enabled() {
    if mariadbd().is_none() {
        return;
    }
    let broker = Broker::start();
    let (d, kv, mut db) = setup(&broker, &[], "db-dis", &[]);
    db.start_ready();
    create_tables(&db, 10);
    let token = d.dek_token_for("db-dis");

    // The endpoint as the plugin sees it.
    let (status, cache, tune) = kv_get(&d, &kv, "/v1/sys/mounts/db-dis/tune", &token);
    assert_eq!((status, tune["options"]["version"].as_str()), (200, Some("2")), "{tune}");
    assert_eq!(cache.as_deref(), Some("no-store"));
    let (status, cache, read) = kv_get(&d, &kv, "/v1/db-dis/data/2?version=1", &token);
    assert_eq!((status, read["data"]["metadata"]["version"].as_u64()), (200, Some(1)), "{read}");
    assert_eq!(cache.as_deref(), Some("no-store"), "a key must not be kept by a cache on its way");
    assert_eq!(kv_get(&d, &kv, "/v1/db-dis/data/2?version=2", &token).0, 404, "only version 1 exists");
    assert_eq!(kv_get(&d, &kv, "/v1/db-dis/data/not-a-number", &token).0, 404);
    // A wrong token and an unknown instance are refused alike, with Vault's envelope.
    let denied = serde_json::json!({"errors": ["permission denied"]});
    for (path, token) in [("/v1/db-dis/data/2", "not-the-token"), ("/v1/nobody/data/2", token.as_str()), ("/v1/sys/mounts/db-dis/tune", "")] {
        let (status, cache, body) = kv_get(&d, &kv, path, token);
        assert_eq!((status, &body, cache.as_deref()), (403, &denied, Some("no-store")), "{path}");
    }
    // Nothing of the admin API is reachable on this listener, with any token.
    for (path, token) in [("/v1/keys/key-db-dis", d.admin_token.as_str()), ("/v1/instances/db-dis", d.admin_token.as_str()), ("/healthz", ""), ("/metrics", "")]
    {
        let (status, _, body) = kv_get(&d, &kv, path, token);
        assert_eq!((status, body), (404, serde_json::json!({"errors": []})), "{path}");
    }
    let posted = d.http.post(format!("http://{kv}/v1/instances/db-dis/dek")).bearer_auth(&token).send().unwrap().status().as_u16();
    assert_eq!(posted, 404, "the DEK endpoint is not on the data-plane listener");
    let mut took: Vec<Duration> = (0..200)
        .map(|_| {
            let started = Instant::now();
            assert_eq!(kv_get(&d, &kv, "/v1/db-dis/data/2", &token).0, 200);
            started.elapsed()
        })
        .collect();
    took.sort();
    // Nearest rank: the smallest sample with at least q of all at or below it.
    let rank = |q: f64| took[((q * took.len() as f64).ceil() as usize).clamp(1, took.len()) - 1];
    println!("vault kv read ({} sequential, warm cache): p50 {:?}, p99 {:?}, max {:?}", took.len(), rank(0.50), rank(0.99), took[took.len() - 1]);

    // Disable: refused at once, by the KV endpoint itself.
    d.act("key-db-dis", "disable");
    d.wait_state("db-dis", "revoked");
    for path in ["/v1/db-dis/data/1", "/v1/db-dis/data/2", "/v1/db-dis/data/2?version=1"] {
        let (status, _, body) = kv_get(&d, &kv, path, &token);
        assert_eq!((status, body), (403, denied.clone()), "{path} while the key is disabled");
    }
    // The running server still has its keys cached (an hour of its CPU
    // time, see keywarden.cnf), so it can be stopped cleanly; that is the
    // agent's job, done here by hand.
    assert_eq!(count(&db, "secret"), 10, "a running server goes on with its cached keys");
    db.shutdown();
    // A restart while disabled: the redo log needs key 1, InnoDB cannot
    // start, mariadbd gives up; no table at all is reachable.
    let refused_at = Instant::now();
    match db.start() {
        Start::Exited(status) => assert!(!status.success(), "{status}"),
        Start::Ready(_) => panic!("mariadbd started with its key disabled: {:?} {:?}", db.query("SELECT COUNT(*) FROM shop.secret"), db.log()),
    }
    let refused_in = refused_at.elapsed();
    let log = db.full_log();
    assert!(log.contains("Hashicorp server error: 403"), "the plugin was refused by keywarden: {}", db.log());
    assert!(log.contains("cannot enable encryption"), "InnoDB cannot start without its key: {}", db.log());

    // Enable: keywarden serves the keys again and every row is back.
    d.act("key-db-dis", "enable");
    d.wait_state("db-dis", "active");
    let back = db.start_ready();
    assert_eq!((count(&db, "secret"), count(&db, "plain")), (10, 10), "every row is back after enable");
    println!("mariadb: a start refused by a disabled key gives up in {} ms; after enable it opens in {} ms", refused_in.as_millis(), back.as_millis());
    db.shutdown();
    // The KV listener is served under the supervisor and stops on the one
    // shutdown path with the rest.
    let mut d = d;
    assert_eq!(d.terminate(), Some(0), "keywarden exits cleanly with the vault kv endpoint on");
    assert!(d.http.get(format!("http://{kv}/v1/sys/mounts/db-dis/tune")).send().is_err(), "the listener is closed");
}

/// The plugin's CPU time, as `clock()` in it reads it: user + system time
/// of the whole process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name, which is in parentheses: fields 14 and 15 overall.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn a_running_server_refused_its_key_aborts_once_its_cache_expires_and_recovers_when_it_is_enabled() {
    if mariadbd().is_none() {
        return;
    }
    let broker = Broker::start();
    // A one-second cache (of the process's CPU time) instead of the shipped hour.
    let short = ["--hashicorp-key-management-cache-timeout=1000", "--hashicorp-key-management-cache-version-timeout=1000"];
    let (d, kv, mut db) = setup(&broker, &[], "db-run", &short);
    db.start_ready();
    create_tables(&db, 10);
    let pid: u32 = std::fs::read_to_string(db.dir.path().join("mysqld.pid")).unwrap().trim().parse().unwrap();
    d.act("key-db-run", "disable");
    d.wait_state("db-run", "revoked");
    assert_eq!(kv_get(&d, &kv, "/v1/db-run/data/2", &d.dek_token_for("db-run")).0, 403);
    // Make the cache expire for sure: the plugin's clock is CPU time, which
    // an idle server hardly spends. Then dirty a page of the encrypted table
    // and have it written.
    let cpu_before = cpu_seconds(pid);
    wait_until("the server to spend more than its cache's second of CPU", MIN, || {
        db.sql("SELECT BENCHMARK(2000000, SHA2('keywarden', 256))");
        (cpu_seconds(pid) - cpu_before > 1.5).then_some(())
    });
    let refused_at = Instant::now();
    let write = db.query(&format!("INSERT INTO shop.secret VALUES (100, '{ENC_MARKER}-late'); SET GLOBAL innodb_max_dirty_pages_pct = 0;"));
    let status = db.wait_exit(MIN);
    let aborted_in = refused_at.elapsed();
    assert_eq!(status.signal(), Some(6), "mariadbd aborts (SIGABRT) when a page write is refused its key: {status}; the write said {write:?}");
    let log = db.full_log();
    assert!(log.contains("Hashicorp server error: 403"), "{}", db.log());
    assert!(log.contains("key_version != ENCRYPTION_KEY_VERSION_INVALID"), "the InnoDB assertion: {}", db.log());

    // Crash recovery needs the key: with it, every row committed before the
    // refusal is there.
    d.act("key-db-run", "enable");
    d.wait_state("db-run", "active");
    let recovered = db.start_ready();
    assert!(count(&db, "secret") >= 10 && count(&db, "plain") == 10, "rows after crash recovery: {} {}", count(&db, "secret"), count(&db, "plain"));
    println!(
        "mariadb: a running server refused its key aborted {} ms after its first page write past the cache; crash recovery with the key back took {} ms",
        aborted_in.as_millis(),
        recovered.as_millis()
    );
    db.shutdown();
}

#[test]
fn a_restore_within_the_window_brings_the_rows_back_and_after_the_purge_nothing_recovers_the_key() {
    if mariadbd().is_none() {
        return;
    }
    let broker = Broker::start();
    let window = [("KEYWARDEN_POLICY_PURGE_AFTER", "25s"), ("KEYWARDEN_POLICY_PURGE_SCHEDULE", "* * * * * *")];
    let (d, kv, mut db) = setup(&broker, &window, "db-del", &[]);
    db.start_ready();
    create_tables(&db, 10);
    let token = d.dek_token_for("db-del");

    // Delete, then restore within the window.
    d.act("key-db-del", "delete");
    d.wait_state("db-del", "erased");
    let (status, _, body) = kv_get(&d, &kv, "/v1/db-del/data/2", &token);
    assert_eq!((status, body), (404, serde_json::json!({"errors": []})), "an erased instance has no keys");
    db.shutdown();
    assert!(matches!(db.start(), Start::Exited(_)), "mariadbd must not start while its key is deleted");
    assert!(db.full_log().contains("Key not found"), "the plugin read the 404 as no key: {}", db.log());
    d.act("key-db-del", "restore");
    d.wait_state("db-del", "active");
    db.start_ready();
    assert_eq!((count(&db, "secret"), count(&db, "plain")), (10, 10), "every row is back after a restore within the window");

    // What would recover the key, taken before it goes: the DEK and the keys
    // derived from it, raw and in hex (and the DEK in base64, as the API says it).
    let (status, v) = d.dek("db-del");
    assert_eq!(status, 200, "{v}");
    let dek_b64 = v["dek"].as_str().unwrap().to_string();
    let dek = base64::engine::general_purpose::STANDARD.decode(&dek_b64).unwrap();
    let mut secrets: Vec<(String, Vec<u8>)> = vec![("dek".into(), dek.clone()), ("dek base64".into(), dek_b64.into_bytes())];
    for n in [1, 2] {
        let hex = kv_key(&d, &kv, "db-del", n);
        let raw: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
        secrets.push((format!("key {n} hex"), hex.clone().into_bytes()));
        secrets.push((format!("key {n} hex upper"), hex.to_uppercase().into_bytes()));
        secrets.push((format!("key {n}"), raw));
    }

    // Delete and let the window pass: the purge destroys the wrapped DEK and
    // the embedded KMS the key's material.
    db.shutdown();
    d.act("key-db-del", "delete");
    d.wait_state("db-del", "erased");
    wait_until("the purge", Duration::from_secs(90), || (d.state("db-del") == "destroyed").then_some(()));
    wait_until("the key material destroyed", MIN, || d.get("/v1/keys/key-db-del").1["kms_material_destroyed_at"].is_string().then_some(()));
    let (status, _, body) = kv_get(&d, &kv, "/v1/db-del/data/2", &token);
    assert_eq!((status, body), (404, serde_json::json!({"errors": []})), "a destroyed instance has no keys");
    let (status, v) = d.post("/v1/keys/key-db-del/restore", None);
    assert_eq!(status, 409, "after the purge the KMS refuses a restore: {v}");
    assert!(matches!(db.start(), Start::Exited(_)), "after the purge the database cannot open its data again: {}", db.log());

    // Neither keywarden's store, its changelog, its log nor the database's
    // files hold anything that recovers the key.
    let mut places: Vec<(String, Vec<u8>)> = files_under(&d.dir.path().join("store")).into_iter().map(|(p, b)| (p.display().to_string(), b)).collect();
    assert!(
        places.iter().any(|(p, b)| p.ends_with("/store/db") && b.len() > 4096),
        "sled's data file was read: {:?}",
        places.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    let mut changelog = TopicReader::new(&broker.bootstrap, "keywarden-state");
    changelog.read_until("the changelog", MIN, |r| !r.is_empty());
    changelog.drain(Duration::from_secs(2));
    let records = changelog.seen.len();
    for (i, m) in changelog.seen.iter().enumerate() {
        let headers: Vec<u8> = m.headers.iter().flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()].concat()).collect();
        places.push((format!("changelog record {i}"), [m.key.clone().unwrap_or_default().into_bytes(), m.payload.clone(), headers].concat()));
    }
    places.extend(db.data_files().into_iter().map(|(p, b)| (p.display().to_string(), b)));
    places.push(("keywarden's log".into(), std::fs::read(d.dir.path().join("keywarden.log")).unwrap()));
    let found: Vec<(&str, &str)> = places
        .iter()
        .flat_map(|(place, bytes)| secrets.iter().filter(|(_, s)| contains(bytes, s)).map(move |(what, _)| (what.as_str(), place.as_str())))
        .collect();
    assert!(found.is_empty(), "the key can be recovered: {found:?}");
    println!(
        "purged: {} files (the log among them) and {} changelog records searched for the DEK and its derived keys, none found",
        places.len() - records,
        records
    );
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a certificate from it for 127.0.0.1 (`server.pem`, `server.key`),
/// and a second CA that issued nothing keywarden uses (`rogue-ca.pem`).
fn make_pki(dir: &std::path::Path) {
    for ca in ["ca", "rogue-ca"] {
        let subject = format!("/CN={ca}");
        let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
        openssl(
            dir,
            &["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", &subject, "-keyout", &key, "-out", &pem],
        );
    }
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(
        dir,
        &["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=keywarden", "-keyout", "server.key", "-out", "server.csr"],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
}

#[test]
fn the_plugin_reads_its_keys_over_tls_and_only_from_a_certificate_its_ca_issued() {
    if mariadbd().is_none() {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let (cert, key) = (pki.path().join("server.pem"), pki.path().join("server.key"));
    let broker = Broker::start();
    let tls = [("KEYWARDEN_DATA_PLANE_TLS_CERT_FILE", cert.to_str().unwrap()), ("KEYWARDEN_DATA_PLANE_TLS_KEY_FILE", key.to_str().unwrap())];
    let bin = mariadbd().unwrap();
    let (d, kv) = daemon(&broker, &tls);
    d.create_key("key-db-tls");
    d.create_instance("db-tls", "key-db-tls");
    let url = format!("--hashicorp-key-management-vault-url=https://{kv}/v1/db-tls");
    let trusted = format!("--hashicorp-key-management-vault-ca={}", pki.path().join("ca.pem").display());
    let mut db = Mariadb::install(bin.clone(), &kv, "db-tls", &d.dek_token_for("db-tls"), &[&url, &trusted]);
    let over_tls = db.start_ready();
    create_tables(&db, 5);
    db.shutdown();
    db.start_ready();
    assert_eq!(count(&db, "secret"), 5, "the rows read back with the keys fetched over TLS");
    db.shutdown();

    // The same database told to trust another CA: the plugin refuses
    // keywarden's certificate and the server cannot start.
    let rogue = format!("--hashicorp-key-management-vault-ca={}", pki.path().join("rogue-ca.pem").display());
    let mut untrusting = Mariadb::install(bin, &kv, "db-tls", &d.dek_token_for("db-tls"), &[&url, &rogue]);
    assert!(matches!(untrusting.start(), Start::Exited(_)), "mariadbd started trusting a CA that did not issue keywarden's certificate");
    assert!(untrusting.full_log().contains("curl returned this error code"), "the TLS handshake failed: {}", untrusting.log());
    println!("mariadb: a start with its keys over TLS took {} ms", over_tls.as_millis());
}

/// Why the shipped config encrypts the redo log, shown with it (and the
/// temporary files and tables, which need key 1 at start too) turned off: a
/// refused server then does start, keeps its unencrypted tables and answers
/// ERROR 1877 for the encrypted one, but that table's rows are readable in
/// ib_logfile0.
#[test]
fn without_an_encrypted_redo_log_a_refused_server_opens_its_plain_tables_and_the_encrypted_rows_leak_into_the_log() {
    if mariadbd().is_none() {
        return;
    }
    let broker = Broker::start();
    let (d, _kv, mut db) = setup(
        &broker,
        &[],
        "db-log",
        &["--innodb-encrypt-log=OFF", "--innodb-encrypt-temporary-tables=OFF", "--encrypt-tmp-files=OFF", "--encrypt-binlog=OFF"],
    );
    db.start_ready();
    create_tables(&db, 5);
    db.shutdown();
    let log = std::fs::read(db.datadir.join("ib_logfile0")).unwrap();
    assert!(contains(&log, ENC_MARKER.as_bytes()), "an unencrypted redo log holds the encrypted table's rows");
    assert!(!contains(&std::fs::read(db.datadir.join("shop/secret.ibd")).unwrap(), ENC_MARKER.as_bytes()));

    d.act("key-db-log", "disable");
    d.wait_state("db-log", "revoked");
    db.start_ready();
    assert_eq!(count(&db, "plain"), 5, "the unencrypted table opens without the key");
    let refused = db.query("SELECT COUNT(*) FROM shop.secret").expect_err("the encrypted table must not open while the key is disabled");
    assert!(refused.contains("ERROR 1877") || refused.contains("ERROR 1105"), "{refused}");
    db.shutdown();
    d.act("key-db-log", "enable");
    d.wait_state("db-log", "active");
    db.start_ready();
    assert_eq!(count(&db, "secret"), 5, "every row is back after enable");
    db.shutdown();
}

/// The shipped hooks, as the agent runs them: argv, no shell.
fn shipped_hook<'a>(action: &'a str, script: &str) -> common::agent::HookSpec<'a> {
    common::agent::HookSpec { action, argv: vec![format!("{}/config/mariadb/hooks/{script}", env!("CARGO_MANIFEST_DIR"))], timeout: "60s" }
}

/// The environment the shipped hooks read for one database.
fn hook_env(db: &Mariadb, defaults: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("MARIADB_SOCKET".into(), db.socket.display().to_string()),
        ("MARIADB_DEFAULTS".into(), defaults.display().to_string()),
        ("MARIADB_USER".into(), "root".into()),
        ("MARIADB_PID_FILE".into(), db.pid_file().display().to_string()),
    ]
}

/// Starts the database the way the agent does: the shipped start hook.
fn start_by_hook(db: &Mariadb, id: &str, env: &[(&str, &str)]) {
    let out = std::process::Command::new(&shipped_hook("restore", "mariadb-start").argv[0])
        .envs(env.iter().copied())
        .env("KEYWARDEN_INSTANCE_ID", id)
        .env("KEYWARDEN_ACTION", "restore")
        .env("KEYWARDEN_COMMAND_ID", "first-start")
        .output()
        .unwrap();
    assert!(out.status.success(), "mariadb-start: {}{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr), db.log());
}

/// How many shutdowns the server's error log records as asked for, and
/// how many as finished.
fn clean_shutdowns(db: &Mariadb) -> (usize, usize) {
    let log = db.full_log();
    (log.matches("Normal shutdown").count(), log.matches("mariadbd: Shutdown complete").count())
}

/// A crash leaves one of these in the error log.
fn crashed(db: &Mariadb) -> bool {
    let log = db.full_log();
    log.contains("Assertion failure") || log.contains("got signal") || log.contains("crash recovery")
}

#[test]
fn the_agent_stops_the_database_on_disable_and_starts_it_with_every_row_on_enable() {
    if mariadbd().is_none() {
        return;
    }
    let broker = Broker::start();
    let (d, kv, db) = setup(&broker, &[("KEYWARDEN_DATA_PLANE_ENFORCE_WITHIN", "30s")], "db-agent", &[]);
    let defaults = db.hook_defaults();
    let env = hook_env(&db, &defaults);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    start_by_hook(&db, "db-agent", &env);
    create_tables(&db, 30);
    let _agent = common::agent::Agent::hosting(
        &broker.bootstrap,
        &d,
        &[("db-agent", env.clone())],
        &[shipped_hook("revoke", "mariadb-stop"), shipped_hook("erase", "mariadb-stop"), shipped_hook("restore", "mariadb-start")],
        "",
    );

    let mut stop_times = Vec::new();
    let mut start_times = Vec::new();
    for cycle in 1..=3 {
        let disabled = Instant::now();
        d.act("key-db-agent", "disable");
        wait_until("the agent to stop the database", MIN, || (!db.answers() && db.running_pid().is_none()).then_some(()));
        stop_times.push(disabled.elapsed());
        let report = common::agent::wait_data_plane(&d, "db-agent", "revoke", "enforced");
        assert_eq!(clean_shutdowns(&db), (cycle, cycle), "one clean shutdown per disable: {report}");
        assert!(!crashed(&db), "the agent stopped the server before a refusal reached it:\n{}", db.log());
        assert_eq!(kv_get(&d, &kv, "/v1/db-agent/data/2", &d.dek_token_for("db-agent")).0, 403);

        let enabled = Instant::now();
        d.act("key-db-agent", "enable");
        wait_until("the agent to start the database", MIN, || db.answers().then_some(()));
        start_times.push(enabled.elapsed());
        common::agent::wait_data_plane(&d, "db-agent", "restore", "enforced");
        assert_eq!((count(&db, "secret"), count(&db, "plain")), (30, 30), "every row is back after enable {cycle}");
    }
    assert!(!crashed(&db), "{}", db.log());
    println!(
        "mariadb with the agent: disable -> database stopped {:?}; enable -> answering again {:?}",
        stop_times.iter().map(|t| t.as_millis()).collect::<Vec<_>>(),
        start_times.iter().map(|t| t.as_millis()).collect::<Vec<_>>()
    );
}

#[test]
fn an_agent_killed_during_a_revocation_still_stops_the_database_exactly_once() {
    if mariadbd().is_none() {
        return;
    }
    let broker = Broker::start();
    let (d, _kv, db) = setup(&broker, &[], "db-kill", &[]);
    let defaults = db.hook_defaults();
    let env = hook_env(&db, &defaults);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    start_by_hook(&db, "db-kill", &env);
    create_tables(&db, 10);
    // The shipped stop hook, behind a line that records each run and
    // whether the agent says it is a re-run of an interrupted one.
    let runs = db.dir.path().join("revoke-runs");
    let stop = shipped_hook("revoke", "mariadb-stop").argv[0].clone();
    let wrapper = format!("echo \"run interrupted=${{KEYWARDEN_INTERRUPTED:-0}}\" >> {runs:?}; exec {stop:?}");
    let revoke = common::agent::HookSpec { action: "revoke", argv: vec!["/bin/sh".into(), "-c".into(), wrapper], timeout: "60s" };
    let mut agent = common::agent::Agent::hosting(&broker.bootstrap, &d, &[("db-kill", env.clone())], &[revoke], "");

    d.act("key-db-kill", "disable");
    // The agent dies once the server has begun its shutdown and the hook is
    // still waiting for it to finish.
    wait_until("the shutdown to begin", MIN, || db.full_log().contains("Normal shutdown").then_some(()));
    agent.kill();
    let interrupted_while_running = db.running_pid().is_some();
    agent.restart();
    common::agent::wait_data_plane(&d, "db-kill", "revoke", "enforced");
    let runs = std::fs::read_to_string(&runs).unwrap();
    assert_eq!(runs.lines().collect::<Vec<_>>(), ["run interrupted=0", "run interrupted=1"], "the hook was cut short by the kill and re-run once");
    assert!(db.running_pid().is_none() && !db.answers(), "the database is stopped");
    assert_eq!(clean_shutdowns(&db), (1, 1), "stopped exactly once, cleanly:\n{}", db.log());
    assert!(!crashed(&db), "{}", db.log());
    println!("mariadb: agent killed mid-shutdown (server still running at the kill: {interrupted_while_running}); one clean shutdown after its restart");
}
