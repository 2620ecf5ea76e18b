//! Chooses the provider for a key: the first configured route whose prefix the
//! key id starts with, else the default provider. The engine never sees this.

use std::sync::Arc;

use super::governor::GovernorState;
use super::{Dek, Kms, KmsError, KmsKeyState};
use crate::engine::{Notice, WrappedDek};

pub struct Route {
    pub prefix: String,
    /// Hand the provider the key id without the prefix (a Vault key name).
    pub strip: bool,
    pub kms: Arc<dyn Kms>,
}

pub struct KmsRouter {
    routes: Vec<Route>,
    default: Arc<dyn Kms>,
}

impl KmsRouter {
    pub fn new(routes: Vec<Route>, default: Arc<dyn Kms>) -> KmsRouter {
        KmsRouter { routes, default }
    }

    /// The provider for a key, and the id that provider knows it by.
    pub fn for_key<'a>(&'a self, key_id: &'a str) -> (&'a Arc<dyn Kms>, &'a str) {
        match self.routes.iter().find(|r| key_id.starts_with(r.prefix.as_str())) {
            Some(r) if r.strip => (&r.kms, &key_id[r.prefix.len()..]),
            Some(r) => (&r.kms, key_id),
            None => (&self.default, key_id),
        }
    }

    /// Each remote provider's limits and breaker, once per provider.
    pub fn providers_health(&self) -> Vec<(&'static str, GovernorState)> {
        let mut seen: Vec<(&'static str, GovernorState)> = Vec::new();
        for k in self.routes.iter().map(|r| &r.kms).chain(std::iter::once(&self.default)) {
            if let Some(state) = k.health() {
                if !seen.iter().any(|(p, _)| *p == k.provider()) {
                    seen.push((k.provider(), state));
                }
            }
        }
        seen
    }

    /// The id the embedded KMS knows the key by, when the embedded KMS serves
    /// it (as the default or through a route); None for a remote KMS's key. The
    /// purge destroys only what keywarden itself holds: a remote KMS destroys
    /// its own material on its own schedule.
    pub fn embedded_id<'a>(&'a self, key_id: &'a str) -> Option<&'a str> {
        let (k, id) = self.for_key(key_id);
        (k.provider() == super::local::NAME).then_some(id)
    }

    /// Which provider serves the key, and its limits and breaker, for `GET /v1/keys`.
    pub fn describe(&self, key_id: &str) -> (&'static str, Option<GovernorState>) {
        let (k, _) = self.for_key(key_id);
        (k.provider(), k.health())
    }
}

#[async_trait::async_trait]
impl Kms for KmsRouter {
    fn provider(&self) -> &'static str {
        "router"
    }
    fn provider_for(&self, key_id: &str) -> &'static str {
        self.for_key(key_id).0.provider_for(key_id)
    }
    async fn wrap(&self, key_id: &str, dek: &Dek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        let (k, id) = self.for_key(key_id);
        k.wrap(id, dek, aad, label).await
    }
    async fn unwrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8]) -> Result<Dek, KmsError> {
        let (k, id) = self.for_key(key_id);
        k.unwrap(id, wrapped, aad).await
    }
    async fn rewrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        let (k, id) = self.for_key(key_id);
        k.rewrap(id, wrapped, aad, label).await
    }
    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
        let (k, id) = self.for_key(key_id);
        k.key_state(id).await
    }
    async fn notify(&self, key_id: &str, notice: &Notice) -> Result<(), KmsError> {
        let (k, id) = self.for_key(key_id);
        k.notify(id, notice).await
    }
    async fn sync(&self, key_id: &str) -> Result<(), KmsError> {
        let (k, id) = self.for_key(key_id);
        k.sync(id).await
    }
    fn wants_notices(&self, key_id: &str) -> bool {
        let (k, id) = self.for_key(key_id);
        k.wants_notices(id)
    }
    fn notice_deadline(&self, key_id: &str) -> Option<super::NoticeDeadline> {
        let (k, id) = self.for_key(key_id);
        k.notice_deadline(id)
    }
}
