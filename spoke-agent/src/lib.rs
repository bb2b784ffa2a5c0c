//! drover-agent: the spoke agent that runs on every cluster. It dials the hub, reports its
//! cluster's inventory and executes the hub's commands. This crate is a skeleton until the agent
//! issue lands; it already shares the hub's protocol types through drover-shared.

pub use drover_shared::inventory;
