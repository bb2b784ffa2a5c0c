//! The hub <-> agent session protocol: JSON messages over one WebSocket per agent, on the hub's
//! mutual-TLS agent endpoint. The agent speaks first (hello), the hub answers with the version
//! both will use; then the agent sends a full snapshot, deltas as things change, and heartbeats.
//! The hub sends commands, each with an idempotency key; the agent acknowledges each with its
//! outcome (see `commands`).

use serde::{Deserialize, Serialize};

use crate::commands::{AgentCommand, CommandOutcome};
use crate::ids::ClusterName;
use crate::inventory::{InventoryDelta, InventorySnapshot};
use crate::migration::MigrationStatus;

/// Protocol versions this build speaks, newest last.
pub const PROTOCOL_VERSIONS: &[u32] = &[1];
/// The session path on the agent endpoint.
pub const SESSION_PATH: &str = "/agent/v1/session";

/// Picks the newest version both sides speak.
pub fn negotiate(offered: &[u32]) -> Option<u32> {
    PROTOCOL_VERSIONS
        .iter()
        .rev()
        .find(|v| offered.contains(v))
        .copied()
}

/// How an agent judges its own cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportedHealth {
    Ready,
    /// Working, but something is wrong (a node down, the runtime slow, ...).
    Degraded,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum AgentMessage {
    #[serde(rename_all = "camelCase")]
    Hello {
        cluster: ClusterName,
        protocol_versions: Vec<u32>,
        agent_version: String,
    },
    Snapshot(Box<InventorySnapshot>),
    Delta(InventoryDelta),
    #[serde(rename_all = "camelCase")]
    Heartbeat {
        health: ReportedHealth,
        #[serde(default)]
        reason: Option<String>,
    },
    /// A command finished (or was already finished: a repeat gets the recorded outcome).
    #[serde(rename_all = "camelCase")]
    CommandAck {
        key: String,
        outcome: CommandOutcome,
    },
    /// Where a migration this agent takes part in is (phase changes, progress every second).
    MigrationStatus(MigrationStatus),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum HubMessage {
    #[serde(rename_all = "camelCase")]
    Welcome {
        protocol_version: u32,
        /// How often the hub expects a heartbeat.
        heartbeat_interval_secs: u32,
    },
    /// An inventory generation was applied.
    Applied { generation: u64 },
    /// Something the agent sent was refused; `resync` asks for a full snapshot.
    #[serde(rename_all = "camelCase")]
    Refused {
        code: String,
        message: String,
        resync: bool,
    },
    /// The hub ends the session (another session replaced it, the identity was revoked, ...).
    Goodbye { reason: String },
    /// Do this, at most once per key; re-sent until acknowledged.
    Command { key: String, command: AgentCommand },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_the_newest_common_version() {
        assert_eq!(negotiate(&[1, 2, 3]), Some(1));
        assert_eq!(negotiate(&[7]), None);
    }

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let hello = AgentMessage::Hello {
            cluster: ClusterName::new("east-1").unwrap(),
            protocol_versions: vec![1],
            agent_version: "0.1.0".into(),
        };
        let json = serde_json::to_string(&hello).unwrap();
        assert!(json.contains("\"type\":\"hello\""), "{json}");
        assert_eq!(serde_json::from_str::<AgentMessage>(&json).unwrap(), hello);
    }
}
