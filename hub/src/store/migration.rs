//! The inventory schema and its migrations. Each migration is frozen once released: later
//! changes come as new migrations, never as edits to old ones.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(M0001Inventory),
            Box::new(M0002AgentCommands),
            Box::new(M0003Scheduling),
            Box::new(M0004DriverLeases),
            Box::new(M0005ApiTokens),
            Box::new(M0006JoinTokenReplaces),
        ]
    }
}

fn a(name: &str) -> Alias {
    Alias::new(name)
}

/// Foreign key from `table.column` to `parent.id`, deleted with its parent.
fn fk(table: &str, column: &str, parent: &str) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(format!("fk_{table}_{column}"))
        .from(a(table), a(column))
        .to(a(parent), a("id"))
        .on_delete(ForeignKeyAction::Cascade)
        .to_owned()
}

/// A 64-bit auto-increment key; SQLite only auto-increments an INTEGER PRIMARY KEY.
fn big_pk_auto(m: &SchemaManager, column: &str) -> ColumnDef {
    match m.get_database_backend() {
        sea_orm::DatabaseBackend::Sqlite => pk_auto(a(column)),
        _ => big_integer(a(column))
            .auto_increment()
            .primary_key()
            .to_owned(),
    }
}

/// Foreign key from `table.column` to `parent.id` that keeps the row (column set to NULL) when
/// the parent goes: history outlives what it is about.
fn fk_keep(table: &str, column: &str, parent: &str) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(format!("fk_{table}_{column}"))
        .from(a(table), a(column))
        .to(a(parent), a("id"))
        .on_delete(ForeignKeyAction::SetNull)
        .to_owned()
}

fn index(table: &str, name: &str, columns: &[&str], unique: bool) -> IndexCreateStatement {
    let mut idx = Index::create();
    idx.name(format!("ix_{table}_{name}")).table(a(table));
    for c in columns {
        idx.col(a(c));
    }
    if unique {
        idx.unique();
    }
    idx.to_owned()
}

struct M0001Inventory;

impl MigrationName for M0001Inventory {
    fn name(&self) -> &str {
        "m0001_inventory"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0001Inventory {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("clusters"))
                .col(pk_uuid(a("id")))
                .col(string_len_uniq(a("name"), 63))
                .col(string_len(a("runtime"), 16))
                .col(string_len(a("platform_version"), 64))
                .col(string_len(a("virtualization_version"), 64))
                .col(json_binary(a("cpu_models")))
                .col(json_binary(a("feature_gates")))
                .col(json_binary(a("migration_config")))
                .col(json_binary(a("storage_classes")))
                .col(json_binary(a("networks")))
                .col(text_null(a("sync_endpoint")))
                .col(string_len(a("health"), 16))
                .col(timestamp_with_time_zone_null(a("last_heartbeat_at")))
                .col(boolean(a("maintenance")))
                .col(timestamp_with_time_zone_null(a("maintenance_since")))
                .col(big_integer(a("inventory_generation")))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone(a("updated_at")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("cluster_labels"))
                .col(uuid(a("cluster_id")))
                .col(string_len(a("key"), 317))
                .col(string_len(a("value"), 63))
                .primary_key(Index::create().col(a("cluster_id")).col(a("key")))
                .foreign_key(&mut fk("cluster_labels", "cluster_id", "clusters"))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "cluster_labels",
            "key_value",
            &["key", "value"],
            false,
        ))
        .await?;

        m.create_table(
            Table::create()
                .table(a("nodes"))
                .col(pk_uuid(a("id")))
                .col(uuid(a("cluster_id")))
                .col(string_len(a("name"), 253))
                .col(string_len(a("cpu_model"), 128))
                .col(big_integer(a("allocatable_memory_bytes")))
                .col(big_integer(a("allocatable_cpu_millis")))
                .col(big_integer(a("requested_memory_bytes")))
                .col(big_integer(a("requested_cpu_millis")))
                .col(boolean(a("schedulable")))
                .col(json_binary(a("labels")))
                .col(timestamp_with_time_zone(a("updated_at")))
                .foreign_key(&mut fk("nodes", "cluster_id", "clusters"))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "nodes",
            "cluster_name",
            &["cluster_id", "name"],
            true,
        ))
        .await?;

        m.create_table(
            Table::create()
                .table(a("virtual_machines"))
                .col(pk_uuid(a("id")))
                .col(uuid(a("cluster_id")))
                .col(string_len(a("namespace"), 63))
                .col(string_len(a("name"), 63))
                .col(string_len(a("uid"), 128))
                .col(string_len(a("run_strategy"), 32))
                .col(string_len(a("phase"), 32))
                .col(string_len_null(a("node_name"), 253))
                .col(big_integer(a("memory_bytes")))
                .col(integer(a("vcpus")))
                .col(json_binary(a("disks")))
                .col(json_binary(a("interfaces")))
                .col(boolean(a("migratable")))
                .col(json_binary(a("non_migratable_reasons")))
                .col(big_integer(a("generation")))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone(a("updated_at")))
                .foreign_key(&mut fk("virtual_machines", "cluster_id", "clusters"))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "virtual_machines",
            "cluster_namespace_name",
            &["cluster_id", "namespace", "name"],
            true,
        ))
        .await?;
        m.create_index(index("virtual_machines", "phase", &["phase"], false))
            .await?;
        m.create_index(index("virtual_machines", "uid", &["uid"], false))
            .await?;
        m.create_index(index(
            "virtual_machines",
            "cluster_node",
            &["cluster_id", "node_name"],
            false,
        ))
        .await?;

        m.create_table(
            Table::create()
                .table(a("vm_labels"))
                .col(uuid(a("vm_id")))
                .col(string_len(a("key"), 317))
                .col(string_len(a("value"), 63))
                .primary_key(Index::create().col(a("vm_id")).col(a("key")))
                .foreign_key(&mut fk("vm_labels", "vm_id", "virtual_machines"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("vm_labels", "key_value", &["key", "value"], false))
            .await?;

        m.create_table(
            Table::create()
                .table(a("evacuations"))
                .col(pk_uuid(a("id")))
                .col(string_len(a("kind"), 16))
                .col(uuid_null(a("cluster_id")))
                .col(string_len(a("state"), 32))
                .col(json_binary(a("plan")))
                .col(json_binary(a("limits")))
                .col(json_binary(a("counters")))
                .col(timestamp_with_time_zone_null(a("deadline")))
                .col(uuid_null(a("schedule_id")))
                .col(string_len(a("created_by"), 253))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone_null(a("started_at")))
                .col(timestamp_with_time_zone_null(a("finished_at")))
                .to_owned(),
        )
        .await?;
        m.create_index(index("evacuations", "state", &["state"], false))
            .await?;

        m.create_table(
            Table::create()
                .table(a("migrations"))
                .col(pk_uuid(a("id")))
                .col(string_len(a("vm_namespace"), 63))
                .col(string_len(a("vm_name"), 63))
                .col(string_len(a("vm_uid"), 128))
                .col(uuid_null(a("source_cluster_id")))
                .col(uuid_null(a("target_cluster_id")))
                // Names too: a migration's history stays readable after a cluster is removed.
                .col(string_len(a("source_cluster_name"), 63))
                .col(string_len(a("target_cluster_name"), 63))
                .col(string_len(a("target_namespace"), 63))
                .col(json_binary(a("storage_class_map")))
                .col(json_binary(a("network_map")))
                .col(string_len(a("phase"), 32))
                .col(json_binary(a("phase_timestamps")))
                .col(big_integer(a("bytes_total")))
                .col(big_integer(a("bytes_transferred")))
                .col(big_integer(a("bytes_remaining")))
                .col(big_integer(a("dirty_rate_bytes_per_sec")))
                .col(big_integer(a("throughput_bytes_per_sec")))
                .col(text_null(a("failure_reason")))
                .col(integer(a("attempt")))
                .col(uuid_null(a("evacuation_id")))
                .col(string_len_null(a("trace_id"), 32))
                .col(string_len(a("requested_by"), 253))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone(a("updated_at")))
                .col(timestamp_with_time_zone_null(a("finished_at")))
                .foreign_key(&mut fk_keep("migrations", "source_cluster_id", "clusters"))
                .foreign_key(&mut fk_keep("migrations", "target_cluster_id", "clusters"))
                .foreign_key(&mut fk_keep("migrations", "evacuation_id", "evacuations"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("migrations", "phase", &["phase"], false))
            .await?;
        m.create_index(index("migrations", "vm_uid", &["vm_uid"], false))
            .await?;
        m.create_index(index("migrations", "source", &["source_cluster_id"], false))
            .await?;
        m.create_index(index("migrations", "target", &["target_cluster_id"], false))
            .await?;
        m.create_index(index("migrations", "evacuation", &["evacuation_id"], false))
            .await?;

        m.create_table(
            Table::create()
                .table(a("migration_events"))
                .col(big_pk_auto(m, "id"))
                .col(uuid(a("migration_id")))
                .col(timestamp_with_time_zone(a("at")))
                .col(string_len(a("kind"), 32))
                .col(string_len_null(a("phase"), 32))
                .col(text(a("message")))
                .col(json_binary(a("data")))
                .foreign_key(&mut fk("migration_events", "migration_id", "migrations"))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "migration_events",
            "migration",
            &["migration_id", "id"],
            false,
        ))
        .await?;

        m.create_table(
            Table::create()
                .table(a("schedules"))
                .col(pk_uuid(a("id")))
                .col(string_len_uniq(a("name"), 63))
                .col(string_len(a("cron"), 128))
                .col(string_len(a("time_zone"), 64))
                .col(big_integer(a("window_seconds")))
                .col(big_integer_null(a("deadline_seconds")))
                .col(uuid(a("cluster_id")))
                .col(json_binary(a("options")))
                .col(boolean(a("enabled")))
                .col(timestamp_with_time_zone_null(a("next_run_at")))
                .col(string_len(a("created_by"), 253))
                .col(timestamp_with_time_zone(a("created_at")))
                .foreign_key(&mut fk("schedules", "cluster_id", "clusters"))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(a("join_tokens"))
                .col(pk_uuid(a("id")))
                .col(string_len(a("cluster_name"), 63))
                .col(string_len_uniq(a("token_hash"), 128))
                .col(timestamp_with_time_zone(a("expires_at")))
                .col(timestamp_with_time_zone_null(a("used_at")))
                .col(string_len(a("created_by"), 253))
                .col(timestamp_with_time_zone(a("created_at")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("agent_certificates"))
                .col(string_len(a("serial"), 64).primary_key())
                .col(string_len(a("cluster_name"), 63))
                .col(string_len(a("fingerprint_sha256"), 64))
                .col(timestamp_with_time_zone(a("not_before")))
                .col(timestamp_with_time_zone(a("not_after")))
                .col(timestamp_with_time_zone_null(a("revoked_at")))
                .col(timestamp_with_time_zone(a("created_at")))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "agent_certificates",
            "cluster",
            &["cluster_name"],
            false,
        ))
        .await?;
        m.create_table(
            Table::create()
                .table(a("api_tokens"))
                .col(pk_uuid(a("id")))
                .col(string_len(a("name"), 253))
                .col(string_len_uniq(a("token_hash"), 128))
                .col(string_len(a("role"), 16))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone_null(a("revoked_at")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("audit_log"))
                .col(big_pk_auto(m, "id"))
                .col(timestamp_with_time_zone(a("at")))
                .col(string_len(a("actor"), 253))
                .col(string_len(a("action"), 64))
                .col(text(a("target")))
                .col(string_len(a("result"), 16))
                .col(json_binary(a("details")))
                .to_owned(),
        )
        .await?;
        m.create_index(index("audit_log", "at", &["at"], false))
            .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            "audit_log",
            "api_tokens",
            "agent_certificates",
            "join_tokens",
            "schedules",
            "migration_events",
            "migrations",
            "evacuations",
            "vm_labels",
            "virtual_machines",
            "nodes",
            "cluster_labels",
            "clusters",
        ] {
            m.drop_table(Table::drop().table(a(t)).to_owned()).await?;
        }
        Ok(())
    }
}

/// Hub -> agent commands, durable until the agent acknowledges them.
pub struct M0002AgentCommands;

impl MigrationName for M0002AgentCommands {
    fn name(&self) -> &str {
        "m0002_agent_commands"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0002AgentCommands {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("agent_commands"))
                .col(big_pk_auto(m, "id"))
                .col(string_len(a("cluster_name"), 63))
                .col(string_len(a("idempotency_key"), 200))
                .col(string_len(a("kind"), 32))
                .col(json_binary(a("payload")))
                .col(string_len(a("state"), 16))
                .col(text_null(a("result_message")))
                .col(string_len(a("created_by"), 253))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone_null(a("sent_at")))
                .col(integer(a("send_count")).default(0))
                .col(timestamp_with_time_zone_null(a("acked_at")))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "agent_commands",
            "key",
            &["cluster_name", "idempotency_key"],
            true,
        ))
        .await?;
        m.create_index(index("agent_commands", "state", &["state", "id"], false))
            .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(a("agent_commands")).to_owned())
            .await
    }
}

/// What the scheduler needs to admit queued migrations under every limit, and migration
/// policies.
pub struct M0003Scheduling;

impl MigrationName for M0003Scheduling {
    fn name(&self) -> &str {
        "m0003_scheduling"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0003Scheduling {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        for column in [
            // Order within its evacuation (the plan's order); admission goes by it.
            big_integer(a("queue_position")).default(0).to_owned(),
            // The node the VM ran on when planned (parallelOutboundMigrationsPerNode).
            string_len(a("source_node"), 253).default("").to_owned(),
            // Memory plus disks, as planned: what the transfer moves.
            big_integer(a("planned_bytes")).default(0).to_owned(),
            // Bandwidth reserved on its cluster pair (bytes/s; 0 = unlimited).
            big_integer(a("bandwidth_bytes_per_sec"))
                .default(0)
                .to_owned(),
            // The migration options chosen when it was planned (policy or cluster defaults).
            json_binary_null(a("options")),
        ] {
            m.alter_table(
                Table::alter()
                    .table(a("migrations"))
                    .add_column(column)
                    .to_owned(),
            )
            .await?;
        }
        m.create_index(index(
            "migrations",
            "queue",
            &["phase", "queue_position"],
            false,
        ))
        .await?;
        m.create_table(
            Table::create()
                .table(a("migration_policies"))
                .col(string_len(a("name"), 63).primary_key())
                .col(json_binary(a("vm_selector")))
                .col(json_binary(a("namespace_selector")))
                .col(big_integer_null(a("bandwidth_per_migration")))
                .col(integer_null(a("completion_timeout_per_gib")))
                .col(boolean_null(a("allow_auto_converge")))
                .col(boolean_null(a("allow_post_copy")))
                .col(timestamp_with_time_zone(a("updated_at")))
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(a("migration_policies")).to_owned())
            .await?;
        m.drop_index(
            Index::drop()
                .name("ix_migrations_queue")
                .table(a("migrations"))
                .to_owned(),
        )
        .await?;
        for column in [
            "queue_position",
            "source_node",
            "planned_bytes",
            "bandwidth_bytes_per_sec",
            "options",
        ] {
            m.alter_table(
                Table::alter()
                    .table(a("migrations"))
                    .drop_column(a(column))
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}

pub struct M0004DriverLeases;

impl MigrationName for M0004DriverLeases {
    fn name(&self) -> &str {
        "m0004_leases_and_switchover"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0004DriverLeases {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // Which hub replica drives each in-flight migration, until when (`leases`), and when a
        // migration's switchover began. Times are
        // milliseconds since the epoch on the replicas' clocks: one comparison on both backends.
        m.create_table(
            Table::create()
                .table(a("migration_leases"))
                .col(uuid(a("migration_id")).primary_key())
                .col(string_len(a("owner"), 200))
                .col(big_integer(a("expires_at_ms")))
                // When the current owner took it, and from whom (a takeover).
                .col(big_integer(a("acquired_at_ms")))
                .col(string_len_null(a("previous_owner"), 200))
                .foreign_key(&mut fk("migration_leases", "migration_id", "migrations"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("migration_leases", "owner", &["owner"], false))
            .await?;
        // When the source reported its switchover began (no cancel is taken from then on).
        m.alter_table(
            Table::alter()
                .table(a("migrations"))
                .add_column(timestamp_with_time_zone_null(a("switchover_at")))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(a("migrations"))
                .drop_column(a("switchover_at"))
                .to_owned(),
        )
        .await?;
        m.drop_table(Table::drop().table(a("migration_leases")).to_owned())
            .await
    }
}

/// API tokens: who may call the GraphQL API with which role. The secret is stored as its
/// SHA-256 only (tokens are 256 random bits, so a fast hash is enough); it is shown once.
pub struct M0005ApiTokens;

impl MigrationName for M0005ApiTokens {
    fn name(&self) -> &str {
        "m0005_api_tokens"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0005ApiTokens {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // M0001 made a placeholder `api_tokens` that nothing ever wrote to: replaced.
        m.drop_table(Table::drop().table(a("api_tokens")).if_exists().to_owned())
            .await?;
        m.create_table(
            Table::create()
                .table(a("api_tokens"))
                .col(uuid(a("id")).primary_key())
                .col(string_len(a("name"), 200).unique_key())
                .col(string_len(a("role"), 20))
                .col(string_len(a("secret_sha256"), 64).unique_key())
                .col(string_len(a("created_by"), 300))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone_null(a("expires_at")))
                .col(timestamp_with_time_zone_null(a("revoked_at")))
                .col(timestamp_with_time_zone_null(a("last_used_at")))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(a("api_tokens")).to_owned())
            .await?;
        // Back to M0001's placeholder.
        m.create_table(
            Table::create()
                .table(a("api_tokens"))
                .col(pk_uuid(a("id")))
                .col(string_len(a("name"), 253))
                .col(string_len_uniq(a("token_hash"), 128))
                .col(string_len(a("role"), 16))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone_null(a("revoked_at")))
                .to_owned(),
        )
        .await
    }
}

/// A join token may replace a cluster's identity (the admin asked for it): redeeming it revokes
/// the cluster's certificates. Other tokens are refused for a cluster that has one.
pub struct M0006JoinTokenReplaces;

impl MigrationName for M0006JoinTokenReplaces {
    fn name(&self) -> &str {
        "m0006_join_token_replaces"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0006JoinTokenReplaces {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(a("join_tokens"))
                .add_column(boolean(a("replaces_identity")).default(false))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(a("join_tokens"))
                .drop_column(a("replaces_identity"))
                .to_owned(),
        )
        .await
    }
}
