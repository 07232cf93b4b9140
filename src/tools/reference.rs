//! `payrecon reference load`: merchant and FX rate versions from CSV files into the store.

use std::path::PathBuf;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// `payrecon reference load`: validates every file first, then loads them all in one
/// transaction.
pub async fn load(
    settings: &Settings,
    files: &[PathBuf],
    correction: Option<crate::store::Correction>,
) -> anyhow::Result<()> {
    use crate::reference::csv::{ReferenceFile, parse};
    let mut parsed = Vec::new();
    for path in files {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = parse(file).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        parsed.push(content);
    }
    let store = crate::app::connect_store(
        settings,
        &CancellationToken::new(),
        crate::app::Patience::Bounded,
    )
    .await?;
    store.migrate().await?;
    let contents: Vec<&ReferenceFile> = parsed.iter().map(|p| &p.content).collect();
    let correction = correction.map(|c| crate::store::Correction {
        source: Some(
            (files.iter())
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ..c
    });
    let summaries = match store
        .load_reference_files(&contents, correction.as_ref())
        .await
    {
        Ok(s) => s,
        Err(crate::store::LoadError::Conflicts(conflicts)) => {
            let lines: Vec<String> = conflicts
                .iter()
                .map(|c| {
                    let changes: Vec<String> = c.changes.iter().map(ToString::to_string).collect();
                    format!(
                        "  {}: row {}: {}: {}",
                        files[c.file].display(),
                        parsed[c.file].rows[c.index],
                        c.key,
                        changes.join("; ")
                    )
                })
                .collect();
            anyhow::bail!(
                "nothing was loaded: {} version(s) differ from the stored version with the same \
                 key; reference data is an append-only history (payments were priced with the \
                 stored values), so change it only with --correct --reason \"...\":\n{}",
                conflicts.len(),
                lines.join("\n")
            );
        }
        Err(e) => return Err(e.into()),
    };
    for ((path, content), summary) in files.iter().zip(&contents).zip(summaries) {
        let kind = match content {
            ReferenceFile::Merchants(_) => "merchant versions",
            ReferenceFile::Rates(_) => "FX rate versions",
        };
        print!(
            "{}: loaded {} {kind}, {} unchanged",
            path.display(),
            summary.inserted,
            summary.unchanged
        );
        if summary.corrected > 0 {
            print!(
                ", corrected {} (re-evaluating {} payment references)",
                summary.corrected, summary.queued
            );
        }
        println!();
    }
    Ok(())
}
