//! Orchestration: the migration lifecycle's drivers, evacuations and rebalances, the scheduler
//! that admits queued migrations, and each migration's trace.

pub mod evacuations;
pub mod migration_trace;
pub mod migrations;
pub mod scheduler;
