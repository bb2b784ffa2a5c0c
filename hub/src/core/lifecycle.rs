//! The migration lifecycle as a pure state machine: from a migration as stored and what its
//! driver observed, the next step. The driver (`migrations`) only carries out the I/O a step
//! names and reports what it saw; every decision — which phase follows, when a phase has timed
//! out, what a failure says, what a cancel does — is made here, over plain data.

use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_shared::inventory::MigrationPhase;

/// Queued or admitted, the target not asked yet.
pub const BEFORE_TARGET: [MigrationPhase; 3] = [
    MigrationPhase::Pending,
    MigrationPhase::Scheduling,
    MigrationPhase::Scheduled,
];
/// Every phase before the source was told to send: a cancel ends these at the hub.
pub const BEFORE_SEND: [MigrationPhase; 5] = [
    MigrationPhase::Pending,
    MigrationPhase::Scheduling,
    MigrationPhase::Scheduled,
    MigrationPhase::PreparingTarget,
    MigrationPhase::TargetReady,
];
/// How long the target agent may take to prepare the receiver.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// Added to the completion limit for the send: the agent enforces the limit itself and reports
/// why; the hub only steps in when no answer comes at all.
pub const SEND_MARGIN: Duration = Duration::from_secs(120);

/// A migration as the driver read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub phase: MigrationPhase,
    /// When the current phase began (its recorded stamp): a restarted driver keeps the
    /// phase's deadline instead of starting a fresh one.
    pub phase_began: DateTime<Utc>,
    /// The reason of a cancel asked for while the source sends (the send's outcome ends it).
    pub cancel_reason: Option<String>,
    /// Whether the source reported that the switchover began (the target takes over; the
    /// migration can no longer be cancelled).
    pub switching_over: bool,
}

/// What became of one of the migration's commands to an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Never stored (the database or the hub went away before it was).
    NotStored,
    /// Stored, no answer (yet, or within the wait).
    Unanswered,
    Succeeded,
    Failed(String),
}

/// What the driver saw since it read the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// Only the row: the first look, or the row after the previous step.
    Row,
    /// The prepare-receiver command to the target.
    Prepare(Command),
    /// The send command to the source.
    Send(Command),
    /// The send could not be made (a cluster left the fleet, the target has no sync
    /// endpoint): why.
    SendImpossible(String),
}

/// The limits a step is judged by (the send's depends on the VM's size: the driver computes
/// it from the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub prepare: Duration,
    /// completionTimeoutPerGiB x (memory + disks) + `SEND_MARGIN`.
    pub send: Duration,
}

/// The one thing the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing: queued (the scheduler admits it) or ended, with nothing left to tell.
    Stop,
    /// Move to `to` if still in one of `from` (a conditional update: of two racing writers,
    /// exactly one wins), then read the row again.
    Advance {
        from: &'static [MigrationPhase],
        to: MigrationPhase,
    },
    /// Store the prepare-receiver command for the target (idempotent) and wait up to `wait`
    /// for its outcome; report `Observation::Prepare`.
    Prepare { wait: Duration },
    /// Build the send; record `Running` (from `TargetReady` only: a cancel that wins the race
    /// keeps the send from going out); store the send. Report `SendImpossible` if it cannot
    /// be built.
    StartSend,
    /// Look whether the send was stored and, if it was, wait up to `wait` for its outcome;
    /// report `Observation::Send`.
    AwaitSend { wait: Duration },
    /// Store the send now (`Running` was recorded but the send never was).
    StoreSend,
    /// Record `Failed` with `reason` (from any phase not ended) and tell both sides to clean up.
    Fail { reason: String },
    /// Tell both sides to clean up (again: the commands are keyed, so once), in case the
    /// database went away between recording a failure and storing the cancels.
    Cleanup,
}

/// What is left of `limit` for the current phase at `now`.
pub fn left_in_phase(m: &Stored, limit: Duration, now: DateTime<Utc>) -> Duration {
    let spent = (now - m.phase_began).to_std().unwrap_or_default();
    limit.saturating_sub(spent)
}

/// The next step for `m` after `seen`, at `now`.
pub fn next_step(m: &Stored, seen: &Observation, limits: Limits, now: DateTime<Utc>) -> Step {
    use MigrationPhase as P;
    match (m.phase, seen) {
        (P::Pending, _) | (P::Succeeded, _) => Step::Stop,
        (P::Failed, _) => Step::Cleanup,
        (P::Scheduling | P::Scheduled, _) => Step::Advance {
            from: &BEFORE_TARGET,
            to: P::PreparingTarget,
        },

        (P::PreparingTarget, Observation::Prepare(Command::Succeeded)) => Step::Advance {
            from: &[P::PreparingTarget],
            to: P::TargetReady,
        },
        (P::PreparingTarget, Observation::Prepare(Command::Failed(message))) => Step::Fail {
            reason: format!("preparing the target failed: {message}"),
        },
        (P::PreparingTarget, _) => {
            let wait = left_in_phase(m, limits.prepare, now);
            if wait.is_zero() {
                Step::Fail {
                    reason: format!(
                        "the target was not ready within {} s",
                        limits.prepare.as_secs()
                    ),
                }
            } else {
                Step::Prepare { wait }
            }
        }

        (P::TargetReady, Observation::SendImpossible(reason)) => Step::Fail {
            reason: reason.clone(),
        },
        (P::TargetReady, _) => Step::StartSend,

        (P::Running, Observation::Send(Command::Succeeded)) => Step::Advance {
            from: &[P::Running],
            to: P::Succeeded,
        },
        (P::Running, Observation::Send(Command::Failed(message))) => Step::Fail {
            reason: if message.is_empty() {
                "the send failed".into()
            } else {
                message.clone()
            },
        },
        // Running was recorded but the send never stored: the source moved nothing. A cancel
        // asked for meanwhile ends it here; otherwise it goes out now.
        (P::Running, Observation::Send(Command::NotStored)) => match &m.cancel_reason {
            Some(reason) => Step::Fail {
                reason: reason.clone(),
            },
            None => Step::StoreSend,
        },
        (P::Running, Observation::SendImpossible(reason)) => Step::Fail {
            reason: reason.clone(),
        },
        (P::Running, Observation::Row | Observation::Send(Command::Unanswered))
        | (P::Running, Observation::Prepare(_)) => {
            let wait = left_in_phase(m, limits.send, now);
            if wait.is_zero() && matches!(seen, Observation::Send(Command::Unanswered)) {
                Step::Fail {
                    reason: format!(
                        "no outcome from the source within {} s",
                        limits.send.as_secs()
                    ),
                }
            } else {
                // First look whether the send is stored at all (and its outcome, if any).
                Step::AwaitSend { wait }
            }
        }
    }
}

/// Whether a cancel asked for now is taken, and how; or why it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelDecision {
    /// Before the send: the hub ends it (`Failed` with the reason) and both sides clean up.
    EndHere,
    /// Sending: the reason is recorded, both sides are told; the source stops the transfer
    /// and the send's outcome ends the migration.
    StopTheSend,
    Refused(String),
}

/// What a cancel of `m` by `actor` does.
pub fn decide_cancel(m: &Stored) -> CancelDecision {
    if !MigrationPhase::NOT_ENDED.contains(&m.phase) {
        return CancelDecision::Refused(format!(
            "it is {} and can no longer be cancelled",
            m.phase.as_str()
        ));
    }
    if m.switching_over {
        return CancelDecision::Refused(
            "its switchover began: the source is paused and the target takes over, which cannot be undone; wait for it to end"
                .into(),
        );
    }
    if BEFORE_SEND.contains(&m.phase) {
        CancelDecision::EndHere
    } else {
        CancelDecision::StopTheSend
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigrationPhase as P;

    const LIMITS: Limits = Limits {
        prepare: Duration::from_secs(300),
        send: Duration::from_secs(600),
    };

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn stored(phase: MigrationPhase) -> Stored {
        Stored {
            phase,
            phase_began: at(0),
            cancel_reason: None,
            switching_over: false,
        }
    }

    fn observations() -> Vec<Observation> {
        let commands = [
            Command::NotStored,
            Command::Unanswered,
            Command::Succeeded,
            Command::Failed("disk full".into()),
        ];
        let mut all = vec![
            Observation::Row,
            Observation::SendImpossible("the target reports no sync endpoint".into()),
        ];
        all.extend(commands.iter().cloned().map(Observation::Prepare));
        all.extend(commands.iter().cloned().map(Observation::Send));
        all
    }

    /// Every phase x every observation, early in the phase: the expected step.
    #[test]
    fn every_phase_and_observation_has_its_step() {
        let wait = |limit: Duration| limit - Duration::from_secs(10);
        for phase in P::ALL {
            for seen in observations() {
                let step = next_step(&stored(phase), &seen, LIMITS, at(10));
                let expected = match (phase, &seen) {
                    (P::Pending | P::Succeeded, _) => Step::Stop,
                    (P::Failed, _) => Step::Cleanup,
                    (P::Scheduling | P::Scheduled, _) => Step::Advance {
                        from: &BEFORE_TARGET,
                        to: P::PreparingTarget,
                    },
                    (P::PreparingTarget, Observation::Prepare(Command::Succeeded)) => {
                        Step::Advance {
                            from: &[P::PreparingTarget],
                            to: P::TargetReady,
                        }
                    }
                    (P::PreparingTarget, Observation::Prepare(Command::Failed(_))) => Step::Fail {
                        reason: "preparing the target failed: disk full".into(),
                    },
                    (P::PreparingTarget, _) => Step::Prepare {
                        wait: wait(LIMITS.prepare),
                    },
                    (P::TargetReady, Observation::SendImpossible(r)) => {
                        Step::Fail { reason: r.clone() }
                    }
                    (P::TargetReady, _) => Step::StartSend,
                    (P::Running, Observation::Send(Command::Succeeded)) => Step::Advance {
                        from: &[P::Running],
                        to: P::Succeeded,
                    },
                    (P::Running, Observation::Send(Command::Failed(_))) => Step::Fail {
                        reason: "disk full".into(),
                    },
                    (P::Running, Observation::Send(Command::NotStored)) => Step::StoreSend,
                    (P::Running, Observation::SendImpossible(r)) => {
                        Step::Fail { reason: r.clone() }
                    }
                    (P::Running, _) => Step::AwaitSend {
                        wait: wait(LIMITS.send),
                    },
                };
                assert_eq!(step, expected, "{phase:?} after {seen:?}");
            }
        }
    }

    #[test]
    fn each_timeout_fails_with_what_did_not_answer() {
        // The target never answered the prepare within its limit.
        let step = next_step(
            &stored(P::PreparingTarget),
            &Observation::Prepare(Command::Unanswered),
            LIMITS,
            at(300),
        );
        assert_eq!(
            step,
            Step::Fail {
                reason: "the target was not ready within 300 s".into()
            }
        );
        // A restarted driver past the deadline does not wait a fresh one.
        assert!(matches!(
            next_step(
                &stored(P::PreparingTarget),
                &Observation::Row,
                LIMITS,
                at(301)
            ),
            Step::Fail { .. }
        ));
        // The source never answered the send within the completion limit and its margin.
        let step = next_step(
            &stored(P::Running),
            &Observation::Send(Command::Unanswered),
            LIMITS,
            at(600),
        );
        assert_eq!(
            step,
            Step::Fail {
                reason: "no outcome from the source within 600 s".into()
            }
        );
        // Past the deadline, the first look still asks whether the send went out at all.
        assert_eq!(
            next_step(&stored(P::Running), &Observation::Row, LIMITS, at(700)),
            Step::AwaitSend {
                wait: Duration::ZERO
            }
        );
        // Just before it, the driver waits for what is left.
        assert_eq!(
            next_step(
                &stored(P::Running),
                &Observation::Send(Command::Unanswered),
                LIMITS,
                at(599)
            ),
            Step::AwaitSend {
                wait: Duration::from_secs(1)
            }
        );
    }

    #[test]
    fn a_send_never_stored_goes_out_unless_a_cancel_came_first() {
        let mut m = stored(P::Running);
        let seen = Observation::Send(Command::NotStored);
        assert_eq!(next_step(&m, &seen, LIMITS, at(1)), Step::StoreSend);
        m.cancel_reason = Some("cancelled by alice".into());
        assert_eq!(
            next_step(&m, &seen, LIMITS, at(1)),
            Step::Fail {
                reason: "cancelled by alice".into()
            }
        );
    }

    #[test]
    fn a_cancel_ends_it_before_the_send_stops_the_send_and_is_refused_at_switchover() {
        for phase in BEFORE_SEND {
            assert_eq!(decide_cancel(&stored(phase)), CancelDecision::EndHere);
        }
        assert_eq!(
            decide_cancel(&stored(P::Running)),
            CancelDecision::StopTheSend
        );
        let mut switching = stored(P::Running);
        switching.switching_over = true;
        match decide_cancel(&switching) {
            CancelDecision::Refused(why) => {
                assert!(why.contains("switchover began"), "{why}")
            }
            other => panic!("a cancel during switchover was {other:?}"),
        }
        for phase in [P::Succeeded, P::Failed] {
            match decide_cancel(&stored(phase)) {
                CancelDecision::Refused(why) => assert!(why.contains(phase.as_str()), "{why}"),
                other => panic!("a cancel of an ended migration was {other:?}"),
            }
        }
    }
}
