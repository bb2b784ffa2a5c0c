//! The hub's pure core: decisions as plain functions over plain data, no I/O — the planner
//! (and its simulator), admission, migration policies and the migration lifecycle's state machine.

pub mod admission;
pub mod lifecycle;
pub mod planner;
pub mod policy;
