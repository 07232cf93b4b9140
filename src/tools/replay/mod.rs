//! `payrecon replay`: re-reads a range of the input topics through the service's own code
//! into a shadow schema and compares the result with the live tables (audit replay).
//!
//! The question it answers: "is what PostgreSQL holds exactly what the event log implies?"
//! Records go through the same path as in the service (decode, enrich as of event time,
//! reconcile, write: [`crate::store::Store::commit_batch`]), but into a schema of their own
//! ([`shadow`]), with reference data from the live database (it is temporal, so lookups as of
//! each event's time give the answers the service got). Then [`compare`] diffs the two
//! schemas, restricted to the range, and [`report`] writes what it finds.
//!
//! It must never disturb the service: its Kafka consumer has a group id of its own, never
//! subscribes and never commits; it writes no live table except its own `audit_runs` row.
//! Two replays of the same range over the same data give identical reports (apart from the
//! `run` object): matching is judged by the event-time watermark, never by the clock.
//!
//! Exit codes: see [`EXIT_CODES`].

mod range;
mod reader;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use sqlx::ConnectOptions;
use tokio_util::sync::CancellationToken;

pub use range::{Mode, PartitionRange, Topics};

use crate::config::Settings;
use crate::engine::Reconciler;
use crate::inputs::Decoder;
use crate::kafka::reader::TopicProbe;
use crate::reference::ReferenceCache;
use crate::store::Store;
use crate::store::audit::{AuditEnd, AuditStart};
use crate::store::compare::Comparison;
use crate::store::shadow::Shadow;
use range::Requested;
use report::{ReportWriter, RunInfo, Summary};

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES: &str = "Exit codes:
  0    everything in the range matches
  3    differences found (listed in the report and the CSV file)
  1    operational error (broker, database, registry, an invalid or vanished range)
  2    usage error (unknown option, malformed value)
  130  interrupted (Ctrl-C / SIGTERM); the shadow schema is dropped";

/// `payrecon replay` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayOptions {
    /// Input topics to replay.
    #[arg(long, value_enum, default_value_t = Topics::All)]
    pub topics: Topics,
    /// First offset (inclusive) per partition: `topic:partition=offset,...`. Only the
    /// partitions named in --from-offsets or --to-offsets are replayed; an unnamed bound is
    /// the log start offset or the group's stored offset.
    #[arg(long, conflicts_with_all = ["from_time", "to_time"])]
    pub from_offsets: Option<String>,
    /// End offset (exclusive) per partition: `topic:partition=offset,...`.
    #[arg(long, conflicts_with_all = ["from_time", "to_time"])]
    pub to_offsets: Option<String>,
    /// Start at the first record whose broker timestamp is at or after this time (RFC 3339),
    /// on every partition.
    #[arg(long)]
    pub from_time: Option<DateTime<Utc>>,
    /// End before the first record whose broker timestamp is at or after this time (default:
    /// the group's stored offsets).
    #[arg(long)]
    pub to_time: Option<DateTime<Utc>>,
    /// The full report, JSON (default `audit-<run id>.json`).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The differences, one CSV line each (default `audit-<run id>-differences.csv`).
    #[arg(long)]
    pub differences_csv: Option<PathBuf>,
    /// Keep the shadow schema for inspection instead of dropping it.
    #[arg(long)]
    pub keep_shadow: bool,
    /// Differences and merchant rows listed on the terminal at most (the files have all).
    #[arg(long, default_value_t = 20)]
    pub show: usize,
    /// Print nothing: no progress, no listing, no result (the exit code and the files tell).
    #[arg(long)]
    pub quiet: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            o: ReplayOptions,
        }
        Wrapper::parse_from(["replay"]).o
    }
}

/// How an audit ended (`audit_runs.result`; ERROR is an `Err`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditResult {
    Match,
    Differences,
    Interrupted,
}

impl AuditResult {
    pub fn as_str(&self) -> &'static str {
        match self {
            AuditResult::Match => "MATCH",
            AuditResult::Differences => "DIFFERENCES",
            AuditResult::Interrupted => "INTERRUPTED",
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            AuditResult::Match => 0,
            AuditResult::Differences => 3,
            AuditResult::Interrupted => 130,
        })
    }
}

/// What a replay found and how fast it went.
#[derive(Debug, Clone)]
pub struct ReplayOutcome {
    pub run_id: String,
    pub result: AuditResult,
    pub records_read: u64,
    pub differences: u64,
    /// `sha256:<hex>` of the report's deterministic part (`None` when interrupted).
    pub digest: Option<String>,
    pub report: PathBuf,
    pub differences_csv: PathBuf,
    pub shadow_schema: String,
    /// The ranges read.
    pub ranges: Vec<PartitionRange>,
    /// From the first record read to the last batch committed in the shadow.
    pub replay_seconds: f64,
    pub records_per_sec: f64,
}

/// The range as recorded in the report and in `audit_runs`.
#[derive(Debug, Clone, Serialize)]
struct RangeReport<'a> {
    mode: Mode,
    topics: Topics,
    from_time: Option<DateTime<Utc>>,
    to_time: Option<DateTime<Utc>>,
    /// Every partition of both topics from offset 0 up to the group's stored offset.
    complete: bool,
    partitions: &'a [PartitionRange],
}

/// The report's opening members.
#[derive(Serialize)]
struct Header<'a> {
    format: &'static str,
    consumer_group: &'a str,
    range: RangeReport<'a>,
    records_read: u64,
}

/// `payrecon replay`: runs until done or Ctrl-C/SIGTERM; maps the outcome to the exit code.
pub async fn command(settings: Settings, options: ReplayOptions) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        crate::app::termination_signal().await;
        signal.cancel();
    });
    let outcome = run(&settings, &options, shutdown).await?;
    if outcome.result == AuditResult::Interrupted {
        eprintln!(
            "replay {} interrupted: shadow schema dropped, no report; recorded as INTERRUPTED",
            outcome.run_id
        );
    }
    Ok(outcome.result.exit_code())
}

/// A run id usable in a schema name: UTC time and a random suffix.
fn new_run_id() -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{}_{}", Utc::now().format("%Y%m%d%H%M%S"), &random[..8])
}

fn requested_by() -> String {
    let user = whoami::fallible::username().unwrap_or_else(|_| "unknown".into());
    let host = whoami::fallible::hostname().unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}

fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Replays and compares; records the run in `audit_runs`. An `Err` is an operational error
/// (the run is recorded as ERROR when the database is reachable).
pub async fn run(
    settings: &Settings,
    options: &ReplayOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<ReplayOutcome> {
    let k = &settings.kafka;
    let names = k.input_topic_names();
    let input_topics: Vec<&str> = names.iter().map(String::as_str).collect();
    let requested = Requested {
        mode: if options.from_time.is_some() || options.to_time.is_some() {
            Mode::Time
        } else if options.from_offsets.is_some() || options.to_offsets.is_some() {
            Mode::Offsets
        } else {
            Mode::Committed
        },
        topics: options.topics,
        from_offsets: (options.from_offsets.as_deref())
            .map(|s| range::parse_offsets(s, &input_topics))
            .transpose()
            .context("--from-offsets")?
            .unwrap_or_default(),
        to_offsets: (options.to_offsets.as_deref())
            .map(|s| range::parse_offsets(s, &input_topics))
            .transpose()
            .context("--to-offsets")?
            .unwrap_or_default(),
        from_time: options.from_time,
        to_time: options.to_time,
    };
    let run_id = new_run_id();
    let schema = format!("audit_{run_id}");
    let report_path =
        (options.report.clone()).unwrap_or_else(|| PathBuf::from(format!("audit-{run_id}.json")));
    let csv_path = (options.differences_csv.clone())
        .unwrap_or_else(|| PathBuf::from(format!("audit-{run_id}-differences.csv")));
    let started_at = Utc::now();
    let live = Store::new(
        settings
            .database
            .pool_options()
            .max_connections(4)
            // The comparison's statements are long by design: no slow-statement warnings.
            .connect_with(
                settings
                    .database
                    .connect_options()?
                    .disable_statement_logging(),
            )
            .await
            .with_context(|| {
                format!(
                    "connecting to PostgreSQL at {}",
                    settings.database.redacted_url()
                )
            })?,
    );
    live.migrate()
        .await
        .context("applying migrations to the live database")?;
    let requested_by = requested_by();
    live.audit_started(&AuditStart {
        id: &run_id,
        requested_by: &requested_by,
        consumer_group: &k.group_id,
        started_at,
        range: serde_json::json!({ "requested": &requested }),
        shadow_schema: &schema,
    })
    .await
    .context("recording the audit run")?;
    if !options.quiet {
        eprintln!(
            "audit replay {run_id} of group {} by {requested_by}; shadow schema {schema}",
            k.group_id
        );
    }
    let job = Job {
        settings,
        options,
        live: &live,
        run_id: &run_id,
        schema: &schema,
        requested: &requested,
        report_path: &report_path,
        csv_path: &csv_path,
        requested_by: &requested_by,
        started_at,
    };
    let result = job.replay(&shutdown).await;
    let record = match &result {
        Ok(o) => {
            let end = AuditEnd {
                records_read: o.records_read as i64,
                differences: (o.result != AuditResult::Interrupted).then_some(o.differences as i64),
                result: o.result.as_str(),
                digest: o.digest.as_deref(),
                partitions: serde_json::to_value(&o.ranges)?,
            };
            live.audit_finished(&run_id, &end).await
        }
        Err(e) => live.audit_failed(&run_id, &format!("{e:#}")).await,
    };
    live.pool().close().await;
    let outcome = result?;
    record.context("recording the audit run's result")?;
    Ok(outcome)
}

/// One replay's parameters.
struct Job<'a> {
    settings: &'a Settings,
    options: &'a ReplayOptions,
    live: &'a Store,
    run_id: &'a str,
    schema: &'a str,
    requested: &'a Requested,
    report_path: &'a PathBuf,
    csv_path: &'a PathBuf,
    requested_by: &'a str,
    started_at: DateTime<Utc>,
}

impl Job<'_> {
    /// The replay's own Kafka consumer group (it never commits).
    fn consumer_group(&self) -> String {
        format!("payrecon-replay-{}", self.run_id)
    }

    async fn replay(&self, shutdown: &CancellationToken) -> anyhow::Result<ReplayOutcome> {
        let settings = self.settings;
        let k = &settings.kafka;
        let group = k.group_id.as_str();
        let names = k.input_topic_names();
        let input_topics: Vec<&str> = names.iter().map(String::as_str).collect();
        let committed = self.live.group_offsets(group).await?;
        if committed.is_empty() {
            // A mistyped or defaulted group would replay nothing and report every live row as
            // "extra in live": say what is wrong instead.
            let groups = self.live.consumer_groups().await?;
            anyhow::ensure!(
                groups.is_empty(),
                "consumer group `{group}` has no stored offsets in this database; groups here: {} \
                 (set kafka.group_id, e.g. PAYRECON_KAFKA__GROUP_ID)",
                groups.join(", ")
            );
        }
        let plans = {
            let probe = TopicProbe::new(&settings.kafka, &self.consumer_group())?;
            range::plan(&probe, &input_topics, self.requested, &committed)?
        };
        let input_partitions = crate::kafka::partition_count(&k.client_config(), &input_topics)?;
        let sr = settings.registry.client()?;
        let codec = Decoder::new(sr).with_limits(settings.validation.limits());
        // Reference data from the live database: its versions are temporal, so lookups as of
        // each event's time give what the service got.
        let cache = Arc::new(ReferenceCache::default());
        cache
            .reload(self.live)
            .await
            .context("loading reference data")?;
        // The service's partition count, whatever is replayed: the watermark must wait for
        // the same partitions as in the service, or a partial replay could judge deadlines
        // the service had not reached.
        // Each partition's log ends where its range ends: a partition is caught up (so it may
        // be idle) once the replay has read its whole range, as the live partitions were
        // caught up at the end of the run. Idleness then uses the same broker timestamps.
        let ends = plans
            .iter()
            .map(|p| {
                let end = crate::reconcile::LogEnd {
                    low: p.start.min(p.limit),
                    high: p.limit,
                    seen_up_to: None,
                    capped: false,
                };
                ((p.topic.clone(), p.partition), end)
            })
            .collect();
        let reconciler = Reconciler::new(&settings.reconciliation, cache, Some(input_partitions))
            .with_log_ends(Arc::new(crate::engine::LogEnds::fixed(ends)))
            .with_payout_leg(!k.payouts_topic.is_empty());

        let shadow = Shadow::create(&settings.database, self.live, self.schema).await?;
        let result = self
            .replay_into(&shadow, &codec, reconciler, plans, shutdown)
            .await;
        let keep = self.options.keep_shadow
            && matches!(&result, Ok(o) if o.result != AuditResult::Interrupted);
        if keep {
            if !self.options.quiet {
                eprintln!("shadow schema kept: {}", self.schema);
            }
        } else if let Err(e) = shadow.drop_schema(self.live).await {
            tracing::warn!(error = %format!("{e:#}"), "could not drop the shadow schema");
        }
        if matches!(&result, Ok(o) if o.result == AuditResult::Interrupted) || result.is_err() {
            let _ = std::fs::remove_file(self.report_path);
            let _ = std::fs::remove_file(self.csv_path);
        }
        result
    }

    async fn replay_into(
        &self,
        shadow: &Shadow,
        codec: &crate::inputs::Decoder,
        reconciler: Reconciler,
        plans: Vec<range::Plan>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<ReplayOutcome> {
        let settings = self.settings;
        let k = &settings.kafka;
        let group = k.group_id.as_str();
        let names = k.input_topic_names();
        let input_topics: Vec<&str> = names.iter().map(String::as_str).collect();
        let reader = reader::Reader {
            settings,
            codec,
            shadow: shadow.store.clone(),
            reconciler: reconciler.clone(),
            group: group.to_owned(),
            instance: format!("replay-{}/{}", self.run_id, crate::instance::instance_id()),
            consumer_group: self.consumer_group(),
            quiet: self.options.quiet,
        };
        let read = reader.run(plans, shutdown).await?;
        let interrupted = |read: &reader::ReadOutcome| ReplayOutcome {
            run_id: self.run_id.to_owned(),
            result: AuditResult::Interrupted,
            records_read: read.records,
            differences: 0,
            digest: None,
            report: self.report_path.clone(),
            differences_csv: self.csv_path.clone(),
            shadow_schema: self.schema.to_owned(),
            ranges: read.ranges.clone(),
            replay_seconds: read.elapsed.as_secs_f64(),
            records_per_sec: 0.0,
        };
        if read.interrupted || shutdown.is_cancelled() {
            return Ok(interrupted(&read));
        }
        let ranges: Vec<(&str, i32, i64, i64)> = (read.ranges.iter())
            .map(|r| (r.topic.as_str(), r.partition, r.from, r.to))
            .collect();
        shadow.write_range(&ranges).await?;
        // A range that is not the whole log the group applied is judged at the live
        // watermark: its verdicts depend on records outside the range.
        let live_now = self.live.group_offsets(group).await?;
        let both = self.requested.topics == Topics::All;
        let whole =
            both && read.ranges.iter().all(|r| {
                r.from == 0
                    && r.to
                        == live_now
                            .get(&(r.topic.clone(), r.partition))
                            .copied()
                            .unwrap_or(0)
            }) && live_now
                .keys()
                .filter(|(t, _)| input_topics.contains(&t.as_str()))
                .all(|(t, p)| {
                    read.ranges
                        .iter()
                        .any(|r| &r.topic == t && r.partition == *p)
                });
        if !whole {
            let times = self.live.event_times(group, &input_topics).await?;
            shadow.align_watermark(group, &times).await?;
        }
        // What the service's background task does every second: judge the items the
        // watermark made due, until none is left.
        let instance = format!("replay-{}", self.run_id);
        loop {
            let outcome = crate::engine::sweeps::reevaluate_due(
                &shadow.store,
                group,
                &instance,
                &reconciler,
                1000,
            )
            .await?;
            if outcome.evaluated == 0 {
                break;
            }
        }
        shadow.analyze().await?;
        let records_per_sec = read.records as f64 / read.elapsed.as_secs_f64().max(1e-9);

        if !self.options.quiet {
            eprintln!("replay: comparing with the live tables");
        }
        let compared = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            r = self.compare(shadow, &read, both) => Some(r?),
        };
        let Some((digest, differences)) = compared else {
            return Ok(interrupted(&read));
        };
        let result = if differences == 0 {
            AuditResult::Match
        } else {
            AuditResult::Differences
        };
        let outcome = ReplayOutcome {
            run_id: self.run_id.to_owned(),
            result,
            records_read: read.records,
            differences,
            digest: Some(digest),
            report: self.report_path.clone(),
            differences_csv: self.csv_path.clone(),
            shadow_schema: self.schema.to_owned(),
            ranges: read.ranges.clone(),
            replay_seconds: read.elapsed.as_secs_f64(),
            records_per_sec,
        };
        self.print_result(&outcome);
        Ok(outcome)
    }

    /// Streams the comparison into the report files; returns the digest and the number of
    /// differences.
    async fn compare(
        &self,
        shadow: &Shadow,
        read: &reader::ReadOutcome,
        both: bool,
    ) -> anyhow::Result<(String, u64)> {
        let k = &self.settings.kafka;
        let names = k.input_topic_names();
        let input_topics: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut c =
            Comparison::begin(self.live, &shadow.schema, &k.group_id, &input_topics, both).await?;
        let mut out = ReportWriter::create(
            self.report_path,
            self.csv_path,
            self.options.show,
            self.options.quiet,
        )?;
        let range = RangeReport {
            mode: self.requested.mode,
            topics: self.requested.topics,
            from_time: self.requested.from_time,
            to_time: self.requested.to_time,
            complete: c.complete,
            partitions: &read.ranges,
        };
        if !self.options.quiet {
            print_range(&range, read.records);
        }
        out.header(&Header {
            format: "payrecon-audit/1",
            consumer_group: &k.group_id,
            range,
            records_read: read.records,
        })?;
        let (live_rows, replay_rows) = c.counts().await?;
        c.merchant_totals(&mut out).await?;
        out.begin_differences()?;
        c.rows(&mut out).await?;
        c.dead_letters(&mut out).await?;
        c.conflicting_duplicates(&mut out).await?;
        let (compared, not_comparable, apart) = c.items(&mut out).await?;
        c.daily_totals(&mut out).await?;
        let (payouts_compared, payouts_not_comparable, payouts_apart) =
            c.payout_items(&mut out).await?;
        c.payout_daily_totals(&mut out).await?;
        c.end().await?;
        let differences = out.differences;
        let summary = Summary {
            result: if differences == 0 {
                "MATCH"
            } else {
                "DIFFERENCES"
            },
            differences,
            by_kind: out.by_kind.clone(),
            references_compared: compared,
            references_not_comparable: not_comparable,
            references_judged_at_different_watermarks: apart,
            payout_items_compared: payouts_compared,
            payout_items_not_comparable: payouts_not_comparable,
            payout_items_judged_at_different_watermarks: payouts_apart,
            live_rows_in_range: live_rows,
            replay_rows,
        };
        let run = RunInfo {
            id: self.run_id.to_owned(),
            requested_by: self.requested_by.to_owned(),
            started_at: time_text(self.started_at),
            finished_at: time_text(Utc::now()),
            shadow_schema: self.schema.to_owned(),
            shadow_kept: self.options.keep_shadow,
            replay_seconds: (read.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            replay_records_per_sec: (read.records as f64 / read.elapsed.as_secs_f64().max(1e-9))
                .round(),
            report: self.report_path.display().to_string(),
            differences_csv: self.csv_path.display().to_string(),
        };
        if !self.options.quiet && (not_comparable > 0 || apart > 0) {
            println!(
                "reconciliation items: {compared} references compared; {not_comparable} not comparable (records outside the range), {apart} judged at different watermarks (not differences)"
            );
        }
        let digest = out.finish(&summary, &run)?;
        Ok((digest, differences))
    }

    fn print_result(&self, o: &ReplayOutcome) {
        if self.options.quiet {
            return;
        }
        let kinds = if o.differences > 0 {
            " (see the report)"
        } else {
            ""
        };
        println!();
        match o.result {
            AuditResult::Match => println!(
                "RESULT: MATCH: the live tables hold exactly what the log implies for this range ({} records read, {:.0} records/s)",
                o.records_read, o.records_per_sec
            ),
            _ => println!(
                "RESULT: DIFFERENCES: {} difference(s){kinds} ({} records read, {:.0} records/s)",
                o.differences, o.records_read, o.records_per_sec
            ),
        }
        println!(
            "report {} ({}), differences {}",
            o.report.display(),
            o.digest.as_deref().unwrap_or("-"),
            o.differences_csv.display()
        );
    }
}

/// The range on the terminal.
fn print_range(range: &RangeReport<'_>, records: u64) {
    let partitions: Vec<String> = range
        .partitions
        .iter()
        .map(|p| format!("{}[{}] {}..{}", p.topic, p.partition, p.from, p.to))
        .collect();
    let mode = match range.mode {
        Mode::Committed => "up to the group's stored offsets",
        Mode::Offsets => "offsets",
        Mode::Time => "broker time",
    };
    println!(
        "range ({mode}{}): {}",
        if range.complete {
            ", complete: every partition from 0 to the group's stored offset"
        } else {
            ", partial"
        },
        partitions.join(", ")
    );
    println!("records read: {records}");
}
