//! The inventory: agents' snapshots and deltas stored (ingest), demo and benchmark fleets
//! (seed), and the fleet as the planner sees it (fleet view).

pub mod fleet_view;
pub mod ingest;
pub mod seed;
