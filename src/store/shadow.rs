//! The shadow target: a PostgreSQL schema of its own in the live database, holding the same
//! tables (the embedded migrations applied with `search_path` set to it), so the service's
//! unchanged [`Store`] code writes there. Created per replay, dropped at the end.
//!
//! It must never touch a live table: its pool's sessions see only the shadow schema (and
//! `pg_catalog`), so an unqualified table name cannot resolve to a live table.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::ConnectOptions;
use sqlx::postgres::PgPoolOptions;

use super::{MIGRATOR, Store, quote_ident};
use crate::config::DatabaseSettings;

/// A shadow schema and a store whose sessions write into it.
pub struct Shadow {
    pub schema: String,
    pub store: Store,
}

impl Shadow {
    /// Creates `schema` (through the live pool) and migrates it; drops it again if that fails.
    pub async fn create(
        database: &DatabaseSettings,
        live: &Store,
        schema: &str,
    ) -> anyhow::Result<Self> {
        sqlx::query(&format!("CREATE SCHEMA {}", quote_ident(schema)))
            .execute(live.pool())
            .await
            .with_context(|| format!("creating the shadow schema {schema}"))?;
        match Self::connect(database, schema).await {
            Ok(shadow) => Ok(shadow),
            Err(e) => {
                let _ = drop_schema(live, schema).await;
                Err(e)
            }
        }
    }

    async fn connect(database: &DatabaseSettings, schema: &str) -> anyhow::Result<Self> {
        let options = database
            .connect_options()?
            .application_name("payrecon-replay")
            .options([("search_path", schema)])
            .disable_statement_logging();
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(database.connect_timeout)
            .connect_with(options)
            .await
            .context("connecting to the shadow schema")?;
        let shadow = Shadow {
            schema: schema.to_owned(),
            store: Store::new(pool),
        };
        MIGRATOR
            .run(shadow.store.pool())
            .await
            .context("applying the migrations to the shadow schema")?;
        Ok(shadow)
    }

    /// Drops the schema and everything in it.
    pub async fn drop_schema(self, live: &Store) -> anyhow::Result<()> {
        self.store.pool().close().await;
        drop_schema(live, &self.schema).await
    }

    /// Records the replayed range (the comparison reads it): (topic, partition, from, to) of
    /// every partition of the replayed topics, empty ranges included.
    pub async fn write_range(&self, ranges: &[(&str, i32, i64, i64)]) -> Result<(), sqlx::Error> {
        sqlx::query(
            "CREATE TABLE audit_range (
                topic text NOT NULL, partition integer NOT NULL,
                from_offset bigint NOT NULL, to_offset bigint NOT NULL,
                PRIMARY KEY (topic, partition))",
        )
        .execute(self.store.pool())
        .await?;
        let topics: Vec<&str> = ranges.iter().map(|r| r.0).collect();
        let partitions: Vec<i32> = ranges.iter().map(|r| r.1).collect();
        let from: Vec<i64> = ranges.iter().map(|r| r.2).collect();
        let to: Vec<i64> = ranges.iter().map(|r| r.3).collect();
        sqlx::query(
            "INSERT INTO audit_range SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::bigint[])",
        )
        .bind(&topics)
        .bind(&partitions)
        .bind(&from)
        .bind(&to)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }

    /// Raises the shadow's per-partition event times to the live group's, so that deadlines
    /// are judged at the live watermark. Only for ranges that are not the whole log: their
    /// verdicts depend on records outside the range, which the live event times summarise.
    pub async fn align_watermark(
        &self,
        group: &str,
        live: &HashMap<(String, i32), Option<DateTime<Utc>>>,
    ) -> Result<(), sqlx::Error> {
        let mut rows: Vec<_> = live
            .iter()
            .filter_map(|((t, p), time)| time.map(|time| (t.as_str(), *p, time)))
            .collect();
        rows.sort();
        let topics: Vec<&str> = rows.iter().map(|r| r.0).collect();
        let partitions: Vec<i32> = rows.iter().map(|r| r.1).collect();
        let times: Vec<DateTime<Utc>> = rows.iter().map(|r| r.2).collect();
        sqlx::query(
            "INSERT INTO consumer_offsets AS o (consumer_group, topic, partition, next_offset,
                    max_event_time, last_committed_by)
             SELECT $1, t, p, 0, m, 'replay: live watermark'
               FROM UNNEST($2::text[], $3::int[], $4::timestamptz[]) AS i(t, p, m)
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE
                SET max_event_time = GREATEST(o.max_event_time, excluded.max_event_time)",
        )
        .bind(group)
        .bind(&topics)
        .bind(&partitions)
        .bind(&times)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }

    /// Fresh statistics for the planner: the comparison joins these tables with the live ones.
    pub async fn analyze(&self) -> Result<(), sqlx::Error> {
        sqlx::query(
            "ANALYZE payment_events, settlement_lines, dead_letters, reconciliation_items,
                     merchant_daily_totals_by_shard, audit_range",
        )
        .execute(self.store.pool())
        .await?;
        Ok(())
    }
}

/// `DROP SCHEMA ... CASCADE`, giving up after 30 s rather than waiting forever for a lock
/// (an abandoned comparison's snapshot is rolled back when its connection is reused).
async fn drop_schema(live: &Store, schema: &str) -> anyhow::Result<()> {
    let mut tx = live.pool().begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '30s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        quote_ident(schema)
    ))
    .execute(&mut *tx)
    .await
    .with_context(|| format!("dropping the shadow schema {schema}"))?;
    tx.commit().await?;
    Ok(())
}
