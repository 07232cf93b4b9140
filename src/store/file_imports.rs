//! The registry of file imports (`file_imports`) and the quarantine of refused files
//! (`rejected_files`): the SQL of `crate::files::import`, which holds the rules.

use sqlx::{PgConnection, PgPool, Row};

/// A file's identity and what it claims to be, as recorded in `file_imports`.
#[derive(Debug, Clone, Copy)]
pub struct FileImport<'a> {
    pub digest: &'a str,
    pub name: &'a str,
    pub format: &'a str,
    pub statement_id: Option<&'a str>,
    pub sequence: Option<&'a str>,
    pub account: Option<&'a str>,
    pub currency: Option<&'a str>,
    pub id_prefix: &'a str,
    pub imported_by: &'a str,
    pub entries: i64,
}

/// A refused file: its bytes (when small enough to keep) and the reason.
#[derive(Debug, Clone, Copy)]
pub struct RejectedFile<'a> {
    pub digest: &'a str,
    pub name: &'a str,
    /// The format asked for (`auto` when detected).
    pub format: &'a str,
    pub size: i64,
    pub bytes: Option<&'a [u8]>,
    pub reason: &'a str,
    pub rejected_by: &'a str,
}

/// Records a refused file, in one transaction: the quarantine row and the import row, status
/// REJECTED. A file already imported stays imported (the rules may have tightened since).
pub async fn quarantine(pool: &PgPool, f: RejectedFile<'_>) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO rejected_files (digest, name, size, bytes, bytes_kept, reason, rejected_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(f.digest)
    .bind(f.name)
    .bind(f.size)
    .bind(f.bytes)
    .bind(f.bytes.is_some())
    .bind(f.reason)
    .bind(f.rejected_by)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO file_imports (digest, name, format, imported_by, status, report, finished_at) \
         VALUES ($1, $2, $3, $4, 'REJECTED', $5, now()) \
         ON CONFLICT (digest) DO UPDATE SET report = EXCLUDED.report, finished_at = now() \
         WHERE file_imports.status <> 'IMPORTED'",
    )
    .bind(f.digest)
    .bind(f.name)
    .bind(f.format)
    .bind(f.rejected_by)
    .bind(f.reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Serialises the claims of one statement (`key`) between concurrent importers until the
/// transaction ends.
pub async fn lock_statement(tx: &mut PgConnection, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 26))")
        .bind(key)
        .execute(tx)
        .await?;
    Ok(())
}

/// The status of the import of the file `digest`, locked for the transaction.
pub async fn status_for_update(
    tx: &mut PgConnection,
    digest: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM file_imports WHERE digest = $1 FOR UPDATE")
        .bind(digest)
        .fetch_optional(tx)
        .await
}

/// Another file (digest, name) importing or imported for the same statement as `f`.
pub async fn same_statement_elsewhere(
    tx: &mut PgConnection,
    f: &FileImport<'_>,
) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT digest, name FROM file_imports WHERE format = $1 \
         AND coalesce(account, '') = $2 AND statement_id = $3 \
         AND coalesce(sequence, '') = $4 AND digest <> $5 \
         AND status IN ('IMPORTING', 'IMPORTED')",
    )
    .bind(f.format)
    .bind(f.account.unwrap_or(""))
    .bind(f.statement_id)
    .bind(f.sequence.unwrap_or(""))
    .bind(f.digest)
    .fetch_optional(tx)
    .await
}

/// The sequence numbers of the other files of `format` importing or imported for `account`.
pub async fn account_sequences(
    tx: &mut PgConnection,
    format: &str,
    account: &str,
    digest: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT sequence FROM file_imports WHERE format = $1 AND account = $2 \
         AND status IN ('IMPORTING', 'IMPORTED') AND digest <> $3 AND sequence IS NOT NULL",
    )
    .bind(format)
    .bind(account)
    .bind(digest)
    .fetch_all(tx)
    .await
}

/// Records the import of `f` with `status` (IMPORTING, CONFLICT), its report and a sequence
/// gap found (kept once found).
pub async fn upsert(
    tx: &mut PgConnection,
    f: &FileImport<'_>,
    status: &str,
    report: &str,
    gap: Option<&str>,
) -> Result<(), sqlx::Error> {
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
    .bind(f.digest)
    .bind(f.name)
    .bind(f.format)
    .bind(f.statement_id)
    .bind(f.sequence)
    .bind(f.account)
    .bind(f.currency)
    .bind(f.id_prefix)
    .bind(f.imported_by)
    .bind(status)
    .bind(report)
    .bind(gap)
    .bind(f.entries)
    .execute(tx)
    .await?;
    Ok(())
}

/// What an import produced, recorded when the last entry is acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct Produced {
    pub entries: i64,
    pub applied: i64,
    pub duplicates: i64,
    pub rejected: i64,
}

/// Marks the import of `digest` IMPORTED with its counts.
pub async fn mark_imported(pool: &PgPool, digest: &str, c: Produced) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE file_imports SET status = 'IMPORTED', finished_at = now(), entries = $2, \
         applied = $3, duplicates = $4, rejected = $5 WHERE digest = $1",
    )
    .bind(digest)
    .bind(c.entries)
    .bind(c.applied)
    .bind(c.duplicates)
    .bind(c.rejected)
    .execute(pool)
    .await?;
    Ok(())
}

/// The ids among `line_ids` (settlement lines) and `statement_line_ids` (bank payouts)
/// already stored.
pub async fn stored_ids(
    pool: &PgPool,
    line_ids: &[&str],
    statement_line_ids: &[&str],
) -> Result<Vec<String>, sqlx::Error> {
    let mut found: Vec<String> = Vec::new();
    if !line_ids.is_empty() {
        found.extend(
            sqlx::query_scalar::<_, String>(
                "SELECT line_id FROM settlement_lines WHERE line_id = ANY($1)",
            )
            .bind(line_ids)
            .fetch_all(pool)
            .await?,
        );
    }
    if !statement_line_ids.is_empty() {
        found.extend(
            sqlx::query_scalar::<_, String>(
                "SELECT statement_line_id FROM bank_payouts WHERE statement_line_id = ANY($1)",
            )
            .bind(statement_line_ids)
            .fetch_all(pool)
            .await?,
        );
    }
    Ok(found)
}

/// One import as `payrecon report` lists it.
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
pub async fn recent(pool: &PgPool, limit: i64) -> Result<Vec<ImportRow>, sqlx::Error> {
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
