//! One OpenTelemetry trace per migration, as the hub sees it: the trace id is the migration's
//! id, the root span and one span per phase have ids derived from it, so that the hub can hand
//! the agents their parent (in the commands) before that span ends, and a restarted hub exports
//! the spans of a migration its predecessor started under the same ids. Spans are exported when
//! they end, with the times recorded in the migration's row.

use std::collections::BTreeMap;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use drover_shared::inventory::MigrationPhase;
use drover_shared::telemetry::{export_recorded, traceparent, RecordedSpan};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::KeyValue;
use uuid::Uuid;

use crate::store::entities::migration;

/// The instrumentation scope of the hub's migration spans.
const SCOPE: &str = "drover-hub";

/// The migration's trace id (as shown in GraphQL: 32 hex digits).
pub fn trace_id(id: Uuid) -> TraceId {
    TraceId::from_bytes(*id.as_bytes())
}

/// A span id derived from the migration id and what the span is (0 = root, else a phase).
fn derived_span_id(id: Uuid, part: u64) -> SpanId {
    let bytes = id.as_bytes();
    let low = u64::from_be_bytes(bytes[8..16].try_into().unwrap_or_default());
    let high = u64::from_be_bytes(bytes[0..8].try_into().unwrap_or_default());
    // Fibonacci hashing spreads consecutive parts; a zero id is invalid, so never give one.
    let mixed = (low ^ high.rotate_left(17)) ^ (part + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    SpanId::from_bytes(mixed.max(1).to_be_bytes())
}

fn root_span_id(id: Uuid) -> SpanId {
    derived_span_id(id, 0)
}

fn phase_span_id(id: Uuid, phase: MigrationPhase) -> SpanId {
    let index = MigrationPhase::ALL
        .iter()
        .position(|p| *p == phase)
        .unwrap_or(MigrationPhase::ALL.len()) as u64;
    derived_span_id(id, index + 1)
}

/// The W3C traceparent of the hub's span for `phase` of migration `id`: the parent of what an
/// agent does for that phase.
pub fn phase_traceparent(id: Uuid, phase: MigrationPhase) -> String {
    traceparent(trace_id(id), phase_span_id(id, phase))
}

/// The traceparent of the migration's root span (for work that belongs to no single phase,
/// such as the cancels sent to both sides).
pub fn root_traceparent(id: Uuid) -> String {
    traceparent(trace_id(id), root_span_id(id))
}

/// The text stored in the migration's row and shown as `Migration.traceId`.
pub fn trace_id_text(id: Uuid) -> String {
    trace_id(id).to_string()
}

fn common_attributes(row: &migration::Model) -> Vec<KeyValue> {
    vec![
        KeyValue::new("drover.migration.id", row.id.to_string()),
        KeyValue::new("drover.vm", format!("{}/{}", row.vm_namespace, row.vm_name)),
        KeyValue::new("drover.source.cluster", row.source_cluster_name.clone()),
        KeyValue::new("drover.target.cluster", row.target_cluster_name.clone()),
    ]
}

fn system_time(at: DateTime<Utc>) -> SystemTime {
    SystemTime::from(at)
}

/// Exports the span of `phase`, which ran from `started` until `ended`.
pub fn phase_ended(
    row: &migration::Model,
    phase: MigrationPhase,
    started: DateTime<Utc>,
    ended: DateTime<Utc>,
) {
    let mut attributes = common_attributes(row);
    attributes.push(KeyValue::new("drover.phase", phase.as_str()));
    export_recorded(
        SCOPE,
        RecordedSpan {
            trace_id: trace_id(row.id),
            span_id: phase_span_id(row.id, phase),
            parent: Some(root_span_id(row.id)),
            name: format!("phase {}", phase.as_str()),
            start: system_time(started),
            end: system_time(ended),
            attributes,
            error: None,
        },
    );
}

/// Exports the spans of the phases a new migration passed through at once.
pub fn created(row: &migration::Model, passed: &[MigrationPhase]) {
    for phase in passed {
        phase_ended(row, *phase, row.created_at, row.created_at);
    }
}

/// Exports the root span when the migration ends: what moved, from where to where, how it
/// ended.
pub fn migration_ended(
    row: &migration::Model,
    result: MigrationPhase,
    failure: Option<&str>,
    ended: DateTime<Utc>,
) {
    let mut attributes = common_attributes(row);
    attributes.extend([
        KeyValue::new("drover.vm.uid", row.vm_uid.clone()),
        KeyValue::new("drover.target.namespace", row.target_namespace.clone()),
        KeyValue::new("drover.requested_by", row.requested_by.clone()),
        KeyValue::new("drover.bytes.total", row.bytes_total),
        KeyValue::new("drover.bytes.transferred", row.bytes_transferred),
        KeyValue::new("drover.attempt", i64::from(row.attempt)),
        KeyValue::new("drover.result", result.as_str()),
    ]);
    if let Some(reason) = failure {
        attributes.push(KeyValue::new("drover.failure_reason", reason.to_owned()));
    }
    export_recorded(
        SCOPE,
        RecordedSpan {
            trace_id: trace_id(row.id),
            span_id: root_span_id(row.id),
            parent: None,
            name: format!("migrate {}/{}", row.vm_namespace, row.vm_name),
            start: system_time(row.created_at),
            end: system_time(ended),
            attributes,
            error: (result == MigrationPhase::Failed)
                .then(|| failure.unwrap_or("the migration failed").to_owned()),
        },
    );
}

/// The phase timestamps recorded in a row.
pub fn stamps(row: &migration::Model) -> BTreeMap<String, DateTime<Utc>> {
    row.phase_stamps()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_span_of_a_migration_has_its_own_stable_id() {
        let id = Uuid::new_v4();
        let mut seen = HashSet::new();
        assert!(seen.insert(root_span_id(id)));
        for phase in MigrationPhase::ALL {
            let span = phase_span_id(id, phase);
            assert_ne!(span, SpanId::INVALID);
            assert!(seen.insert(span), "{phase:?} repeats an id");
            assert_eq!(span, phase_span_id(id, phase), "stable");
        }
        assert_eq!(trace_id_text(id), id.simple().to_string());
    }

    #[test]
    fn the_traceparents_name_the_migrations_trace() {
        let id = Uuid::new_v4();
        let value = phase_traceparent(id, MigrationPhase::Running);
        let parsed = drover_shared::telemetry::parse_traceparent(&value).unwrap();
        assert_eq!(parsed.trace_id(), trace_id(id));
        assert_eq!(parsed.span_id(), phase_span_id(id, MigrationPhase::Running));
        let root = drover_shared::telemetry::parse_traceparent(&root_traceparent(id)).unwrap();
        assert_eq!(root.span_id(), root_span_id(id));
    }
}
