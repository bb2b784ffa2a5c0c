//! The fleet as the planner sees it, read from the store: every cluster with its nodes and VMs,
//! the memory, MACs and names that queued and running migrations hold on their targets, the
//! migration policies, and when each VM last moved. Evacuations, rebalances and single moves all
//! plan over this one view.

pub use crate::store::fleet::load_fleet;
