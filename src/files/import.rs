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

use crate::kafka::producer::{FutureProducer, Sender};
use anyhow::Context;
use sqlx::{PgPool, Row};

use super::{Checked, Entry, Format, Leg, ParseOptions, Rejection};
use crate::inputs::Encoder;

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
        sqlx::query(
            "UPDATE file_imports SET status = 'IMPORTED', finished_at = now(), entries = $2, \
             applied = $3, duplicates = $4, rejected = $5 WHERE digest = $1",
        )
        .bind(&checked.digest)
        .bind(checked.info.entries as i64)
        .bind(counts.applied as i64)
        .bind(counts.duplicates as i64)
        .bind(counts.rejected as i64)
        .execute(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO rejected_files (digest, name, size, bytes, bytes_kept, reason, rejected_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&digest)
        .bind(name)
        .bind(size as i64)
        .bind(bytes.as_deref())
        .bind(bytes.is_some())
        .bind(&reason)
        .bind(&self.by)
        .execute(&mut *tx)
        .await?;
        // A file already imported stays imported (the rules may have tightened since).
        sqlx::query(
            "INSERT INTO file_imports (digest, name, format, imported_by, status, report, finished_at) \
             VALUES ($1, $2, $3, $4, 'REJECTED', $5, now()) \
             ON CONFLICT (digest) DO UPDATE SET report = EXCLUDED.report, finished_at = now() \
             WHERE file_imports.status <> 'IMPORTED'",
        )
        .bind(&digest)
        .bind(name)
        .bind(self.format.map(|f| f.as_str()).unwrap_or("auto"))
        .bind(&self.by)
        .bind(&reason)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
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
        let mut tx = self.pool.begin().await?;
        // Serialise claims of one statement (and of one file) between concurrent importers.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 26))")
            .bind(format!(
                "{}|{}|{}|{}",
                c.format,
                i.account.as_deref().unwrap_or(""),
                i.statement_id.as_deref().unwrap_or(&c.digest),
                i.sequence.as_deref().unwrap_or("")
            ))
            .execute(&mut *tx)
            .await?;
        let existing: Option<String> =
            sqlx::query_scalar("SELECT status FROM file_imports WHERE digest = $1 FOR UPDATE")
                .bind(&c.digest)
                .fetch_optional(&mut *tx)
                .await?;
        if existing.as_deref() == Some("IMPORTED") {
            tx.commit().await?;
            return Ok(Claim {
                status: Status::Imported,
                report: String::new(),
            });
        }
        if let Some(statement) = &i.statement_id {
            let other: Option<(String, String)> = sqlx::query_as(
                "SELECT digest, name FROM file_imports WHERE format = $1 \
                 AND coalesce(account, '') = $2 AND statement_id = $3 \
                 AND coalesce(sequence, '') = $4 AND digest <> $5 \
                 AND status IN ('IMPORTING', 'IMPORTED')",
            )
            .bind(c.format.as_str())
            .bind(i.account.as_deref().unwrap_or(""))
            .bind(statement)
            .bind(i.sequence.as_deref().unwrap_or(""))
            .bind(&c.digest)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((digest, other_name)) = other {
                let report = format!(
                    "statement {statement} (sequence {}) of account {} was already imported from another file ({other_name}, digest {}): not merged",
                    i.sequence.as_deref().unwrap_or("-"),
                    i.account.as_deref().unwrap_or("-"),
                    &digest[..16]
                );
                self.upsert(&mut tx, name, c, "CONFLICT", &report, None)
                    .await?;
                tx.commit().await?;
                return Ok(Claim {
                    status: Status::Conflict,
                    report,
                });
            }
        }
        let gap = self.sequence_gap(&mut tx, c).await?;
        self.upsert(&mut tx, name, c, "IMPORTING", "", gap.as_deref())
            .await?;
        tx.commit().await?;
        Ok(Claim {
            status: Status::Importing,
            report: gap
                .map(|g| format!("sequence gap: {g}"))
                .unwrap_or_default(),
        })
    }

    async fn upsert(
        &self,
        tx: &mut sqlx::PgConnection,
        name: &str,
        c: &Checked,
        status: &str,
        report: &str,
        gap: Option<&str>,
    ) -> anyhow::Result<()> {
        let i = &c.info;
        sqlx::query(
            "INSERT INTO file_imports (digest, name, format, statement_id, sequence, account, \
             currency, id_prefix, imported_by, status, report, sequence_gap, entries, finished_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
                     CASE WHEN $10 = 'IMPORTING' THEN NULL ELSE now() END) \
             ON CONFLICT (digest) DO UPDATE SET name = EXCLUDED.name, format = EXCLUDED.format, \
               statement_id = EXCLUDED.statement_id, sequence = EXCLUDED.sequence, \
               account = EXCLUDED.account, currency = EXCLUDED.currency, \
               id_prefix = EXCLUDED.id_prefix, imported_by = EXCLUDED.imported_by, \
               status = EXCLUDED.status, report = EXCLUDED.report, \
               sequence_gap = coalesce(file_imports.sequence_gap, EXCLUDED.sequence_gap), \
               entries = EXCLUDED.entries, finished_at = EXCLUDED.finished_at",
        )
        .bind(&c.digest)
        .bind(name)
        .bind(c.format.as_str())
        .bind(&i.statement_id)
        .bind(&i.sequence)
        .bind(&i.account)
        .bind(i.currency.map(|c| c.code()))
        .bind(&c.id_prefix)
        .bind(&self.by)
        .bind(status)
        .bind(report)
        .bind(gap)
        .bind(i.entries as i64)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// A numeric sequence number more than one above the account's highest imported one.
    async fn sequence_gap(
        &self,
        tx: &mut sqlx::PgConnection,
        c: &Checked,
    ) -> anyhow::Result<Option<String>> {
        let (Some(account), Some(sequence)) = (&c.info.account, &c.info.sequence) else {
            return Ok(None);
        };
        if !matches!(c.format, Format::Camt053 | Format::Mt940) {
            return Ok(None);
        }
        let Some(number) = leading_number(sequence) else {
            return Ok(None);
        };
        let rows = sqlx::query(
            "SELECT sequence FROM file_imports WHERE format = $1 AND account = $2 \
             AND status IN ('IMPORTING', 'IMPORTED') AND digest <> $3 AND sequence IS NOT NULL",
        )
        .bind(c.format.as_str())
        .bind(account)
        .bind(&c.digest)
        .fetch_all(&mut *tx)
        .await?;
        let highest = rows
            .iter()
            .filter_map(|r| leading_number(&r.get::<String, _>(0)))
            .max();
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
        let mut stored = HashSet::new();
        for (table, column, entries) in [
            ("settlement_lines", "line_id", lines),
            ("bank_payouts", "statement_line_id", payouts),
        ] {
            if entries.is_empty() {
                continue;
            }
            let ids: Vec<&str> = entries.iter().map(|e| e.leg.id()).collect();
            let found: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT {column} FROM {table} WHERE {column} = ANY($1)"
            ))
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
            stored.extend(found);
        }
        Ok(stored)
    }
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

/// The recent imports and rejections, for `payrecon report`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImportRow {
    pub name: String,
    pub format: String,
    pub status: String,
    pub statement_id: Option<String>,
    pub sequence: Option<String>,
    pub account: Option<String>,
    pub imported_by: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub entries: i64,
    pub applied: i64,
    pub duplicates: i64,
    pub rejected: i64,
    pub report: String,
    pub sequence_gap: Option<String>,
}

/// The `limit` most recent imports, newest first (empty when the table does not exist yet).
pub async fn recent(pool: &PgPool, limit: i64) -> anyhow::Result<Vec<ImportRow>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('file_imports') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT name, format, status, statement_id, sequence, account, imported_by, started_at, \
         entries, applied, duplicates, rejected, report, sequence_gap \
         FROM file_imports ORDER BY started_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| ImportRow {
            name: r.get(0),
            format: r.get(1),
            status: r.get(2),
            statement_id: r.get(3),
            sequence: r.get(4),
            account: r.get(5),
            imported_by: r.get(6),
            started_at: r.get(7),
            entries: r.get(8),
            applied: r.get(9),
            duplicates: r.get(10),
            rejected: r.get(11),
            report: r.get(12),
            sequence_gap: r.get(13),
        })
        .collect())
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
