//! The audit trail of `payrecon replay` in the live database (`audit_runs`: who replayed
//! what, when, with which result), and the live event times a partial replay aligns with.

use chrono::{DateTime, Utc};

use super::Store;

/// An audit run as it starts.
pub struct AuditStart<'a> {
    pub id: &'a str,
    pub requested_by: &'a str,
    pub consumer_group: &'a str,
    pub started_at: DateTime<Utc>,
    /// The range as requested (JSON).
    pub range: serde_json::Value,
    pub shadow_schema: &'a str,
}

/// How an audit run ended, when it ran to its end or was interrupted.
pub struct AuditEnd<'a> {
    pub records_read: i64,
    /// `None` when interrupted (the comparison did not run).
    pub differences: Option<i64>,
    pub result: &'a str,
    pub digest: Option<&'a str>,
    /// The partitions' ranges as read (JSON), added to the run's `range`.
    pub partitions: serde_json::Value,
}

impl Store {
    /// Records an audit run as started.
    pub async fn audit_started(&self, run: &AuditStart<'_>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO audit_runs (id, requested_by, consumer_group, started_at, range, shadow_schema)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(run.id)
        .bind(run.requested_by)
        .bind(run.consumer_group)
        .bind(run.started_at)
        .bind(sqlx::types::Json(&run.range))
        .bind(run.shadow_schema)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records how audit run `id` ended.
    pub async fn audit_finished(&self, id: &str, end: &AuditEnd<'_>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE audit_runs SET finished_at = now(), records_read = $2, differences = $3,
                    result = $4, report_digest = $5,
                    range = range || jsonb_build_object('partitions', $6::jsonb)
              WHERE id = $1",
        )
        .bind(id)
        .bind(end.records_read)
        .bind(end.differences)
        .bind(end.result)
        .bind(end.digest)
        .bind(sqlx::types::Json(&end.partitions))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records that audit run `id` failed, and why.
    pub async fn audit_failed(&self, id: &str, error: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE audit_runs SET finished_at = now(), result = 'ERROR', error_message = $2
              WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The highest event time `group` applied per partition of `topics`.
    pub async fn event_times(
        &self,
        group: &str,
        topics: &[&str],
    ) -> Result<std::collections::HashMap<(String, i32), Option<DateTime<Utc>>>, sqlx::Error> {
        let times: Vec<(String, i32, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT topic, partition, max_event_time FROM consumer_offsets
              WHERE consumer_group = $1 AND topic = ANY($2)",
        )
        .bind(group)
        .bind(topics)
        .fetch_all(self.pool())
        .await?;
        Ok(times.into_iter().map(|(t, p, m)| ((t, p), m)).collect())
    }
}
