//! AWS KMS: Encrypt wraps, Decrypt unwraps, ReEncrypt rewraps (the plaintext never
//! leaves AWS), DescribeKey reads the state. Requests are signed with SigV4 by the
//! official `aws-sigv4` crate. The encryption context binds each DEK to its
//! instance id. AWS rotates key material inside the key and names no versions,
//! so a wrapping is labelled with keywarden's version for the key.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use base64::{engine::general_purpose::STANDARD, Engine};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::governor::{Governed, RemoteLimits};
use super::{Dek, Kms, KmsError, KmsKeyState, Provider};
use crate::config::ConfigError;
use crate::engine::{KeyStatus, WrappedDek};

/// The `[kms.aws]` section of the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsKmsConfig {
    pub region: String,
    /// Empty: https://kms.<region>.amazonaws.com.
    pub endpoint: String,
    /// Credentials profile in ~/.aws/credentials, used when AWS_ACCESS_KEY_ID is not set.
    pub profile: String,
    pub limits: RemoteLimits,
}

impl Default for AwsKmsConfig {
    fn default() -> Self {
        Self { region: "us-east-1".into(), endpoint: String::new(), profile: "default".into(), limits: RemoteLimits::default() }
    }
}

/// What `kms.default` and routes call this provider.
pub const NAME: &str = "aws";

/// This provider's line in the table of `kms/mod.rs`.
pub static PROVIDER: Provider = Provider { name: NAME, validate: |k| k.aws.validate(), build: |k| build(&k.aws) };

/// Behind its own governor, so that a throttling or failing AWS never holds up another KMS.
pub fn build(config: &AwsKmsConfig) -> Result<Arc<dyn Kms>, KmsError> {
    Ok(Arc::new(Governed::new(AwsKms::new(config)?, config.limits.governor())))
}

impl AwsKmsConfig {
    /// Only the limits: the region, endpoint and credentials are AWS's to
    /// judge, and a wrong one is reported by the first call with AWS's reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits.validate("kms.aws.limits")
    }
}

/// The encryption-context entry that binds a DEK to its instance.
const CONTEXT_KEY: &str = "keywarden:instance";
/// Label of wrappings made before keywarden saw any rotation of the key.
const FIRST_LABEL: &str = "1";

pub struct AwsKms {
    http: reqwest::Client,
    endpoint: String,
    region: String,
    credentials: Credentials,
}

impl AwsKms {
    pub fn new(config: &AwsKmsConfig) -> Result<AwsKms, KmsError> {
        let endpoint = if config.endpoint.is_empty() {
            format!("https://kms.{}.amazonaws.com/", config.region)
        } else {
            format!("{}/", config.endpoint.trim_end_matches('/'))
        };
        let credentials = load_credentials(&config.profile)?;
        let http = reqwest::Client::builder()
            .timeout(config.limits.timeout.0)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| KmsError::Setup(format!("aws kms http client: {e}")))?;
        Ok(AwsKms { http, endpoint, region: config.region.clone(), credentials })
    }

    async fn call(&self, action: &str, key_id: &str, body: Value) -> Result<Value, KmsError> {
        let body = serde_json::to_vec(&body).expect("json serializes");
        let target = format!("TrentService.{action}");
        let headers = [("content-type", "application/x-amz-json-1.1"), ("x-amz-target", target.as_str())];
        let identity = self.credentials.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("kms")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| KmsError::Setup(format!("aws sigv4 parameters: {e}")))?
            .into();
        let signable = SignableRequest::new("POST", self.endpoint.as_str(), headers.iter().copied(), SignableBody::Bytes(&body))
            .map_err(|e| KmsError::Setup(format!("aws kms endpoint {} is not a valid url: {e}", self.endpoint)))?;
        let (instructions, _) = sign(signable, &params).map_err(|e| KmsError::Setup(format!("aws sigv4 signing: {e}")))?.into_parts();
        let mut req = self.http.post(&self.endpoint).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        for (k, v) in instructions.headers() {
            req = req.header(k, v);
        }
        let resp = req.send().await.map_err(|e| KmsError::Unavailable(format!("aws kms {action} for key {key_id}: {e}")))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|e| KmsError::Unavailable(format!("aws kms {action} answered with bad json: {e}")));
        }
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let kind = body["__type"].as_str().unwrap_or_default();
        let kind = kind.rsplit('#').next().unwrap_or(kind);
        let message = body["message"].as_str().or(body["Message"].as_str()).unwrap_or(&text).to_string();
        Err(map_error(status.as_u16(), kind, &message, action, key_id))
    }
}

fn map_error(status: u16, kind: &str, message: &str, action: &str, key_id: &str) -> KmsError {
    let what = format!("aws kms {action} for key {key_id}: {kind}: {message}");
    match kind {
        "ThrottlingException" | "LimitExceededException" => KmsError::Throttled(what),
        "NotFoundException" => KmsError::UnknownKey(key_id.to_string()),
        "DisabledException" => KmsError::KeyDisabled(key_id.to_string()),
        "KMSInvalidStateException" => KmsError::KeyDeleted(key_id.to_string()),
        "InvalidCiphertextException" | "IncorrectKeyException" => KmsError::Integrity(key_id.to_string()),
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "MissingAuthenticationToken"
        | "IncompleteSignature" => KmsError::Refused(format!("{what}; check the AWS credentials (AWS_ACCESS_KEY_ID or kms.aws.profile) and the key policy")),
        "DependencyTimeoutException" | "KMSInternalException" | "KeyUnavailableException" | "ServiceUnavailable" | "InternalFailure" => {
            KmsError::Unavailable(what)
        }
        _ if status == 429 => KmsError::Throttled(what),
        _ if status >= 500 => KmsError::Unavailable(what),
        _ => KmsError::Refused(what),
    }
}

fn decode_b64(v: &Value, field: &str, action: &str) -> Result<Vec<u8>, KmsError> {
    v[field].as_str().and_then(|s| STANDARD.decode(s).ok()).ok_or_else(|| KmsError::Unavailable(format!("aws kms {action} answered without {field}")))
}

fn context(aad: &[u8]) -> Value {
    json!({ CONTEXT_KEY: String::from_utf8_lossy(aad) })
}

#[async_trait::async_trait]
impl Kms for AwsKms {
    fn provider(&self) -> &'static str {
        NAME
    }

    async fn wrap(&self, key_id: &str, dek: &Dek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        let plaintext = zeroize::Zeroizing::new(STANDARD.encode(dek.expose()));
        let v = self.call("Encrypt", key_id, json!({"KeyId": key_id, "Plaintext": plaintext.as_str(), "EncryptionContext": context(aad)})).await?;
        Ok(WrappedDek { key_version: label.unwrap_or(FIRST_LABEL).to_string(), ciphertext: decode_b64(&v, "CiphertextBlob", "Encrypt")? })
    }

    async fn unwrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8]) -> Result<Dek, KmsError> {
        let v = self
            .call("Decrypt", key_id, json!({"KeyId": key_id, "CiphertextBlob": STANDARD.encode(&wrapped.ciphertext), "EncryptionContext": context(aad)}))
            .await?;
        let plain = zeroize::Zeroizing::new(decode_b64(&v, "Plaintext", "Decrypt")?);
        Dek::from_slice(&plain).ok_or_else(|| KmsError::Integrity(key_id.to_string()))
    }

    async fn rewrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        let v = self
            .call(
                "ReEncrypt",
                key_id,
                json!({
                    "CiphertextBlob": STANDARD.encode(&wrapped.ciphertext),
                    "SourceKeyId": key_id,
                    "SourceEncryptionContext": context(aad),
                    "DestinationKeyId": key_id,
                    "DestinationEncryptionContext": context(aad),
                }),
            )
            .await?;
        Ok(WrappedDek { key_version: label.unwrap_or(&wrapped.key_version).to_string(), ciphertext: decode_b64(&v, "CiphertextBlob", "ReEncrypt")? })
    }

    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
        let v = self.call("DescribeKey", key_id, json!({"KeyId": key_id})).await?;
        let state = v["KeyMetadata"]["KeyState"].as_str().unwrap_or_default();
        let status = match state {
            "Enabled" => KeyStatus::Active,
            "PendingDeletion" | "PendingReplicaDeletion" => KeyStatus::Deleted,
            _ => KeyStatus::Disabled,
        };
        Ok(KmsKeyState::new(status, String::new()))
    }
}

/// The standard environment variables first, then the shared credentials file.
fn load_credentials(profile: &str) -> Result<Credentials, KmsError> {
    if let (Ok(ak), Ok(sk)) = (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY")) {
        return Ok(Credentials::new(ak, sk, std::env::var("AWS_SESSION_TOKEN").ok(), None, "environment"));
    }
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| profile.to_string());
    let path = std::env::var("AWS_SHARED_CREDENTIALS_FILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".aws/credentials"));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        KmsError::Setup(format!("no aws credentials: AWS_ACCESS_KEY_ID is not set and {} cannot be read ({e}); set one of them", path.display()))
    })?;
    let mut in_profile = false;
    let (mut ak, mut sk, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_profile = line.trim_matches(|c| c == '[' || c == ']').trim() == profile;
        } else if in_profile {
            if let Some((k, v)) = line.split_once('=') {
                match k.trim() {
                    "aws_access_key_id" => ak = Some(v.trim().to_string()),
                    "aws_secret_access_key" => sk = Some(v.trim().to_string()),
                    "aws_session_token" => token = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
    }
    match (ak, sk) {
        (Some(ak), Some(sk)) => Ok(Credentials::new(ak, sk, token, None, "profile")),
        _ => Err(KmsError::Setup(format!("profile {profile} in {} has no aws_access_key_id and aws_secret_access_key", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_errors_map_to_what_keywarden_does_next() {
        assert!(matches!(map_error(400, "ThrottlingException", "slow down", "ReEncrypt", "k"), KmsError::Throttled(_)));
        assert!(matches!(map_error(400, "DisabledException", "", "Decrypt", "k"), KmsError::KeyDisabled(_)));
        assert!(matches!(map_error(400, "KMSInvalidStateException", "", "Decrypt", "k"), KmsError::KeyDeleted(_)));
        assert!(matches!(map_error(400, "NotFoundException", "", "Decrypt", "k"), KmsError::UnknownKey(_)));
        assert!(matches!(map_error(500, "KMSInternalException", "", "Decrypt", "k"), KmsError::Unavailable(_)));
        let denied = map_error(400, "AccessDeniedException", "no", "Encrypt", "k").to_string();
        assert!(denied.contains("check the AWS credentials"), "{denied}");
    }
}
