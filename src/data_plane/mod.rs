//! data_plane: the listeners databases talk to directly, beside the admin
//! API and apart from it. Each serves one protocol a database already speaks
//! (`vault_kv`: HashiCorp Vault's KV v2, for MariaDB's
//! `hashicorp_key_management` plugin), opens DEKs through the same code as
//! the API's DEK endpoint (`api::open_dek`), and reaches nothing else.

pub mod vault_kv;

use std::net::SocketAddr;

use crate::api::AppState;
use crate::config::DataPlaneConfig;

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("cannot listen on {addr} for the vault kv endpoint: {source}; set data_plane.vault_kv_listen to a free address")]
    Listen { addr: String, source: std::io::Error },
    #[error("data_plane.tls: {0}")]
    Tls(#[from] crate::api::tls::TlsError),
}

/// A data-plane listener bound and ready to be served under the supervisor.
pub struct Bound {
    pub addr: SocketAddr,
    pub listener: tokio::net::TcpListener,
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub app: axum::Router,
}

/// Binds the Vault KV listener, when `data_plane.vault_kv_listen` is set.
/// Bound before anything is served, so that a taken port stops the start.
pub async fn bind_vault_kv(config: &DataPlaneConfig, state: AppState) -> Result<Option<Bound>, DataPlaneError> {
    if !config.vault_kv_enabled() {
        return Ok(None);
    }
    let acceptor = if config.tls.enabled() { Some(crate::api::tls::acceptor(&config.tls)?) } else { None };
    let listen = &config.vault_kv_listen;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|source| DataPlaneError::Listen { addr: listen.clone(), source })?;
    let addr = listener.local_addr().map_err(|source| DataPlaneError::Listen { addr: listen.clone(), source })?;
    let needs_client_cert = !config.tls.client_ca_file.as_os_str().is_empty();
    Ok(Some(Bound { addr, listener, acceptor, app: vault_kv::router(state, needs_client_cert) }))
}
