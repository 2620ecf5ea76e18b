//! TLS for the API listener (rustls, certificate and key from PEM files), and
//! optional client certificates: with `api.tls.client_ca_file` set, a DEK
//! request must also come over a connection whose client certificate chains
//! to that CA, and with `api.client_identity` set the certificate's URI SANs
//! may name the instance it opens. Other endpoints do not ask for one, so
//! operators' tools need only the admin token.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {problem}; give a PEM file")]
    Read { what: &'static str, path: String, problem: String },
    #[error("tls setup failed: {0}; check that the key_file of api.tls (or data_plane.tls) holds the key of its cert_file")]
    Setup(String),
}

/// On a request whose connection presented a client certificate that chains
/// to the configured CA (rustls has verified it by then); absent otherwise.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The leaf's URI SANs, read once per connection: `api.client_identity`
    /// maps one of them to the instance whose DEK it may open.
    pub uris: std::sync::Arc<[String]>,
}

impl ClientCert {
    /// `None` without a verified leaf. A leaf rustls verified but webpki cannot
    /// read again (it never happens: both parse the same way) has no URIs, so
    /// it maps to no instance but still counts as a verified certificate.
    fn of(chain: Option<&[CertificateDer<'_>]>) -> Option<ClientCert> {
        let leaf = chain?.first()?;
        let uris = webpki::EndEntityCert::try_from(leaf).map(|c| c.valid_uri_names().map(str::to_owned).collect::<Vec<_>>()).unwrap_or_default();
        Some(ClientCert { uris: uris.into() })
    }
}

pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("certificate", &config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| read_error("private key", &config.key_file, e))?;
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = if config.client_ca_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_certs("client CA", &config.client_ca_file)? {
            roots.add(ca).map_err(|e| TlsError::Setup(e.to_string()))?;
        }
        // Optional at the handshake: only the DEK endpoint insists on it.
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| TlsError::Setup(e.to_string()))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn read_error(what: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read { what, path: path.display().to_string(), problem: e.to_string() }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs =
        CertificateDer::pem_file_iter(path).map_err(|e| read_error(what, path, e))?.collect::<Result<Vec<_>, _>>().map_err(|e| read_error(what, path, e))?;
    if certs.is_empty() {
        return Err(read_error(what, path, "no certificate in it"));
    }
    Ok(certs)
}

/// Serves `app` over TLS until `stop`, then lets open requests finish.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, app: Router, stop: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "api accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // A slow or silent client must not hold a task forever.
            let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let cert = ClientCert::of(tls.get_ref().1.peer_certificates());
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut req = req.map(axum::body::Body::new);
                if let Some(cert) = &cert {
                    req.extensions_mut().insert(cert.clone());
                }
                app.clone().oneshot(req)
            });
            let conn = Builder::new(TokioExecutor::new()).serve_connection_with_upgrades(TokioIo::new(tls), service).into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "api connection ended with an error");
            }
        });
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
}
