//! The group's event-time watermark from what each input partition has applied: which
//! partitions hold deadlines back, which are idle and why. Pure: the caller reads the stored
//! offsets (and the high watermarks last fetched from the broker) and passes them in.
//!
//! See the module doc of [`crate::reconcile`] for the rule and why it is replayable.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};

/// A partition's log as last fetched from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEnd {
    /// First offset still in the log (retention may have deleted older ones).
    pub low: i64,
    /// Offset the next produced record will get.
    pub high: i64,
    /// The highest event time applied on any of the group's partitions, read *before* this
    /// log end was fetched (live service; `None` in a replay, whose log ends are fixed). A
    /// record that reaches a caught-up partition after the fetch was produced after every
    /// record behind this time, so an idle partition holds the watermark at it: records
    /// applied since, which may have been produced after that record, cannot push the
    /// watermark past it before the next fetch shows the partition as it is.
    pub seen_up_to: Option<DateTime<Utc>>,
    /// Whether `seen_up_to` applies (live log ends).
    pub capped: bool,
}

/// What the group has applied on one input partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionClock {
    pub topic: String,
    pub partition: i32,
    /// Stored `next_offset`; `None` when the partition has no stored row yet (it starts at
    /// the log's low watermark).
    pub next_offset: Option<i64>,
    /// Broker timestamp of the last applied record: in the log, so a replay sees the same.
    pub last_record_time: Option<DateTime<Utc>>,
    /// Highest event time applied on the partition.
    pub max_event_time: Option<DateTime<Utc>>,
    /// The partition's log end as last fetched, if fresh enough to trust; `None`: unknown,
    /// so the partition is never idle.
    pub log_end: Option<LogEnd>,
}

/// How long a caught-up partition may stay quiet before it stops holding deadlines back,
/// and how late its records may arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicClock {
    /// Broker time behind the group's stream time after which a caught-up partition is idle.
    pub idle_timeout: Duration,
    /// Subtracted from the partition's highest event time.
    pub allowed_lateness: Duration,
}

/// [`TopicClock`] per input topic, with a default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockRules {
    pub default: TopicClock,
    pub topics: BTreeMap<String, TopicClock>,
}

impl ClockRules {
    pub fn for_topic(&self, topic: &str) -> TopicClock {
        self.topics.get(topic).copied().unwrap_or(self.default)
    }
}

/// Why a partition is left out of the watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IdleReason {
    /// Caught up and nothing with an event time was ever applied: no record to wait for.
    Empty,
    /// Caught up and its last record's broker time is more than the idle timeout behind
    /// the group's stream time.
    Quiet,
}

/// Where a partition stands for the watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Caught up and received records recently (in broker time): it counts.
    Active,
    /// Records are waiting to be applied (a backlog, an instance down or frozen): it counts,
    /// so no deadline passes because a partition was not read yet.
    Behind { records: i64 },
    /// No fresh high watermark: it cannot be known to be caught up, so it counts.
    Unknown,
    /// Left out (see [`IdleReason`]).
    Idle(IdleReason),
}

/// Every [`Standing::as_str`] value.
pub const STANDINGS: [&str; 5] = ["active", "behind", "unknown", "idle_empty", "idle_quiet"];

impl Standing {
    /// The label value used in metrics and reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Standing::Active => "active",
            Standing::Behind { .. } => "behind",
            Standing::Unknown => "unknown",
            Standing::Idle(IdleReason::Empty) => "idle_empty",
            Standing::Idle(IdleReason::Quiet) => "idle_quiet",
        }
    }

    pub fn is_idle(&self) -> bool {
        matches!(self, Standing::Idle(_))
    }
}

/// One partition's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionWatermark {
    pub topic: String,
    pub partition: i32,
    pub standing: Standing,
    /// Highest event time minus the topic's allowed lateness; `None` when nothing with an
    /// event time was applied.
    pub contribution: Option<DateTime<Utc>>,
}

/// The group's watermark and how it was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupWatermark {
    /// Deadlines strictly before it have passed.
    pub watermark: DateTime<Utc>,
    /// Highest broker timestamp applied on any input partition.
    pub stream_time: Option<DateTime<Utc>>,
    /// Every partition judged, in (topic, partition) order.
    pub partitions: Vec<PartitionWatermark>,
}

/// Judges every partition and takes the lowest contribution of those that count.
///
/// `expected_partitions`: the number of input partitions (from the broker); fewer clocks
/// than that, or a partition that counts without having an event time, hold the watermark
/// at the Unix epoch. `None` (tools that run after the service): judge by the partitions
/// that have an event time.
pub fn group_watermark(
    clocks: &[PartitionClock],
    rules: &ClockRules,
    expected_partitions: Option<i64>,
) -> GroupWatermark {
    let stream_time = clocks.iter().filter_map(|c| c.last_record_time).max();
    let mut partitions: Vec<PartitionWatermark> = clocks
        .iter()
        .map(|c| {
            let rule = rules.for_topic(&c.topic);
            PartitionWatermark {
                topic: c.topic.clone(),
                partition: c.partition,
                standing: standing(c, rule, stream_time),
                contribution: c
                    .max_event_time
                    .and_then(|m| m.checked_sub_signed(rule.allowed_lateness)),
            }
        })
        .collect();
    partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let distinct: BTreeSet<(&str, i32)> = clocks
        .iter()
        .map(|c| (c.topic.as_str(), c.partition))
        .collect();
    // What each partition counts with: its contribution, or for an idle one the cap of its
    // log end (live) or nothing at all (fixed log ends: a replay).
    let caps: BTreeMap<(&str, i32), Option<DateTime<Utc>>> = clocks
        .iter()
        .filter_map(|c| {
            let end = c.log_end.filter(|e| e.capped)?;
            let lateness = rules.for_topic(&c.topic).allowed_lateness;
            let cap = end.seen_up_to.and_then(|t| t.checked_sub_signed(lateness));
            Some(((c.topic.as_str(), c.partition), cap))
        })
        .collect();
    let mut counting = partitions.iter().filter_map(|p| {
        if !p.standing.is_idle() {
            return Some(p.contribution);
        }
        caps.get(&(p.topic.as_str(), p.partition)).copied()
    });
    let watermark = if expected_partitions.is_some_and(|n| (distinct.len() as i64) < n) {
        None
    } else if expected_partitions.is_some() {
        // Every counting partition must have an event time; one without holds at the epoch.
        counting
            .try_fold(None::<DateTime<Utc>>, |acc, c| {
                c.map(|c| Some(acc.map_or(c, |a| a.min(c))))
            })
            .flatten()
    } else {
        counting.flatten().min()
    };
    GroupWatermark {
        watermark: watermark.unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
        stream_time,
        partitions,
    }
}

fn standing(c: &PartitionClock, rule: TopicClock, stream_time: Option<DateTime<Utc>>) -> Standing {
    let Some(end) = c.log_end else {
        return Standing::Unknown;
    };
    let next = c.next_offset.unwrap_or(end.low).max(end.low);
    if next < end.high {
        return Standing::Behind {
            records: end.high - next,
        };
    }
    if c.max_event_time.is_none() {
        return Standing::Idle(IdleReason::Empty);
    }
    let quiet = match (c.last_record_time, stream_time) {
        (Some(last), Some(stream)) => stream
            .checked_sub_signed(rule.idle_timeout)
            .is_some_and(|horizon| last < horizon),
        // An event time without a broker timestamp (a replay's aligned row): not judged idle.
        _ => false,
    };
    if quiet {
        Standing::Idle(IdleReason::Quiet)
    } else {
        Standing::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(hours: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::hours(hours)
    }

    fn rules() -> ClockRules {
        ClockRules {
            default: TopicClock {
                idle_timeout: Duration::hours(2),
                allowed_lateness: Duration::hours(1),
            },
            topics: BTreeMap::from([(
                "settlements".to_owned(),
                TopicClock {
                    idle_timeout: Duration::hours(30),
                    allowed_lateness: Duration::zero(),
                },
            )]),
        }
    }

    /// (topic, partition, next_offset, last broker time h, max event time h, log end (low, high)).
    type Row = (
        &'static str,
        i32,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<(i64, i64)>,
    );

    fn clocks(rows: &[Row]) -> Vec<PartitionClock> {
        rows.iter()
            .map(|&(topic, partition, next, last, max, end)| PartitionClock {
                topic: topic.to_owned(),
                partition,
                next_offset: next,
                last_record_time: last.map(t),
                max_event_time: max.map(t),
                log_end: end.map(|(low, high)| LogEnd {
                    low,
                    high,
                    seen_up_to: None,
                    capped: false,
                }),
            })
            .collect()
    }

    #[test]
    fn partitions_are_judged_by_offsets_and_broker_time_never_by_the_clock() {
        // (case, rows, expected partitions, expected standings in (topic, partition) order,
        //  expected watermark in hours; None = the epoch)
        type Case = (
            &'static str,
            Vec<Row>,
            Option<i64>,
            Vec<&'static str>,
            Option<i64>,
        );
        let cases: Vec<Case> = vec![
            (
                "an empty, caught-up partition does not hold the others back",
                vec![
                    ("payments", 0, Some(5), Some(10), Some(10), Some((0, 5))),
                    ("payments", 1, None, None, None, Some((0, 0))),
                ],
                Some(2),
                vec!["active", "idle_empty"],
                Some(9),
            ),
            (
                "a partition with records nobody read yet holds the watermark at the epoch",
                vec![
                    ("payments", 0, Some(5), Some(10), Some(10), Some((0, 5))),
                    ("payments", 1, None, None, None, Some((0, 3))),
                ],
                Some(2),
                vec!["active", "behind"],
                None,
            ),
            (
                "a backlog counts with its own event time, however old its last record",
                vec![
                    ("payments", 0, Some(5), Some(100), Some(100), Some((0, 5))),
                    ("payments", 1, Some(2), Some(3), Some(3), Some((0, 9))),
                ],
                Some(2),
                vec!["active", "behind"],
                Some(2),
            ),
            (
                "a caught-up partition quiet for longer than the idle timeout is left out",
                vec![
                    ("payments", 0, Some(5), Some(100), Some(100), Some((0, 5))),
                    ("payments", 1, Some(2), Some(97), Some(3), Some((0, 2))),
                ],
                Some(2),
                vec!["active", "idle_quiet"],
                Some(99),
            ),
            (
                "quiet for exactly the idle timeout still counts",
                vec![
                    ("payments", 0, Some(5), Some(100), Some(100), Some((0, 5))),
                    ("payments", 1, Some(2), Some(98), Some(3), Some((0, 2))),
                ],
                Some(2),
                vec!["active", "active"],
                Some(2),
            ),
            (
                "no fresh high watermark: unknown, never idle",
                vec![
                    ("payments", 0, Some(5), Some(100), Some(100), Some((0, 5))),
                    ("payments", 1, Some(2), Some(3), Some(3), None),
                ],
                Some(2),
                vec!["active", "unknown"],
                Some(2),
            ),
            (
                "an unknown partition without records holds at the epoch",
                vec![
                    ("payments", 0, Some(5), Some(100), Some(100), Some((0, 5))),
                    ("payments", 1, None, None, None, None),
                ],
                Some(2),
                vec!["active", "unknown"],
                None,
            ),
            (
                "a partition the broker has that no clock covers holds at the epoch",
                vec![("payments", 0, Some(5), Some(100), Some(100), Some((0, 5)))],
                Some(2),
                vec!["active"],
                None,
            ),
            (
                "per-topic idle timeout and lateness: a daily settlement burst stays counted for 30 h",
                vec![
                    ("payments", 0, Some(5), Some(120), Some(120), Some((0, 5))),
                    ("settlements", 0, Some(4), Some(96), Some(96), Some((0, 4))),
                ],
                Some(2),
                vec!["active", "active"],
                Some(96),
            ),
            (
                "after 30 h of broker time the settlement partition is idle",
                vec![
                    ("payments", 0, Some(5), Some(127), Some(127), Some((0, 5))),
                    ("settlements", 0, Some(4), Some(96), Some(96), Some((0, 4))),
                ],
                Some(2),
                vec!["active", "idle_quiet"],
                Some(126),
            ),
            (
                "every partition empty: the epoch",
                vec![
                    ("payments", 0, None, None, None, Some((0, 0))),
                    ("payments", 1, None, None, None, Some((0, 0))),
                ],
                Some(2),
                vec!["idle_empty", "idle_empty"],
                None,
            ),
            (
                "retention deleted the log: a partition with nothing left to read is empty",
                vec![
                    ("payments", 0, Some(5), Some(10), Some(10), Some((0, 5))),
                    ("payments", 1, None, None, None, Some((7, 7))),
                ],
                Some(2),
                vec!["active", "idle_empty"],
                Some(9),
            ),
            (
                "a partition that becomes active again counts with its own (older) event time",
                vec![
                    ("payments", 0, Some(5), Some(100), Some(100), Some((0, 5))),
                    ("payments", 1, Some(3), Some(100), Some(50), Some((0, 3))),
                ],
                Some(2),
                vec!["active", "active"],
                Some(49),
            ),
            (
                "tools (no partition count, no log ends) judge by the partitions with event times",
                vec![
                    ("payments", 0, Some(5), Some(10), Some(10), None),
                    ("payments", 1, Some(1), Some(3), None, None),
                ],
                None,
                vec!["unknown", "unknown"],
                Some(9),
            ),
        ];
        for (case, rows, expected_partitions, standings, watermark) in cases {
            let got = group_watermark(&clocks(&rows), &rules(), expected_partitions);
            let got_standings: Vec<&str> =
                got.partitions.iter().map(|p| p.standing.as_str()).collect();
            assert_eq!(got_standings, standings, "{case}");
            assert_eq!(
                got.watermark,
                watermark.map_or(DateTime::<Utc>::UNIX_EPOCH, t),
                "{case}"
            );
        }
    }

    #[test]
    fn a_live_idle_partition_holds_the_watermark_at_what_was_applied_when_its_log_end_was_fetched()
    {
        // Partition 1 was caught up when its log end was fetched; the group had applied event
        // times up to h10 then. Partition 0 has since applied records up to h200 (perhaps
        // produced after a record that reached partition 1 after the fetch).
        let mut c = clocks(&[
            ("payments", 0, Some(9), Some(200), Some(200), Some((0, 9))),
            ("payments", 1, Some(2), Some(1), Some(1), Some((0, 2))),
        ]);
        for clock in &mut c {
            let end = clock.log_end.as_mut().unwrap();
            end.capped = true;
            end.seen_up_to = Some(t(10));
        }
        let got = group_watermark(&c, &rules(), Some(2));
        assert_eq!(got.partitions[1].standing.as_str(), "idle_quiet");
        assert_eq!(got.watermark, t(9));
        // Nothing applied anywhere when it was fetched: held at the epoch.
        for clock in &mut c {
            clock.log_end.as_mut().unwrap().seen_up_to = None;
        }
        let got = group_watermark(&c, &rules(), Some(2));
        assert_eq!(got.watermark, DateTime::<Utc>::UNIX_EPOCH);
        // A fetch after everything was applied: the idle partition no longer holds it.
        for clock in &mut c {
            clock.log_end.as_mut().unwrap().seen_up_to = Some(t(200));
        }
        let got = group_watermark(&c, &rules(), Some(2));
        assert_eq!(got.watermark, t(199));
    }

    #[test]
    fn stream_time_is_the_highest_broker_time_applied() {
        let got = group_watermark(
            &clocks(&[
                ("payments", 0, Some(5), Some(10), Some(10), Some((0, 5))),
                ("settlements", 3, Some(5), Some(12), Some(2), Some((0, 5))),
            ]),
            &rules(),
            Some(2),
        );
        assert_eq!(got.stream_time, Some(t(12)));
    }
}
