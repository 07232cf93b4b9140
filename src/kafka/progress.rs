//! Whether this instance makes progress: what `/health/ready` and `payrecon_consumer_stalled`
//! report.
//!
//! An instance is *stalled* when
//! - a batch it received (in any commit lane) has not committed for `pipeline.stall_timeout`
//!   (a commit retried without end: the database refuses or is unreachable), or
//! - it owns a partition with records waiting (commit lag > 0) that it has neither fetched
//!   (its fetch position is behind the high watermark) nor committed anything from for
//!   `stall_timeout` (a consumer that fetches nothing while it looks healthy), or
//! - a partition could not be positioned at its stored offset (assign or seek failed) and the
//!   retry has not succeeded yet.
//!
//! The consumer loop reports events here; the lag reporter, which knows the lag, judges on
//! its timer. Judging uses the wall clock on purpose: it is about this process, not about the
//! data, and nothing of it is stored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::lag::PartitionLag;
use crate::store::TopicPartition;

/// Progress of one consumer, shared by the loop, the lag reporter and readiness.
#[derive(Debug)]
pub struct Progress {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Per commit lane: when its oldest record not yet committed was received (absent when
    /// nothing waits in that lane). One lane retrying is a stall even while others commit.
    uncommitted_since: BTreeMap<usize, Instant>,
    /// Per commit lane: why its last commit attempt failed (retried), for the readiness
    /// message.
    last_error: BTreeMap<usize, String>,
    /// Last commit, or last change of assignment (a new owner gets the full timeout).
    last_progress: Instant,
    /// The same moment as wall-clock time (the `payrecon_last_commit_timestamp_seconds` gauge).
    last_progress_wall: SystemTime,
    /// A partition that could not be positioned, until a retry succeeds.
    positioning_error: Option<String>,
    /// The consumer's fetch positions (next offset it will fetch) by partition.
    positions: HashMap<TopicPartition, i64>,
    /// The verdict of the last judgement: why the instance is stalled.
    stalled: Option<String>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            state: Mutex::new(State {
                uncommitted_since: BTreeMap::new(),
                last_error: BTreeMap::new(),
                last_progress: Instant::now(),
                last_progress_wall: SystemTime::now(),
                positioning_error: None,
                positions: HashMap::new(),
                stalled: None,
            }),
        }
    }
}

impl Progress {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A record was added to the batch `lane` collects.
    pub fn received(&self, lane: usize) {
        self.state()
            .uncommitted_since
            .entry(lane)
            .or_insert_with(Instant::now);
    }

    /// The lane's batch committed: nothing waits in it any more (the batch it collects
    /// meanwhile is counted from its next record on).
    pub fn committed(&self, lane: usize) {
        let mut s = self.state();
        s.uncommitted_since.remove(&lane);
        s.last_error.remove(&lane);
        s.last_progress = Instant::now();
        s.last_progress_wall = SystemTime::now();
    }

    /// The lane's batch was dropped (rebalance, fence, shutdown): its records are read again.
    pub fn dropped(&self, lane: usize) {
        self.state().uncommitted_since.remove(&lane);
    }

    /// The assignment changed: the new partitions get the full timeout.
    pub fn reassigned(&self) {
        let mut s = self.state();
        s.last_progress = Instant::now();
        s.last_progress_wall = SystemTime::now();
        s.positions.clear();
    }

    /// A commit attempt of the lane's batch failed and will be retried.
    pub fn retrying(&self, lane: usize, error: String) {
        self.state().last_error.insert(lane, error);
    }

    /// Positioning failed (`Some`) or succeeded again (`None`).
    pub fn positioning(&self, error: Option<String>) {
        self.state().positioning_error = error;
    }

    /// Whether a partition is waiting to be positioned again.
    pub fn positioning_failed(&self) -> bool {
        self.state().positioning_error.is_some()
    }

    /// The consumer's current fetch positions.
    pub fn set_positions(&self, positions: HashMap<TopicPartition, i64>) {
        self.state().positions = positions;
    }

    /// Judges whether the instance is stalled (module doc), remembers and returns the reason.
    pub fn judge(
        &self,
        timeout: Duration,
        owned: &HashSet<TopicPartition>,
        lags: &HashMap<TopicPartition, PartitionLag>,
    ) -> Option<String> {
        let mut s = self.state();
        let verdict = judge(&s, Instant::now(), timeout, owned, lags);
        s.stalled.clone_from(&verdict);
        let last = s
            .last_progress_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        crate::metrics::consumer_progress(verdict.is_some(), last);
        verdict
    }

    /// The last verdict: `Some(reason)` while stalled.
    pub fn stalled(&self) -> Option<String> {
        self.state().stalled.clone()
    }
}

fn judge(
    s: &State,
    now: Instant,
    timeout: Duration,
    owned: &HashSet<TopicPartition>,
    lags: &HashMap<TopicPartition, PartitionLag>,
) -> Option<String> {
    if let Some(e) = &s.positioning_error {
        return Some(format!("cannot position a partition: {e}"));
    }
    if let Some((lane, &since)) = s.uncommitted_since.iter().min_by_key(|(_, t)| **t) {
        let age = now.duration_since(since);
        if age > timeout {
            return Some(format!(
                "records received {} s ago are not committed yet ({})",
                age.as_secs(),
                s.last_error
                    .get(lane)
                    .map_or("no error reported", String::as_str)
            ));
        }
    }
    let quiet = now.duration_since(s.last_progress);
    if quiet <= timeout {
        return None;
    }
    let mut waiting: Vec<String> = owned
        .iter()
        .filter_map(|tp| {
            let lag = lags.get(tp)?;
            let fetched_all = s
                .positions
                .get(tp)
                .is_some_and(|&p| p >= lag.high_watermark);
            (lag.records > 0 && !fetched_all).then(|| format!("{}[{}]", tp.0, tp.1))
        })
        .collect();
    if waiting.is_empty() {
        return None;
    }
    waiting.sort();
    Some(format!(
        "{} owned partitions have records waiting ({}) and nothing was committed for {} s",
        waiting.len(),
        waiting.join(", "),
        quiet.as_secs()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(high: i64, next: i64) -> PartitionLag {
        PartitionLag {
            low_watermark: 0,
            high_watermark: high,
            next_offset: next,
            records: high - next,
            seconds: 0.0,
        }
    }

    fn state(now: Instant) -> State {
        State {
            uncommitted_since: BTreeMap::new(),
            last_error: BTreeMap::new(),
            last_progress: now,
            last_progress_wall: SystemTime::now(),
            positioning_error: None,
            positions: HashMap::new(),
            stalled: None,
        }
    }

    #[test]
    fn stalls_are_told_apart_from_idle_and_busy_consumers() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(60);
        let later = t0 + Duration::from_secs(61);
        let tp = ("payments".to_owned(), 0);
        let owned: HashSet<_> = [tp.clone()].into();
        let waiting: HashMap<_, _> = [(tp.clone(), lag(10, 5))].into();
        let caught_up: HashMap<_, _> = [(tp.clone(), lag(10, 10))].into();

        // Idle: no lag, nothing received; however long it stays quiet, it is not stalled.
        assert_eq!(judge(&state(t0), later, timeout, &owned, &caught_up), None);
        // Lag, but within the timeout of the last commit.
        let s = state(t0);
        assert_eq!(
            judge(&s, t0 + Duration::from_secs(30), timeout, &owned, &waiting),
            None
        );
        // Lag and nothing fetched or committed for longer than the timeout.
        let v = judge(&s, later, timeout, &owned, &waiting).unwrap();
        assert!(v.contains("payments[0]"), "{v}");
        // Lag of a transaction marker only: fetched up to the high watermark, not stalled.
        let mut s = state(t0);
        s.positions.insert(tp.clone(), 10);
        assert_eq!(judge(&s, later, timeout, &owned, &waiting), None);
        // A batch retried without end.
        let mut s = state(later);
        s.uncommitted_since.insert(0, t0);
        s.last_error
            .insert(0, "SQLSTATE 54000: index row size".into());
        let v = judge(&s, later, timeout, &owned, &caught_up).unwrap();
        assert!(v.contains("not committed") && v.contains("54000"), "{v}");
        // A partition that could not be positioned.
        let mut s = state(later);
        s.positioning_error = Some("seek failed".into());
        assert!(judge(&s, later, timeout, &owned, &caught_up).is_some());
        // Partitions owned by others do not count.
        let s = state(t0);
        assert_eq!(judge(&s, later, timeout, &HashSet::new(), &waiting), None);
    }

    #[test]
    fn a_commit_lane_retrying_is_a_stall_while_another_lane_commits() {
        let timeout = Duration::from_secs(60);
        let p = Progress::default();
        p.received(0);
        p.received(1);
        let t0 = p.state().uncommitted_since[&1];
        // Lane 0 keeps committing; lane 1's batch is retried without end.
        p.committed(0);
        p.received(0);
        p.retrying(1, "SQLSTATE 53100: disk full".into());
        p.committed(0);
        let owned = HashSet::new();
        let v = judge(
            &p.state(),
            t0 + Duration::from_secs(61),
            timeout,
            &owned,
            &HashMap::new(),
        );
        assert!(
            v.as_deref()
                .is_some_and(|v| v.contains("not committed") && v.contains("53100")),
            "{v:?}"
        );
        // Lane 1 commits: nothing waits any more.
        p.committed(1);
        assert!(p.state().uncommitted_since.is_empty());
        assert_eq!(
            judge(
                &p.state(),
                t0 + Duration::from_secs(61),
                timeout,
                &owned,
                &HashMap::new()
            ),
            None
        );
        // A dropped batch waits no more either.
        p.received(1);
        p.dropped(1);
        assert!(p.state().uncommitted_since.is_empty());
    }
}
