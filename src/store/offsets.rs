//! The consumer offsets: the stored `next_offset` of each partition, advanced by
//! compare-and-set in the batch transaction. Whatever the database holds here is what
//! payrecon resumes from.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::CommitError;

/// How far a batch moves one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionProgress {
    pub topic: String,
    pub partition: i32,
    /// The stored `next_offset` this batch started from; `None` when the partition has
    /// never been committed by this group. The commit is a compare-and-set on it.
    pub expected: Option<i64>,
    /// Offset of the last record in the batch + 1.
    pub next_offset: i64,
    /// Records of this partition in the batch (applied, ignored duplicates and poison).
    pub records: i64,
    /// Broker timestamp of the last record.
    pub last_record_time: Option<DateTime<Utc>>,
}

/// Compare-and-set of every partition's offset. Rows that do not match are reported as
/// [`CommitError::Fenced`]; dropping the transaction rolls everything back.
pub async fn advance_offsets(
    tx: &mut Transaction<'_, Postgres>,
    group: &str,
    instance: &str,
    progress: &[PartitionProgress],
    max_times: &HashMap<(&str, i32), DateTime<Utc>>,
) -> Result<(), CommitError> {
    // In one key order: a zombie's batch and the new owner's may cover the same partitions
    // during a rebalance, and rows locked in the order records arrived could deadlock.
    let mut sorted: Vec<&PartitionProgress> = progress.iter().collect();
    sorted.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let (known, new): (Vec<&PartitionProgress>, Vec<&PartitionProgress>) =
        sorted.into_iter().partition(|p| p.expected.is_some());
    let cols = |ps: &[&PartitionProgress]| {
        (
            ps.iter().map(|p| p.topic.clone()).collect::<Vec<_>>(),
            ps.iter().map(|p| p.partition).collect::<Vec<_>>(),
            ps.iter()
                .map(|p| p.expected.unwrap_or(-1))
                .collect::<Vec<_>>(),
            ps.iter().map(|p| p.next_offset).collect::<Vec<_>>(),
            ps.iter().map(|p| p.records).collect::<Vec<_>>(),
            ps.iter().map(|p| p.last_record_time).collect::<Vec<_>>(),
            ps.iter()
                .map(|p| max_times.get(&(p.topic.as_str(), p.partition)).copied())
                .collect::<Vec<_>>(),
        )
    };
    let mut advanced = 0usize;
    if !known.is_empty() {
        let (topics, parts, expected, next, records, times, event_times) = cols(&known);
        advanced += sqlx::query(
            "UPDATE consumer_offsets o
                SET next_offset = i.next_offset,
                    records_applied = o.records_applied + i.records,
                    batches_committed = o.batches_committed + 1,
                    last_record_time = COALESCE(i.last_time, o.last_record_time),
                    max_event_time = GREATEST(o.max_event_time, i.event_time),
                    last_committed_by = $8,
                    updated_at = now()
               FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::bigint[],
                           $7::timestamptz[], $9::timestamptz[])
                    AS i(topic, partition, expected, next_offset, records, last_time, event_time)
              WHERE o.consumer_group = $1 AND o.topic = i.topic AND o.partition = i.partition
                AND o.next_offset = i.expected AND i.next_offset > o.next_offset",
        )
        .bind(group)
        .bind(&topics)
        .bind(&parts)
        .bind(&expected)
        .bind(&next)
        .bind(&records)
        .bind(&times)
        .bind(instance)
        .bind(&event_times)
        .execute(&mut **tx)
        .await?
        .rows_affected() as usize;
    }
    if !new.is_empty() {
        let (topics, parts, _, next, records, times, event_times) = cols(&new);
        advanced += sqlx::query(
            "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset,
                    records_applied, batches_committed, last_record_time, last_committed_by,
                    max_event_time)
             SELECT $1, i.topic, i.partition, i.next_offset, i.records, 1, i.last_time, $7,
                    i.event_time
               FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::timestamptz[],
                           $8::timestamptz[])
                    AS i(topic, partition, next_offset, records, last_time, event_time)
             ON CONFLICT (consumer_group, topic, partition) DO NOTHING",
        )
        .bind(group)
        .bind(&topics)
        .bind(&parts)
        .bind(&next)
        .bind(&records)
        .bind(&times)
        .bind(instance)
        .bind(&event_times)
        .execute(&mut **tx)
        .await?
        .rows_affected() as usize;
    }
    if advanced == progress.len() {
        return Ok(());
    }
    // Name one partition that failed, for the log; the whole batch is rejected either way.
    let partitions: Vec<_> = progress
        .iter()
        .map(|p| (p.topic.clone(), p.partition))
        .collect();
    let stored = stored_offsets(&mut **tx, group, &partitions).await?;
    let stale = progress
        .iter()
        .find(|p| stored.get(&(p.topic.clone(), p.partition)).copied() != Some(p.next_offset))
        .unwrap_or(&progress[0]);
    Err(CommitError::Fenced {
        topic: stale.topic.clone(),
        partition: stale.partition,
    })
}

/// A (topic, partition) pair.
pub type TopicPartition = (String, i32);

/// Stored `next_offset` of each requested partition, on the pool or inside a transaction
/// (the batch commit names the partition that lost its compare-and-set).
pub async fn stored_offsets<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    group: &str,
    partitions: &[TopicPartition],
) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
    let (topics, parts): (Vec<String>, Vec<i32>) = partitions.iter().cloned().unzip();
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT o.topic, o.partition, o.next_offset
           FROM consumer_offsets o
           JOIN UNNEST($2::text[], $3::int[]) AS p(topic, partition)
             ON o.topic = p.topic AND o.partition = p.partition
          WHERE o.consumer_group = $1",
    )
    .bind(group)
    .bind(&topics)
    .bind(&parts)
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
}
