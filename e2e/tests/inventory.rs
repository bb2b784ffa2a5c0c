//! Inventory ingest and the GraphQL read API, against real PostgreSQL (a throwaway cluster) and
//! the embedded SQLite file: every test runs on both.

use std::collections::BTreeSet;

use drover_e2e::testbed::*;
use drover_hub::inventory::ingest::IngestError;
use drover_shared::inventory::*;
use drover_shared::ClusterName;
use sea_orm::ConnectionTrait;
use serde_json::{json, Value};

use drover_e2e::on_both_backends;

on_both_backends!(
    snapshot_shows_up_in_every_query,
    newer_snapshot_replaces_the_old_one_and_keeps_ids,
    stale_generations_are_refused_and_change_nothing,
    invalid_inventory_is_refused_whole,
    snapshot_failing_halfway_leaves_nothing_behind,
    deltas_apply_in_order_and_last_change_wins,
    delta_for_unknown_cluster_is_refused,
    concurrent_ingests_of_two_clusters_both_land,
    concurrent_ingests_of_one_cluster_keep_the_newest,
    cluster_filters_select_by_labels_health_and_maintenance,
    vm_filters_select_what_they_say,
    pagination_walks_every_vm_exactly_once,
    bad_arguments_get_stable_error_codes,
    depth_and_complexity_limits_refuse_expensive_queries,
    migrations_are_queryable_with_history_and_filters,
    fleet_counts_add_up,
    sql_statements_per_fleet_page_do_not_grow_with_results,
    subscriptions_stream_inventory_changes_over_websocket,
);

fn names(conn: &Value) -> Vec<String> {
    conn["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["name"].as_str().unwrap().to_owned())
        .collect()
}

async fn three_vm_cluster(h: &TestHub, cluster: &str, generation: u64) {
    let mut pinned = vm("payments", "db-1", 3);
    pinned.migratable = false;
    pinned.non_migratable_reasons = vec!["HostDevice: GPU passthrough".into()];
    pinned.memory_bytes = 8 << 30;
    pinned.vcpus = 4;
    let mut stopped = vm("web", "frontend-1", 2);
    stopped.phase = VmPhase::Stopped;
    stopped.run_strategy = RunStrategy::Halted;
    stopped.node = None;
    let mut n2 = node("node-b", 128, 32);
    n2.requested_memory_bytes = 8 << 30;
    n2.requested_cpu_millis = 4000;
    let snap = snapshot(
        cluster,
        generation,
        vec![node("node-a", 64, 16), n2],
        vec![vm("web", "api-1", 1), stopped, pinned],
    );
    h.hub.ingest.apply_snapshot(&snap).await.unwrap();
}

async fn snapshot_shows_up_in_every_query(b: Backend) {
    let h = TestHub::new(b, "snapshot_shows").await.unwrap();
    three_vm_cluster(&h, "east-1", 1).await;
    let d = h
        .data(
            r#"{ cluster(name: "east-1") {
                name runtime platformVersion virtualizationVersion cpuModels featureGates health maintenance
                inventoryGeneration labels { key value }
                migrationConfiguration { parallelMigrationsPerCluster parallelOutboundMigrationsPerNode
                    bandwidthPerMigration completionTimeoutPerGiB progressTimeout allowAutoConverge allowPostCopy }
                storageClasses { name isDefault } networks
                capacity { nodes allocatableMemoryBytes requestedMemoryBytes allocatableCpuMillis requestedCpuMillis }
                nodes { name cpuModel allocatableMemoryBytes schedulable }
                virtualMachines { totalCount edges { node { namespace name uid phase runStrategy node memoryBytes vcpus
                    migratable nonMigratableReasons labels { key value }
                    disks { name sizeBytes storageClass accessMode } interfaces { name network macAddress }
                    cluster { name } } } }
            } }"#,
            json!({}),
        )
        .await;
    let c = &d["cluster"];
    assert_eq!(c["name"], "east-1");
    assert_eq!(c["runtime"], "KUBEVIRT");
    assert_eq!(c["platformVersion"], "4.20.3");
    assert_eq!(c["virtualizationVersion"], "1.6.0");
    assert_eq!(c["cpuModels"], json!(["Icelake-Server", "Skylake-Server"]));
    assert_eq!(c["featureGates"], json!(["DecentralizedLiveMigration"]));
    assert_eq!(c["health"], "READY");
    assert_eq!(c["maintenance"], false);
    assert_eq!(c["inventoryGeneration"], 1);
    assert_eq!(c["labels"], json!([{"key": "region", "value": "eu-west"}]));
    assert_eq!(
        c["migrationConfiguration"],
        json!({"parallelMigrationsPerCluster": 5, "parallelOutboundMigrationsPerNode": 2,
               "bandwidthPerMigration": 0, "completionTimeoutPerGiB": 150, "progressTimeout": 150,
               "allowAutoConverge": false, "allowPostCopy": false})
    );
    assert_eq!(
        c["storageClasses"],
        json!([{"name": "standard", "isDefault": true}])
    );
    assert_eq!(
        c["capacity"],
        json!({"nodes": 2, "allocatableMemoryBytes": 192u64 << 30, "requestedMemoryBytes": 8u64 << 30,
               "allocatableCpuMillis": 48000, "requestedCpuMillis": 4000})
    );
    assert_eq!(c["nodes"][0]["name"], "node-a");
    assert_eq!(c["nodes"][1]["allocatableMemoryBytes"], 128u64 << 30);
    let vms = &c["virtualMachines"];
    assert_eq!(vms["totalCount"], 3);
    // Ordered by namespace, then name.
    assert_eq!(names(vms), ["db-1", "api-1", "frontend-1"]);
    let db = &vms["edges"][0]["node"];
    assert_eq!(db["namespace"], "payments");
    assert_eq!(db["memoryBytes"], 8u64 << 30);
    assert_eq!(db["vcpus"], 4);
    assert_eq!(db["migratable"], false);
    assert_eq!(
        db["nonMigratableReasons"],
        json!(["HostDevice: GPU passthrough"])
    );
    assert_eq!(db["labels"], json!([{"key": "app", "value": "db-1"}]));
    assert_eq!(
        db["disks"],
        json!([{"name": "rootdisk", "sizeBytes": 10u64 << 30, "storageClass": "standard", "accessMode": "ReadWriteOnce"}])
    );
    // MACs are stored normalised to lowercase.
    assert_eq!(
        db["interfaces"],
        json!([{"name": "default", "network": "pod", "macAddress": "02:aa:00:00:00:03"}])
    );
    assert_eq!(db["cluster"]["name"], "east-1");
    let stopped = &vms["edges"][2]["node"];
    assert_eq!(stopped["phase"], "STOPPED");
    assert_eq!(stopped["runStrategy"], "HALTED");
    assert_eq!(stopped["node"], Value::Null);

    let one = h
        .data(
            r#"{ virtualMachine(cluster: "east-1", namespace: "web", name: "api-1") { name phase node uid } }"#,
            json!({}),
        )
        .await;
    assert_eq!(
        one["virtualMachine"],
        json!({"name": "api-1", "phase": "RUNNING", "node": "node-a", "uid": "uid-web-api-1"})
    );
}

async fn vm_ids(h: &TestHub, cluster: &str) -> std::collections::BTreeMap<String, String> {
    let d = h
        .data(
            "query($c: String!) { cluster(name: $c) { virtualMachines(first: 100) { edges { node { id name } } } } }",
            json!({"c": cluster}),
        )
        .await;
    d["cluster"]["virtualMachines"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["node"]["name"].as_str().unwrap().to_owned(),
                e["node"]["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn newer_snapshot_replaces_the_old_one_and_keeps_ids(b: Backend) {
    let h = TestHub::new(b, "newer_snapshot").await.unwrap();
    three_vm_cluster(&h, "east-1", 1).await;
    let before = vm_ids(&h, "east-1").await;
    let mut api = vm("web", "api-1", 1);
    api.memory_bytes = 2 << 30;
    api.labels.insert("tier".into(), "gold".into());
    let mut info = cluster_info();
    info.labels.insert("env".into(), "prod".into());
    let mut snap = snapshot(
        "east-1",
        2,
        vec![node("node-a", 64, 16)],
        vec![api, vm("web", "api-2", 9)],
    );
    snap.info = info;
    let outcome = h.hub.ingest.apply_snapshot(&snap).await.unwrap();
    assert_eq!((outcome.vms_upserted, outcome.vms_removed), (2, 2));
    assert_eq!((outcome.nodes_upserted, outcome.nodes_removed), (1, 1));
    let after = vm_ids(&h, "east-1").await;
    assert_eq!(after.keys().collect::<Vec<_>>(), ["api-1", "api-2"]);
    assert_eq!(before["api-1"], after["api-1"], "a kept VM keeps its id");
    let d = h
        .data(
            r#"{ cluster(name: "east-1") { inventoryGeneration labels { key value } nodes { name }
                 virtualMachines { edges { node { name memoryBytes labels { key value } } } } } }"#,
            json!({}),
        )
        .await;
    let c = &d["cluster"];
    assert_eq!(c["inventoryGeneration"], 2);
    assert_eq!(c["nodes"], json!([{"name": "node-a"}]));
    assert_eq!(
        c["labels"],
        json!([{"key": "env", "value": "prod"}, {"key": "region", "value": "eu-west"}])
    );
    let api = &c["virtualMachines"]["edges"][0]["node"];
    assert_eq!(api["memoryBytes"], 2u64 << 30);
    assert_eq!(
        api["labels"],
        json!([{"key": "app", "value": "api-1"}, {"key": "tier", "value": "gold"}])
    );
}

async fn stale_generations_are_refused_and_change_nothing(b: Backend) {
    let h = TestHub::new(b, "stale_generation").await.unwrap();
    three_vm_cluster(&h, "east-1", 5).await;
    let same = snapshot("east-1", 5, vec![], vec![]);
    let err = h.hub.ingest.apply_snapshot(&same).await.unwrap_err();
    assert!(
        matches!(
            err,
            IngestError::StaleGeneration {
                got: 5,
                have: 5,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("not newer"), "{err}");
    let older = InventoryDelta {
        cluster: ClusterName::new("east-1").unwrap(),
        generation: 3,
        changes: vec![InventoryChange::VmRemoved {
            namespace: "web".into(),
            name: "api-1".into(),
        }],
    };
    assert!(matches!(
        h.hub.ingest.apply_delta(&older).await.unwrap_err(),
        IngestError::StaleGeneration {
            got: 3,
            have: 5,
            ..
        }
    ));
    assert_eq!(vm_ids(&h, "east-1").await.len(), 3, "nothing was removed");
}

async fn invalid_inventory_is_refused_whole(b: Backend) {
    let h = TestHub::new(b, "invalid_inventory").await.unwrap();
    let mut absurd = vm("web", "huge", 2);
    absurd.memory_bytes = 1 << 62;
    let mut bad_mac = vm("web", "bad-mac", 3);
    bad_mac.interfaces[0].mac = "not-a-mac".into();
    let snap = snapshot(
        "east-1",
        1,
        vec![],
        vec![vm("web", "fine", 1), absurd, bad_mac],
    );
    let err = h.hub.ingest.apply_snapshot(&snap).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("web/huge: memory"), "{text}");
    assert!(text.contains("not-a-mac"), "{text}");
    assert!(text.contains("nothing was written"), "{text}");
    // Not even the cluster exists.
    let resp = h
        .gql(r#"{ cluster(name: "east-1") { name } }"#, json!({}))
        .await;
    assert_eq!(error_code(&resp).as_deref(), Some("NOT_FOUND"));
}

/// A trigger that makes the database refuse one VM, to fail a snapshot after it started writing.
async fn refuse_vm_named_boom(h: &TestHub, b: Backend) {
    let db = &h.hub.store.db;
    match b {
        Backend::Postgres => {
            db.execute_unprepared(
                "CREATE FUNCTION refuse_boom() RETURNS trigger AS $$ BEGIN \
                 IF NEW.name = 'boom' THEN RAISE EXCEPTION 'refused by test trigger'; END IF; \
                 RETURN NEW; END $$ LANGUAGE plpgsql",
            )
            .await
            .unwrap();
            db.execute_unprepared(
                "CREATE TRIGGER refuse_boom BEFORE INSERT ON virtual_machines \
                 FOR EACH ROW EXECUTE FUNCTION refuse_boom()",
            )
            .await
            .unwrap();
        }
        Backend::Sqlite => {
            db.execute_unprepared(
                "CREATE TRIGGER refuse_boom BEFORE INSERT ON virtual_machines \
                 WHEN NEW.name = 'boom' BEGIN SELECT RAISE(ABORT, 'refused by test trigger'); END",
            )
            .await
            .unwrap();
        }
    }
}

async fn snapshot_failing_halfway_leaves_nothing_behind(b: Backend) {
    let h = TestHub::new(b, "failing_halfway").await.unwrap();
    three_vm_cluster(&h, "east-1", 1).await;
    refuse_vm_named_boom(&h, b).await;
    let before = h
        .data(
            r#"{ cluster(name: "east-1") { inventoryGeneration labels { key } nodes { name }
                 virtualMachines { edges { node { id name memoryBytes } } } } }"#,
            json!({}),
        )
        .await;
    // Changes labels, removes a node and two VMs, changes one, and adds the refused one.
    let mut changed = vm("web", "api-1", 1);
    changed.memory_bytes = 4 << 30;
    let mut snap = snapshot(
        "east-1",
        2,
        vec![node("node-a", 64, 16)],
        vec![changed, vm("web", "boom", 7)],
    );
    snap.info.labels.clear();
    let err = h.hub.ingest.apply_snapshot(&snap).await.unwrap_err();
    assert!(matches!(err, IngestError::Store(_)), "{err}");
    let after = h
        .data(
            r#"{ cluster(name: "east-1") { inventoryGeneration labels { key } nodes { name }
                 virtualMachines { edges { node { id name memoryBytes } } } } }"#,
            json!({}),
        )
        .await;
    assert_eq!(
        before, after,
        "a failed snapshot must leave the inventory as it was"
    );
}

async fn deltas_apply_in_order_and_last_change_wins(b: Backend) {
    let h = TestHub::new(b, "deltas").await.unwrap();
    three_vm_cluster(&h, "east-1", 1).await;
    let mut migrated = vm("web", "api-1", 1);
    migrated.node = Some("node-b".into());
    let mut info = cluster_info();
    info.virtualization_version = "1.6.1".into();
    info.migration_config.bandwidth_per_migration = 64 << 20;
    let delta = InventoryDelta {
        cluster: ClusterName::new("east-1").unwrap(),
        generation: 2,
        changes: vec![
            InventoryChange::VmUpserted {
                vm: vm("web", "new-1", 20),
            },
            InventoryChange::VmRemoved {
                namespace: "web".into(),
                name: "new-1".into(),
            },
            InventoryChange::VmRemoved {
                namespace: "web".into(),
                name: "new-2".into(),
            },
            InventoryChange::VmUpserted {
                vm: vm("web", "new-2", 21),
            },
            InventoryChange::VmUpserted { vm: migrated },
            InventoryChange::VmRemoved {
                namespace: "payments".into(),
                name: "db-1".into(),
            },
            InventoryChange::NodeUpserted {
                node: node("node-c", 32, 8),
            },
            InventoryChange::NodeRemoved {
                name: "node-a".into(),
            },
            InventoryChange::ClusterUpdated { info },
        ],
    };
    let outcome = h.hub.ingest.apply_delta(&delta).await.unwrap();
    assert_eq!(outcome.generation, 2);
    let d = h
        .data(
            r#"{ cluster(name: "east-1") { inventoryGeneration virtualizationVersion
                 migrationConfiguration { bandwidthPerMigration } nodes { name }
                 virtualMachines { edges { node { name node } } } } }"#,
            json!({}),
        )
        .await;
    let c = &d["cluster"];
    assert_eq!(c["inventoryGeneration"], 2);
    assert_eq!(c["virtualizationVersion"], "1.6.1");
    assert_eq!(
        c["migrationConfiguration"]["bandwidthPerMigration"],
        64u64 << 20
    );
    assert_eq!(c["nodes"], json!([{"name": "node-b"}, {"name": "node-c"}]));
    assert_eq!(
        c["virtualMachines"]["edges"],
        json!([
            {"node": {"name": "api-1", "node": "node-b"}},
            {"node": {"name": "frontend-1", "node": null}},
            {"node": {"name": "new-2", "node": "node-a"}},
        ])
    );
}

async fn delta_for_unknown_cluster_is_refused(b: Backend) {
    let h = TestHub::new(b, "delta_unknown").await.unwrap();
    let delta = InventoryDelta {
        cluster: ClusterName::new("ghost").unwrap(),
        generation: 1,
        changes: vec![InventoryChange::VmUpserted {
            vm: vm("web", "a", 1),
        }],
    };
    let err = h.hub.ingest.apply_delta(&delta).await.unwrap_err();
    assert!(matches!(err, IngestError::UnknownCluster { .. }), "{err}");
    assert!(
        err.to_string().contains("send a full snapshot first"),
        "{err}"
    );
}

async fn concurrent_ingests_of_two_clusters_both_land(b: Backend) {
    let h = TestHub::new(b, "concurrent_two").await.unwrap();
    let mut tasks = Vec::new();
    for (c, cluster) in ["east-1", "west-1"].into_iter().enumerate() {
        let ingest = h.hub.ingest.clone();
        tasks.push(tokio::spawn(async move {
            let base = (c as u32 + 1) << 16;
            let vms = (0..50)
                .map(|i| vm("web", &format!("vm-{i}"), base + i))
                .collect();
            ingest
                .apply_snapshot(&snapshot(cluster, 1, vec![node("node-a", 64, 16)], vms))
                .await
                .unwrap();
            for g in 2..12u32 {
                let delta = InventoryDelta {
                    cluster: ClusterName::new(cluster).unwrap(),
                    generation: g as u64,
                    changes: vec![InventoryChange::VmUpserted {
                        vm: vm("web", &format!("late-{g}"), base + 1000 + g),
                    }],
                };
                ingest.apply_delta(&delta).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for cluster in ["east-1", "west-1"] {
        let d = h
            .data(
                "query($c: String!) { cluster(name: $c) { inventoryGeneration virtualMachines { totalCount } } }",
                json!({"c": cluster}),
            )
            .await;
        assert_eq!(d["cluster"]["inventoryGeneration"], 11, "{cluster}");
        assert_eq!(
            d["cluster"]["virtualMachines"]["totalCount"], 60,
            "{cluster}"
        );
    }
}

async fn concurrent_ingests_of_one_cluster_keep_the_newest(b: Backend) {
    let h = TestHub::new(b, "concurrent_one").await.unwrap();
    let mut tasks = Vec::new();
    for g in 1..=8u32 {
        let ingest = h.hub.ingest.clone();
        tasks.push(tokio::spawn(async move {
            let vms = (0..g).map(|i| vm("web", &format!("vm-{i}"), i)).collect();
            ingest
                .apply_snapshot(&snapshot("east-1", g as u64, vec![], vms))
                .await
        }));
    }
    let mut applied = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => applied += 1,
            Err(IngestError::StaleGeneration { .. }) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert!(applied >= 1);
    let d = h
        .data(
            r#"{ cluster(name: "east-1") { inventoryGeneration virtualMachines { totalCount } } }"#,
            json!({}),
        )
        .await;
    // Whatever the interleaving, generation 8 is never refused and is what remains.
    assert_eq!(d["cluster"]["inventoryGeneration"], 8);
    assert_eq!(d["cluster"]["virtualMachines"]["totalCount"], 8);
}

async fn labelled_fleet(h: &TestHub) {
    for (i, (name, region, tier)) in [
        ("alpha", "eu-west", "gold"),
        ("bravo", "eu-west", "silver"),
        ("charlie", "us-east", "gold"),
        ("delta", "us-east", "bronze"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut snap = snapshot(
            name,
            1,
            vec![node("node-a", 64, 16)],
            vec![vm("web", "x", i as u32)],
        );
        snap.info.labels = [("region", region), ("tier", tier)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if name == "delta" {
            snap.info.labels.insert("legacy".into(), "true".into());
        }
        h.hub.ingest.apply_snapshot(&snap).await.unwrap();
    }
    h.hub
        .ingest
        .set_cluster_health("bravo", ClusterHealth::Degraded)
        .await
        .unwrap();
    h.hub
        .ingest
        .set_cluster_health("charlie", ClusterHealth::Unreachable)
        .await
        .unwrap();
    h.hub
        .store
        .db
        .execute_unprepared("UPDATE clusters SET maintenance = true WHERE name = 'alpha'")
        .await
        .unwrap();
}

async fn cluster_filters_select_by_labels_health_and_maintenance(b: Backend) {
    let h = TestHub::new(b, "cluster_filters").await.unwrap();
    labelled_fleet(&h).await;
    let q = "query($f: ClusterFilterInput) { clusters(filter: $f) { totalCount edges { node { name } } } }";
    for (filter, expected) in [
        (json!({}), vec!["alpha", "bravo", "charlie", "delta"]),
        (
            json!({"labelSelector": "region=eu-west"}),
            vec!["alpha", "bravo"],
        ),
        (
            json!({"labelSelector": "tier in (gold,bronze),region!=eu-west"}),
            vec!["charlie", "delta"],
        ),
        (
            json!({"labelSelector": "!legacy"}),
            vec!["alpha", "bravo", "charlie"],
        ),
        (json!({"labelSelector": "legacy"}), vec!["delta"]),
        (
            json!({"labelSelector": "tier notin (gold)"}),
            vec!["bravo", "delta"],
        ),
        (json!({"health": "DEGRADED"}), vec!["bravo"]),
        (json!({"health": "READY"}), vec!["alpha", "delta"]),
        (json!({"maintenance": true}), vec!["alpha"]),
        (
            json!({"maintenance": false, "labelSelector": "region=eu-west"}),
            vec!["bravo"],
        ),
    ] {
        let d = h.data(q, json!({"f": filter})).await;
        assert_eq!(names(&d["clusters"]), expected, "filter {filter}");
        assert_eq!(
            d["clusters"]["totalCount"],
            expected.len(),
            "filter {filter}"
        );
    }
}

async fn vm_fleet(h: &TestHub) {
    let mut vms = Vec::new();
    for i in 0..12u32 {
        let mut v = vm(
            if i % 2 == 0 { "web" } else { "payments" },
            &format!("vm-{i:02}"),
            i,
        );
        v.labels.insert(
            "tier".into(),
            ["gold", "silver", "bronze"][(i % 3) as usize].into(),
        );
        if i % 4 == 0 {
            v.labels.insert("pci".into(), "true".into());
        }
        v.node = Some(if i < 6 { "node-a" } else { "node-b" }.into());
        if i == 11 {
            v.phase = VmPhase::Stopped;
            v.node = None;
        }
        if i == 7 {
            v.migratable = false;
            v.non_migratable_reasons = vec!["LUN: disk \"san\" is a LUN".into()];
        }
        vms.push(v);
    }
    h.hub
        .ingest
        .apply_snapshot(&snapshot(
            "east-1",
            1,
            vec![node("node-a", 64, 16), node("node-b", 64, 16)],
            vms,
        ))
        .await
        .unwrap();
    h.hub
        .ingest
        .apply_snapshot(&snapshot(
            "west-1",
            1,
            vec![node("node-a", 64, 16)],
            vec![vm("web", "vm-99", 99)],
        ))
        .await
        .unwrap();
}

async fn vm_filters_select_what_they_say(b: Backend) {
    let h = TestHub::new(b, "vm_filters").await.unwrap();
    vm_fleet(&h).await;
    let q = "query($f: VirtualMachineFilter) { virtualMachines(first: 100, filter: $f) { totalCount edges { node { name } } } }";
    let all_east: Vec<String> = (0..12).map(|i| format!("vm-{i:02}")).collect();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    for (filter, expected) in [
        (json!({"cluster": "west-1"}), vec!["vm-99".to_string()]),
        (
            json!({"cluster": "east-1", "namespace": "web"}),
            (0..12).step_by(2).map(|i| format!("vm-{i:02}")).collect(),
        ),
        (
            json!({"cluster": "east-1", "labelSelector": "tier=gold,pci"}),
            vec!["vm-00".into()],
        ),
        (
            json!({"cluster": "east-1", "labelSelector": "tier in (gold,bronze),pci"}),
            vec!["vm-00".into(), "vm-08".into()],
        ),
        (
            json!({"cluster": "east-1", "labelSelector": "!pci,tier in (silver)"}),
            vec!["vm-01".into(), "vm-07".into(), "vm-10".into()],
        ),
        (
            json!({"cluster": "east-1", "phase": "STOPPED"}),
            vec!["vm-11".into()],
        ),
        (
            json!({"cluster": "east-1", "node": "node-b"}),
            (6..11).map(|i| format!("vm-{i:02}")).collect(),
        ),
        (json!({"migratable": false}), vec!["vm-07".into()]),
        (json!({"cluster": "east-1"}), all_east.clone()),
    ] {
        let d = h.data(q, json!({"f": filter})).await;
        let got = sorted(names(&d["virtualMachines"]));
        assert_eq!(got, sorted(expected.clone()), "filter {filter}");
        assert_eq!(
            d["virtualMachines"]["totalCount"],
            expected.len(),
            "filter {filter}"
        );
    }
    // The same filters work inside a cluster.
    let d = h
        .data(
            r#"{ cluster(name: "east-1") { virtualMachines(filter: {namespace: "payments", labelSelector: "tier=bronze"}) {
                 totalCount edges { node { name } } } } }"#,
            json!({}),
        )
        .await;
    assert_eq!(names(&d["cluster"]["virtualMachines"]), ["vm-05", "vm-11"]);
    assert_eq!(d["cluster"]["virtualMachines"]["totalCount"], 2);
}

async fn pagination_walks_every_vm_exactly_once(b: Backend) {
    let h = TestHub::new(b, "pagination").await.unwrap();
    vm_fleet(&h).await;
    // Across the fleet, ordered by cluster, namespace, name.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let d = h
            .data(
                "query($a: String) { virtualMachines(first: 5, after: $a) { pageInfo { hasNextPage endCursor }
                   edges { node { name namespace cluster { name } } } } }",
                json!({"a": after}),
            )
            .await;
        let conn = &d["virtualMachines"];
        for e in conn["edges"].as_array().unwrap() {
            seen.push(format!(
                "{}/{}/{}",
                e["node"]["cluster"]["name"].as_str().unwrap(),
                e["node"]["namespace"].as_str().unwrap(),
                e["node"]["name"].as_str().unwrap()
            ));
        }
        pages += 1;
        assert!(pages < 10, "pagination does not end");
        if !conn["pageInfo"]["hasNextPage"].as_bool().unwrap() {
            break;
        }
        after = Some(conn["pageInfo"]["endCursor"].as_str().unwrap().to_owned());
    }
    assert_eq!(pages, 3);
    let mut expected = seen.clone();
    expected.sort();
    expected.dedup();
    assert_eq!(seen, expected, "every VM once, in order");
    assert_eq!(seen.len(), 13);
    assert_eq!(seen.last().unwrap(), "west-1/web/vm-99");

    // Inside a cluster.
    let mut seen = BTreeSet::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let d = h
            .data(
                r#"query($a: String) { cluster(name: "east-1") { virtualMachines(first: 4, after: $a) {
                     pageInfo { hasNextPage endCursor } edges { node { name } } } } }"#,
                json!({"a": after}),
            )
            .await;
        let conn = &d["cluster"]["virtualMachines"];
        for n in names(conn) {
            assert!(seen.insert(n.clone()), "{n} seen twice");
        }
        if !conn["pageInfo"]["hasNextPage"].as_bool().unwrap() {
            break;
        }
        after = Some(conn["pageInfo"]["endCursor"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 12);

    // Clusters.
    let d = h
        .data(
            "{ clusters(first: 1) { pageInfo { hasNextPage endCursor } edges { node { name } } } }",
            json!({}),
        )
        .await;
    assert_eq!(names(&d["clusters"]), ["east-1"]);
    let cursor = d["clusters"]["pageInfo"]["endCursor"]
        .as_str()
        .unwrap()
        .to_owned();
    let d = h
        .data(
            "query($a: String) { clusters(first: 1, after: $a) { pageInfo { hasNextPage hasPreviousPage } edges { node { name } } } }",
            json!({"a": cursor}),
        )
        .await;
    assert_eq!(names(&d["clusters"]), ["west-1"]);
    assert_eq!(d["clusters"]["pageInfo"]["hasNextPage"], false);
    assert_eq!(d["clusters"]["pageInfo"]["hasPreviousPage"], true);
}

async fn bad_arguments_get_stable_error_codes(b: Backend) {
    let h = TestHub::new(b, "bad_arguments").await.unwrap();
    vm_fleet(&h).await;
    for (query, code, hint) in [
        (
            "{ clusters(first: 101) { totalCount } }",
            "PAGE_TOO_LARGE",
            "at most 100",
        ),
        (
            "{ clusters(first: -1) { totalCount } }",
            "PAGE_TOO_LARGE",
            "at most 100",
        ),
        (
            r#"{ cluster(name: "east-1") { virtualMachines(first: 1000) { totalCount } } }"#,
            "PAGE_TOO_LARGE",
            "at most 100",
        ),
        (
            r#"{ clusters(after: "garbage") { totalCount } }"#,
            "BAD_USER_INPUT",
            "not a cursor",
        ),
        (
            r#"{ cluster(name: "East_1") { name } }"#,
            "INVALID_NAME",
            "DNS-1123",
        ),
        (
            r#"{ cluster(name: "nowhere") { name } }"#,
            "NOT_FOUND",
            "not in the fleet",
        ),
        (
            r#"{ virtualMachine(cluster: "east-1", namespace: "web", name: "ghost") { name } }"#,
            "NOT_FOUND",
            "ghost",
        ),
        (
            r#"{ virtualMachine(cluster: "east-1", namespace: "Web!", name: "x") { name } }"#,
            "INVALID_NAME",
            "namespace",
        ),
        (
            r#"{ virtualMachines(filter: {cluster: "nowhere"}) { totalCount } }"#,
            "NOT_FOUND",
            "nowhere",
        ),
        (
            r#"{ virtualMachines(filter: {labelSelector: "env in prod"}) { totalCount } }"#,
            "BAD_USER_INPUT",
            "write it like",
        ),
        (
            r#"{ migration(id: "123") { id } }"#,
            "BAD_USER_INPUT",
            "UUID",
        ),
        (
            r#"{ migration(id: "0192c1f0-7a3b-7c4d-8e9f-0123456789ab") { id } }"#,
            "NOT_FOUND",
            "does not exist",
        ),
        (
            "{ clusters { edges { node { nme } } } }",
            "GRAPHQL_VALIDATION_FAILED",
            "nme",
        ),
        ("{ clusters { ", "GRAPHQL_PARSE_FAILED", ""),
    ] {
        let resp = h.gql(query, json!({})).await;
        assert_eq!(error_code(&resp).as_deref(), Some(code), "{query}: {resp}");
        assert!(error_message(&resp).contains(hint), "{query}: {resp}");
    }
}

async fn depth_and_complexity_limits_refuse_expensive_queries(b: Backend) {
    let h = TestHub::new(b, "limits").await.unwrap();
    vm_fleet(&h).await;
    let deep = "{ virtualMachines(first: 1) { edges { node { cluster { virtualMachines(first: 1) { edges { node { cluster {
        virtualMachines(first: 1) { edges { node { cluster { virtualMachines(first: 1) { edges { node { name } } } } } } } } } } } } } } } }";
    let resp = h.gql(deep, json!({})).await;
    assert_eq!(
        error_code(&resp).as_deref(),
        Some("QUERY_TOO_DEEP"),
        "{resp}"
    );
    let wide = "{ clusters(first: 100) { edges { node { virtualMachines(first: 100) { edges { node { cluster { virtualMachines(first: 100) { edges { node { name } } } } } } } } } } }";
    let resp = h.gql(wide, json!({})).await;
    assert_eq!(
        error_code(&resp).as_deref(),
        Some("QUERY_TOO_COMPLEX"),
        "{resp}"
    );
    assert!(error_message(&resp).contains("smaller pages"), "{resp}");
    // A portal's fleet page stays within the limits.
    let resp = h.gql(FLEET_PAGE, json!({})).await;
    assert!(resp.get("errors").is_none(), "{resp}");
}

/// A portal's fleet page: totals plus the first 100 clusters with nodes and first 100 VMs.
pub const FLEET_PAGE: &str = "{
  fleet { clusters { total ready degraded unreachable inMaintenance }
          virtualMachines { total running notMigratable memoryBytes vcpus byPhase { phase count } }
          capacity { nodes allocatableMemoryBytes requestedMemoryBytes allocatableCpuMillis requestedCpuMillis }
          migrationsInFlight }
  clusters(first: 100) {
    pageInfo { hasNextPage endCursor }
    edges { node {
      name health maintenance platformVersion virtualizationVersion labels { key value }
      capacity { allocatableMemoryBytes requestedMemoryBytes }
      nodes { name cpuModel allocatableMemoryBytes requestedMemoryBytes schedulable }
      virtualMachines(first: 100) { pageInfo { hasNextPage endCursor } edges { node {
        namespace name phase node memoryBytes vcpus migratable labels { key value } } } }
    } }
  }
}";

async fn insert_migration(
    h: &TestHub,
    source: &str,
    target: &str,
    vm_name: &str,
    phase: MigrationPhase,
) -> uuid::Uuid {
    use drover_hub::store::entities::{cluster, migration};
    use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};
    let id_of = |name: &str| {
        let name = name.to_owned();
        let db = h.hub.store.db.clone();
        async move {
            cluster::Entity::find()
                .filter(cluster::Column::Name.eq(name))
                .one(&db)
                .await
                .unwrap()
                .unwrap()
                .id
        }
    };
    let now = chrono::Utc::now();
    let id = uuid::Uuid::now_v7();
    migration::Entity::insert(migration::ActiveModel {
        id: Set(id),
        vm_namespace: Set("web".into()),
        vm_name: Set(vm_name.into()),
        vm_uid: Set(format!("uid-web-{vm_name}")),
        source_cluster_id: Set(Some(id_of(source).await)),
        target_cluster_id: Set(Some(id_of(target).await)),
        source_cluster_name: Set(source.into()),
        target_cluster_name: Set(target.into()),
        target_namespace: Set("web".into()),
        storage_class_map: Set(json!({})),
        network_map: Set(json!({})),
        phase: Set(phase.as_str().into()),
        phase_timestamps: Set(json!({
            "Pending": now - chrono::Duration::seconds(30),
            "Running": now - chrono::Duration::seconds(10),
        })),
        bytes_total: Set(3 << 30),
        bytes_transferred: Set(1 << 30),
        bytes_remaining: Set(2 << 30),
        dirty_rate_bytes_per_sec: Set(1 << 20),
        throughput_bytes_per_sec: Set(100 << 20),
        failure_reason: Set(None),
        attempt: Set(1),
        evacuation_id: Set(None),
        trace_id: Set(Some("4bf92f3577b34da6a3ce929d0e0e4736".into())),
        requested_by: Set("operator@example".into()),
        created_at: Set(now),
        updated_at: Set(now),
        finished_at: Set(None),
        queue_position: Set(0),
        source_node: Set("node-1".into()),
        planned_bytes: Set(3 << 30),
        bandwidth_bytes_per_sec: Set(0),
        options: Set(None),
        switchover_at: Set(None),
    })
    .exec_without_returning(&h.hub.store.db)
    .await
    .unwrap();
    id
}

async fn migrations_are_queryable_with_history_and_filters(b: Backend) {
    let h = TestHub::new(b, "migrations").await.unwrap();
    vm_fleet(&h).await;
    let empty = h
        .data("{ migrations { edges { node { id } } } }", json!({}))
        .await;
    assert_eq!(empty["migrations"]["edges"], json!([]));
    let first = insert_migration(&h, "east-1", "west-1", "vm-00", MigrationPhase::Succeeded).await;
    let second = insert_migration(&h, "west-1", "east-1", "vm-00", MigrationPhase::Running).await;
    let d = h
        .data(
            "{ migrations { edges { node { id phase virtualMachine { namespace name uid }
                 sourceCluster { name } targetCluster { name } attempt traceId requestedBy
                 phaseTimestamps { phase } progress { bytesTotal bytesTransferred bytesRemaining
                 dirtyRateBytesPerSecond throughputBytesPerSecond } } } } }",
            json!({}),
        )
        .await;
    let edges = d["migrations"]["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 2);
    let newest = &edges[0]["node"];
    assert_eq!(newest["id"], second.to_string(), "newest first");
    assert_eq!(newest["phase"], "RUNNING");
    assert_eq!(newest["sourceCluster"]["name"], "west-1");
    assert_eq!(newest["targetCluster"]["name"], "east-1");
    assert_eq!(newest["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        newest["phaseTimestamps"],
        json!([{"phase": "PENDING"}, {"phase": "RUNNING"}])
    );
    assert_eq!(newest["progress"]["bytesRemaining"], 2u64 << 30);
    let d = h
        .data(
            r#"{ migrations(filter: {phase: SUCCEEDED}) { edges { node { id } } }
                 m: migration(id: "FIRST") { phase } fleet { migrationsInFlight } }"#
                .replace("FIRST", &first.to_string())
                .as_str(),
            json!({}),
        )
        .await;
    assert_eq!(
        d["migrations"]["edges"],
        json!([{"node": {"id": first.to_string()}}])
    );
    assert_eq!(d["m"]["phase"], "SUCCEEDED");
    assert_eq!(d["fleet"]["migrationsInFlight"], 1);
    let d = h
        .data(
            r#"{ migrations(first: 1) { pageInfo { hasNextPage endCursor } } }"#,
            json!({}),
        )
        .await;
    let cursor = d["migrations"]["pageInfo"]["endCursor"]
        .as_str()
        .unwrap()
        .to_owned();
    let d = h
        .data(
            "query($a: String) { migrations(first: 1, after: $a) { pageInfo { hasNextPage } edges { node { id } } } }",
            json!({"a": cursor}),
        )
        .await;
    assert_eq!(
        d["migrations"]["edges"],
        json!([{"node": {"id": first.to_string()}}])
    );
    assert_eq!(d["migrations"]["pageInfo"]["hasNextPage"], false);
}

async fn fleet_counts_add_up(b: Backend) {
    let h = TestHub::new(b, "fleet_counts").await.unwrap();
    labelled_fleet(&h).await;
    three_vm_cluster(&h, "east-1", 1).await;
    let d = h.data(FLEET_PAGE, json!({})).await;
    let f = &d["fleet"];
    assert_eq!(
        f["clusters"],
        json!({"total": 5, "ready": 3, "degraded": 1, "unreachable": 1, "inMaintenance": 1})
    );
    let vms = &f["virtualMachines"];
    assert_eq!(vms["total"], 7);
    assert_eq!(vms["running"], 6);
    assert_eq!(vms["notMigratable"], 1);
    assert_eq!(vms["memoryBytes"], (6u64 << 30) + (8 << 30));
    assert_eq!(vms["vcpus"], 10);
    assert_eq!(
        vms["byPhase"],
        json!([{"phase": "RUNNING", "count": 6}, {"phase": "STOPPED", "count": 1}])
    );
    assert_eq!(f["capacity"]["nodes"], 6);
    assert_eq!(
        f["capacity"]["allocatableMemoryBytes"],
        (4 * 64 + 64 + 128) as u64 * (1 << 30)
    );
    assert_eq!(f["migrationsInFlight"], 0);
    assert_eq!(d["clusters"]["edges"].as_array().unwrap().len(), 5);
}

async fn sql_statements_per_fleet_page_do_not_grow_with_results(b: Backend) {
    async fn statements_for(h: &TestHub) -> (u64, usize) {
        let before = h.hub.store.statements.get();
        let d = h.data(FLEET_PAGE, json!({})).await;
        let vms: usize = d["clusters"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e["node"]["virtualMachines"]["edges"]
                    .as_array()
                    .unwrap()
                    .len()
            })
            .sum();
        (h.hub.store.statements.get() - before, vms)
    }
    let small = TestHub::new(b, "statements_small").await.unwrap();
    let large = TestHub::new(b, "statements_large").await.unwrap();
    for (h, clusters, vms) in [(&small, 2u32, 3u32), (&large, 40, 60)] {
        for c in 0..clusters {
            let list = (0..vms)
                .map(|i| vm("web", &format!("vm-{i}"), (c << 16) + i))
                .collect();
            h.hub
                .ingest
                .apply_snapshot(&snapshot(
                    &format!("c-{c}"),
                    1,
                    vec![node("node-a", 64, 16), node("node-b", 64, 16)],
                    list,
                ))
                .await
                .unwrap();
        }
    }
    let (s_small, v_small) = statements_for(&small).await;
    let (s_large, v_large) = statements_for(&large).await;
    assert_eq!((v_small, v_large), (6, 2400));
    assert_eq!(
        s_small, s_large,
        "SQL statements per fleet page: {s_small} for {v_small} VMs but {s_large} for {v_large} VMs"
    );
    assert!(s_large <= 12, "{s_large} statements for one page");
}

async fn subscriptions_stream_inventory_changes_over_websocket(b: Backend) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let h = TestHub::new(b, "subscriptions").await.unwrap();
    let served = h.serve().await.unwrap();
    let mut req = format!("ws://{}/graphql/ws", served.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let timeout = std::time::Duration::from_secs(60);
    let next_text = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| -> Value {
        loop {
            let msg = tokio::time::timeout(timeout, ws.next())
                .await
                .expect("a message within 60 s")
                .expect("the socket stays open")
                .unwrap();
            if let Message::Text(t) = msg {
                return serde_json::from_str(&t).unwrap();
            }
        }
    };
    ws.send(Message::Text(
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {}", h.token)}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_text(&mut ws).await["type"], "connection_ack");
    let listeners_before = h.hub.events.receiver_count();
    ws.send(Message::Text(
        json!({"id": "1", "type": "subscribe", "payload": {
            "query": "subscription { inventoryEvents(cluster: \"east-1\") { cluster kind generation changes } }"}})
        .to_string()
        .into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_text(&mut ws).await["type"], "pong");
    // The pong does not prove the subscription listens yet (the server may answer a ping that
    // arrived with the subscribe before it first polls the new stream): wait until the
    // subscription holds a receiver of the hub's inventory events.
    drover_e2e::agents::eventually(
        "the subscription to listen",
        std::time::Duration::from_secs(60),
        async || h.hub.events.receiver_count() > listeners_before,
    )
    .await;
    three_vm_cluster(&h, "west-9", 1).await; // another cluster: filtered out
    three_vm_cluster(&h, "east-1", 1).await;
    let ev = next_text(&mut ws).await;
    assert_eq!(ev["type"], "next", "{ev}");
    assert_eq!(
        ev["payload"]["data"]["inventoryEvents"],
        json!({"cluster": "east-1", "kind": "SNAPSHOT", "generation": 1, "changes": 5})
    );
}

/// Several hub replicas starting on one fresh PostgreSQL database migrate it once, together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_replicas_starting_together_share_one_migration() {
    let pg = drover_e2e::postgres::PgCluster::shared().await.unwrap();
    let url = pg.create_database("replicas").await.unwrap();
    let opens = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let dir = tempfile::tempdir().unwrap();
            let pki = std::sync::Arc::new(
                drover_hub::agents::pki::Pki::load_or_create(dir.path()).unwrap(),
            );
            drover_hub::Hub::open(&url, pki).await.map(|_| ())
        })
    });
    for open in futures::future::join_all(opens).await {
        open.unwrap().expect("every replica opens the store");
    }
}
