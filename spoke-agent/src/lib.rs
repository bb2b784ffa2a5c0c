//! drover-agent: the spoke agent that runs on every cluster. It joins the hub once (identity),
//! then — with the agent issue's remaining work — keeps a session over which it reports its
//! cluster and executes the hub's commands.

pub mod identity;
pub mod runtime;
pub mod session;

pub use drover_shared::inventory;
