//! drover-hub: the hub of a Drover fleet. `core` holds the pure decisions (planner, admission,
//! policies, the migration state machine); `store` the database (schema migrations, entities,
//! repositories, leases); `inventory` what agents report; `agents` the agent edge (endpoint,
//! sessions, durable commands, identities, PKI); `orchestration` migrations, evacuations and the
//! scheduler; `api` the GraphQL adapters and the HTTP server; `hub` assembles them.

pub mod agents;
pub mod api;
pub mod clock;
pub mod config;
pub mod core;
pub mod hub;
pub mod inventory;
pub mod orchestration;
pub mod replicas;
pub mod retry;
pub mod store;

pub use hub::Hub;
