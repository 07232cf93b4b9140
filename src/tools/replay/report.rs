//! The audit report: a JSON file (the whole report), a CSV file (one line per difference)
//! and a summary on the terminal, all written while the comparison streams its rows, so
//! nothing proportional to the range is held in memory.
//!
//! The JSON file is `{"audit": {...}, "digest": "sha256:...", "run": {...}}`. Everything
//! that depends only on the range and the data is in `audit`, in a deterministic order;
//! the run id, user and timestamps are in `run`. `digest` is the SHA-256 of the `audit`
//! value exactly as written (from its `{` to its `}`), so two replays of the same range over
//! the same data have the same digest and files identical apart from `run`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use crate::store::compare::{ComparisonSink, Difference, MerchantTotal, RowCounts, Sums};

/// Kinds of differences, in the order they are compared and reported.
pub const KINDS: [&str; 5] = [
    "payment_event",
    "settlement_line",
    "dead_letter",
    "reconciliation_item",
    "merchant_daily_total",
];

/// The end of the deterministic part.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub result: &'static str,
    pub differences: u64,
    pub by_kind: BTreeMap<&'static str, u64>,
    /// Payment references whose items were compared.
    pub references_compared: i64,
    /// References with live records outside the range (or, for a partial range, without
    /// any record on either side): their status depends on records the replay did not read.
    pub references_not_comparable: i64,
    /// References whose only difference is EXPECTED on one side and a deadline status on
    /// the other, each consistent with its own evaluation's watermark (the service judged
    /// later or had not yet judged): not a difference in the data.
    pub references_judged_at_different_watermarks: i64,
    /// Payout items (settlement batches, unexplained credits) compared, not comparable
    /// (live records outside the range) and judged at different watermarks, as above.
    pub payout_items_compared: i64,
    pub payout_items_not_comparable: i64,
    pub payout_items_judged_at_different_watermarks: i64,
    /// Rows the live tables hold for the range (open dead letters only).
    pub live_rows_in_range: RowCounts,
    /// Rows the replay wrote.
    pub replay_rows: RowCounts,
}

/// Who ran the audit and when: the part of the report that differs between two runs.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub id: String,
    pub requested_by: String,
    pub started_at: String,
    pub finished_at: String,
    pub shadow_schema: String,
    pub shadow_kept: bool,
    pub replay_seconds: f64,
    pub replay_records_per_sec: f64,
    pub report: String,
    pub differences_csv: String,
}

/// A writer that hashes what passes through while `hashing` is on.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    hashing: bool,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if self.hashing {
            self.hasher.update(&buf[..n]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the three outputs as rows arrive.
pub struct ReportWriter {
    json: Hashing<BufWriter<File>>,
    csv: csv::Writer<BufWriter<File>>,
    /// Differences and merchant rows printed on the terminal at most.
    show: usize,
    quiet: bool,
    first_in_list: bool,
    merchants: usize,
    pub by_kind: BTreeMap<&'static str, u64>,
    pub differences: u64,
}

fn write_json(out: &mut impl Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    Ok(())
}

impl ReportWriter {
    pub fn create(json: &Path, csv: &Path, show: usize, quiet: bool) -> anyhow::Result<Self> {
        let file = File::create(json).with_context(|| format!("creating {}", json.display()))?;
        let csv_file = File::create(csv).with_context(|| format!("creating {}", csv.display()))?;
        let mut csv = csv::Writer::from_writer(BufWriter::new(csv_file));
        csv.write_record([
            "kind",
            "key",
            "problem",
            "columns",
            "live",
            "replay",
            "topic",
            "partition",
            "offset",
            "positions",
        ])?;
        Ok(ReportWriter {
            json: Hashing {
                inner: BufWriter::new(file),
                hasher: Sha256::new(),
                hashing: false,
            },
            csv,
            show,
            quiet,
            first_in_list: true,
            merchants: 0,
            by_kind: KINDS.iter().map(|k| (*k, 0)).collect(),
            differences: 0,
        })
    }

    /// Opens the report with `header` (a JSON object whose members start `audit`) and the
    /// per-merchant list.
    pub fn header(&mut self, header: &impl Serialize) -> anyhow::Result<()> {
        let mut head = serde_json::to_string(header)?;
        anyhow::ensure!(head.ends_with('}'), "the report header must be an object");
        head.pop();
        self.json.write_all(b"{\n\"audit\": ")?;
        self.json.hashing = true;
        self.json.write_all(head.as_bytes())?;
        self.json.write_all(b",\n\"merchant_totals\": [")?;
        self.first_in_list = true;
        if !self.quiet {
            println!();
            println!(
                "per merchant and currency, records in the range (live rows | replay; * = differ):"
            );
            println!(
                "  {:<22} {:<4} {:>8} {:>16} {:>8} {:>16}   {:>8} {:>16} {:>8} {:>16}",
                "merchant",
                "cur",
                "events",
                "captured",
                "lines",
                "settled net",
                "events",
                "captured",
                "lines",
                "settled net"
            );
        }
        Ok(())
    }

    fn list_separator(&mut self) -> anyhow::Result<()> {
        let sep: &[u8] = if self.first_in_list { b"\n" } else { b",\n" };
        self.json.write_all(sep)?;
        self.first_in_list = false;
        Ok(())
    }

    pub fn merchant_total(&mut self, t: &MerchantTotal) -> anyhow::Result<()> {
        self.list_separator()?;
        write_json(&mut self.json, t)?;
        self.merchants += 1;
        if !self.quiet && self.merchants <= self.show {
            let side = |s: &Option<Sums>| match s {
                Some(s) => format!(
                    "{:>8} {:>16} {:>8} {:>16}",
                    s.payment_events, s.captured, s.settlement_lines, s.settled_net
                ),
                None => format!("{:>8} {:>16} {:>8} {:>16}", "-", "-", "-", "-"),
            };
            println!(
                "{} {:<22} {:<4} {}   {}",
                if t.live == t.replay { ' ' } else { '*' },
                t.merchant_id,
                t.currency,
                side(&t.live),
                side(&t.replay)
            );
        }
        Ok(())
    }

    /// Closes the per-merchant list and opens the differences.
    pub fn begin_differences(&mut self) -> anyhow::Result<()> {
        self.json.write_all(b"\n],\n\"differences\": [")?;
        self.first_in_list = true;
        if !self.quiet {
            if self.merchants > self.show {
                println!(
                    "  ... and {} more merchant/currency rows in the report",
                    self.merchants - self.show
                );
            }
            println!();
        }
        Ok(())
    }

    pub fn difference(&mut self, d: &Difference) -> anyhow::Result<()> {
        self.list_separator()?;
        write_json(&mut self.json, d)?;
        let columns: Vec<&str> = d.values.iter().map(|v| v.column.as_str()).collect();
        let live: Vec<&Option<String>> = d.values.iter().map(|v| &v.live).collect();
        let replay: Vec<&Option<String>> = d.values.iter().map(|v| &v.replay).collect();
        let (topic, partition, offset) = match &d.source {
            Some(p) => (
                p.topic.clone(),
                p.partition.to_string(),
                p.offset.to_string(),
            ),
            None => Default::default(),
        };
        let positions: Vec<String> = d
            .positions
            .iter()
            .map(|p| format!("{}:{}:{}", p.topic, p.partition, p.offset))
            .collect();
        self.csv.write_record([
            d.kind,
            &d.key,
            &d.problem,
            &serde_json::to_string(&columns)?,
            &serde_json::to_string(&live)?,
            &serde_json::to_string(&replay)?,
            &topic,
            &partition,
            &offset,
            &positions.join(" "),
        ])?;
        self.differences += 1;
        *self.by_kind.entry(d.kind).or_default() += 1;
        if !self.quiet && self.differences as usize <= self.show {
            if self.differences == 1 {
                println!("differences:");
            }
            let at = d
                .source
                .as_ref()
                .map(|p| format!(" at {}[{}]@{}", p.topic, p.partition, p.offset))
                .unwrap_or_default();
            let values: Vec<String> = d
                .values
                .iter()
                .take(6)
                .map(|v| {
                    format!(
                        "{} {} -> {}",
                        v.column,
                        v.live.as_deref().unwrap_or("(none)"),
                        v.replay.as_deref().unwrap_or("(none)")
                    )
                })
                .collect();
            println!(
                "  {} {}: {}{at}: {}",
                d.kind,
                d.key,
                d.problem.replace('_', " "),
                values.join(", ")
            );
        }
        Ok(())
    }

    /// Closes the deterministic part with `summary`, writes the digest and `run`; returns
    /// the digest (`sha256:<hex>`).
    pub fn finish(mut self, summary: &Summary, run: &RunInfo) -> anyhow::Result<String> {
        self.json.write_all(b"\n],\n\"summary\": ")?;
        write_json(&mut self.json, summary)?;
        self.json.write_all(b"}")?;
        self.json.hashing = false;
        let digest: String = self
            .json
            .hasher
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let digest = format!("sha256:{digest}");
        self.json.write_all(b",\n\"digest\": ")?;
        write_json(&mut self.json, &digest)?;
        self.json.write_all(b",\n\"run\": ")?;
        write_json(&mut self.json, run)?;
        self.json.write_all(b"\n}\n")?;
        self.json.flush()?;
        self.csv.flush()?;
        if !self.quiet && self.differences as usize > self.show {
            println!(
                "  ... and {} more differences in the report",
                self.differences as usize - self.show
            );
        }
        Ok(digest)
    }
}

impl ComparisonSink for ReportWriter {
    fn merchant_total(&mut self, t: &MerchantTotal) -> anyhow::Result<()> {
        ReportWriter::merchant_total(self, t)
    }

    fn difference(&mut self, d: &Difference) -> anyhow::Result<()> {
        ReportWriter::difference(self, d)
    }
}
