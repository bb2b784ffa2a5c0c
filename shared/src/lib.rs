//! drover-shared: the vocabulary hub and agents have in common — validated ids, the inventory
//! model an agent reports, label selectors, and the one telemetry setup every binary uses.
//! Nothing here performs I/O policy; it is plain data plus validation.

pub mod commands;
pub mod events;
pub mod identity;
pub mod ids;
pub mod inventory;
pub mod labels;
pub mod migration;
pub mod protocol;
pub mod telemetry;

pub use ids::{ClusterName, InvalidName, MigrationId, Namespace, VmName, VmRef};
