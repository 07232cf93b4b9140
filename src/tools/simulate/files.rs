//! The simulation's settlement lines and bank payouts as files (`--files DIR`): each run of
//! consecutive settlement or payout records (in production order) becomes a settlement
//! report and a bank statement, in the formats in turn, imported where the run stood in the
//! stream, so the log order of lines relative to payments stays what the topics would see.
//!
//! A record produced twice (a simulated re-delivery) is written once: in a file, the same
//! entry twice would be two entries (two settlements). The re-delivery of a file is what
//! stands for it: every file is imported a second time at the end, which must produce
//! nothing (the import registry knows it).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::*;
use crate::domain::{BankPayout, SettlementLine};
use crate::files::Format;
use crate::files::write::{StatementWriter, settlement_report};

/// One step of a simulation run from files.
#[derive(Debug, Clone)]
pub enum Step {
    /// Records for the topics, in order.
    Produce(Vec<Generated>),
    /// A file to import, with its entries.
    Import(PathBuf, u64),
}

/// The files written and what they hold.
#[derive(Debug, Clone, Default)]
pub struct Written {
    pub files: Vec<PathBuf>,
    pub entries: u64,
    /// Records produced twice by the simulation, written once.
    pub folded_duplicates: u64,
}

/// The formats the simulation writes in turn: every format keeps every field except where
/// [`crate::files::write`] says; `exact` limits them to those that keep event times and long
/// references (the demo from files, which must match the simulation's predictions).
pub fn formats(exact: bool) -> (Vec<Format>, Vec<Format>) {
    let settlements = vec![Format::Stripe, Format::Adyen];
    let statements = if exact {
        vec![Format::Camt053, Format::Camt054]
    } else {
        vec![
            Format::Camt053,
            Format::Camt054,
            Format::Mt940,
            Format::Bai2,
        ]
    };
    (settlements, statements)
}

/// Splits `records` into steps, writing each run of settlement lines and payouts to `dir`.
pub fn plan(
    records: Vec<Generated>,
    dir: &Path,
    seed: u64,
    exact: bool,
) -> anyhow::Result<(Vec<Step>, Written)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (settlement_formats, statement_formats) = formats(exact);
    let mut statements = StatementWriter::default();
    let mut written = Written::default();
    let mut seen: HashSet<String> = HashSet::new();
    let mut steps = Vec::new();
    let mut produce: Vec<Generated> = Vec::new();
    let (mut lines, mut payouts): (Vec<SettlementLine>, Vec<BankPayout>) = (vec![], vec![]);
    let mut records = records.into_iter().peekable();
    while let Some(r) = records.next() {
        match r {
            Generated::Settlement(l) => {
                if seen.insert(format!("L{}", l.line_id)) {
                    lines.push(l);
                } else {
                    written.folded_duplicates += 1;
                }
            }
            Generated::Payout(p) => {
                if seen.insert(format!("P{}", p.statement_line_id)) {
                    payouts.push(p);
                } else {
                    written.folded_duplicates += 1;
                }
            }
            other => produce.push(other),
        }
        let run_ends = !matches!(
            records.peek(),
            Some(Generated::Settlement(_) | Generated::Payout(_))
        );
        if run_ends && (!lines.is_empty() || !payouts.is_empty()) {
            if !produce.is_empty() {
                steps.push(Step::Produce(std::mem::take(&mut produce)));
            }
            let n = written.files.len();
            if !lines.is_empty() {
                let format = settlement_formats[n % settlement_formats.len()];
                let bytes = settlement_report(format, &lines)?;
                let path = dir.join(format!("sim{seed}-{:05}-{}.csv", n, format.as_str()));
                std::fs::write(&path, bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
                written.entries += lines.len() as u64;
                steps.push(Step::Import(path.clone(), lines.len() as u64));
                written.files.push(path);
                lines.clear();
            }
            if !payouts.is_empty() {
                let n = written.files.len();
                let format = statement_formats[n % statement_formats.len()];
                let bytes = statements.file(format, &format!("SIM{seed}"), &payouts)?;
                let extension = match format {
                    Format::Camt053 | Format::Camt054 => "xml",
                    Format::Mt940 => "sta",
                    _ => "bai",
                };
                let path = dir.join(format!("sim{seed}-{n:05}-{}.{extension}", format.as_str()));
                std::fs::write(&path, bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
                written.entries += payouts.len() as u64;
                steps.push(Step::Import(path.clone(), payouts.len() as u64));
                written.files.push(path);
                payouts.clear();
            }
        }
    }
    if !produce.is_empty() {
        steps.push(Step::Produce(produce));
    }
    Ok((steps, written))
}

/// Where [`run`] produces the records of its steps.
pub struct Producing<'a> {
    pub producer: &'a FutureProducer,
    pub encoder: &'a Encoder,
    pub topics: &'a [&'a str],
    pub rate: u64,
    pub broker_time: BrokerTime,
}

/// Runs `steps`: produces the records, imports the files (each must be IMPORTED), then
/// imports every file again (each must be "already imported", nothing produced).
pub async fn run(
    settings: &Settings,
    steps: &[Step],
    written: &Written,
    to: Producing<'_>,
) -> anyhow::Result<()> {
    let importer = crate::files::inbox::simulator_importer(settings).await?;
    for step in steps {
        match step {
            Step::Produce(records) => {
                produce_stamped(
                    to.producer,
                    to.encoder,
                    to.topics,
                    records,
                    to.rate,
                    to.broker_time,
                    |_| {},
                )
                .await?
            }
            Step::Import(path, entries) => {
                let outcome = importer.import(path, |_, _| {}).await?;
                anyhow::ensure!(
                    outcome.status == crate::files::import::Status::Imported
                        && outcome.entries == *entries,
                    "the simulated file {} was not imported whole: {}",
                    path.display(),
                    outcome.summary()
                );
            }
        }
    }
    let mut again = 0u64;
    for path in &written.files {
        let outcome = importer.import(path, |_, _| {}).await?;
        anyhow::ensure!(
            outcome.status == crate::files::import::Status::Imported && outcome.applied == 0,
            "importing {} again changed something: {}",
            path.display(),
            outcome.summary()
        );
        again += outcome.duplicates;
    }
    println!(
        "files: {} written and imported ({} entries, {} re-deliveries folded); imported again: {again} entries already there, nothing produced",
        written.files.len(),
        written.entries,
        written.folded_duplicates
    );
    importer.pool.close().await;
    Ok(())
}
