//! Bearer tokens for the API. The admin token manages keys and instances and
//! opens no DEK. A DEK is opened by its instance's own credential or a client
//! certificate mapped to the instance (see `credential`), which the DEK
//! handler checks against the instance's record; this layer only gathers what
//! the request presented. The shared DEK token of old deployments opens every
//! DEK, and only when `api.shared_dek_token` is on. Token files are created
//! 0600 on first run, or come from systemd credentials
//! (`$CREDENTIALS_DIRECTORY/<file name>`); one of fewer than 32 characters is
//! refused at start and at reload. A wrong or missing token gets 401 with no
//! detail; tokens are compared in constant time.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::credential::{IdentityPattern, Presented};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read or create the api token file {path}: {message}; check api.admin_token_file (and api.dek_token_file if api.shared_dek_token is on)")]
    TokenFile { path: String, message: String },
    /// Said without the token: only its length and where it came from.
    #[error(
        "the api token in {path} is {} ({length} characters after trimming whitespace); a token must be at least {MIN_TOKEN_CHARS}: \
         put a random one there (such as `openssl rand -hex 32`), or remove the file to have keywarden create one",
        if *length == 0 { "empty" } else { "too short" }
    )]
    WeakToken { path: String, length: usize },
}

/// The fewest characters a token file or credential may hold: an empty
/// credential would let an empty bearer token in, and a short one can be
/// guessed. The tokens keywarden creates are 64 hex characters.
pub const MIN_TOKEN_CHARS: usize = 32;

/// Who a request was made by, for the log and the audit trail.
/// DEK requests are not among them: they are not audited as API writes but as
/// releases, naming what opened them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Admin,
    /// Another node of the cluster, forwarding a write it authenticated.
    Node,
    /// An instance's data-plane agent, with that instance's own credential.
    Instance,
}

pub struct Tokens {
    /// The admin token's digest and the shared DEK token's (`None` unless
    /// `api.shared_dek_token` is on: then no bearer is the shared token).
    /// Swapped whole when SIGHUP re-reads the token files.
    digests: std::sync::RwLock<([u8; 32], Option<[u8; 32]>)>,
    /// DEK requests must also come with a verified client certificate.
    dek_needs_client_cert: bool,
    /// `api.client_identity`: which instance a client certificate's URI SAN names.
    identity: Option<IdentityPattern>,
    /// With several nodes: a write another node forwarded, signed under the
    /// cluster secret, is taken without a token (the caller's stayed there).
    node: Option<std::sync::Arc<crate::cluster::forward::NodeAuth>>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// Equal-length digests compared without an early exit, so the time taken says
/// nothing about how much of a guess was right.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    /// `shared_dek_file` is `Some` only with `api.shared_dek_token` on: off,
    /// the file is neither read nor created.
    pub fn load(admin_file: &Path, shared_dek_file: Option<&Path>) -> Result<Tokens, AuthError> {
        Ok(Tokens { digests: std::sync::RwLock::new(Self::read(admin_file, shared_dek_file)?), dek_needs_client_cert: false, identity: None, node: None })
    }

    fn read(admin_file: &Path, shared_dek_file: Option<&Path>) -> Result<([u8; 32], Option<[u8; 32]>), AuthError> {
        let shared = shared_dek_file.map(|f| read_or_create(f).map(|t| digest(&t))).transpose()?;
        Ok((digest(&read_or_create(admin_file)?), shared))
    }

    /// Re-reads the token files (or credentials); the old tokens stop working.
    pub fn reload(&self, admin_file: &Path, shared_dek_file: Option<&Path>) -> Result<(), AuthError> {
        let fresh = Self::read(admin_file, shared_dek_file)?;
        *self.digests.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    pub fn with_client_certs_for_dek(mut self, needed: bool) -> Tokens {
        self.dek_needs_client_cert = needed;
        self
    }

    pub fn with_client_identity(mut self, identity: Option<IdentityPattern>) -> Tokens {
        self.identity = identity;
        self
    }

    pub fn with_node_auth(mut self, node: Option<std::sync::Arc<crate::cluster::forward::NodeAuth>>) -> Tokens {
        self.node = node;
        self
    }

    fn admin(&self, presented: &str) -> bool {
        let (admin, _) = *self.digests.read().unwrap_or_else(|e| e.into_inner());
        same(&digest(presented), &admin)
    }

    /// What a DEK (or data-plane report) request presented, for its handler
    /// to match against the instance it names; `None` is a 401: a node's
    /// signature opens no DEK, and with `api.tls.client_ca_file` set a
    /// verified client certificate must come with the request.
    pub fn dek_presented(&self, headers: &axum::http::HeaderMap, extensions: &axum::http::Extensions) -> Option<Presented> {
        if crate::cluster::forward::NodeAuth::presented(headers) {
            return None;
        }
        let cert = extensions.get::<super::tls::ClientCert>();
        if self.dek_needs_client_cert && cert.is_none() {
            return None;
        }
        let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        Some(self.presented(bearer, cert))
    }

    /// The shared-token comparison always runs when the shared token is on,
    /// so its time says nothing either.
    fn presented(&self, bearer: Option<&str>, cert: Option<&super::tls::ClientCert>) -> Presented {
        let bearer = bearer.map(digest);
        let (_, shared) = *self.digests.read().unwrap_or_else(|e| e.into_inner());
        let shared = matches!((bearer, shared), (Some(b), Some(s)) if same(&b, &s));
        let identities = match (&self.identity, cert) {
            (Some(pattern), Some(cert)) => cert.uris.iter().filter_map(|uri| pattern.instance_of(uri).map(|id| (id.to_string(), uri.clone()))).collect(),
            _ => Vec::new(),
        };
        Presented { bearer, shared, identities }
    }
}

/// A systemd credential of the same file name wins; otherwise the file, which is
/// created with a random token on first run. A credential or file that exists
/// but holds fewer than [`MIN_TOKEN_CHARS`] is refused, naming where it is.
pub fn read_or_create(path: &Path) -> Result<Zeroizing<String>, AuthError> {
    read_or_create_with(path, std::env::var_os("CREDENTIALS_DIRECTORY").as_deref().map(Path::new))
}

/// [`read_or_create`] with the credentials directory given, not read from the
/// environment (which tests running in parallel must not change).
fn read_or_create_with(path: &Path, credentials: Option<&Path>) -> Result<Zeroizing<String>, AuthError> {
    let err = |message: String| AuthError::TokenFile { path: path.display().to_string(), message };
    if let (Some(dir), Some(name)) = (credentials, path.file_name()) {
        let cred = dir.join(name);
        if cred.exists() {
            return read_token(&cred);
        }
    }
    if path.exists() {
        return read_token(path);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = Zeroizing::new(crate::text::hex(raw.as_slice()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| err(e.to_string()))?;
    f.write_all(format!("{}\n", token.as_str()).as_bytes()).map_err(|e| err(e.to_string()))?;
    tracing::info!(path = %path.display(), "created an api token file (mode 0600)");
    Ok(token)
}

/// The file's text, trimmed, if it is long enough to be a token.
fn read_token(path: &Path) -> Result<Zeroizing<String>, AuthError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| AuthError::TokenFile { path: path.display().to_string(), message: e.to_string() })?);
    let token = Zeroizing::new(text.trim().to_string());
    let length = token.chars().count();
    if length < MIN_TOKEN_CHARS {
        return Err(AuthError::WeakToken { path: path.display().to_string(), length });
    }
    Ok(token)
}

/// The one refusal: the DEK handler answers a wrong credential and an unknown
/// instance with it too.
pub(super) fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], Json(serde_json::json!({"error": "unauthorized"}))).into_response()
}

/// Health, readiness and metrics are open; the DEK endpoint is checked by its
/// handler against the instance (with a client certificate first, when
/// `api.tls.client_ca_file` asks for one); everything else takes the admin token.
pub async fn require(State(tokens): State<std::sync::Arc<Tokens>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return next.run(req).await;
    }
    // A data-plane report is opened like a DEK (whose route is outside this
    // layer, see `super::dek`): by the instance's own credential, which its
    // handler checks against the instance it names.
    if path.starts_with("/v1/instances/") && path.ends_with("/data-plane") {
        return match tokens.dek_presented(req.headers(), req.extensions()) {
            Some(presented) => {
                req.extensions_mut().insert(presented);
                next.run(req).await
            }
            None => unauthorized(),
        };
    }
    if crate::cluster::forward::NodeAuth::presented(req.headers()) {
        return match &tokens.node {
            Some(node) if matches!(*req.method(), axum::http::Method::POST | axum::http::Method::DELETE) => forwarded(node, req, next).await,
            _ => unauthorized(),
        };
    }
    let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if !bearer.is_some_and(|t| tokens.admin(t)) {
        return unauthorized();
    }
    // Carried on the response, for the audit trail wrapped around this layer.
    let mut response = next.run(req).await;
    response.extensions_mut().insert(Caller::Admin);
    response
}

/// A write another node forwarded: taken only if its node signature verifies.
async fn forwarded(node: &crate::cluster::forward::NodeAuth, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else { return unauthorized() };
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    if let Err(why) = node.verify(parts.method.as_str(), &path, &parts.headers, &bytes) {
        tracing::warn!(%path, reason = why, "refused a forwarded request");
        return unauthorized();
    }
    let mut response = next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await;
    response.extensions_mut().insert(Caller::Node);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(t: &Tokens, bearer: &str) -> bool {
        t.presented(Some(bearer), None).shared
    }

    #[test]
    fn a_dek_request_with_a_node_signature_or_without_a_required_certificate_presents_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "admin-token-0123456789abcdefghijklmn\n").unwrap();
        let bearer = |headers: &mut axum::http::HeaderMap| {
            headers.insert(header::AUTHORIZATION, "Bearer some-instance-token".parse().unwrap());
        };
        let mut headers = axum::http::HeaderMap::new();
        bearer(&mut headers);
        let with_cert = {
            let mut e = axum::http::Extensions::new();
            e.insert(super::super::tls::ClientCert { uris: std::sync::Arc::from(Vec::new()) });
            e
        };
        let plain = Tokens::load(&dir.path().join("a"), None).unwrap();
        let presented = plain.dek_presented(&headers, &axum::http::Extensions::new()).expect("a bearer alone is presented");
        assert_eq!(presented.bearer, Some(digest("some-instance-token")));
        let mut signed = headers.clone();
        signed.insert("x-keywarden-node-mac", "anything".parse().unwrap());
        assert!(plain.dek_presented(&signed, &with_cert).is_none(), "a node's signature opens no DEK");
        let certs = Tokens::load(&dir.path().join("a"), None).unwrap().with_client_certs_for_dek(true);
        assert!(certs.dek_presented(&headers, &axum::http::Extensions::new()).is_none(), "the certificate is required");
        assert!(certs.dek_presented(&headers, &with_cert).is_some());
    }

    #[test]
    fn each_token_opens_only_its_own_door() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "admin-token-0123456789abcdefghijklmn\n").unwrap();
        std::fs::write(dir.path().join("d"), "dek-token-0123456789abcdefghijklmnop\n").unwrap();
        let t = Tokens::load(&dir.path().join("a"), Some(&dir.path().join("d"))).unwrap();
        assert!(t.admin("admin-token-0123456789abcdefghijklmn"));
        assert!(!t.admin("dek-token-0123456789abcdefghijklmnop"));
        assert!(!t.admin("admin-token-0123456789abcdefghijklm"));
        assert!(!t.admin(""));
        assert!(shared(&t, "dek-token-0123456789abcdefghijklmnop"));
        assert!(!shared(&t, "admin-token-0123456789abcdefghijklmn"), "the admin token opens no DEK");
        assert!(!t.presented(None, None).shared);
    }

    #[test]
    fn without_the_shared_token_no_bearer_is_it_and_its_file_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "admin-token-0123456789abcdefghijklmn\n").unwrap();
        let t = Tokens::load(&dir.path().join("a"), None).unwrap();
        for bearer in ["", "dek-token-0123456789abcdefghijklmnop", "admin-token-0123456789abcdefghijklmn"] {
            assert!(!shared(&t, bearer), "{bearer:?}");
        }
        assert!(!dir.path().join("d").exists());
        t.reload(&dir.path().join("a"), None).unwrap();
        assert!(!shared(&t, ""));
    }

    #[test]
    fn a_client_certificate_names_instances_only_through_the_configured_pattern() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "admin-token-0123456789abcdefghijklmn\n").unwrap();
        let cert = super::super::tls::ClientCert { uris: vec!["spiffe://keywarden/instance/db-a".into(), "https://elsewhere/x".into()].into() };
        let off = Tokens::load(&dir.path().join("a"), None).unwrap();
        assert!(off.presented(None, Some(&cert)).identities.is_empty(), "api.client_identity empty: no mapping");
        let on = off.with_client_identity(IdentityPattern::parse("spiffe://keywarden/instance/{instance}"));
        assert_eq!(on.presented(None, Some(&cert)).identities, vec![("db-a".to_string(), "spiffe://keywarden/instance/db-a".to_string())]);
        assert!(on.presented(None, None).identities.is_empty());
    }

    #[test]
    fn an_empty_or_short_token_file_refuses_to_start_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, d) = (dir.path().join("admin.token"), dir.path().join("dek.token"));
        std::fs::write(&d, "dek-token-0123456789abcdefghijklmnop\n").unwrap();
        for (text, length, says) in [("", 0, "is empty"), ("  \n\t\n", 0, "is empty"), ("short-token-0123456789\n", 22, "too short")] {
            std::fs::write(&a, text).unwrap();
            let err = Tokens::load(&a, Some(&d)).err().expect("a weak admin token is refused");
            assert!(matches!(&err, AuthError::WeakToken { length: l, .. } if *l == length), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&a.display().to_string()) && msg.contains(says) && msg.contains("at least 32"), "{msg}");
            assert!(!msg.contains("short-token"), "the token itself is never said: {msg}");
            // The file is left as it was, not replaced with a token of keywarden's.
            assert_eq!(std::fs::read_to_string(&a).unwrap(), text);
        }
        // 31 characters are one too few; 32, with whitespace around, are enough.
        std::fs::write(&a, format!("{}\n", "x".repeat(31))).unwrap();
        assert!(matches!(Tokens::load(&a, Some(&d)), Err(AuthError::WeakToken { length: 31, .. })));
        std::fs::write(&a, format!("  {}\n", "x".repeat(32))).unwrap();
        let t = Tokens::load(&a, Some(&d)).unwrap();
        assert!(t.admin(&"x".repeat(32)));
        // A reload that finds a weak token fails, and the tokens in force stay.
        std::fs::write(&d, "\n").unwrap();
        assert!(matches!(t.reload(&a, Some(&d)), Err(AuthError::WeakToken { length: 0, .. })));
        assert!(shared(&t, "dek-token-0123456789abcdefghijklmnop"));
    }

    #[test]
    fn an_empty_systemd_credential_is_refused_not_taken_as_the_empty_token() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        std::fs::create_dir(&creds).unwrap();
        let file = dir.path().join("state/admin.token");
        std::fs::write(creds.join("admin.token"), "").unwrap();
        let err = read_or_create_with(&file, Some(&creds)).expect_err("an empty credential is refused");
        let msg = err.to_string();
        assert!(matches!(err, AuthError::WeakToken { length: 0, .. }), "{msg}");
        assert!(msg.contains(&creds.join("admin.token").display().to_string()) && msg.contains("is empty"), "{msg}");
        assert!(!file.exists(), "no token file is created beside a credential");
        std::fs::write(creds.join("admin.token"), "credential-token-0123456789abcdef\n").unwrap();
        assert_eq!(read_or_create_with(&file, Some(&creds)).unwrap().as_str(), "credential-token-0123456789abcdef");
    }

    #[test]
    fn a_missing_token_file_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/admin.token");
        let t = read_or_create(&p).unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_or_create(&p).unwrap().as_str(), t.as_str());
    }
}
