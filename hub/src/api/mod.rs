//! The API edge: the GraphQL schema's reader and admin implementations over the store and the
//! orchestration, and the HTTP server (GraphQL, health, metrics).

pub mod admin;
pub mod auth;
pub mod events;
pub mod reader;
pub mod server;
