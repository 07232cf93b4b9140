//! Which records a replay reads: for every partition, one contiguous offset range
//! `[from, to)`, so the comparison can say of any stored row whether the replay covered it.
//!
//! A range comes from explicit offsets, from broker timestamps, or by default from the log
//! start up to the offsets the live group has applied (`consumer_offsets` in PostgreSQL).
//! Timestamps follow Kafka's `offsetsForTimes` meaning: the range starts at the first record
//! whose timestamp is at or after `--from-time` and ends before the first one at or after
//! `--to-time`. The end is always found by reading the records' own timestamps. For the start,
//! the broker's `offsets_for_times` answer is only a hint, used when the record before it is
//! indeed older than `--from-time`; otherwise (librdkafka's mock cluster always answers "end",
//! some brokers answer per record batch) the partition is scanned from the log start.
//!
//! It reads broker metadata and watermarks and peeks at single records; it does not consume
//! a range.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::kafka::reader::{PartitionBounds, TopicProbe};
use crate::store::TopicPartition;

/// Which input topics a replay reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Topics {
    Payments,
    Settlements,
    Payouts,
    /// Every input topic (`both` is accepted too, from before the payouts topic).
    #[value(alias = "both")]
    #[serde(rename = "both")]
    All,
}

/// How the range was chosen (recorded in the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// From the log start up to the group's stored offsets.
    Committed,
    /// Explicit offsets per partition.
    Offsets,
    /// Broker timestamps.
    Time,
}

/// What the operator asked for.
#[derive(Debug, Clone, Serialize)]
pub struct Requested {
    pub mode: Mode,
    pub topics: Topics,
    /// `--from-offsets` / `--to-offsets`, parsed: "topic:partition" → offset.
    pub from_offsets: BTreeMap<String, i64>,
    pub to_offsets: BTreeMap<String, i64>,
    pub from_time: Option<DateTime<Utc>>,
    pub to_time: Option<DateTime<Utc>>,
}

/// The reading plan of one partition.
#[derive(Debug, Clone)]
pub struct Plan {
    pub topic: String,
    /// 0 = payments topic, 1 = settlements topic (index into a batch's topics).
    pub topic_index: usize,
    pub partition: i32,
    /// Where reading starts.
    pub start: i64,
    /// First offset of the range; `None` while a time scan still looks for it.
    pub from: Option<i64>,
    /// Reading stops before this offset.
    pub limit: i64,
    /// Time scan only: the range starts at the first record at or after this (ms).
    pub scan_from_ms: Option<i64>,
    /// Time scan only: the range ends before the first record at or after this (ms).
    pub scan_to_ms: Option<i64>,
}

/// One partition's range once read (`to` exclusive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionRange {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
    /// Records read in the range (fewer than `to - from` where offsets are missing:
    /// compaction, transaction markers).
    pub records: u64,
}

/// Parses `topic:partition=offset,...` (partition numbers after the last colon).
pub fn parse_offsets(spec: &str, topics: &[&str]) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (tp, offset) = item
            .split_once('=')
            .with_context(|| format!("`{item}`: expected topic:partition=offset"))?;
        let (topic, partition) = tp
            .rsplit_once(':')
            .with_context(|| format!("`{item}`: expected topic:partition=offset"))?;
        anyhow::ensure!(
            topics.contains(&topic),
            "`{item}`: {topic} is not an input topic ({})",
            topics.join(", ")
        );
        let partition: i32 = partition
            .parse()
            .with_context(|| format!("`{item}`: bad partition number"))?;
        let offset: i64 = offset
            .trim()
            .parse()
            .with_context(|| format!("`{item}`: bad offset"))?;
        anyhow::ensure!(
            partition >= 0 && offset >= 0,
            "`{item}`: negative partition or offset"
        );
        anyhow::ensure!(
            out.insert(format!("{topic}:{partition}"), offset).is_none(),
            "`{item}`: partition given twice"
        );
    }
    Ok(out)
}

/// Decides every partition's reading plan.
///
/// `input_topics` are the input topics in topic-index order; `selected` says
/// which of them the replay reads; `committed` is the live group's stored offsets.
pub fn plan(
    probe: &TopicProbe,
    input_topics: &[&str],
    requested: &Requested,
    committed: &HashMap<TopicPartition, i64>,
) -> anyhow::Result<Vec<Plan>> {
    let selected: Vec<usize> = match requested.topics {
        Topics::Payments => vec![0],
        Topics::Settlements => vec![1],
        Topics::Payouts => {
            anyhow::ensure!(
                input_topics.len() > 2,
                "--topics payouts: no payouts topic is configured (kafka.payouts_topic)"
            );
            vec![2]
        }
        Topics::All => (0..input_topics.len()).collect(),
    };
    let mut bounds = Vec::new();
    for &i in &selected {
        let topic = input_topics[i];
        for b in probe.partitions(topic)? {
            bounds.push((i, topic.to_owned(), b.partition, b.low, b.high));
        }
    }
    let stored = |topic: &str, p: i32| committed.get(&(topic.to_owned(), p)).copied();
    let named =
        |m: &BTreeMap<String, i64>, topic: &str, p: i32| m.get(&format!("{topic}:{p}")).copied();
    let mut plans = Vec::new();
    match requested.mode {
        Mode::Committed => {
            for (i, topic, p, low, high) in bounds {
                let to = stored(&topic, p).unwrap_or(0).clamp(low, high);
                plans.push(fixed(i, topic, p, low, to));
            }
        }
        Mode::Offsets => {
            for key in requested
                .from_offsets
                .keys()
                .chain(requested.to_offsets.keys())
            {
                anyhow::ensure!(
                    bounds
                        .iter()
                        .any(|(_, t, p, ..)| format!("{t}:{p}") == *key),
                    "{key}: no such partition among the topics replayed"
                );
            }
            for (i, topic, p, low, high) in bounds {
                let from = named(&requested.from_offsets, &topic, p);
                let to = named(&requested.to_offsets, &topic, p);
                if from.is_none() && to.is_none() {
                    continue; // only the partitions named are replayed
                }
                let from = from.unwrap_or(low);
                anyhow::ensure!(
                    from >= low,
                    "{topic}:{p}: offset {from} is before the log start offset {low} (deleted by retention)"
                );
                let to = to
                    .unwrap_or_else(|| stored(&topic, p).unwrap_or(0))
                    .min(high);
                anyhow::ensure!(
                    from <= to,
                    "{topic}:{p}: the range {from}..{to} is inverted (the partition ends at {high})"
                );
                plans.push(fixed(i, topic, p, from, to));
            }
        }
        Mode::Time => {
            let from_ms = requested.from_time.map(|t| t.timestamp_millis());
            let to_ms = requested.to_time.map(|t| t.timestamp_millis());
            if let (Some(f), Some(t)) = (from_ms, to_ms) {
                anyhow::ensure!(f < t, "--from-time must be before --to-time");
            }
            let hints = match from_ms {
                Some(ms) => {
                    let parts: Vec<(&str, PartitionBounds)> = (bounds.iter())
                        .map(|(_, topic, partition, low, high)| {
                            let b = PartitionBounds {
                                partition: *partition,
                                low: *low,
                                high: *high,
                            };
                            (topic.as_str(), b)
                        })
                        .collect();
                    probe.start_hints(&parts, ms)
                }
                None => vec![None; bounds.len()],
            };
            for ((i, topic, p, low, high), hint) in bounds.into_iter().zip(hints) {
                // Without --to-time the range ends where the live group stands.
                let end = match to_ms {
                    None => stored(&topic, p).unwrap_or(0).clamp(low, high),
                    Some(_) => high,
                };
                plans.push(Plan {
                    start: hint.unwrap_or(low).clamp(low, end.max(low)),
                    topic,
                    topic_index: i,
                    partition: p,
                    from: None,
                    limit: end,
                    scan_from_ms: Some(from_ms.unwrap_or(i64::MIN)),
                    scan_to_ms: to_ms,
                });
            }
        }
    }
    Ok(plans)
}

fn fixed(topic_index: usize, topic: String, partition: i32, from: i64, to: i64) -> Plan {
    Plan {
        topic,
        topic_index,
        partition,
        start: from,
        from: Some(from),
        limit: to,
        scan_from_ms: None,
        scan_to_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_per_partition_and_reject_unknown_topics() {
        let topics = ["payments.transactions", "payments.settlements"];
        let m = parse_offsets(
            "payments.transactions:0=100, payments.settlements:3=7",
            &topics,
        )
        .unwrap();
        assert_eq!(m.get("payments.transactions:0"), Some(&100));
        assert_eq!(m.get("payments.settlements:3"), Some(&7));
        assert!(parse_offsets("other:0=1", &topics).is_err());
        assert!(parse_offsets("payments.transactions:x=1", &topics).is_err());
        assert!(
            parse_offsets(
                "payments.transactions:0=1,payments.transactions:0=2",
                &topics
            )
            .is_err()
        );
        assert!(parse_offsets("payments.transactions=1", &topics).is_err());
    }
}
