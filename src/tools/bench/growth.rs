//! `payrecon bench --prefill N`: the end-to-end stages on an empty database and on one that
//! already holds N records of history, in one run, so the two can be compared as a ratio.
//!
//! For each of the two databases: the backlog (`--payments`) through the embedded Kafka and
//! the real service loop (records/s from first to last commit), then `--rate` records/s for
//! `--latency-duration` (broker timestamp → commit, p50/p99), then the size and dead tuples
//! of every table after that sustained run. The history is generated inside PostgreSQL
//! (`store::growth`, `INSERT ... SELECT generate_series`), not through Kafka, and vacuumed and
//! analysed as autovacuum would have left it. On the prefilled database the statements that
//! run per batch, per sweep, per relay round and per report are then explained
//! (`EXPLAIN (ANALYZE, BUFFERS)`): their time, buffers and every sequential scan, the plans in
//! full with `--plans-out FILE`.

use super::*;
use crate::store::growth::{self, TableSize};

/// The measurements on one database.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrowthRun {
    /// Records of history in the database before the stage (0: empty).
    pub prefilled_records: u64,
    /// Seconds the history took to generate, vacuum and analyse.
    pub prefill_secs: f64,
    pub end_to_end_records_per_sec: f64,
    pub latency_p50_ms: u64,
    pub latency_p99_ms: u64,
    pub latency_max_ms: u64,
    /// Every table after the latency run.
    pub tables: Vec<TableSize>,
}

/// One statement's plan at size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanFigure {
    pub name: String,
    pub execution_ms: f64,
    /// Shared buffers hit + read by the plan's top node.
    pub buffers: u64,
    /// Tables read by a sequential scan.
    pub seq_scans: Vec<String>,
}

/// The two runs and the plans.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrowthReport {
    pub empty: GrowthRun,
    pub prefilled: GrowthRun,
    pub throughput_ratio: f64,
    pub plans: Vec<PlanFigure>,
}

/// Payments of history for `records` records: ~2.2 records each (a capture, a refund for
/// one in ten, their settlement lines), plus a payout per settlement batch.
fn payments_for(records: u64) -> i64 {
    (records as f64 / 2.2).ceil() as i64
}

/// Runs the growth stage.
pub(super) async fn run(
    mut settings: Settings,
    admin: &PgConnectOptions,
    o: &BenchOptions,
    prefill: u64,
) -> anyhow::Result<GrowthReport> {
    let sim = SimulationOptions {
        payments: o.payments,
        malformed: 0,
        payouts: false,
        ..SimulationOptions::default()
    };
    let (records, _) = crate::tools::simulate::generate(&sim, 1)?;
    let start = sim
        .start_time
        .unwrap_or_else(|| "2026-01-01T00:00:00Z".parse().expect("a time"));
    println!(
        "payrecon bench --prefill {prefill}: backlog {} records, then {} records/s for {:?}, on an empty database and on {prefill} records of history ({} days before {start})",
        records.len(),
        o.rate,
        o.latency_duration,
        o.prefill_days
    );
    let cluster = EmbeddedKafka::start()?;
    let (registry_url, _registry) = crate::registry::spawn_local(crate::registry::RegistryConfig {
        storage: crate::registry::Storage::Memory,
    })
    .await?;
    settings.kafka.bootstrap_servers = cluster.bootstrap_servers();
    settings.registry.url = registry_url;
    settings.http.listen = "127.0.0.1:0".parse()?;
    // Both databases first, the history generated; then the two measurements back to back,
    // so the machine's load is alike for both (the prefill takes minutes to hours).
    let mut prepared = Vec::new();
    for (tag, history) in [("growth_empty", 0u64), ("growth_full", prefill)] {
        let empty = history == 0;
        let stage = Stage {
            tag,
            group: if empty {
                "bench-growth-empty"
            } else {
                "bench-growth-full"
            },
            topics: if empty {
                (
                    "bench.growth.empty.payments",
                    "bench.growth.empty.settlements",
                )
            } else {
                (
                    "bench.growth.full.payments",
                    "bench.growth.full.settlements",
                )
            },
            refuse_psp: false,
        };
        let mut settings = settings.clone();
        // Each stage's relay scans its own exceptions topic's tail.
        settings.exceptions.topic = format!("{}.exceptions", stage.topics.0);
        cluster.create_topic(&settings.exceptions.topic, 1)?;
        let (db, encoder) = stage
            .prepare(&mut settings, admin, &cluster, &sim, o.partitions)
            .await?;
        // The prefill's statements run for seconds each: not worth a slow-statement warning.
        let options: PgConnectOptions = crate::store::database_url(admin, &db).parse()?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(sqlx::ConnectOptions::disable_statement_logging(options))
            .await?;
        let started = Instant::now();
        if history > 0 {
            prefill_history(&pool, history, o.prefill_days, start).await?;
        }
        let prefill_secs = round1(started.elapsed().as_secs_f64());
        prepared.push((stage, settings, db, encoder, pool, history, prefill_secs));
    }
    let mut runs = Vec::new();
    let mut plans = Vec::new();
    for (stage, settings, db, encoder, pool, history, prefill_secs) in prepared {
        let Backlog {
            producer,
            shutdown,
            service,
            mut events,
            rate,
        } = stage.consume_backlog(&settings, &encoder, &records).await?;
        let histogram = paced_latency(
            &producer,
            &encoder,
            stage.topics,
            &mut events,
            o.rate,
            o.latency_duration,
        )
        .await?;
        shutdown.cancel();
        service.await??;
        tokio::time::sleep(Duration::from_millis(700)).await; // the backends' last report
        let tables = growth::table_sizes(&pool).await?;
        let run = GrowthRun {
            prefilled_records: history,
            prefill_secs,
            end_to_end_records_per_sec: rate.round(),
            latency_p50_ms: histogram.value_at_quantile(0.50),
            latency_p99_ms: histogram.value_at_quantile(0.99),
            latency_max_ms: histogram.max(),
            tables,
        };
        println!(
            "{:<10} end-to-end {:>8.0} records/s; latency @ {} records/s p50 {} ms, p99 {} ms, max {} ms",
            if history == 0 { "empty:" } else { "prefilled:" },
            run.end_to_end_records_per_sec,
            o.rate,
            run.latency_p50_ms,
            run.latency_p99_ms,
            run.latency_max_ms
        );
        print_tables(&run.tables);
        if history > 0 {
            plans = explain_plans(&pool, start, o.prefill_days, o.plans_out.as_deref()).await?;
        }
        pool.close().await;
        if o.keep_databases {
            println!("kept database {db}");
        } else {
            let _ = crate::store::drop_database(admin, &db).await;
        }
        runs.push(run);
    }
    let prefilled = runs.pop().expect("two runs");
    let empty = runs.pop().expect("two runs");
    let ratio = prefilled.end_to_end_records_per_sec / empty.end_to_end_records_per_sec.max(1.0);
    println!(
        "growth: {:.0} -> {:.0} records/s ({:.2}x) and p99 {} -> {} ms on {} records of history",
        empty.end_to_end_records_per_sec,
        prefilled.end_to_end_records_per_sec,
        ratio,
        empty.latency_p99_ms,
        prefilled.latency_p99_ms,
        prefill
    );
    let report = GrowthReport {
        empty,
        prefilled,
        throughput_ratio: round3(ratio),
        plans,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(report)
}

/// Generates `records` records of history over `days` days ending at `end`, in chunks of
/// 500,000 payments, then the payouts and totals, then `VACUUM (ANALYZE)`.
async fn prefill_history(
    pool: &sqlx::PgPool,
    records: u64,
    days: u64,
    end: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    let total = payments_for(records);
    let span = days as f64 * 86_400.0;
    let started = Instant::now();
    let chunk = 500_000i64;
    let mut from = 0i64;
    while from < total {
        let to = (from + chunk).min(total);
        growth::prefill_chunk(pool, (from, to, total), span, end)
            .await
            .context("prefill")?;
        from = to;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "  prefill: {from} of {total} payments ({:.0} s, {:.0} payments/s)",
            secs,
            from as f64 / secs
        );
    }
    growth::prefill_finish(pool).await.context("prefill")?;
    let generated = started.elapsed().as_secs_f64();
    growth::vacuum_analyze(pool).await?;
    println!(
        "  prefill: {total} payments of history generated in {generated:.0} s, vacuumed and analysed in {:.0} s",
        started.elapsed().as_secs_f64() - generated
    );
    Ok(())
}

/// `rate` records/s for `duration` through the running service: broker timestamp → commit.
async fn paced_latency(
    producer: &crate::kafka::producer::FutureProducer,
    encoder: &crate::inputs::Encoder,
    (payments, settlements): (&str, &str),
    events: &mut mpsc::UnboundedReceiver<LoopEvent>,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Histogram<u64>> {
    let count = (rate as f64 * duration.as_secs_f64()) as u64;
    let sim = SimulationOptions {
        payments: count / 2 + 1,
        seed: 7,
        malformed: 0,
        payouts: false,
        ..SimulationOptions::default()
    };
    let (mut paced, _) = crate::tools::simulate::generate(&sim, 1)?;
    paced.truncate(count as usize);
    let topics = [payments, settlements];
    let producing =
        crate::tools::simulate::produce(producer, encoder, &topics, &paced, rate, |_| {});
    let consuming = async { super::latencies(events, paced.len() as u64).await };
    let (produced, histogram) = tokio::join!(producing, consuming);
    produced?;
    histogram
}

/// The tables that matter for growth and bloat: the largest, and the updated ones.
fn print_tables(tables: &[TableSize]) {
    let mib = |b: i64| b as f64 / 1_048_576.0;
    for t in tables
        .iter()
        .filter(|t| t.total_bytes >= 1_048_576 || t.dead_tuples > 0)
    {
        println!(
            "    {:<36} {:>11} live {:>9} dead {:>9.1} MiB ({:.1} MiB heap) {} vacuums",
            t.table,
            t.live_tuples,
            t.dead_tuples,
            mib(t.total_bytes),
            mib(t.heap_bytes),
            t.autovacuums
        );
    }
}

/// Explains [`growth::PLANS`] on the prefilled database: a day in the middle of the history,
/// references and batches from it, the watermark at the end of the bench's simulation.
async fn explain_plans(
    pool: &sqlx::PgPool,
    end: chrono::DateTime<chrono::Utc>,
    days: u64,
    out: Option<&std::path::Path>,
) -> anyhow::Result<Vec<PlanFigure>> {
    let day = (end - chrono::Duration::days(days as i64 / 2)).date_naive();
    let refs = (0..50)
        .map(|i| format!("pf-p-{:010}", 1_000_003 + i * 7))
        .collect::<Vec<_>>()
        .join(",");
    let batches = format!("pf-b-merchant-003-{}-EUR", day.format("%Y%m%d"));
    let watermark = (end + chrono::Duration::days(11)).to_rfc3339();
    let mut figures = Vec::new();
    let mut full = String::new();
    println!("  plans at size (EXPLAIN (ANALYZE, BUFFERS)):");
    for (name, sql) in growth::PLANS {
        let sql = sql
            .replace("{watermark}", &watermark)
            .replace("{day}", &day.to_string())
            .replace("{refs}", &format!("{{{refs}}}"))
            .replace("{batches}", &format!("{{{batches}}}"));
        let plan = growth::explain(pool, &sql).await?;
        let figure = summarize(name, &plan);
        println!(
            "    {:>9.2} ms {:>8} buffers  {}{}",
            figure.execution_ms,
            figure.buffers,
            name,
            if figure.seq_scans.is_empty() {
                String::new()
            } else {
                format!("  SEQ SCAN on {}", figure.seq_scans.join(", "))
            }
        );
        let _ = writeln!(full, "-- {name}\n{sql}\n{}\n", plan.join("\n"));
        figures.push(figure);
    }
    if let Some(path) = out {
        std::fs::write(path, full).with_context(|| format!("writing {}", path.display()))?;
        println!("  plans written to {}", path.display());
    }
    Ok(figures)
}

/// A plan's execution time, its top node's buffers and its sequential scans.
fn summarize(name: &str, plan: &[String]) -> PlanFigure {
    let execution_ms = plan
        .iter()
        .find_map(|l| l.trim().strip_prefix("Execution Time: "))
        .and_then(|l| l.trim_end_matches(" ms").parse().ok())
        .unwrap_or(0.0);
    let buffers = plan
        .iter()
        .find_map(|l| l.trim().strip_prefix("Buffers: shared "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|part| part.split_once('='))
                .filter(|(k, _)| matches!(*k, "hit" | "read"))
                .filter_map(|(_, v)| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let mut seq_scans: Vec<String> = plan
        .iter()
        .filter_map(|l| l.split_once("Seq Scan on ").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_owned))
        .collect();
    seq_scans.sort();
    seq_scans.dedup();
    PlanFigure {
        name: name.to_owned(),
        execution_ms,
        buffers,
        seq_scans,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_summary_names_its_time_buffers_and_sequential_scans() {
        let plan: Vec<String> = [
            "Aggregate  (cost=1.00..2.00 rows=1 width=8) (actual time=0.1..5.5 rows=1 loops=1)",
            "  Buffers: shared hit=120 read=30",
            "  ->  Seq Scan on reconciliation_items i  (cost=0.00..1.00 rows=1 width=0)",
            "  ->  Parallel Seq Scan on reconciliation_items  (cost=0.00..1.00 rows=1 width=0)",
            "        Buffers: shared hit=7",
            "Planning Time: 0.2 ms",
            "Execution Time: 5.512 ms",
        ]
        .map(String::from)
        .to_vec();
        let f = summarize("x", &plan);
        assert_eq!(f.execution_ms, 5.512);
        assert_eq!(f.buffers, 150);
        assert_eq!(f.seq_scans, ["reconciliation_items"]);
        assert!(summarize("y", &plan[..2]).seq_scans.is_empty());
    }

    #[test]
    fn history_is_sized_in_payments_of_about_two_records() {
        assert_eq!(payments_for(50_000_000), 22_727_273);
        assert_eq!(payments_for(0), 0);
    }
}
