//! Every metric payrecon exports: names, units and help text live here and only here.
//!
//! Business code calls one function per event (`batch_committed`, `dead_lettered`, ...);
//! it never spells a metric name. Units follow Prometheus conventions: base units,
//! `_seconds`, `_total` for counters.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const RECORDS: &str = "payrecon_records_total";
pub const BATCHES: &str = "payrecon_batches_total";
pub const BATCH_RECORDS: &str = "payrecon_batch_records";
pub const BATCH_COMMIT_SECONDS: &str = "payrecon_batch_commit_duration_seconds";
pub const BATCH_DECODE_SECONDS: &str = "payrecon_batch_decode_duration_seconds";
pub const END_TO_END_SECONDS: &str = "payrecon_end_to_end_latency_seconds";
pub const DEAD_LETTERS: &str = "payrecon_dead_letters_total";
pub const TRANSIENT_ERRORS: &str = "payrecon_transient_errors_total";
pub const REBALANCES: &str = "payrecon_rebalances_total";
pub const ASSIGNED_PARTITIONS: &str = "payrecon_assigned_partitions";
pub const OFFSET_GAPS: &str = "payrecon_offset_gaps_total";
pub const COMMIT_LAG: &str = "payrecon_commit_lag";
pub const COMMIT_LAG_SECONDS: &str = "payrecon_commit_lag_seconds";
pub const PARTITION_ASSIGNED: &str = "payrecon_partition_assigned";
pub const LAG_REFRESH_ERRORS: &str = "payrecon_commit_lag_refresh_errors_total";
pub const LAG_REFRESHED: &str = "payrecon_commit_lag_last_refresh_timestamp_seconds";
pub const STATUS_CHANGES: &str = "payrecon_reconciliation_status_changes_total";
pub const EXCEPTIONS: &str = "payrecon_reconciliation_exceptions_total";
pub const WATERMARK: &str = "payrecon_reconciliation_watermark_timestamp_seconds";
pub const WATERMARK_GROUP: &str = "payrecon_watermark_group_timestamp_seconds";
pub const WATERMARK_STREAM_TIME: &str = "payrecon_watermark_stream_time_timestamp_seconds";
pub const WATERMARK_PARTITION: &str = "payrecon_watermark_partition_timestamp_seconds";
pub const WATERMARK_PARTITION_IDLE: &str = "payrecon_watermark_partition_idle";
pub const WATERMARK_PARTITION_STANDING: &str = "payrecon_watermark_partition_standing";
pub const WATERMARK_HOLDING: &str = "payrecon_watermark_holding_partitions";
pub const EXCEPTIONS_PUBLISHED: &str = "payrecon_exceptions_published_total";
pub const OUTBOX_PENDING: &str = "payrecon_exceptions_outbox_pending";
pub const OUTBOX_OLDEST: &str = "payrecon_exceptions_outbox_oldest_pending_seconds";
pub const REFERENCE_LOADED: &str = "payrecon_reference_cache_loaded_timestamp_seconds";
pub const CONFLICTING_DUPLICATES: &str = "payrecon_conflicting_duplicates_total";
pub const DATABASE_ERRORS: &str = "payrecon_database_errors_total";
pub const CONSUMER_STALLED: &str = "payrecon_consumer_stalled";
pub const LAST_COMMIT: &str = "payrecon_last_commit_timestamp_seconds";
pub const POSITIONING_ERRORS: &str = "payrecon_positioning_errors_total";
pub const RECORDS_REREAD: &str = "payrecon_reconciliation_reread_items_total";
pub const EXCEPTIONS_LOST: &str = "payrecon_exceptions_lost_total";
pub const DATABASE_SWITCHES: &str = "payrecon_database_switches_total";
pub const DATABASE_SERVER: &str = "payrecon_database_server_info";
pub const DATABASE_LAST_SWITCH: &str = "payrecon_database_last_switch_timestamp_seconds";
pub const DATABASE_FAILOVER_SECONDS: &str = "payrecon_database_failover_duration_seconds";

/// Latency buckets (seconds) from 1 ms to 2 min: commit and end-to-end times.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];
/// Batch size buckets (records).
const SIZE_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();

/// The process-wide Prometheus recorder, installed (and every metric described) on first use.
/// `None` if another recorder was installed first.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.get_or_init(install).clone()
}

fn install() -> Option<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .ok()?
        .set_buckets_for_metric(Matcher::Full(BATCH_RECORDS.into()), SIZE_BUCKETS)
        .ok()?
        .install_recorder()
        .ok()?;
    describe();
    Some(handle)
}

fn describe() {
    describe_counter!(
        RECORDS,
        "Log records consumed, by topic and outcome: applied (new row), duplicate (id already stored with the same content), conflicting_duplicate (id stored with different content: kept aside) or dead_lettered."
    );
    describe_counter!(
        BATCHES,
        "Batch transactions, by outcome: committed, fenced (offset compare-and-set lost: stale batch rolled back) or retried (transient error)."
    );
    describe_histogram!(BATCH_RECORDS, "Records per committed batch.");
    describe_histogram!(
        BATCH_COMMIT_SECONDS,
        metrics::Unit::Seconds,
        "Duration of one batch transaction (offsets + rows + totals + dead letters), commit included."
    );
    describe_histogram!(
        BATCH_DECODE_SECONDS,
        metrics::Unit::Seconds,
        "Time spent decoding and validating the records of one batch."
    );
    describe_histogram!(
        END_TO_END_SECONDS,
        metrics::Unit::Seconds,
        "Broker timestamp of a record to the commit of the transaction that applied it."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Records kept in dead_letters because they can never succeed, by topic and reason."
    );
    describe_counter!(
        TRANSIENT_ERRORS,
        "Transient failures that were retried (never dead-lettered), by source: database, registry, broker."
    );
    describe_counter!(
        REBALANCES,
        "Consumer group rebalances seen by this instance, by kind: assign, revoke, error."
    );
    describe_gauge!(
        ASSIGNED_PARTITIONS,
        "Partitions currently assigned to this instance."
    );
    describe_counter!(
        OFFSET_GAPS,
        "Times a partition's next record was beyond the stored offset (retention deleted records before they were read, or transaction markers)."
    );
    describe_gauge!(
        PARTITION_ASSIGNED,
        "1 for each partition this instance owns, 0 after it was revoked."
    );
    describe_counter!(
        LAG_REFRESH_ERRORS,
        "Failed commit-lag refreshes (broker or database unreachable); the lag gauges keep their last value meanwhile."
    );
    describe_gauge!(
        LAG_REFRESHED,
        metrics::Unit::Seconds,
        "Unix time of the last successful commit-lag refresh; an old value means the lag gauges are stale."
    );
    describe_counter!(
        STATUS_CHANGES,
        "Reconciliation status changes, by the status entered and whether it is an exception (anything but MATCHED and EXPECTED)."
    );
    describe_counter!(
        EXCEPTIONS,
        "Exceptions opened (an item entered an exception status) and resolved (it left one); each is one message for the exceptions topic."
    );
    describe_gauge!(
        WATERMARK,
        metrics::Unit::Seconds,
        "The event-time watermark of the last batch (the lowest of the input partitions' highest event times, minus allowed lateness), as Unix time; deadlines are judged against it."
    );
    describe_gauge!(
        WATERMARK_GROUP,
        metrics::Unit::Seconds,
        "The group's event-time watermark as judged after each lag refresh (the lowest contribution of the input partitions that are not idle), as Unix time; 0 while it is held at 1970."
    );
    describe_gauge!(
        WATERMARK_STREAM_TIME,
        metrics::Unit::Seconds,
        "The group's stream time: the highest broker timestamp applied on any input partition (idleness is judged against it, never the wall clock), as Unix time."
    );
    describe_gauge!(
        WATERMARK_PARTITION,
        metrics::Unit::Seconds,
        "An input partition's contribution to the watermark: its highest event time minus the topic's allowed lateness, as Unix time (0: nothing with an event time applied)."
    );
    describe_gauge!(
        WATERMARK_PARTITION_IDLE,
        "1 when the input partition is idle and left out of the watermark (caught up, and empty or quiet for longer than the idle timeout in broker time), else 0."
    );
    describe_gauge!(
        WATERMARK_PARTITION_STANDING,
        "1 for the input partition's current standing: active, behind (records not applied yet), unknown (no fresh high watermark), idle_empty or idle_quiet; 0 for the others."
    );
    describe_gauge!(
        WATERMARK_HOLDING,
        "Input partitions that count in the watermark but have no event time, holding it at 1970: behind or unknown partitions never read yet. Deadlines cannot pass while it is above 0."
    );
    describe_counter!(
        EXCEPTIONS_PUBLISHED,
        "Outbox rows published to the exceptions topic by this instance's relay (acknowledged by the broker)."
    );
    describe_gauge!(
        OUTBOX_PENDING,
        "Outbox rows not yet published, as last seen by the active relay (0 on standby instances)."
    );
    describe_gauge!(
        OUTBOX_OLDEST,
        metrics::Unit::Seconds,
        "Age of the oldest outbox row not yet published to the exceptions topic (0 when none), measured by every instance with the commit lag: it grows when no relay runs or the relay cannot publish."
    );
    describe_gauge!(
        REFERENCE_LOADED,
        metrics::Unit::Seconds,
        "Unix time the reference-data cache was last (re)loaded."
    );
    describe_counter!(
        CONFLICTING_DUPLICATES,
        "Records whose id was already stored with different content, by topic: kept in conflicting_duplicates, the stored row unchanged. Each one is an integrity incident."
    );
    describe_counter!(
        DATABASE_ERRORS,
        "Database errors of the batch transaction, by SQLSTATE (or 'connection') and disposition: retry (the database is unavailable), stop (the schema or permissions are wrong: the service exits), isolate (PostgreSQL refused a record: it is found and dead-lettered)."
    );
    describe_gauge!(
        CONSUMER_STALLED,
        "1 while this instance owns partitions with lag but has committed nothing for pipeline.stall_timeout (or cannot position a partition); /health/ready fails meanwhile."
    );
    describe_gauge!(
        LAST_COMMIT,
        metrics::Unit::Seconds,
        "Unix time of this instance's last committed batch (or of its last assignment, when it has committed nothing since)."
    );
    describe_counter!(
        RECORDS_REREAD,
        "Reconciliation items whose records were re-read because their running state could not be carried forward (reference data that changes their prices, a correction, a missing rate, or an item from before running state)."
    );
    describe_counter!(
        POSITIONING_ERRORS,
        "Failures to position a partition at its stored offset (assign or seek), by operation; each is retried and makes the instance not ready until it succeeds."
    );
    describe_counter!(
        EXCEPTIONS_LOST,
        "Exceptions found on the exceptions topic that the database lost (failover to an asynchronous standby, restore): each is superseded by the next exception of its payment reference (header payrecon-supersedes)."
    );
    describe_counter!(
        DATABASE_SWITCHES,
        "Times the pool moved to another PostgreSQL server of database.url's list because the current one died or turned read-only (a failover)."
    );
    describe_gauge!(
        DATABASE_SERVER,
        "1 for the PostgreSQL server (host:port of database.url, label server) payrecon writes to, 0 for the others it used before."
    );
    describe_gauge!(
        DATABASE_LAST_SWITCH,
        metrics::Unit::Seconds,
        "Unix time of the last switch to another PostgreSQL server."
    );
    describe_gauge!(
        DATABASE_FAILOVER_SECONDS,
        metrics::Unit::Seconds,
        "Of the last switch: seconds from finding the old server gone (or read-only) to connecting to the new primary."
    );
    describe_gauge!(
        COMMIT_LAG,
        "Records behind: partition high watermark minus next_offset committed in PostgreSQL (the exactly-once offsets, not Kafka's)."
    );
    describe_gauge!(
        COMMIT_LAG_SECONDS,
        "Seconds behind: now minus the broker timestamp of the last record committed in PostgreSQL, 0 when the partition is fully committed. Chosen because it needs no extra fetch of the oldest unread record."
    );
}

/// Registers every counter with a known label set at zero, so rates and `increase()` see
/// the first event and dashboards show 0 instead of "no data". `topics` are the input topics.
pub fn register_zeroes(
    topics: &[&str],
    dead_letter_reasons: &[&'static str],
    statuses: &[(&'static str, bool)],
) {
    for outcome in ["committed", "fenced", "retried", "isolated"] {
        counter!(BATCHES, "outcome" => outcome).absolute(0);
    }
    for source in ["database", "registry", "broker", "relay"] {
        counter!(TRANSIENT_ERRORS, "source" => source).absolute(0);
    }
    for kind in ["assign", "revoke", "error"] {
        counter!(REBALANCES, "kind" => kind).absolute(0);
    }
    counter!(LAG_REFRESH_ERRORS).absolute(0);
    counter!(RECORDS_REREAD).absolute(0);
    for (status, exception) in statuses {
        counter!(STATUS_CHANGES, "status" => *status, "exception" => exception_label(*exception))
            .absolute(0);
    }
    for event in ["opened", "resolved"] {
        counter!(EXCEPTIONS, "event" => event).absolute(0);
    }
    counter!(EXCEPTIONS_PUBLISHED).absolute(0);
    gauge!(OUTBOX_PENDING).set(0.0);
    gauge!(ASSIGNED_PARTITIONS).set(0.0);
    for topic in topics {
        for outcome in [
            "applied",
            "duplicate",
            "dead_lettered",
            "conflicting_duplicate",
        ] {
            counter!(RECORDS, "topic" => topic.to_string(), "outcome" => outcome).absolute(0);
        }
        for reason in dead_letter_reasons {
            counter!(DEAD_LETTERS, "topic" => topic.to_string(), "reason" => *reason).absolute(0);
        }
        counter!(OFFSET_GAPS, "topic" => topic.to_string()).absolute(0);
        counter!(CONFLICTING_DUPLICATES, "topic" => topic.to_string()).absolute(0);
    }
    for (sqlstate, disposition) in [("connection", "retry"), ("record", "isolate")] {
        counter!(DATABASE_ERRORS, "sqlstate" => sqlstate, "disposition" => disposition).absolute(0);
    }
    for operation in ["assign", "seek"] {
        counter!(POSITIONING_ERRORS, "operation" => operation).absolute(0);
    }
    gauge!(CONSUMER_STALLED).set(0.0);
    counter!(DATABASE_SWITCHES).absolute(0);
    counter!(EXCEPTIONS_LOST).absolute(0);
}

/// The relay found `n` exceptions on the topic that the database lost.
pub fn exceptions_lost(n: u64) {
    counter!(EXCEPTIONS_LOST).increment(n);
}

/// payrecon writes to PostgreSQL server `server` (host:port).
pub fn database_server(server: &str) {
    gauge!(DATABASE_SERVER, "server" => server.to_owned()).set(1.0);
}

/// The pool moved from server `from` to `to`, `lost_for` after the old one was found gone.
pub fn database_switched(from: &str, to: &str, lost_for: Option<Duration>) {
    counter!(DATABASE_SWITCHES).increment(1);
    gauge!(DATABASE_SERVER, "server" => from.to_owned()).set(0.0);
    database_server(to);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    gauge!(DATABASE_LAST_SWITCH).set(now);
    if let Some(d) = lost_for {
        gauge!(DATABASE_FAILOVER_SECONDS).set(d.as_secs_f64());
    }
}

fn exception_label(exception: bool) -> &'static str {
    if exception { "true" } else { "false" }
}

/// `n` items entered `status` (an exception status or not) in one committed transaction.
pub fn status_changed(status: &'static str, exception: bool, n: u64) {
    counter!(STATUS_CHANGES, "status" => status, "exception" => exception_label(exception))
        .increment(n);
}

/// Exceptions opened and resolved in one committed transaction (outbox rows written).
pub fn exceptions(opened: u64, resolved: u64) {
    counter!(EXCEPTIONS, "event" => "opened").increment(opened);
    counter!(EXCEPTIONS, "event" => "resolved").increment(resolved);
}

/// The watermark a transaction's evaluations used.
pub fn watermark(w: chrono::DateTime<chrono::Utc>) {
    if w > chrono::DateTime::<chrono::Utc>::UNIX_EPOCH {
        gauge!(WATERMARK).set(w.timestamp_millis() as f64 / 1000.0);
    }
}

/// One partition's part in the group's watermark.
pub struct PartitionClock<'a> {
    pub topic: &'a str,
    pub partition: i32,
    /// Highest event time minus the allowed lateness; `None`: nothing with an event time.
    pub contribution: Option<chrono::DateTime<chrono::Utc>>,
    /// Its standing's label (one of `standings`).
    pub standing: &'static str,
    /// Whether the standing leaves it out of the watermark.
    pub idle: bool,
}

/// The watermark was judged (after a lag refresh): the group's, and every partition's part;
/// `standings` is every label a partition's standing can take.
pub fn group_watermark<'a>(
    watermark: chrono::DateTime<chrono::Utc>,
    stream_time: Option<chrono::DateTime<chrono::Utc>>,
    partitions: impl IntoIterator<Item = PartitionClock<'a>>,
    standings: &[&str],
) {
    let seconds = |t: chrono::DateTime<chrono::Utc>| t.timestamp_millis() as f64 / 1000.0;
    gauge!(WATERMARK_GROUP).set(seconds(watermark).max(0.0));
    gauge!(WATERMARK_STREAM_TIME).set(stream_time.map_or(0.0, seconds));
    let mut holding = 0;
    for p in partitions {
        let labels = [
            ("topic", p.topic.to_owned()),
            ("partition", p.partition.to_string()),
        ];
        gauge!(WATERMARK_PARTITION, &labels).set(p.contribution.map_or(0.0, seconds).max(0.0));
        gauge!(WATERMARK_PARTITION_IDLE, &labels).set(if p.idle { 1.0 } else { 0.0 });
        for standing in standings {
            let mut labels = labels.to_vec();
            labels.push(("standing", (*standing).to_owned()));
            let on = p.standing == *standing;
            gauge!(WATERMARK_PARTITION_STANDING, &labels).set(if on { 1.0 } else { 0.0 });
        }
        if !p.idle && p.contribution.is_none() {
            holding += 1;
        }
    }
    gauge!(WATERMARK_HOLDING).set(holding as f64);
}

/// The relay published `n` outbox rows; `pending` remain.
pub fn exceptions_published(n: u64, pending: i64) {
    counter!(EXCEPTIONS_PUBLISHED).increment(n);
    gauge!(OUTBOX_PENDING).set(pending as f64);
}

/// The reference cache was reloaded.
pub fn reference_loaded(unix_seconds: f64) {
    gauge!(REFERENCE_LOADED).set(unix_seconds);
}

/// One batch committed.
pub fn batch_committed(records: u64, commit: Duration, decode: Duration) {
    counter!(BATCHES, "outcome" => "committed").increment(1);
    histogram!(BATCH_RECORDS).record(records as f64);
    histogram!(BATCH_COMMIT_SECONDS).record(commit.as_secs_f64());
    histogram!(BATCH_DECODE_SECONDS).record(decode.as_secs_f64());
}

/// Records applied per topic and outcome.
pub fn records(topic: &str, applied: u64, duplicates: u64) {
    if applied > 0 {
        counter!(RECORDS, "topic" => topic.to_owned(), "outcome" => "applied").increment(applied);
    }
    if duplicates > 0 {
        counter!(RECORDS, "topic" => topic.to_owned(), "outcome" => "duplicate")
            .increment(duplicates);
    }
}

/// Items whose records were re-read to rebuild their running state.
pub fn records_reread(items: u64) {
    counter!(RECORDS_REREAD).increment(items);
}

/// PostgreSQL refused a batch for a reason that may lie in a record; it is being bisected.
pub fn batch_isolating() {
    counter!(BATCHES, "outcome" => "isolated").increment(1);
    counter!(DATABASE_ERRORS, "sqlstate" => "record", "disposition" => "isolate").increment(1);
}

/// A database error of the batch transaction with its disposition (`retry` or `stop`).
pub fn database_error(e: &sqlx::Error, disposition: &'static str) {
    let sqlstate = match e {
        sqlx::Error::Database(db) => db
            .code()
            .map_or_else(|| "unknown".into(), |c| c.into_owned()),
        _ => "connection".to_owned(),
    };
    counter!(DATABASE_ERRORS, "sqlstate" => sqlstate, "disposition" => disposition).increment(1);
}

/// A record whose id is stored with different content was kept.
pub fn conflicting_duplicate(topic: &str) {
    counter!(RECORDS, "topic" => topic.to_owned(), "outcome" => "conflicting_duplicate")
        .increment(1);
    counter!(CONFLICTING_DUPLICATES, "topic" => topic.to_owned()).increment(1);
}

/// Whether this instance is stalled, and when it last committed (or was assigned).
pub fn consumer_progress(stalled: bool, last_commit_unix_seconds: f64) {
    gauge!(CONSUMER_STALLED).set(if stalled { 1.0 } else { 0.0 });
    gauge!(LAST_COMMIT).set(last_commit_unix_seconds);
}

/// Positioning a partition failed (`assign` or `seek`).
pub fn positioning_error(operation: &'static str) {
    counter!(POSITIONING_ERRORS, "operation" => operation).increment(1);
}

/// A batch was rejected by the offset compare-and-set.
pub fn batch_fenced() {
    counter!(BATCHES, "outcome" => "fenced").increment(1);
}

/// A batch transaction failed transiently and will be retried.
pub fn batch_retried() {
    counter!(BATCHES, "outcome" => "retried").increment(1);
}

/// A transient failure from `source` was retried.
pub fn transient_error(source: &'static str) {
    counter!(TRANSIENT_ERRORS, "source" => source).increment(1);
}

/// A record was dead-lettered.
pub fn dead_lettered(topic: &str, reason: &'static str) {
    counter!(RECORDS, "topic" => topic.to_owned(), "outcome" => "dead_lettered").increment(1);
    counter!(DEAD_LETTERS, "topic" => topic.to_owned(), "reason" => reason).increment(1);
}

/// End-to-end latency of one record.
pub fn end_to_end(latency: Duration) {
    histogram!(END_TO_END_SECONDS).record(latency.as_secs_f64());
}

/// A rebalance event of `kind`: `revoked` partitions left this instance, `assigned` are
/// the ones it owns afterwards.
pub fn rebalance<'a>(
    kind: &'static str,
    revoked: impl Iterator<Item = &'a (String, i32)>,
    assigned: impl Iterator<Item = &'a (String, i32)>,
) {
    counter!(REBALANCES, "kind" => kind).increment(1);
    for (topic, partition) in revoked {
        gauge!(PARTITION_ASSIGNED, "topic" => topic.clone(), "partition" => partition.to_string())
            .set(0.0);
    }
    let mut count = 0u32;
    for (topic, partition) in assigned {
        gauge!(PARTITION_ASSIGNED, "topic" => topic.clone(), "partition" => partition.to_string())
            .set(1.0);
        count += 1;
    }
    gauge!(ASSIGNED_PARTITIONS).set(f64::from(count));
}

/// A commit-lag refresh failed.
pub fn lag_refresh_failed() {
    counter!(LAG_REFRESH_ERRORS).increment(1);
}

/// A commit-lag refresh succeeded at `unix_seconds`.
pub fn outbox_oldest_pending(seconds: f64) {
    gauge!(OUTBOX_OLDEST).set(seconds);
}

pub fn lag_refreshed(unix_seconds: f64) {
    gauge!(LAG_REFRESHED).set(unix_seconds);
}

/// A partition skipped offsets.
pub fn offset_gap(topic: &str) {
    counter!(OFFSET_GAPS, "topic" => topic.to_owned()).increment(1);
}

/// Lag of one partition.
pub fn commit_lag(topic: &str, partition: i32, records: i64, seconds: f64) {
    let p = partition.to_string();
    gauge!(COMMIT_LAG, "topic" => topic.to_owned(), "partition" => p.clone()).set(records as f64);
    gauge!(COMMIT_LAG_SECONDS, "topic" => topic.to_owned(), "partition" => p).set(seconds);
}
