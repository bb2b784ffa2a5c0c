//! drover-hub: the hub of a Drover fleet — the inventory store (PostgreSQL or an embedded SQLite
//! file), inventory ingest, the GraphQL API's reader, the HTTP server and the seeding command.

pub mod admin;
pub mod admission;
pub mod agent_endpoint;
pub mod commands;
pub mod evacuations;
pub mod fleet_view;
pub mod hub;
pub mod identity;
pub mod ingest;
pub mod leases;
pub mod lifecycle;
pub mod migration_trace;
pub mod migrations;
pub mod pki;
pub mod planner;
pub mod policies;
pub mod read;
pub mod replicas;
pub mod retry;
pub mod scheduler;
pub mod seed;
pub mod server;
pub mod sessions;
pub mod simulation;
pub mod store;

pub use hub::Hub;
