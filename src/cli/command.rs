//! `keywarden command verify`: checks one data-plane command the way a
//! consumer of the commands topic should before acting on it, with the code
//! the daemon checks events with. Commands are signed like events
//! (`keywarden-signature`, under `signatures.hmac_key_file`), so that whoever
//! can write the topic cannot have a database restored or erased.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::Output;
use crate::config::{Config, SignatureAlgorithm};
use crate::intake::format::Incoming;
use crate::intake::signature::{SignatureError, Verifier, HEADER};
use crate::tell::Command as DataCommand;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The command exactly as read from the topic (the message's value, byte
    /// for byte): a file, or - for stdin.
    #[arg(default_value = "-")]
    pub file: String,
    /// The message's keywarden-signature header, kid=<key id>;sig=<base64>
    /// (a leading "keywarden-signature:" is accepted).
    #[arg(long)]
    pub signature: String,
    /// Check with this key file instead of signatures.hmac_key_file: an HMAC
    /// secret, or an Ed25519 public key.
    #[arg(long, requires = "key_id")]
    pub key_file: Option<PathBuf>,
    /// The key id the header must name (with --key-file).
    #[arg(long)]
    pub key_id: Option<String>,
    /// How the key given with --key-file checks; the header never chooses.
    #[arg(long, value_enum, default_value_t = SignatureAlgorithm::HmacSha256)]
    pub algorithm: SignatureAlgorithm,
}

/// Prints `valid: ...` and exits 0, or `invalid: <reason>` and exits 1.
pub fn verify(config: &Config, args: &VerifyArgs, output: Output) -> anyhow::Result<ExitCode> {
    let mut payload = Vec::new();
    if args.file == "-" {
        std::io::stdin().read_to_end(&mut payload)?;
    } else {
        payload = std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file))?;
    }
    let s = &config.signatures;
    let (id, verifier) = match (&args.key_file, &args.key_id) {
        (Some(file), Some(id)) => (id.clone(), Verifier::single(id, args.algorithm, file)?),
        _ if s.hmac_key_file.as_os_str().is_empty() => bail!("signatures.hmac_key_file is empty; pass --key-file and --key-id"),
        // Read, never created: a new random key would call every command forged.
        _ => (s.hmac_key_id.clone(), Verifier::single(&s.hmac_key_id, SignatureAlgorithm::HmacSha256, &s.hmac_key_file)?),
    };
    let header = args.signature.trim();
    let header = match header.split_once(':') {
        Some((name, rest)) if name.trim().eq_ignore_ascii_case(HEADER) => rest.trim(),
        _ => header,
    };
    let verdict = check(&verifier, &id, &config.kafka.commands_topic, &payload, header);
    match (&verdict, output) {
        (Ok(c), Output::Json) => println!("{}", json!({"valid": true, "key_id": id, "command": c})),
        (Err(reason), Output::Json) => println!("{}", json!({"valid": false, "reason": reason})),
        (Ok(c), Output::Text) => {
            let action = serde_json::to_value(c.action).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            println!("valid: command {} ({action} instance {}, key {}), signed by key {id}", c.command_id, c.instance_id, c.key_id);
        }
        (Err(reason), Output::Text) => println!("invalid: {reason}"),
    }
    Ok(if verdict.is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The command, if the header signs exactly these bytes under the key and
/// they are a command; else why not.
pub(crate) fn check(verifier: &Verifier, id: &str, topic: &str, payload: &[u8], header: &str) -> Result<DataCommand, String> {
    let msg = Incoming { key: None, payload, headers: vec![(HEADER, header.as_bytes())] };
    verifier.check(topic, &msg, "command", true).map_err(|e| match e {
        SignatureError::UnknownKey { kid, .. } => format!("signed by key {kid:?}, not by {id:?}; pass --key-id and --key-file of that key"),
        e @ SignatureError::Forged { .. } if payload.ends_with(b"\n") => {
            format!("{e} (the payload ends with a newline: pass the message's value exactly as read from the topic)")
        }
        e => e.to_string(),
    })?;
    // A signed event put on the commands topic is signed too, by the same key.
    serde_json::from_slice(payload).map_err(|e| format!("the signature holds, but the payload is not a command ({e}): do not act on it"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::CommandAction;
    use crate::intake::signature::Signer;

    const SECRET: &str = "a-command-signing-secret-of-enough-length-0123";

    #[test]
    fn a_signed_command_verifies_and_an_altered_or_foreign_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hmac.key"), format!("{SECRET}\n")).unwrap();
        let verifier = Verifier::single("local", SignatureAlgorithm::HmacSha256, &dir.path().join("hmac.key")).unwrap();
        let command = DataCommand::new("db-1", "k", CommandAction::Restore, None, "e1", chrono::Utc::now(), None);
        let payload = serde_json::to_vec(&command).unwrap();
        let header = Signer::hmac("local", SECRET.as_bytes()).sign(&payload);
        assert_eq!(check(&verifier, "local", "instance-commands", &payload, &header), Ok(command.clone()));

        let forged = String::from_utf8(payload.clone()).unwrap().replace("restore", "erase");
        let err = check(&verifier, "local", "instance-commands", forged.as_bytes(), &header).unwrap_err();
        assert!(err.contains("forged or altered"), "{err}");
        let err = check(&verifier, "local", "instance-commands", &[payload.as_slice(), b"\n"].concat(), &header).unwrap_err();
        assert!(err.contains("ends with a newline"), "{err}");
        let other = Signer::hmac("local", b"somebody-else-s-secret-of-enough-length-0123").sign(&payload);
        assert!(check(&verifier, "local", "instance-commands", &payload, &other).unwrap_err().contains("forged"));
        let err = check(&verifier, "local", "instance-commands", &payload, &Signer::hmac("partner", SECRET.as_bytes()).sign(&payload)).unwrap_err();
        assert!(err.contains("not by \"local\""), "{err}");
        assert!(check(&verifier, "local", "instance-commands", &payload, "sig=AAAA").unwrap_err().contains("malformed"));
        // Signed, but an event, not a command.
        let event = br#"{"event_id":"e","type":"delete","key_id":"k"}"#;
        let err = check(&verifier, "local", "instance-commands", event, &Signer::hmac("local", SECRET.as_bytes()).sign(event)).unwrap_err();
        assert!(err.contains("not a command"), "{err}");
    }
}
