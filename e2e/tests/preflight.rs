//! One rulebook: every reason the planner knows to keep a VM where it is, set up in a two-cluster
//! fleet, refuses `planEvacuation` and `migrateVirtualMachine` alike, with the same words —
//! on PostgreSQL and SQLite. (Reasons that need another set-up are named at the table's end.)

use drover_e2e::on_both_backends;
use drover_e2e::testbed::*;
use drover_hub::store::entities::cluster;
use drover_shared::inventory::*;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{json, Value};

on_both_backends!(every_reason_refuses_a_single_move_as_it_refuses_an_evacuation);

/// What a case changes in the two-cluster fleet: the source `src` with the VM `web/app`, the
/// target `dst` with room for it.
struct Case {
    /// A fragment of the reason's remedy (which kind of reason it is).
    says: &'static str,
    source: fn(&mut InventorySnapshot),
    target: fn(&mut InventorySnapshot),
    /// Set the target's health to this (health is the hub's, not in a snapshot).
    target_health: Option<&'static str>,
    cordon_target: bool,
}

fn nothing(_: &mut InventorySnapshot) {}

fn cases() -> Vec<Case> {
    let case =
        |says, source: fn(&mut InventorySnapshot), target: fn(&mut InventorySnapshot)| Case {
            says,
            source,
            target,
            target_health: None,
            cordon_target: false,
        };
    vec![
        case(
            "remove what prevents live migration",
            |s| {
                s.vms[0].migratable = false;
                s.vms[0].non_migratable_reasons = vec!["a host device".into()];
            },
            nothing,
        ),
        case(
            "start the VM",
            |s| s.vms[0].phase = VmPhase::Stopped,
            nothing,
        ),
        case(
            "drover.io/pinned",
            |s| {
                s.vms[0]
                    .labels
                    .insert("drover.io/pinned".into(), "true".into());
            },
            nothing,
        ),
        case(
            "feature gate on the source cluster",
            |s| s.info.feature_gates.clear(),
            nothing,
        ),
        Case {
            target_health: Some("Degraded"),
            ..case("wait until they report Ready", nothing, nothing)
        },
        Case {
            cordon_target: true,
            ..case("end their maintenance", nothing, nothing)
        },
        case("the same runtime on both sides", nothing, |t| {
            t.info.runtime = RuntimeKind::Qemu
        }),
        case("the same minor version", nothing, |t| {
            t.info.platform_version = "4.21.0".into()
        }),
        case("the same minor version", nothing, |t| {
            t.info.virtualization_version = "1.7.0".into()
        }),
        case("HyperConverged spec.featureGates", nothing, |t| {
            t.info.feature_gates.clear()
        }),
        case("sync endpoint", nothing, |t| t.info.sync_endpoint = None),
        case("CPU model", nothing, |t| {
            t.info.cpu_models = vec!["Cascadelake-Server".into()];
            t.nodes[0].cpu_model = "Cascadelake-Server".into();
        }),
        case("create the storage class", nothing, |t| {
            t.info.storage_classes[0].name = "fast".into()
        }),
        case("create the network", nothing, |t| {
            t.info.networks = vec!["vlan-7".into()]
        }),
        case("another MAC address", nothing, |t| {
            let mut other = vm("db", "other", 1);
            other.interfaces[0].mac = vm("web", "app", 1).interfaces[0].mac.clone();
            t.vms.push(other);
        }),
        case("rename or remove the other VM", nothing, |t| {
            t.vms.push(vm("web", "app", 2))
        }),
        case("free or add memory", nothing, |t| {
            t.nodes[0].requested_memory_bytes = t.nodes[0].allocatable_memory_bytes
        }),
    ]
    // Not here: AlreadyMigrating (migrateVirtualMachine answers CONFLICT before planning),
    // NoTargets and NotAllowedTarget (a single move names its target), AntiAffinity and
    // AffinityGroup (Preferred by default: a warning, not a reason; the planner's tests cover
    // Required), SourceNotReady (the API reads the source's health like the target's).
}

fn fleet(name: &str, vms: Vec<VmInfo>) -> InventorySnapshot {
    let mut s = snapshot(name, 1, vec![node("node-a", 64, 32)], vms);
    s.nodes[0].requested_memory_bytes = s.vms.iter().map(|v| v.memory_bytes).sum();
    s.info.sync_endpoint = Some(format!("{name}.example:9185"));
    s
}

async fn every_reason_refuses_a_single_move_as_it_refuses_an_evacuation(b: Backend) {
    for (i, case) in cases().into_iter().enumerate() {
        let h = TestHub::new(b, &format!("preflight_{i}")).await.unwrap();
        let mut source = fleet("src", vec![vm("web", "app", 1)]);
        let mut target = fleet("dst", Vec::new());
        (case.source)(&mut source);
        (case.target)(&mut target);
        h.hub.ingest.apply_snapshot(&source).await.unwrap();
        h.hub.ingest.apply_snapshot(&target).await.unwrap();
        if let Some(health) = case.target_health {
            cluster::Entity::update_many()
                .col_expr(cluster::Column::Health, health.into())
                .filter(cluster::Column::Name.eq("dst"))
                .exec(&h.hub.store.db)
                .await
                .unwrap();
        }
        if case.cordon_target {
            h.data(
                r#"mutation { setClusterMaintenance(cluster: "dst", maintenance: true) { maintenance } }"#,
                json!({}),
            )
            .await;
        }

        let plan = h
            .data(
                r#"mutation { planEvacuation(input: {cluster: "src"}) { moves { name } cannotMove { name reasons } } }"#,
                json!({}),
            )
            .await;
        let refused = &plan["planEvacuation"]["cannotMove"];
        assert_eq!(
            refused.as_array().map(Vec::len),
            Some(1),
            "case {i} ({}): the evacuation refuses the VM: {plan}",
            case.says
        );
        let reasons: Vec<&str> = refused[0]["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            reasons.iter().any(|r| r.contains(case.says)),
            "case {i}: the evacuation's reasons say {:?}: {reasons:?}",
            case.says
        );

        let migrate = h
            .gql(
                r#"mutation { migrateVirtualMachine(input: {cluster: "src", namespace: "web", name: "app", targetCluster: "dst"}) { id } }"#,
                json!({}),
            )
            .await;
        assert_eq!(
            error_code(&migrate).as_deref(),
            Some("PREFLIGHT_FAILED"),
            "case {i} ({}): {migrate}",
            case.says
        );
        let message = error_message(&migrate);
        for reason in &reasons {
            assert!(
                message.contains(reason),
                "case {i}: the single move gives the evacuation's reason {reason:?}: {message}"
            );
        }
        let started = h
            .data("{ migrations { edges { node { id } } } }", json!({}))
            .await;
        assert_eq!(
            started["migrations"]["edges"],
            json!([]),
            "case {i}: nothing queued"
        );
    }
}
