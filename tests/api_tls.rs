//! TLS on the API listener and client certificates for the DEK endpoint, with
//! certificates made by openssl and the real binary on a real broker.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1, and a client certificate from
/// that CA; one from that CA whose URI SAN names instance tls-db; plus a
/// client certificate from a CA keywarden does not trust.
fn make_pki(dir: &Path) {
    for ca in ["ca", "rogue-ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ],
        );
    }
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    std::fs::write(dir.join("spiffe.ext"), "subjectAltName=URI:spiffe://keywarden/instance/tls-db\nextendedKeyUsage=clientAuth\n").unwrap();
    for (name, ca, ext) in [("server", "ca", "server.ext"), ("client", "ca", "client.ext"), ("spiffe", "ca", "spiffe.ext"), ("rogue", "rogue-ca", "client.ext")]
    {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext,
                "-out",
                &format!("{name}.pem"),
            ],
        );
        // reqwest and the CLI take the certificate and its key in one PEM file.
        let both = [std::fs::read(dir.join(format!("{name}.pem"))).unwrap(), std::fs::read(dir.join(format!("{name}.key"))).unwrap()].concat();
        std::fs::write(dir.join(format!("{name}-identity.pem")), both).unwrap();
    }
}

fn client_with(dir: &Path, identity: Option<&str>) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap());
    if let Some(name) = identity {
        b = b.identity(reqwest::Identity::from_pem(&std::fs::read(dir.join(format!("{name}-identity.pem"))).unwrap()).unwrap());
    }
    b.build().unwrap()
}

#[test]
fn the_api_speaks_tls_and_the_dek_endpoint_wants_a_client_certificate_from_the_configured_ca() {
    let pki = tempfile::tempdir().unwrap();
    let dir = pki.path();
    make_pki(dir);
    let path = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let broker = Broker::start();
    let d = Daemon::start(
        &broker.bootstrap,
        &[
            ("KEYWARDEN_API_TLS_CERT_FILE", &path("server.pem")),
            ("KEYWARDEN_API_TLS_KEY_FILE", &path("server.key")),
            ("KEYWARDEN_API_TLS_CLIENT_CA_FILE", &path("ca.pem")),
            ("KEYWARDEN_API_CLIENT_IDENTITY", "spiffe://keywarden/instance/{instance}"),
            ("KEYWARDEN_API_CA_CERT", &path("ca.pem")),
        ],
    );
    assert!(d.api.starts_with("https://"));
    // Admin calls need only the token, over TLS.
    d.create_key("tls-key");
    d.create_instance("tls-db", "tls-key");
    d.create_instance("tls-other", "tls-key");
    // Plain HTTP gets no answer it could use.
    let plain = reqwest::blocking::get(d.api.replace("https://", "http://") + "/readyz");
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true), "plain http must not be served");

    let (db_token, other_token) = (d.dek_token_for("tls-db"), d.dek_token_for("tls-other"));
    let dek = |client: &reqwest::blocking::Client, id: &str, token: Option<&str>| {
        let mut req = client.post(format!("{}/v1/instances/{id}/dek", d.api));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().map(|r| r.status().as_u16())
    };
    assert_eq!(dek(&client_with(dir, None), "tls-db", Some(&db_token)).unwrap(), 401, "the instance's token alone is not enough");
    assert_eq!(dek(&client_with(dir, Some("client")), "tls-db", Some(&db_token)).unwrap(), 200);
    assert_eq!(dek(&client_with(dir, Some("client")), "tls-db", Some(&other_token)).unwrap(), 401, "another instance's token, with a certificate");
    // A certificate from another CA fails the handshake (or at least gets nothing).
    assert!(dek(&client_with(dir, Some("rogue")), "tls-db", Some(&db_token)).map(|s| s != 200).unwrap_or(true));
    // A client certificate that names no instance does not stand in for the token.
    assert_eq!(dek(&client_with(dir, Some("client")), "tls-db", None).unwrap(), 401);
    // One whose URI SAN api.client_identity maps to tls-db opens tls-db, and only it.
    let spiffe = client_with(dir, Some("spiffe"));
    assert_eq!(dek(&spiffe, "tls-db", None).unwrap(), 200, "the mapped identity opens its instance without a token");
    assert_eq!(dek(&spiffe, "tls-other", None).unwrap(), 401, "the identity names tls-db, not tls-other");
    assert_eq!(dek(&spiffe, "no-such-db", None).unwrap(), 401);
    assert_eq!(dek(&spiffe, "tls-other", Some(&other_token)).unwrap(), 200, "tls-other's own token still opens it");
    // The release is audited under the certificate's identity.
    let release = wait_until("the certificate's DEK release audited", std::time::Duration::from_secs(10), || {
        let (_, audit) = d.get("/v1/audit?limit=1000");
        releases(audit["entries"].as_array()?).into_iter().find(|r| r["opened_by"] == "client certificate spiffe://keywarden/instance/tls-db")
    });
    assert_eq!(release["instance_id"], "tls-db", "{release}");
    assert_eq!(release["who"], "dek", "{release}");

    // The CLI, as an operator or a data-plane node would use it.
    let cli = |args: &[&str], token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keywarden"));
        cmd.args(["--api", &d.api, "--ca-cert", &path("ca.pem")]);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        // Not the daemon's config: the CLI must not find a token on its own.
        cmd.env("KEYWARDEN_API_ADMIN_TOKEN_FILE", dir.join("none")).args(args).output().unwrap()
    };
    let shown = cli(&["instance", "show", "tls-db"], Some(&d.admin_token));
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let fetched = cli(&["--client-cert", &path("client-identity.pem"), "instance", "dek", "tls-db"], Some(&db_token));
    assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
    let refused = cli(&["instance", "dek", "tls-db"], Some(&db_token));
    assert!(!refused.status.success());
    let by_identity = cli(&["--client-cert", &path("spiffe-identity.pem"), "instance", "dek", "tls-db"], None);
    assert!(by_identity.status.success(), "{}", String::from_utf8_lossy(&by_identity.stderr));
    let not_mapped = cli(&["--client-cert", &path("spiffe-identity.pem"), "instance", "dek", "tls-other"], None);
    assert!(!not_mapped.status.success());
    assert!(String::from_utf8_lossy(&not_mapped.stderr).contains("(401)"), "{}", String::from_utf8_lossy(&not_mapped.stderr));
}

#[test]
fn a_half_configured_tls_section_is_refused_with_the_field_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_keywarden")).arg("check-config").env("KEYWARDEN_API_TLS_CERT_FILE", "/etc/keywarden/api.pem").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("api.tls.key_file"), "{}", String::from_utf8_lossy(&out.stderr));
}
