//! act: work that calls the KMS on behalf of committed decisions.

pub mod rotation;
