//! drover-agent: the spoke agent that runs on every cluster. It joins the hub once (identity),
//! then keeps a session over which it reports its cluster (through a runtime) and executes the
//! hub's commands at most once each.

pub mod commands;
pub mod identity;
pub mod local_socket;
pub mod migrate;
pub mod runtime;
pub mod session;
pub mod sync;

pub use drover_shared::inventory;
