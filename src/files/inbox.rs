//! `payrecon import`: the command, its progress bar and summary lines, and the watched inbox.
//!
//! The inbox (`--watch DIR`) imports each new file of `DIR` once it is complete, then moves it
//! to `DIR/processed/` (IMPORTED, also when already imported) or `DIR/rejected/` (REJECTED,
//! CONFLICT) with `<name>.report.txt` beside it. A file still being written is not picked
//! up: its size and modification time must stay the same for `--settle` (default 2 s);
//! dot-files and names ending in `.tmp`/`.part` are ignored, so a writer that renames into
//! the inbox is picked up at once after the rename.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use super::csv::CsvMapping;
use super::import::{Importer, Outcome, Status};
use super::{Format, ParseOptions};
use crate::config::Settings;

/// Options of `payrecon import`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportOptions {
    /// Files to import, in order.
    #[arg(value_name = "FILE", required_unless_present = "watch")]
    pub files: Vec<PathBuf>,
    /// The files' format: auto (from the first bytes), stripe, adyen, csv (needs --mapping),
    /// camt053, camt054, mt940, bai2.
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// The column mapping of a generic CSV report (TOML; see docs/files.md).
    #[arg(long, value_name = "FILE.toml")]
    pub mapping: Option<PathBuf>,
    /// The merchant of a Stripe report without a connected_account column.
    #[arg(long, value_name = "ID")]
    pub merchant: Option<String>,
    /// Who imports (recorded with each import). Default: the OS user.
    #[arg(long, value_name = "NAME")]
    pub by: Option<String>,
    /// Watch this directory as an inbox instead of importing FILEs.
    #[arg(long, value_name = "DIR", conflicts_with = "files")]
    pub watch: Option<PathBuf>,
    /// Inbox: how long a file's size must stay unchanged before it is imported.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Inbox: import what is there (once settled) and exit.
    #[arg(long, requires = "watch")]
    pub once: bool,
    /// For the crash tests only: after producing this many entries (and their
    /// acknowledgement), stop and wait to be killed.
    #[arg(long, hide = true)]
    pub pause_after: Option<u64>,
}

/// Runs `payrecon import`. Exit code 0 when every file is imported (or was already), 2 when
/// any was rejected or is in conflict.
pub async fn run(settings: &Settings, options: ImportOptions) -> anyhow::Result<ExitCode> {
    let importer = importer(settings, &options).await?;
    let outcomes = match &options.watch {
        Some(dir) => watch(&importer, dir, options.settle, options.once).await?,
        None => {
            let mut outcomes = Vec::new();
            for file in &options.files {
                let outcome = import_with_progress(&importer, file).await?;
                println!("{}", outcome.summary());
                outcomes.push(outcome);
            }
            outcomes
        }
    };
    importer.pool.close().await;
    Ok(
        if outcomes
            .iter()
            .any(|o| matches!(o.status, Status::Rejected | Status::Conflict))
        {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        },
    )
}

/// The importer the simulator's files go through (`payrecon simulate --files`): every format
/// detected, recorded as imported by `simulator`.
pub async fn simulator_importer(settings: &Settings) -> anyhow::Result<Importer> {
    let options = ImportOptions {
        files: Vec::new(),
        format: "auto".into(),
        mapping: None,
        merchant: None,
        by: Some("simulator".into()),
        watch: None,
        settle: Duration::from_secs(2),
        once: true,
        pause_after: None,
    };
    importer(settings, &options).await
}

async fn importer(settings: &Settings, options: &ImportOptions) -> anyhow::Result<Importer> {
    let format = match options.format.as_str() {
        "auto" => None,
        f => Some(f.parse::<Format>().map_err(anyhow::Error::msg)?),
    };
    let csv = match &options.mapping {
        Some(path) => Some(
            CsvMapping::from_file(path)
                .with_context(|| format!("reading the mapping {}", path.display()))?,
        ),
        None => None,
    };
    anyhow::ensure!(
        format != Some(Format::Csv) || csv.is_some(),
        "--format csv needs --mapping FILE.toml"
    );
    let store = crate::app::connect_store(
        settings,
        &tokio_util::sync::CancellationToken::new(),
        crate::app::Patience::Bounded,
    )
    .await?;
    store.migrate().await.context("applying migrations")?;
    let k = &settings.kafka;
    let sr = settings.registry.client()?;
    let mut encoder =
        crate::inputs::Encoder::register(&sr, &k.payments_topic, &k.settlements_topic).await?;
    if !k.payouts_topic.is_empty() {
        encoder = encoder.with_payouts(&sr, &k.payouts_topic).await?;
    }
    let producer = crate::kafka::producer::idempotent(k)?;
    Ok(Importer {
        pool: store.pool().clone(),
        producer,
        encoder,
        settlements_topic: k.settlements_topic.clone(),
        payouts_topic: k.payouts_topic.clone(),
        by: options
            .by
            .clone()
            .unwrap_or_else(|| whoami::fallible::username().unwrap_or_else(|_| "unknown".into())),
        format,
        pause_after: options.pause_after,
        options: ParseOptions {
            csv,
            merchant_id: options.merchant.clone(),
            ..ParseOptions::default()
        },
    })
}

async fn import_with_progress(importer: &Importer, file: &Path) -> anyhow::Result<Outcome> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} entries ({per_sec})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(file.display().to_string());
    let outcome = importer
        .import(file, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .await
        .with_context(|| format!("importing {}", file.display()));
    bar.finish_and_clear();
    outcome
}

/// Watches `dir` until a termination signal (or, with `once`, until it holds no settled
/// file).
async fn watch(
    importer: &Importer,
    dir: &Path,
    settle: Duration,
    once: bool,
) -> anyhow::Result<Vec<Outcome>> {
    for sub in ["processed", "rejected"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let mut seen: HashMap<PathBuf, (u64, Option<SystemTime>, std::time::Instant)> = HashMap::new();
    let mut outcomes = Vec::new();
    let stop = crate::app::termination_signal();
    tokio::pin!(stop);
    let tick = settle
        .min(Duration::from_millis(500))
        .max(Duration::from_millis(50));
    loop {
        let mut waiting = false;
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                !name.starts_with('.') && !name.ends_with(".tmp") && !name.ends_with(".part")
            })
            .collect();
        entries.sort();
        seen.retain(|p, _| entries.contains(p));
        for path in entries {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let now = (meta.len(), meta.modified().ok());
            let settled = match seen.get(&path) {
                Some((len, modified, since)) if (*len, *modified) == now => {
                    since.elapsed() >= settle
                }
                _ => {
                    seen.insert(path.clone(), (now.0, now.1, std::time::Instant::now()));
                    false
                }
            };
            if !settled {
                waiting = true;
                continue;
            }
            seen.remove(&path);
            let outcome = match importer.import(&path, |_, _| {}).await {
                Ok(o) => o,
                Err(e) => {
                    // Transient (database, broker): leave the file for the next scan.
                    tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "import failed; will retry");
                    waiting = true;
                    continue;
                }
            };
            println!("{}", outcome.summary());
            let target = match outcome.status {
                Status::Imported | Status::Importing => "processed",
                Status::Rejected | Status::Conflict => "rejected",
            };
            file_away(&path, &dir.join(target), &outcome)?;
            outcomes.push(outcome);
        }
        if once && !waiting {
            return Ok(outcomes);
        }
        tokio::select! {
            _ = &mut stop => return Ok(outcomes),
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// Moves an imported file into `target` with its report beside it; an existing name gets the
/// digest's first characters appended.
fn file_away(path: &Path, target: &Path, outcome: &Outcome) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let mut dest = target.join(&name);
    if dest.exists() {
        dest = target.join(format!(
            "{name}.{}",
            &outcome.digest[..12.min(outcome.digest.len())]
        ));
    }
    std::fs::rename(path, &dest)
        .with_context(|| format!("moving {} to {}", path.display(), dest.display()))?;
    let mut report = outcome.summary();
    report.push('\n');
    report.push_str(&format!("digest: {}\n", outcome.digest));
    std::fs::write(
        dest.with_file_name(format!(
            "{}.report.txt",
            dest.file_name().unwrap_or_default().to_string_lossy()
        )),
        report,
    )?;
    Ok(())
}
