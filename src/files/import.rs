//! Importing a file, exactly once per entry: the registry of imports in PostgreSQL
//! (`file_imports`, `rejected_files`) and the producer that puts the entries on the input
//! topics.
//!
//! ## The guarantee and its limits
//! An import never writes a settlement line or a payout itself: it PRODUCES each entry as an
//! ordinary Avro record (Confluent wire format, the shipped schemas) to the settlements or
//! payouts topic, with the idempotent producer, keyed as any producer keys them and stamped
//! with the entry's event time. The engine applies them in its one offset transaction, so
//! the invariant stays in one place and `payrecon replay` reproduces files like any input.
//! Entry ids are derived from the statement identity (or the file digest) and the entry's
//! index, so a re-import, or an import resumed after a kill at any moment (status
//! `IMPORTING`), re-produces byte-identical records, which the engine counts as exact
//! duplicates and never applies twice. A file whose statement (format, account, id,
//! sequence) was already imported from other bytes is a `CONFLICT`: recorded, reported,
//! nothing produced. A file that fails its integrity check is `REJECTED` whole and kept in
//! `rejected_files`; nothing of it is produced.
//!
//! What the registry cannot promise: the status says the records are acknowledged by the
//! broker, not yet applied; the engine applies them when it reaches them. `applied` counts
//! the entries that were new when the import ran (not already stored) and that payrecon's
//! rules accept; the engine's own counters stay the authority.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use sqlx::PgPool;

use super::{Checked, Entry, Format, Leg, ParseOptions, Rejection};
use crate::inputs::Encoder;
use crate::kafka::producer::{FutureProducer, Sender};
use crate::store::file_imports::{self, FileImport, Produced, RejectedFile};

pub use crate::store::file_imports::ImportRow;

/// The status of an import, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Importing,
    Imported,
    Rejected,
    Conflict,
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Importing => "IMPORTING",
            Status::Imported => "IMPORTED",
            Status::Rejected => "REJECTED",
            Status::Conflict => "CONFLICT",
        }
    }
}

/// What one file's import did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub name: String,
    pub digest: String,
    pub format: Option<Format>,
    pub status: Status,
    pub entries: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Why the file was rejected or conflicts; a sequence gap; "already imported".
    pub report: String,
}

impl Outcome {
    /// The summary line printed per file.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} {} entries, {} applied, {} duplicates, {} rejected",
            self.name,
            self.status.as_str(),
            self.entries,
            self.applied,
            self.duplicates,
            self.rejected
        );
        if !self.report.is_empty() {
            s.push_str(" - ");
            s.push_str(&self.report);
        }
        s
    }
}

/// Where an import sends its entries and what it knows.
pub struct Importer {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub encoder: Encoder,
    pub settlements_topic: String,
    /// Empty when the payout leg is off: a statement file then cannot be imported.
    pub payouts_topic: String,
    /// Who imports (OS user or `--by`).
    pub by: String,
    /// `None`: detect from the first bytes.
    pub format: Option<Format>,
    pub options: ParseOptions,
    /// Crash tests: stop after this many entries are acknowledged and wait to be killed.
    pub pause_after: Option<u64>,
}

/// Files larger than this are quarantined by digest and size only.
const MAX_KEPT_BYTES: u64 = 16 * 1024 * 1024;

impl Importer {
    /// Imports one file; `progress` is told how many entries have been produced.
    pub async fn import(
        &self,
        path: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> anyhow::Result<Outcome> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let path_buf = path.to_path_buf();
        let format = self.format;
        let options = self.options.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let format = match format {
                Some(f) => f,
                None => super::detect(&path_buf)?,
            };
            super::check(&path_buf, format, &options)
        })
        .await?;
        let checked = match checked {
            Ok(c) => c,
            Err(rejection) => return self.quarantine(path, &name, rejection).await,
        };
        let claim = self.claim(&name, &checked).await?;
        let mut outcome = Outcome {
            name,
            digest: checked.digest.clone(),
            format: Some(checked.format),
            status: claim.status,
            entries: checked.info.entries,
            applied: 0,
            duplicates: 0,
            rejected: 0,
            report: claim.report.clone(),
        };
        match claim.status {
            Status::Importing => {}
            Status::Imported => {
                outcome.duplicates = checked.info.entries;
                outcome.report = "already imported: nothing produced".into();
                return Ok(outcome);
            }
            _ => return Ok(outcome),
        }
        let counts = self.produce(path, &checked, &mut progress).await?;
        outcome.applied = counts.applied;
        outcome.duplicates = counts.duplicates;
        outcome.rejected = counts.rejected;
        let produced = Produced {
            entries: checked.info.entries as i64,
            applied: counts.applied as i64,
            duplicates: counts.duplicates as i64,
            rejected: counts.rejected as i64,
        };
        file_imports::mark_imported(&self.pool, &checked.digest, produced)
            .await
            .context("marking the import IMPORTED")?;
        outcome.status = Status::Imported;
        Ok(outcome)
    }

    /// Records a refused file: the quarantine row (with its bytes up to 16 MiB) and the
    /// import row, status REJECTED.
    async fn quarantine(
        &self,
        path: &Path,
        name: &str,
        rejection: Rejection,
    ) -> anyhow::Result<Outcome> {
        let path_buf = path.to_path_buf();
        let (digest, size, bytes) = tokio::task::spawn_blocking(move || digest_of(&path_buf))
            .await?
            .with_context(|| format!("reading {}", path.display()))?;
        let reason = rejection.to_string();
        let rejected = RejectedFile {
            digest: &digest,
            name,
            format: self.format.map(|f| f.as_str()).unwrap_or("auto"),
            size: size as i64,
            bytes: bytes.as_deref(),
            reason: &reason,
            rejected_by: &self.by,
        };
        file_imports::quarantine(&self.pool, rejected).await?;
        Ok(Outcome {
            name: name.to_owned(),
            digest,
            format: self.format,
            status: Status::Rejected,
            entries: 0,
            applied: 0,
            duplicates: 0,
            rejected: 0,
            report: reason,
        })
    }

    /// Decides, in one transaction, what this file's import is: a fresh or resumed import
    /// (IMPORTING), already done (IMPORTED), or a conflict with another file of the same
    /// statement (CONFLICT, recorded).
    async fn claim(&self, name: &str, c: &Checked) -> anyhow::Result<Claim> {
        let i = &c.info;
        let file = FileImport {
            digest: &c.digest,
            name,
            format: c.format.as_str(),
            statement_id: i.statement_id.as_deref(),
            sequence: i.sequence.as_deref(),
            account: i.account.as_deref(),
            currency: i.currency.map(|c| c.code()),
            id_prefix: &c.id_prefix,
            imported_by: &self.by,
            entries: i.entries as i64,
        };
        let mut tx = self.pool.begin().await?;
        // Serialise claims of one statement (and of one file) between concurrent importers.
        let statement_key = format!(
            "{}|{}|{}|{}",
            c.format,
            i.account.as_deref().unwrap_or(""),
            i.statement_id.as_deref().unwrap_or(&c.digest),
            i.sequence.as_deref().unwrap_or("")
        );
        file_imports::lock_statement(&mut tx, &statement_key).await?;
        let existing = file_imports::status_for_update(&mut tx, &c.digest).await?;
        if existing.as_deref() == Some("IMPORTED") {
            tx.commit().await?;
            return Ok(Claim {
                status: Status::Imported,
                report: String::new(),
            });
        }
        if let Some(statement) = &i.statement_id
            && let Some((digest, other_name)) =
                file_imports::same_statement_elsewhere(&mut tx, &file).await?
        {
            let report = format!(
                "statement {statement} (sequence {}) of account {} was already imported from another file ({other_name}, digest {}): not merged",
                i.sequence.as_deref().unwrap_or("-"),
                i.account.as_deref().unwrap_or("-"),
                &digest[..16]
            );
            file_imports::upsert(&mut tx, &file, "CONFLICT", &report, None).await?;
            tx.commit().await?;
            return Ok(Claim {
                status: Status::Conflict,
                report,
            });
        }
        let gap = sequence_gap(&mut tx, c).await?;
        file_imports::upsert(&mut tx, &file, "IMPORTING", "", gap.as_deref()).await?;
        tx.commit().await?;
        Ok(Claim {
            status: Status::Importing,
            report: gap
                .map(|g| format!("sequence gap: {g}"))
                .unwrap_or_default(),
        })
    }

    /// Pass 2: reads the file again and produces its entries, chunk by chunk.
    async fn produce(
        &self,
        path: &Path,
        checked: &Checked,
        progress: &mut impl FnMut(u64, u64),
    ) -> anyhow::Result<Counts> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Entry>(4096);
        let source: PathBuf = path.to_path_buf();
        let c = checked.clone();
        let options = self.options.clone();
        let reader = tokio::task::spawn_blocking(move || {
            super::entries(&source, &c, &options, &mut |e| {
                tx.blocking_send(e)
                    .map_err(|_| Rejection::new("file", "the import stopped"))
            })
        });
        let mut counts = Counts::default();
        let mut chunk = Vec::with_capacity(CHUNK);
        let total = checked.info.entries;
        let mut produced = 0u64;
        loop {
            let next = rx.recv().await;
            let done = next.is_none();
            if let Some(e) = next {
                chunk.push(e);
            }
            if chunk.len() >= CHUNK || (done && !chunk.is_empty()) {
                self.produce_chunk(&chunk, &mut counts).await?;
                produced += chunk.len() as u64;
                progress(produced, total);
                chunk.clear();
                if self.pause_after.is_some_and(|n| produced >= n) {
                    tracing::warn!(produced, "pausing the import as asked (--pause-after)");
                    std::future::pending::<()>().await;
                }
            }
            if done {
                break;
            }
        }
        reader
            .await?
            .map_err(|r| anyhow::anyhow!("reading the file again: {r}"))?;
        Ok(counts)
    }

    async fn produce_chunk(&self, chunk: &[Entry], counts: &mut Counts) -> anyhow::Result<()> {
        let (lines, payouts): (Vec<&Entry>, Vec<&Entry>) = chunk
            .iter()
            .partition(|e| matches!(e.leg, Leg::Settlement(_)));
        let stored = self.stored_ids(&lines, &payouts).await?;
        // One sender per chunk: its `finish` waits for every acknowledgement.
        let mut sender = Sender::new(&self.producer);
        for e in chunk {
            let (topic, key, bytes, valid, stamp) = match &e.leg {
                Leg::Settlement(s) => (
                    self.settlements_topic.as_str(),
                    s.payment_reference.as_str(),
                    self.encoder.encode_settlement(s)?,
                    s.validate().is_ok(),
                    s.event_time.timestamp_millis(),
                ),
                Leg::Payout(p) => {
                    anyhow::ensure!(
                        !self.payouts_topic.is_empty(),
                        "a bank statement needs the payouts topic (kafka.payouts_topic)"
                    );
                    (
                        self.payouts_topic.as_str(),
                        p.account_id.as_str(),
                        self.encoder.encode_payout(p)?,
                        p.validate().is_ok(),
                        p.event_time.timestamp_millis(),
                    )
                }
            };
            if stored.contains(e.leg.id()) {
                counts.duplicates += 1;
            } else if !valid {
                counts.rejected += 1;
            } else {
                counts.applied += 1;
            }
            sender.send(topic, key, &bytes, Some(stamp)).await?;
        }
        sender.finish().await
    }

    /// The ids among `lines` and `payouts` already stored.
    async fn stored_ids(
        &self,
        lines: &[&Entry],
        payouts: &[&Entry],
    ) -> anyhow::Result<HashSet<String>> {
        let lines: Vec<&str> = lines.iter().map(|e| e.leg.id()).collect();
        let payouts: Vec<&str> = payouts.iter().map(|e| e.leg.id()).collect();
        let found = file_imports::stored_ids(&self.pool, &lines, &payouts).await?;
        Ok(found.into_iter().collect())
    }
}

/// A numeric sequence number more than one above the account's highest imported one.
async fn sequence_gap(tx: &mut sqlx::PgConnection, c: &Checked) -> anyhow::Result<Option<String>> {
    let (Some(account), Some(sequence)) = (&c.info.account, &c.info.sequence) else {
        return Ok(None);
    };
    if !matches!(c.format, Format::Camt053 | Format::Mt940) {
        return Ok(None);
    }
    let Some(number) = leading_number(sequence) else {
        return Ok(None);
    };
    let others = file_imports::account_sequences(tx, c.format.as_str(), account, &c.digest).await?;
    let highest = others.iter().filter_map(|s| leading_number(s)).max();
    Ok(match highest {
        Some(h) if number > h + 1 => Some(if number == h + 2 {
            format!("{} missing before {number} on account {account}", h + 1)
        } else {
            format!(
                "{}..{} missing before {number} on account {account}",
                h + 1,
                number - 1
            )
        }),
        _ => None,
    })
}

const CHUNK: usize = 5000;

#[derive(Debug, Default)]
struct Counts {
    applied: u64,
    duplicates: u64,
    rejected: u64,
}

struct Claim {
    status: Status,
    report: String,
}

fn leading_number(s: &str) -> Option<u64> {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// SHA-256 and size of a file, and its bytes when small enough to keep.
fn digest_of(path: &Path) -> std::io::Result<(String, u64, Option<Vec<u8>>)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut kept = Some(Vec::new());
    let mut size = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        if size > MAX_KEPT_BYTES {
            kept = None;
        } else if let Some(k) = &mut kept {
            k.extend_from_slice(&buf[..n]);
        }
    }
    Ok((super::hex(&hasher.finalize()), size, kept))
}

/// The `limit` most recent imports, newest first (empty when the table does not exist yet).
pub async fn recent(pool: &PgPool, limit: i64) -> anyhow::Result<Vec<ImportRow>> {
    Ok(file_imports::recent(pool, limit).await?)
}

/// The imports section of the text report.
pub fn render(out: &mut String, imports: &[ImportRow]) {
    use std::fmt::Write;
    if imports.is_empty() {
        return;
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "File imports (latest {}):", imports.len());
    for i in imports {
        let _ = writeln!(
            out,
            "  {} {:<9} {:<8} {} entries {} applied {} duplicates {} rejected  {} by {}{}{}",
            i.started_at.format("%Y-%m-%d %H:%M"),
            i.status,
            i.format,
            i.entries,
            i.applied,
            i.duplicates,
            i.rejected,
            i.name,
            i.imported_by,
            match (&i.statement_id, &i.sequence) {
                (Some(s), Some(q)) => format!("  statement {s} seq {q}"),
                (Some(s), None) => format!("  statement {s}"),
                _ => String::new(),
            },
            if i.report.is_empty() {
                String::new()
            } else {
                format!("\n      {}", i.report)
            },
        );
        if let Some(gap) = &i.sequence_gap {
            let _ = writeln!(out, "      EXCEPTION statement sequence gap: {gap}");
        }
    }
}
