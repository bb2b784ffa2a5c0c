//! sea-orm entities for the inventory tables the hub reads and writes row by row.

pub mod cluster {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "clusters")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub name: String,
        pub runtime: String,
        pub platform_version: String,
        pub virtualization_version: String,
        pub cpu_models: Json,
        pub feature_gates: Json,
        pub migration_config: Json,
        pub storage_classes: Json,
        pub networks: Json,
        pub sync_endpoint: Option<String>,
        pub health: String,
        pub last_heartbeat_at: Option<DateTimeUtc>,
        pub maintenance: bool,
        pub maintenance_since: Option<DateTimeUtc>,
        pub inventory_generation: i64,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod cluster_label {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "cluster_labels")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub cluster_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub value: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod node {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "nodes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub cluster_id: Uuid,
        pub name: String,
        pub cpu_model: String,
        pub allocatable_memory_bytes: i64,
        pub allocatable_cpu_millis: i64,
        pub requested_memory_bytes: i64,
        pub requested_cpu_millis: i64,
        pub schedulable: bool,
        pub labels: Json,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod vm {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "virtual_machines")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub cluster_id: Uuid,
        pub namespace: String,
        pub name: String,
        pub uid: String,
        pub run_strategy: String,
        pub phase: String,
        pub node_name: Option<String>,
        pub memory_bytes: i64,
        pub vcpus: i32,
        pub disks: Json,
        pub interfaces: Json,
        pub migratable: bool,
        pub non_migratable_reasons: Json,
        pub generation: i64,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod vm_label {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "vm_labels")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub vm_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub value: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod migration {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "migrations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub vm_namespace: String,
        pub vm_name: String,
        pub vm_uid: String,
        pub source_cluster_id: Option<Uuid>,
        pub target_cluster_id: Option<Uuid>,
        pub source_cluster_name: String,
        pub target_cluster_name: String,
        pub target_namespace: String,
        pub storage_class_map: Json,
        pub network_map: Json,
        pub phase: String,
        pub phase_timestamps: Json,
        pub bytes_total: i64,
        pub bytes_transferred: i64,
        pub bytes_remaining: i64,
        pub dirty_rate_bytes_per_sec: i64,
        pub throughput_bytes_per_sec: i64,
        pub failure_reason: Option<String>,
        pub attempt: i32,
        pub evacuation_id: Option<Uuid>,
        pub trace_id: Option<String>,
        pub requested_by: String,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub finished_at: Option<DateTimeUtc>,
        pub queue_position: i64,
        pub source_node: String,
        pub planned_bytes: i64,
        pub bandwidth_bytes_per_sec: i64,
        pub options: Option<Json>,
        pub switchover_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod evacuation {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "evacuations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        /// "evacuation" or "rebalance".
        pub kind: String,
        /// The evacuated cluster (none for a rebalance).
        pub cluster_id: Option<Uuid>,
        pub state: String,
        pub plan: Json,
        pub limits: Json,
        pub counters: Json,
        pub deadline: Option<DateTimeUtc>,
        pub schedule_id: Option<Uuid>,
        pub created_by: String,
        pub created_at: DateTimeUtc,
        pub started_at: Option<DateTimeUtc>,
        pub finished_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod migration_policy {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "migration_policies")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub vm_selector: Json,
        pub namespace_selector: Json,
        pub bandwidth_per_migration: Option<i64>,
        pub completion_timeout_per_gib: Option<i32>,
        pub allow_auto_converge: Option<bool>,
        pub allow_post_copy: Option<bool>,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod join_token {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "join_tokens")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub cluster_name: String,
        pub token_hash: String,
        pub expires_at: DateTimeUtc,
        pub used_at: Option<DateTimeUtc>,
        pub created_by: String,
        pub created_at: DateTimeUtc,
        /// Redeeming it revokes the cluster's current identity (an admin asked for that).
        pub replaces_identity: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod agent_certificate {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "agent_certificates")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub serial: String,
        pub cluster_name: String,
        pub fingerprint_sha256: String,
        pub not_before: DateTimeUtc,
        pub not_after: DateTimeUtc,
        pub revoked_at: Option<DateTimeUtc>,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod agent_command {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "agent_commands")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub cluster_name: String,
        pub idempotency_key: String,
        pub kind: String,
        pub payload: Json,
        /// Pending, Succeeded or Failed.
        pub state: String,
        pub result_message: Option<String>,
        pub created_by: String,
        pub created_at: DateTimeUtc,
        pub sent_at: Option<DateTimeUtc>,
        pub send_count: i32,
        pub acked_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod api_token {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_tokens")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub name: String,
        /// viewer, migrator or admin.
        pub role: String,
        /// SHA-256 of the secret, hex.
        pub secret_sha256: String,
        pub created_by: String,
        pub created_at: DateTimeUtc,
        pub expires_at: Option<DateTimeUtc>,
        pub revoked_at: Option<DateTimeUtc>,
        pub last_used_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
