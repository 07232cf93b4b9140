//! PostgreSQL's own statistics for a benchmark stage: row writes per table
//! (`pg_stat_user_tables`, with HOT updates) and, when the `pg_stat_statements` module is
//! preloaded, the statements that took the time.

use sqlx::PgPool;

/// Row writes of one table during a stage.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableWrites {
    pub table: String,
    pub inserted: i64,
    pub updated: i64,
    /// Of `updated`: heap-only (no index touched).
    pub hot_updated: i64,
    pub deleted: i64,
}

impl TableWrites {
    pub fn total(&self) -> i64 {
        self.inserted + self.updated + self.deleted
    }
}

/// One statement's share of a stage.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatementTime {
    pub calls: i64,
    pub total_ms: f64,
    pub rows: i64,
    /// The statement's first words, whitespace collapsed.
    pub query: String,
}

/// Zeroes the database's table statistics and, if available, the statement statistics.
/// Returns whether statement statistics are collected.
pub async fn reset(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query("SELECT pg_stat_reset()").execute(pool).await?;
    let statements = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await
        .is_ok()
        && sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(pool)
            .await
            .is_ok();
    Ok(statements)
}

/// Row writes per table since [`reset`], most first (tables without any left out). Backends
/// report their counts when their transaction ends and at most every second while busy, so
/// call this after the stage's connections are closed.
pub async fn table_writes(pool: &PgPool) -> Result<Vec<TableWrites>, sqlx::Error> {
    let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del
           FROM pg_stat_user_tables
          WHERE n_tup_ins + n_tup_upd + n_tup_del > 0
          ORDER BY n_tup_ins + n_tup_upd + n_tup_del DESC, relname",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(table, inserted, updated, hot_updated, deleted)| TableWrites {
                table,
                inserted,
                updated,
                hot_updated,
                deleted,
            },
        )
        .collect())
}

/// The `n` statements of this database that took the most execution time since [`reset`].
pub async fn top_statements(pool: &PgPool, n: i64) -> Result<Vec<StatementTime>, sqlx::Error> {
    let rows: Vec<(i64, f64, i64, String)> = sqlx::query_as(
        "SELECT calls, total_exec_time, rows, query FROM pg_stat_statements
          WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND query !~* '^\\s*(BEGIN|COMMIT|SAVEPOINT|RELEASE|SELECT pg_stat)'
          ORDER BY total_exec_time DESC LIMIT $1",
    )
    .bind(n)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(calls, total_ms, rows, query)| {
            let words: Vec<&str> = query.split_whitespace().take(9).collect();
            StatementTime {
                calls,
                total_ms,
                rows,
                query: words.join(" "),
            }
        })
        .collect())
}
