//! Whether a migration still makes progress: a pure decision over samples of its remaining
//! bytes, so that it can be tested without QEMU or a clock.
//!
//! "Remaining bytes did not fall for `progress_timeout`" needs care with pre-copy: within one
//! pass over memory the remaining bytes always fall (pages are sent), and at the end of each
//! pass QEMU re-syncs the dirty bitmap and they jump back up to whatever the guest dirtied
//! meanwhile. A guest that dirties memory faster than the link carries it therefore shows a
//! saw-tooth that falls all the time and never converges. So:
//!
//! - while copying disks, during the first pass over memory and in post-copy (nothing is sent
//!   twice there), a new low of the remaining bytes is progress;
//! - after that, what counts is the dirty set each pass starts with (estimated at the first
//!   sample after a sync): a pass that starts at least `CONVERGENCE_STEP` below the smallest
//!   earlier start is progress, and so is every new low within such a pass (a long pass that
//!   started smaller is working towards convergence). A pass that starts no smaller does not
//!   count, however much it sends.

use std::time::Duration;

use tokio::time::Instant;

use super::{mib, MigrationProgress, MigrationStage, SendOptions};

/// Below this throughput nothing moves: the link to the target is stalled.
const STALLED_THROUGHPUT: u64 = 64 << 10;

/// A pass must start at least this much (in percent) below the best earlier start to count:
/// noise in a non-converging guest's dirty set must not look like progress.
const CONVERGENCE_STEP_PERCENT: u64 = 10;

/// What the migration is doing when sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Disks,
    Memory,
    PostCopy,
}

/// One sample of the migration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub stage: Stage,
    /// Bytes still to send (disk and memory).
    pub remaining: u64,
    /// Bytes sent so far (to estimate a pass's dirty set).
    pub transferred: u64,
    /// QEMU's `dirty-sync-count`: 1 during the first pass over memory.
    pub memory_passes: u64,
}

#[derive(Debug)]
pub(crate) struct ProgressTracker {
    timeout: Duration,
    last_progress: Instant,
    stage: Option<Stage>,
    /// The lowest remaining bytes seen where lows count.
    best_remaining: Option<u64>,
    /// The smallest dirty set a pass started with.
    best_pass_start: Option<u64>,
    /// Whether the current pass started with progress (its lows then count).
    pass_counts: bool,
    previous: Option<Sample>,
}

impl ProgressTracker {
    pub(crate) fn new(timeout: Duration, now: Instant) -> Self {
        Self {
            timeout,
            last_progress: now,
            stage: None,
            best_remaining: None,
            best_pass_start: None,
            pass_counts: false,
            previous: None,
        }
    }

    /// Starts over (a new stage, post-copy switched on): progress is measured from `now`.
    pub(crate) fn reset(&mut self, now: Instant) {
        *self = Self::new(self.timeout, now);
    }

    /// How long since the last progress.
    pub(crate) fn stalled_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_progress)
    }

    /// Records a sample; true when no progress was made for the timeout.
    pub(crate) fn observe(&mut self, sample: Sample, now: Instant) -> bool {
        if self.stage != Some(sample.stage) {
            self.reset(now);
            self.stage = Some(sample.stage);
        }
        let lows_count = match sample.stage {
            Stage::Disks | Stage::PostCopy => true,
            Stage::Memory if sample.memory_passes <= 1 => true,
            Stage::Memory => {
                let new_pass = self
                    .previous
                    .is_some_and(|p| p.memory_passes != sample.memory_passes)
                    || self.best_pass_start.is_none();
                if new_pass {
                    let start = self.pass_start(&sample);
                    self.pass_counts = self.best_pass_start.is_none_or(|best| {
                        start.saturating_mul(100) < best * (100 - CONVERGENCE_STEP_PERCENT)
                    });
                    if self.pass_counts {
                        self.best_pass_start = Some(start);
                        self.best_remaining = Some(sample.remaining);
                        self.last_progress = now;
                    }
                }
                self.pass_counts
            }
        };
        // A disk copy that has nothing left, or still moves bytes (mirrored guest writes), is
        // not stalled: it waits for QEMU to call the mirror ready.
        let disk_moving = sample.stage == Stage::Disks
            && (sample.remaining == 0
                || self
                    .previous
                    .is_some_and(|p| sample.transferred > p.transferred));
        if disk_moving {
            self.last_progress = now;
        }
        if lows_count
            && self
                .best_remaining
                .is_none_or(|best| sample.remaining < best)
        {
            self.best_remaining = Some(sample.remaining);
            self.last_progress = now;
        }
        self.previous = Some(sample);
        self.stalled_for(now) >= self.timeout
    }

    /// The dirty set a pass started with: what remains now plus what it already sent (the bytes
    /// sent since the previous sample beyond what the previous pass still had to send).
    fn pass_start(&self, sample: &Sample) -> u64 {
        match self.previous {
            Some(previous) if previous.stage == sample.stage => {
                let sent = sample.transferred.saturating_sub(previous.transferred);
                sample.remaining + sent.saturating_sub(previous.remaining)
            }
            _ => sample.remaining,
        }
    }
}

/// Why a send that made no progress for its timeout gives up, in the operator's terms.
///
/// Pre-copy memory that stays, pass after pass, while the link still carries bytes is a guest
/// that dirties memory as fast as the link sends it: whatever QEMU's sampled dirty rate says
/// (on a busy host it can read a little below the throughput), the memory does not converge,
/// and the remedies are the same (more bandwidth, auto-converge, post-copy). Only a link that
/// carries next to nothing is called stalled.
pub(crate) fn stall_reason(report: &MigrationProgress, options: &SendOptions) -> String {
    let rates = format!(
        "dirty rate {}/s, throughput {}/s",
        mib(report.dirty_rate_bytes_per_sec),
        mib(report.throughput_bytes_per_sec)
    );
    let moving = report.throughput_bytes_per_sec >= STALLED_THROUGHPUT;
    let why = match report.stage {
        MigrationStage::PostCopy => format!(
            "post-copy stopped moving ({} of memory left, throughput {}/s); the link to the target is stalled",
            mib(report.memory_remaining_bytes),
            mib(report.throughput_bytes_per_sec)
        ),
        MigrationStage::Memory | MigrationStage::Switchover if moving => {
            let help = match (options.allow_auto_converge, options.allow_post_copy) {
                (false, false) => " and neither auto-converge nor post-copy is allowed".to_owned(),
                (true, _) => format!(
                    " even with auto-converge throttling its vCPUs by {}%",
                    report.cpu_throttle_percent
                ),
                (false, true) => String::new(),
            };
            format!(
                "the guest dirties memory faster than the link carries it: {} stay to be sent pass after pass ({rates}){help}",
                mib(report.memory_remaining_bytes)
            )
        }
        _ => format!(
            "{} stay to be sent ({rates}); the link to the target is stalled",
            mib(report.remaining_bytes)
        ),
    };
    format!(
        "it made no progress for {:?}: {why}",
        options.progress_timeout
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const TIMEOUT: Duration = Duration::from_secs(5);

    fn memory(remaining: u64, transferred: u64, passes: u64) -> Sample {
        Sample {
            stage: Stage::Memory,
            remaining,
            transferred,
            memory_passes: passes,
        }
    }

    /// Feeds one sample every 250 ms; returns when the tracker first says stalled.
    fn first_stall(samples: impl IntoIterator<Item = Sample>) -> Option<Duration> {
        let start = Instant::now();
        let mut tracker = ProgressTracker::new(TIMEOUT, start);
        for (i, sample) in samples.into_iter().enumerate() {
            let at = Duration::from_millis(250 * i as u64);
            if tracker.observe(sample, start + at) {
                return Some(at);
            }
        }
        None
    }

    /// A guest whose dirty set per pass is `dirty(pass)`, sent at `rate` bytes per 250 ms.
    fn precopy(
        first_pass: u64,
        rate: u64,
        dirty: impl Fn(u64) -> u64,
        ticks: usize,
    ) -> Vec<Sample> {
        let mut samples = Vec::new();
        let (mut remaining, mut sent, mut pass) = (first_pass, 0, 1);
        for _ in 0..ticks {
            samples.push(memory(remaining, sent, pass));
            let step = rate.min(remaining);
            remaining -= step;
            sent += rate;
            if remaining == 0 {
                pass += 1;
                // What was not sent of this tick goes to the next pass.
                remaining = dirty(pass).saturating_sub(rate - step);
            }
        }
        samples
    }

    fn stalled_at(stage: MigrationStage, dirty: u64, throughput: u64) -> MigrationProgress {
        MigrationProgress {
            stage,
            elapsed: Duration::from_secs(30),
            total_bytes: 160 * MIB,
            transferred_bytes: 200 * MIB,
            remaining_bytes: 3 * MIB,
            disk_total_bytes: 32 * MIB,
            disk_remaining_bytes: 0,
            memory_total_bytes: 128 * MIB,
            memory_remaining_bytes: 3 * MIB,
            memory_passes: 12,
            dirty_rate_bytes_per_sec: dirty,
            throughput_bytes_per_sec: throughput,
            cpu_throttle_percent: 0,
        }
    }

    fn send_options(auto_converge: bool, post_copy: bool) -> SendOptions {
        SendOptions {
            nbd_socket: "/nbd".into(),
            migration_socket: "/mig".into(),
            bandwidth_bytes_per_sec: 4 * MIB,
            allow_auto_converge: auto_converge,
            allow_post_copy: post_copy,
            completion_timeout: Duration::from_secs(600),
            progress_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn memory_that_never_converges_is_called_dirtying_whatever_the_sampled_rate() {
        let options = send_options(false, false);
        // The CI failure: a busy host sampled the dirty rate a little below the throughput.
        for (dirty, throughput) in [
            (36 * MIB / 10, 4 * MIB),
            (16 * MIB, 4 * MIB),
            (MIB / 2, 4 * MIB),
            (0, 4 * MIB),
        ] {
            let reason = stall_reason(
                &stalled_at(MigrationStage::Memory, dirty, throughput),
                &options,
            );
            assert!(
                reason.contains("dirties memory faster than the link carries it")
                    && reason.contains("neither auto-converge nor post-copy"),
                "{reason}"
            );
        }
        let reason = stall_reason(
            &stalled_at(MigrationStage::Memory, 16 * MIB, 4 * MIB),
            &send_options(true, false),
        );
        assert!(reason.contains("even with auto-converge"), "{reason}");
    }

    #[test]
    fn a_link_that_carries_nothing_is_called_stalled() {
        for stage in [MigrationStage::Memory, MigrationStage::Disks] {
            let reason = stall_reason(&stalled_at(stage, 16 * MIB, 0), &send_options(false, false));
            assert!(
                reason.contains("the link to the target is stalled"),
                "{reason}"
            );
            assert!(!reason.contains("dirties"), "{reason}");
        }
        let reason = stall_reason(
            &stalled_at(MigrationStage::PostCopy, 0, 0),
            &send_options(false, true),
        );
        assert!(reason.contains("post-copy stopped moving"), "{reason}");
    }

    #[test]
    fn a_long_first_pass_is_progress() {
        let samples = precopy(400 * MIB, MIB, |_| 0, 300);
        assert_eq!(first_stall(samples), None);
    }

    #[test]
    fn a_guest_that_redirties_its_working_set_every_pass_stalls() {
        // 32 MiB dirtied again during every pass, 4 MiB per second sent: the saw-tooth
        // falls all the time but never converges.
        let samples = precopy(64 * MIB, MIB, |_| 32 * MIB, 400);
        let stalled = first_stall(samples).expect("the stall is detected");
        // First pass 16 s, then one pass (8 s) that counts as a new best, then the timeout.
        assert!(
            stalled >= Duration::from_secs(20) && stalled <= Duration::from_secs(35),
            "{stalled:?}"
        );
    }

    #[test]
    fn shrinking_dirty_sets_are_progress_even_when_a_pass_outlasts_the_timeout() {
        // Each pass starts with half the previous one; the first later pass takes 12 s.
        let samples = precopy(
            64 * MIB,
            MIB,
            |pass| (96 * MIB).checked_shr(pass as u32 - 1).unwrap_or(0),
            120,
        );
        assert_eq!(first_stall(samples), None);
    }

    #[test]
    fn a_copy_that_stops_moving_stalls_and_a_new_stage_starts_over() {
        let start = Instant::now();
        let mut tracker = ProgressTracker::new(TIMEOUT, start);
        let disks = |remaining| Sample {
            stage: Stage::Disks,
            remaining,
            transferred: 0,
            memory_passes: 0,
        };
        assert!(!tracker.observe(disks(100), start));
        assert!(!tracker.observe(disks(50), start + Duration::from_secs(1)));
        assert!(!tracker.observe(disks(50), start + Duration::from_secs(5)));
        assert!(tracker.observe(disks(50), start + Duration::from_secs(6)));
        // Memory starts: measured afresh.
        assert!(!tracker.observe(memory(1000, 0, 1), start + Duration::from_secs(7)));
        assert!(!tracker.observe(memory(1000, 0, 1), start + Duration::from_secs(11)));
        assert!(tracker.observe(memory(1000, 0, 1), start + Duration::from_secs(12)));
    }
}
