//! `payrecon report`: the reconciliation report of one business day, the open exceptions and
//! the per-merchant totals, read from the reporting views of
//! `migrations/20261126000004_reporting_views.sql` (`open_exceptions`,
//! `merchant_daily_report`), printed as aligned tables or as one JSON document. `--verify`
//! also checks every derived table (running totals, daily totals, reconciliation items and
//! their history, the exceptions outbox, the stored offsets) against what it derives from
//! ([`Store::verify`]; each check and what it proves is listed in [`crate::store::CHECKS`]).
//!
//! It only reads: it never writes, and does not migrate either, so a read-only role can run
//! it. The report's queries run in one REPEATABLE READ READ ONLY transaction, so exceptions
//! and totals come from the same snapshot even while the service commits batches; the
//! verification reads a snapshot of its own (one for all its checks).
//! Money is never a float: amounts are [`Decimal`]s shown with (at least) their currency's
//! minor units, and JSON carries them as decimal strings.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::config::Settings;
use crate::domain::Currency;
use crate::reference::SnapshotBuilder;
use crate::store::{Check, Rules, Store};

pub use crate::store::report::{MerchantDay, OpenException, OpenPayoutException, PayoutDay};

/// The exit codes of `payrecon report`, shown at the end of its `--help`.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  the report was printed (with --verify: every check passed)
  1  error: database unreachable, or the reporting views are missing (run `payrecon migrate`)
  2  with --verify: a derived table differs from what it derives from (the failed checks and
     their differing rows are printed). Invalid arguments also exit 2, with a usage message
     on stderr.";

/// Options of `payrecon report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportOptions {
    /// Business day to report, as a UTC date (YYYY-MM-DD). Default: the latest business_date
    /// in merchant_daily_totals (of --merchant, when given).
    #[arg(long, value_name = "YYYY-MM-DD")]
    pub date: Option<NaiveDate>,
    /// Only this merchant.
    #[arg(long, value_name = "ID")]
    pub merchant: Option<String>,
    /// Print one JSON document instead of tables (amounts as decimal strings).
    #[arg(long)]
    pub json: bool,
    /// Show at most this many open exceptions, largest absolute difference first (the total
    /// is always given).
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(i64).range(0..))]
    pub limit: i64,
    /// Also check every derived table against what it derives from (running and daily
    /// totals, reconciliation items, history, exceptions outbox, stored offsets; every day,
    /// every merchant) and exit 2 if any differs.
    #[arg(long)]
    pub verify: bool,
    /// Also show the event-time watermark per input partition: which partitions count in
    /// it and which are idle and why (reads the partitions' log ends from the broker, as
    /// the service does).
    #[arg(long)]
    pub watermark: bool,
}

/// The report of one business day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The day reported; `None` when there is no daily total yet and no `--date` was given.
    pub business_date: Option<NaiveDate>,
    /// The merchant filter, if any.
    pub merchant: Option<String>,
    /// Open exceptions of the day (and merchant) in all, before the limit: tells a reader
    /// whether `open_exceptions` is the whole list.
    pub open_exceptions_total: i64,
    /// Open exceptions, largest absolute difference first (unknown differences last).
    pub open_exceptions: Vec<OpenException>,
    /// One row per merchant and currency with totals on the day, by merchant.
    pub merchants: Vec<MerchantDay>,
    /// The payout leg on the day: settlement batches (and unexplained credits) per merchant,
    /// currency and status (view `payout_status_summary`).
    pub payouts: Vec<PayoutDay>,
    /// Open payout exceptions of the day, largest absolute difference first, at most the
    /// limit (view `open_payout_exceptions`).
    pub open_payout_exceptions: Vec<OpenPayoutException>,
    /// With `--verify` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    /// With `--watermark` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark: Option<WatermarkReport>,
    /// The most recent file imports and rejections (`payrecon import`), newest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub imports: Vec<crate::files::import::ImportRow>,
}

/// The group's watermark as the service judges it now (see `reconcile::watermark`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WatermarkReport {
    pub consumer_group: String,
    /// Deadlines before it have passed; the Unix epoch while it is held.
    pub watermark: DateTime<Utc>,
    /// The highest broker timestamp applied on any input partition.
    pub stream_time: Option<DateTime<Utc>>,
    pub partitions: Vec<PartitionWatermarkRow>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionWatermarkRow {
    pub topic: String,
    pub partition: i32,
    /// active, behind, unknown (count in the watermark); idle_empty, idle_quiet (do not).
    pub standing: &'static str,
    /// Records not applied yet (`behind` only).
    pub records_behind: Option<i64>,
    /// Highest event time minus the topic's allowed lateness.
    pub contribution: Option<DateTime<Utc>>,
}

impl PayoutDay {
    fn in_minor_units(mut self) -> Self {
        payout_amounts_in_minor_units(
            self.currency.as_deref(),
            [&mut self.expected_net, &mut self.paid, &mut self.difference],
        );
        self
    }
}

impl OpenPayoutException {
    fn in_minor_units(mut self) -> Self {
        payout_amounts_in_minor_units(
            self.currency.as_deref(),
            [&mut self.expected_net, &mut self.paid, &mut self.difference],
        );
        self
    }
}

/// A payout row's amounts with their currency's minor units (none for mixed currencies).
fn payout_amounts_in_minor_units(currency: Option<&str>, amounts: [&mut Option<Decimal>; 3]) {
    if let Some(c) = currency {
        for a in amounts {
            *a = a.map(|a| money(a, c));
        }
    }
}

/// The outcome of `--verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Whether every check passed.
    pub consistent: bool,
    /// Every check, passed or not, in the order of [`crate::store::CHECKS`].
    pub checks: Vec<Check>,
}

impl Verification {
    /// The checks that found a difference.
    pub fn failed(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.passed())
    }
}

/// `payrecon report`: prints the report (and the verification) and returns the exit code
/// described by [`EXIT_CODES`].
pub async fn run(settings: &Settings, options: ReportOptions) -> anyhow::Result<ExitCode> {
    // One attempt, unlike the service's connect_store which waits for the database forever:
    // a report run by hand or from cron should fail, not hang.
    let pool = settings
        .database
        .pool_options()
        .max_connections(2)
        .connect_with(settings.database.connect_options()?)
        .await
        .with_context(|| format!("connecting to {}", settings.database.redacted_url()))?;
    let store = Store::new(pool);
    let rules = Rules::from_settings(&settings.reconciliation);
    let mut result = report(&store, &options, &rules).await;
    if let (Ok(r), true) = (&mut result, options.watermark) {
        r.watermark = Some(watermark(settings, &store).await?);
    }
    if let Ok(r) = &mut result {
        r.imports = crate::files::import::recent(store.pool(), 20).await?;
    }
    store.pool().close().await;
    let report = result?;
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(match &report.verification {
        Some(v) if !v.consistent => ExitCode::from(2),
        _ => ExitCode::SUCCESS,
    })
}

async fn report(store: &Store, options: &ReportOptions, rules: &Rules) -> anyhow::Result<Report> {
    let mut report = build(
        store,
        options.date,
        options.merchant.as_deref(),
        options.limit,
    )
    .await
    .map_err(explain)?;
    if options.verify {
        report.verification = Some(verify(store, rules).await.map_err(explain)?);
    }
    Ok(report)
}

/// The watermark report: [`judged_watermark`] with every partition's standing.
async fn watermark(settings: &Settings, store: &Store) -> anyhow::Result<WatermarkReport> {
    let group = settings.kafka.group_id.clone();
    let w = judged_watermark(settings, store).await?;
    Ok(WatermarkReport {
        consumer_group: group,
        watermark: w.watermark,
        stream_time: w.stream_time,
        partitions: (w.partitions.iter())
            .map(|p| PartitionWatermarkRow {
                topic: p.topic.clone(),
                partition: p.partition,
                standing: p.standing.as_str(),
                records_behind: match p.standing {
                    crate::reconcile::watermark::Standing::Behind { records } => Some(records),
                    _ => None,
                },
                contribution: p.contribution,
            })
            .collect(),
    })
}

/// Judges the watermark as the service does: the group's highest event time, then the
/// partitions' log ends from the broker, then the stored offsets (reports; the demo waits on
/// it for the last deadlines to be judged).
pub async fn judged_watermark(
    settings: &Settings,
    store: &Store,
) -> anyhow::Result<crate::reconcile::GroupWatermark> {
    let group = settings.kafka.group_id.clone();
    let seen_up_to = store.highest_event_time(&group).await?;
    let kafka = settings.kafka.clone();
    let ends = tokio::task::spawn_blocking(move || crate::kafka::lag::log_ends(&kafka))
        .await?
        .context("reading the input partitions' log ends from the broker")?;
    let ends = ends
        .into_iter()
        .map(|(k, (low, high))| {
            let end = crate::reconcile::LogEnd {
                low,
                high,
                seen_up_to,
                capped: true,
            };
            (k, end)
        })
        .collect();
    let reconciler = crate::engine::Reconciler::new(
        &settings.reconciliation,
        std::sync::Arc::new(crate::reference::ReferenceCache::default()),
        None,
    )
    .with_log_ends(std::sync::Arc::new(crate::engine::LogEnds::fixed(ends)));
    let mut conn = store.pool().acquire().await?;
    Ok(reconciler.group_watermark(&mut conn, &group).await?)
}
fn render_watermark(out: &mut String, report: &Report) {
    let Some(w) = &report.watermark else {
        return;
    };
    let time = |t: Option<DateTime<Utc>>| t.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Watermark of {}: {} (stream time {}); idle partitions (caught up, and empty or quiet for longer than the idle timeout in broker time) do not count",
        w.consumer_group,
        w.watermark.to_rfc3339(),
        time(w.stream_time)
    );
    let rows: Vec<Vec<String>> = (w.partitions.iter())
        .map(|p| {
            vec![
                p.topic.clone(),
                p.partition.to_string(),
                p.standing.to_owned(),
                p.records_behind.map_or_else(String::new, |n| n.to_string()),
                time(p.contribution),
            ]
        })
        .collect();
    table(
        out,
        &[
            ("topic", Left),
            ("partition", Right),
            ("standing", Left),
            ("behind", Right),
            ("event time - lateness", Left),
        ],
        &rows,
    );
}

/// Names the fix when the views are missing (a database migrated by an older payrecon).
fn explain(e: sqlx::Error) -> anyhow::Error {
    let undefined_table =
        matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01"));
    let e = anyhow::Error::new(e);
    if undefined_table {
        e.context("the reporting views are missing: run `payrecon migrate`")
    } else {
        e.context("reading the report")
    }
}

/// The report of `date` (default: the latest business day, of `merchant` when given), with
/// at most `limit` open exceptions. Reads one snapshot.
pub async fn build(
    store: &Store,
    date: Option<NaiveDate>,
    merchant: Option<&str>,
    limit: i64,
) -> Result<Report, sqlx::Error> {
    let Some(rows) = store.day_report(date, merchant, limit).await? else {
        return Ok(Report {
            business_date: None,
            merchant: merchant.map(str::to_owned),
            open_exceptions_total: 0,
            open_exceptions: Vec::new(),
            merchants: Vec::new(),
            payouts: Vec::new(),
            open_payout_exceptions: Vec::new(),
            verification: None,
            watermark: None,
            imports: Vec::new(),
        });
    };
    Ok(Report {
        business_date: Some(rows.business_date),
        merchant: merchant.map(str::to_owned),
        open_exceptions_total: rows.open_exceptions_total,
        open_exceptions: (rows.open_exceptions.into_iter())
            .map(OpenException::in_minor_units)
            .collect(),
        merchants: (rows.merchants.into_iter())
            .map(MerchantDay::in_minor_units)
            .collect(),
        payouts: (rows.payouts.into_iter())
            .map(PayoutDay::in_minor_units)
            .collect(),
        open_payout_exceptions: (rows.open_payout_exceptions.into_iter())
            .map(OpenPayoutException::in_minor_units)
            .collect(),
        verification: None,
        watermark: None,
        imports: Vec::new(),
    })
}

/// `--verify`: every check of [`crate::store::CHECKS`], all days, the items re-evaluated
/// with `rules` (the configured defaults) and the reference data as stored now.
pub async fn verify(store: &Store, rules: &Rules) -> Result<Verification, sqlx::Error> {
    // Loaded just before the checks' snapshot, not from a cache that may lag the tables.
    let mut builder = SnapshotBuilder::new();
    store.load_reference_into(&mut builder).await?;
    let snapshot = builder.build(0);
    let checks = crate::engine::verify::verify(store, rules, &snapshot).await?;
    Ok(Verification {
        consistent: checks.iter().all(Check::passed),
        checks,
    })
}

/// `amount` without the storage's trailing zeros but with at least `currency`'s minor units
/// (`100.0000` EUR becomes `100.00`; a fee of `0.3750` stays `0.375`). Never rounds.
fn money(amount: Decimal, currency: &str) -> Decimal {
    let mut amount = amount.normalize();
    let minor = Currency::from_code(currency.trim()).map_or(0, |c| c.minor_units());
    if amount.scale() < minor {
        amount.rescale(minor);
    }
    amount
}

impl OpenException {
    fn in_minor_units(mut self) -> Self {
        self.currency = self.currency.trim().to_owned();
        self.settled_currency = self.settled_currency.map(|c| c.trim().to_owned());
        let settled = self
            .settled_currency
            .clone()
            .unwrap_or(self.currency.clone());
        let c = self.currency.as_str();
        for a in [
            &mut self.expected_gross,
            &mut self.expected_fee,
            &mut self.expected_net,
            &mut self.difference,
        ] {
            *a = a.map(|a| money(a, c));
        }
        for a in [
            &mut self.settled_gross,
            &mut self.settled_fee,
            &mut self.settled_net,
        ] {
            *a = a.map(|a| money(a, &settled));
        }
        self
    }
}

impl MerchantDay {
    fn in_minor_units(mut self) -> Self {
        self.currency = self.currency.trim().to_owned();
        let c = self.currency.as_str();
        for a in [
            &mut self.captured,
            &mut self.refunded,
            &mut self.charged_back,
            &mut self.net_captured,
            &mut self.settled_gross,
            &mut self.settled_fees,
            &mut self.settled_net,
        ] {
            *a = money(*a, c);
        }
        for a in [
            &mut self.items_expected_net,
            &mut self.items_settled_net,
            &mut self.items_net_difference,
        ] {
            *a = a.map(|a| money(a, c));
        }
        self
    }
}

/// The report as text: a heading, then each section as an aligned table.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let scope = report
        .merchant
        .as_deref()
        .map_or_else(|| "all merchants".to_owned(), |m| format!("merchant {m}"));
    let Some(date) = report.business_date else {
        let _ = writeln!(
            out,
            "No business day to report ({scope}): merchant_daily_totals has no row yet."
        );
        render_verification(&mut out, report);
        render_watermark(&mut out, report);
        crate::files::import::render(&mut out, &report.imports);
        return out;
    };
    let _ = writeln!(out, "Reconciliation report for {date} ({scope})");
    let _ = writeln!(out);
    let shown = report.open_exceptions.len();
    let total = report.open_exceptions_total;
    if i64::try_from(shown).is_ok_and(|n| n < total) {
        let _ = writeln!(out, "Open exceptions: {total} (largest {shown} shown)");
    } else {
        let _ = writeln!(out, "Open exceptions: {total}");
    }
    if shown > 0 {
        let rows: Vec<Vec<String>> = (report.open_exceptions.iter())
            .map(|e| {
                let settled = |a: Option<Decimal>| match (a, &e.settled_currency) {
                    (Some(a), Some(c)) if *c != e.currency => format!("{a} {c}"),
                    (a, _) => amount(a),
                };
                vec![
                    e.payment_reference.clone(),
                    e.merchant_id.clone(),
                    e.currency.clone(),
                    e.status.clone(),
                    amount(e.expected_gross),
                    settled(e.settled_gross),
                    amount(e.expected_fee),
                    settled(e.settled_fee),
                    amount(e.difference),
                    e.since.map_or_else(
                        || "-".to_owned(),
                        |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                    ),
                    e.evaluations.to_string(),
                    e.reason.clone(),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                ("reference", Left),
                ("merchant", Left),
                ("cur", Left),
                ("status", Left),
                ("expected_gross", Right),
                ("settled_gross", Right),
                ("expected_fee", Right),
                ("settled_fee", Right),
                ("difference", Right),
                ("since", Left),
                ("evals", Right),
                ("reason", Left),
            ],
            &rows,
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Merchant totals: {}", report.merchants.len());
    if !report.merchants.is_empty() {
        let rows: Vec<Vec<String>> = (report.merchants.iter())
            .map(|m| {
                vec![
                    m.merchant_id.clone(),
                    m.currency.clone(),
                    m.captured_count.to_string(),
                    m.captured.to_string(),
                    m.refunded.to_string(),
                    m.charged_back.to_string(),
                    m.net_captured.to_string(),
                    m.settled_count.to_string(),
                    m.settled_gross.to_string(),
                    m.settled_fees.to_string(),
                    m.settled_net.to_string(),
                    m.matched_count.to_string(),
                    m.expected_count.to_string(),
                    m.exception_count.to_string(),
                    m.match_rate.map_or_else(
                        || "-".to_owned(),
                        |r| format!("{}%", (r * Decimal::ONE_HUNDRED).round_dp(2)),
                    ),
                    amount(m.items_expected_net),
                    amount(m.items_settled_net),
                    amount(m.items_net_difference),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                ("merchant", Left),
                ("cur", Left),
                ("captures", Right),
                ("captured", Right),
                ("refunded", Right),
                ("charged_back", Right),
                ("net_captured", Right),
                ("lines", Right),
                ("settled_gross", Right),
                ("settled_fees", Right),
                ("settled_net", Right),
                ("matched", Right),
                ("expected", Right),
                ("exceptions", Right),
                ("match_rate", Right),
                ("items_expected_net", Right),
                ("items_settled_net", Right),
                ("items_net_diff", Right),
            ],
            &rows,
        );
    }
    render_payouts(&mut out, report);
    render_verification(&mut out, report);
    render_watermark(&mut out, report);
    crate::files::import::render(&mut out, &report.imports);
    out
}

/// The payout leg: batches per status, then the open payout exceptions.
fn render_payouts(out: &mut String, report: &Report) {
    let _ = writeln!(out);
    let items: i64 = report.payouts.iter().map(|p| p.items).sum();
    let _ = writeln!(
        out,
        "Payouts (settlement batches against bank credits): {items} item(s)"
    );
    if !report.payouts.is_empty() {
        let rows: Vec<Vec<String>> = (report.payouts.iter())
            .map(|p| {
                vec![
                    if p.merchant_id.is_empty() {
                        "-".into()
                    } else {
                        p.merchant_id.clone()
                    },
                    p.currency.clone().unwrap_or_else(|| "mixed".into()),
                    p.status.clone(),
                    p.items.to_string(),
                    amount(p.expected_net),
                    amount(p.paid),
                    amount(p.difference),
                ]
            })
            .collect();
        table(
            out,
            &[
                ("merchant", Left),
                ("cur", Left),
                ("status", Left),
                ("items", Right),
                ("expected_net", Right),
                ("paid", Right),
                ("difference", Right),
            ],
            &rows,
        );
    }
    let _ = writeln!(
        out,
        "Open payout exceptions: {}",
        report.open_payout_exceptions.len()
    );
    if !report.open_payout_exceptions.is_empty() {
        let rows: Vec<Vec<String>> = (report.open_payout_exceptions.iter())
            .map(|e| {
                vec![
                    format!("{} {}", e.kind.to_lowercase(), e.batch_or_line),
                    e.merchant_id.clone().unwrap_or_else(|| "-".into()),
                    e.account_id.clone().unwrap_or_else(|| "-".into()),
                    e.currency.clone().unwrap_or_else(|| "mixed".into()),
                    e.status.clone(),
                    amount(e.expected_net),
                    amount(e.paid),
                    amount(e.difference),
                    e.reason.clone(),
                ]
            })
            .collect();
        table(
            out,
            &[
                ("batch", Left),
                ("merchant", Left),
                ("account", Left),
                ("cur", Left),
                ("status", Left),
                ("expected_net", Right),
                ("paid", Right),
                ("difference", Right),
                ("reason", Left),
            ],
            &rows,
        );
    }
}

fn render_verification(out: &mut String, report: &Report) {
    let Some(v) = &report.verification else {
        return;
    };
    let _ = writeln!(out);
    let failed = v.failed().count();
    if failed == 0 {
        let _ = writeln!(
            out,
            "Verification: all {} checks passed (derived tables equal what they derive from)",
            v.checks.len()
        );
    } else {
        let _ = writeln!(
            out,
            "Verification: {failed} of {} checks FAILED",
            v.checks.len()
        );
    }
    let rows: Vec<Vec<String>> = (v.checks.iter())
        .map(|c| {
            vec![
                if c.passed() { "pass" } else { "FAIL" }.to_owned(),
                c.name.to_owned(),
                c.table.to_owned(),
                c.checked.to_string(),
                c.differing.to_string(),
                c.proves.to_owned(),
            ]
        })
        .collect();
    table(
        out,
        &[
            ("result", Left),
            ("check", Left),
            ("table", Left),
            ("compared", Right),
            ("differ", Right),
            ("proves", Left),
        ],
        &rows,
    );
    for c in &v.checks {
        if let Some(note) = &c.note {
            let _ = writeln!(out, "{}: {note}", c.name);
        }
    }
    for c in v.failed() {
        let _ = writeln!(out);
        let shown = c.differences.len();
        let _ = writeln!(
            out,
            "{} ({}): {} difference(s){}, stored vs recomputed:",
            c.name,
            c.table,
            c.differing,
            if i64::try_from(shown).is_ok_and(|n| n < c.differing) {
                format!(" (first {shown} by key)")
            } else {
                String::new()
            }
        );
        for d in &c.differences {
            let _ = writeln!(
                out,
                "  {}: stored {}; recomputed {}",
                d.key, d.stored, d.recomputed
            );
        }
    }
}

fn amount(a: Option<Decimal>) -> String {
    a.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}
use Align::{Left, Right};

/// Appends `rows` under `columns` with every column as wide as its widest cell; the last
/// column is not padded (it holds free text).
fn table(out: &mut String, columns: &[(&str, Align)], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let headers: Vec<String> = columns.iter().map(|(h, _)| (*h).to_owned()).collect();
    for row in std::iter::once(&headers).chain(rows) {
        let mut line = String::new();
        for (i, ((cell, width), (_, align))) in row.iter().zip(&widths).zip(columns).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let last = i + 1 == columns.len();
            match align {
                Right => {
                    let _ = write!(line, "{cell:>width$}");
                }
                Left if last => line.push_str(cell),
                Left => {
                    let _ = write!(line, "{cell:<width$}");
                }
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_keeps_the_currency_minor_units_and_never_rounds() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(money(d("100.0000"), "EUR").to_string(), "100.00");
        assert_eq!(money(d("-5.0000"), "EUR ").to_string(), "-5.00");
        assert_eq!(money(d("0.3750"), "EUR").to_string(), "0.375");
        assert_eq!(money(d("1200.0000"), "JPY").to_string(), "1200");
        assert_eq!(money(d("0.0000"), "USD").to_string(), "0.00");
    }

    #[test]
    fn tables_align_every_column_but_the_last() {
        let mut out = String::new();
        table(
            &mut out,
            &[("name", Left), ("amount", Right), ("note", Left)],
            &[
                vec!["a".into(), "1.00".into(), "x".into()],
                vec!["longer".into(), "-100.00".into(), "".into()],
            ],
        );
        assert_eq!(
            out,
            "name     amount  note\n\
             a          1.00  x\n\
             longer  -100.00\n"
        );
    }
}
