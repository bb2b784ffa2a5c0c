//! drover-e2e: the test bed (throwaway PostgreSQL, hubs on fresh stores, real binaries,
//! fixtures) and the end-to-end and benchmark suites that use it.

pub mod agents;
pub mod direct_migration;
pub mod guest_fleet;
pub mod logs;
pub mod otlp;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod subscription;
pub mod testbed;
