//! Chooses the provider for a key: the first configured route whose prefix the
//! key id starts with, else the default provider. The engine never sees this.

use std::sync::Arc;

use super::governor::GovernorState;
use super::{Dek, Kms, KmsError, KmsKeyState};
use crate::engine::WrappedDek;

pub struct KmsRouter {
    routes: Vec<(String, Arc<dyn Kms>)>,
    default: Arc<dyn Kms>,
}

impl KmsRouter {
    pub fn new(routes: Vec<(String, Arc<dyn Kms>)>, default: Arc<dyn Kms>) -> KmsRouter {
        KmsRouter { routes, default }
    }

    pub fn for_key(&self, key_id: &str) -> &Arc<dyn Kms> {
        self.routes.iter().find(|(prefix, _)| key_id.starts_with(prefix.as_str())).map(|(_, k)| k).unwrap_or(&self.default)
    }

    /// Which provider serves the key, and its limits and breaker, for `GET /v1/keys`.
    pub fn describe(&self, key_id: &str) -> (&'static str, Option<GovernorState>) {
        let k = self.for_key(key_id);
        (k.provider(), k.health())
    }
}

#[async_trait::async_trait]
impl Kms for KmsRouter {
    fn provider(&self) -> &'static str {
        "router"
    }
    async fn wrap(&self, key_id: &str, dek: &Dek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        self.for_key(key_id).wrap(key_id, dek, aad, label).await
    }
    async fn unwrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8]) -> Result<Dek, KmsError> {
        self.for_key(key_id).unwrap(key_id, wrapped, aad).await
    }
    async fn rewrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        self.for_key(key_id).rewrap(key_id, wrapped, aad, label).await
    }
    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
        self.for_key(key_id).key_state(key_id).await
    }
}
