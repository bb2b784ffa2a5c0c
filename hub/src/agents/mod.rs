//! The agent edge: the mutual-TLS endpoint, agent sessions, durable commands, agent identities
//! and the hub's certificate authority.

pub mod commands;
pub mod endpoint;
pub mod identity;
pub mod pki;
pub mod sessions;
