//! keywarden: a key-lifecycle daemon for customer-managed keys.
//!
//! A lifecycle event travels intake → engine → act (KMS) → store → tell; each stage
//! is a module of the same name, so a reader finds a stage by its file name.

pub mod act;
pub mod agent;
pub mod api;
pub mod backoff;
pub mod broker;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod data_plane;
pub mod engine;
pub mod intake;
pub mod kms;
pub mod metrics;
pub mod notify;
pub mod reload;
pub mod schedule;
pub mod store;
pub mod supervise;
pub mod telemetry;
pub mod tell;
pub mod text;
