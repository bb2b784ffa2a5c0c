//! drover-graphql: the GraphQL API of the hub — types, resolvers, DataLoaders, error codes and
//! limits. It has no HTTP and no database in it: it reads the fleet through the [`FleetReader`]
//! trait the hub implements, and [`build_schema`] is its entry point.

pub mod access;
pub mod admin;
pub mod batch;
pub mod error;
pub mod evacuate;
pub mod events;
pub mod lifecycle;
pub mod migrate;
pub mod model;
pub mod reader;
pub mod schema;
pub mod tokens;

pub use admin::{
    AdminError, CannotMoveRecord, ClusterLimitsRecord, CommandProgress, CommandRecord,
    EvacuationRecord, FleetAdmin, JoinTokenRecord, MigrateRequest, PlanAsk, PlanRecord,
    PlannedMoveRecord, PolicyRecord, RemovedCluster,
};
pub use error::{classify_response_errors, ApiError, ErrorCode};
pub use events::{FleetEvents, InventoryEvent, InventoryEventKind, MigrationEvent};
pub use reader::{FleetReader, ReadError};
pub use schema::{build_schema, DroverSchema, SchemaLimits, MAX_PAGE_SIZE};
