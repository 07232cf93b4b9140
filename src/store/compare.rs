//! The comparison: SQL between the live schema and the shadow schema, restricted to the
//! replayed range, streamed row by row into a [`ComparisonSink`] (`payrecon replay`'s report).
//!
//! Everything runs in ONE read-only REPEATABLE READ transaction, so a service that keeps
//! consuming meanwhile is seen at a single instant. Rows are "in the range" by their stored
//! provenance (`source_topic/partition/offset`, the dead letter's position) against the
//! shadow's `audit_range` table.
//!
//! - Events and lines by id. A shadow row whose live twin (same id) lies *outside* the range
//!   is a duplicate of a record applied before the range began: only its content is compared.
//! - Dead letters by position (open ones only: a re-driven dead letter's record is in the
//!   events or lines, where the replay puts it too once it decodes).
//! - Reconciliation items of the references whose live records all lie inside the range
//!   (with a complete range: all of them), on status, bucket, counts and amounts.
//! - Daily totals: for a complete range (every partition of both topics from offset 0 up to
//!   the group's stored offset) `merchant_daily_totals` itself; otherwise the sums of the
//!   events and lines in the range per merchant, day and currency.

use anyhow::Context;
use futures::TryStreamExt;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

use serde::{Deserialize, Serialize};

use super::{Store, quote_ident};
use crate::reconcile::DAILY_COLUMNS;

/// Where a record is in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One column that differs (or, for a missing or extra row, that one side has).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Value {
    pub column: String,
    pub live: Option<String>,
    pub replay: Option<String>,
}

/// One difference between the live tables and what the log implies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub kind: &'static str,
    /// The row's key: event or line id, topic:partition:offset, payment reference,
    /// merchant/date/currency.
    pub key: String,
    /// `missing_in_live`, `extra_in_live` or `different`.
    pub problem: String,
    pub values: Vec<Value>,
    /// The record that explains it (the first of `positions`).
    pub source: Option<Position>,
    /// The records behind the row, in log order (at most 20).
    pub positions: Vec<Position>,
}

/// Sums of the records of one merchant and currency in the range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sums {
    pub payment_events: i64,
    pub captured: String,
    pub refunded: String,
    pub charged_back: String,
    pub settlement_lines: i64,
    pub settled_gross: String,
    pub settled_fees: String,
    pub settled_net: String,
}

/// Per merchant and currency, the stored rows in the range next to the replay's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MerchantTotal {
    pub merchant_id: String,
    pub currency: String,
    pub live: Option<Sums>,
    pub replay: Option<Sums>,
}

/// Row counts of one side.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RowCounts {
    pub payment_events: i64,
    pub settlement_lines: i64,
    pub dead_letters: i64,
}

/// Where the comparison's findings go, as they are found (the replay report writes them out).
pub trait ComparisonSink {
    /// Per merchant and currency, the stored rows in the range next to the replay's.
    fn merchant_total(&mut self, t: &MerchantTotal) -> anyhow::Result<()>;
    /// One difference between the live tables and what the log implies.
    fn difference(&mut self, d: &Difference) -> anyhow::Result<()>;
}

/// Statuses only a passed deadline gives (see [`crate::reconcile`]).
const DEADLINE_STATUSES: &str = "('MISSING_SETTLEMENT', 'UNEXPECTED_SETTLEMENT', 'OVER_SETTLED', 'AMOUNT_MISMATCH', 'FEE_MISMATCH')";

const EVENT_COLUMNS: [&str; 7] = [
    "payment_reference",
    "merchant_id",
    "kind",
    "amount",
    "currency",
    "event_time",
    "psp_reference",
];
const LINE_COLUMNS: [&str; 9] = [
    "batch_id",
    "payment_reference",
    "merchant_id",
    "gross",
    "fee",
    "net",
    "currency",
    "settlement_date",
    "event_time",
];
const PAYOUT_COLUMNS: [&str; 7] = [
    "account_id",
    "value_date",
    "amount",
    "currency",
    "batch_reference",
    "description",
    "event_time",
];
const PAYOUT_ITEM_COLUMNS: [&str; 11] = [
    "merchant_id",
    "account_id",
    "business_date",
    "currency",
    "status",
    "expected_net",
    "paid",
    "difference",
    "settlement_lines",
    "payouts",
    "state",
];
const PAYOUT_DAILY_COLUMNS: [&str; 3] = ["payout_count", "credited", "debited"];
/// Payout statuses only a passed deadline gives.
const PAYOUT_DEADLINE_STATUSES: &str =
    "('PAYOUT_MISSING', 'PAYOUT_AMOUNT_MISMATCH', 'PAYOUT_UNEXPECTED')";
const POSITION_COLUMNS: [&str; 3] = ["source_topic", "source_partition", "source_offset"];
const DEAD_LETTER_COLUMNS: [&str; 5] = [
    "error_kind",
    "error_message",
    "key_sha256",
    "payload_sha256",
    "broker_timestamp",
];
const CONFLICT_COLUMNS: [&str; 9] = [
    "record_type",
    "record_id",
    "stored_topic",
    "stored_partition",
    "stored_offset",
    "stored_fields",
    "incoming_fields",
    "differing_fields",
    "payload_sha256",
];
const ITEM_COLUMNS: [&str; 13] = [
    "merchant_id",
    "business_date",
    "currency",
    "status",
    "expected_gross",
    "expected_fee",
    "expected_net",
    "settled_currency",
    "settled_gross",
    "settled_fee",
    "settled_net",
    "payment_events",
    "settlement_lines",
];

/// One difference as the queries return it.
#[derive(sqlx::FromRow)]
struct Row {
    key: String,
    problem: String,
    #[sqlx(json)]
    values: Vec<Value>,
    #[sqlx(json)]
    positions: Vec<Position>,
}

/// A comparison in progress: the snapshot transaction and the two schemas.
pub struct Comparison<'c> {
    tx: Transaction<'c, Postgres>,
    /// Quoted live and shadow schema names.
    live: String,
    shadow: String,
    /// Whether the range is the whole log the group applied (decided in the snapshot).
    pub complete: bool,
}

/// `CASE WHEN <differs> THEN {column, live, replay} END` for each column, in an array
/// without the NULLs. Sides are aliased `l` and `s`, each with a `present` column;
/// `position` columns only count where the live row is in the range (or a side is missing).
fn values_sql(columns: &[&str], position: &[&str]) -> String {
    let one = |c: &str, pos: bool| {
        let guard = if pos {
            "(l.present IS NULL OR s.present IS NULL OR l.inr) AND "
        } else {
            ""
        };
        // The running state is JSON kept as text, compared as jsonb: a state written before
        // it was text (jsonb's spelling) equals the same state written since, and a text that
        // is not JSON differs (see payrecon_state_jsonb).
        let (sc, lc) = if c == "state" {
            (
                "payrecon_state_jsonb(s.state)".to_owned(),
                "payrecon_state_jsonb(l.state)".to_owned(),
            )
        } else {
            (format!("s.{c}"), format!("l.{c}"))
        };
        format!(
            "CASE WHEN {guard}{sc} IS DISTINCT FROM {lc} THEN jsonb_build_object('column', '{c}', 'live', l.{c}::text, 'replay', s.{c}::text) END"
        )
    };
    let all: Vec<String> = (columns.iter().map(|c| one(c, false)))
        .chain(position.iter().map(|c| one(c, true)))
        .collect();
    format!(
        "to_jsonb(array_remove(ARRAY[{}]::jsonb[], NULL))",
        all.join(", ")
    )
}

const PROBLEM: &str = "CASE WHEN l.present IS NULL THEN 'missing_in_live' WHEN s.present IS NULL THEN 'extra_in_live' ELSE 'different' END";

impl<'c> Comparison<'c> {
    /// Opens the snapshot and decides whether the range is complete: every partition of both
    /// input topics replayed from offset 0 to the group's stored offset.
    pub async fn begin(
        live_store: &'c Store,
        shadow_schema: &str,
        group: &str,
        input_topics: &[&str],
        both_topics: bool,
    ) -> anyhow::Result<Comparison<'c>> {
        let mut tx = live_store.pool().begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        // Values are compared and reported as text: fix how times and dates print.
        sqlx::query("SET LOCAL TimeZone = 'UTC'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SET LOCAL DateStyle = 'ISO, YMD'")
            .execute(&mut *tx)
            .await?;
        let live_schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&mut *tx)
            .await?;
        let live = quote_ident(&live_schema.context("the live database has no current schema")?);
        let shadow = quote_ident(shadow_schema);
        let whole: bool = sqlx::query_scalar(&format!(
            "SELECT count(*) FILTER (WHERE r.topic IS NULL OR r.from_offset <> 0
                                        OR r.to_offset <> coalesce(o.next_offset, 0)) = 0
               FROM {shadow}.audit_range r
               FULL JOIN (SELECT topic, partition, next_offset FROM {live}.consumer_offsets
                           WHERE consumer_group = $1 AND topic = ANY($2)) o
                 ON o.topic = r.topic AND o.partition = r.partition"
        ))
        .bind(group)
        .bind(input_topics)
        .fetch_one(&mut *tx)
        .await?;
        Ok(Comparison {
            tx,
            live,
            shadow,
            complete: both_topics && whole,
        })
    }

    /// `EXISTS` a range row covering `x`'s position.
    fn in_range(&self, x: &str, topic: &str, partition: &str, offset: &str) -> String {
        format!(
            "EXISTS (SELECT 1 FROM {}.audit_range r WHERE r.topic = {x}.{topic}
                        AND r.partition = {x}.{partition} AND {x}.{offset} >= r.from_offset
                        AND {x}.{offset} < r.to_offset)",
            self.shadow
        )
    }

    fn row_in_range(&self, x: &str) -> String {
        self.in_range(x, "source_topic", "source_partition", "source_offset")
    }

    /// Live rows in the range and the shadow's rows that are not twins of live rows outside
    /// it, for events (`ev`) and lines (`li`) on both sides (`l_`, `s_`).
    fn rows_in_range_ctes(&self) -> String {
        let (l, s) = (&self.live, &self.shadow);
        let inr = self.row_in_range("x");
        format!(
            "l_ev AS (SELECT x.* FROM {l}.payment_events x WHERE {inr}),
             l_li AS (SELECT x.* FROM {l}.settlement_lines x WHERE {inr}),
             s_ev AS (SELECT y.* FROM {s}.payment_events y WHERE NOT EXISTS (
                        SELECT 1 FROM {l}.payment_events x WHERE x.event_id = y.event_id AND NOT {inr})),
             s_li AS (SELECT y.* FROM {s}.settlement_lines y WHERE NOT EXISTS (
                        SELECT 1 FROM {l}.settlement_lines x WHERE x.line_id = y.line_id AND NOT {inr}))"
        )
    }

    /// Per-bucket sums of events `ev` and lines `li`, grouped by `keys` ("m, d, c" or "m, c").
    fn sums_sql(ev: &str, li: &str, keys: &str) -> String {
        format!(
            "SELECT {keys}, sum(captured_count)::bigint AS captured_count, sum(captured) AS captured,
                    sum(refunded_count)::bigint AS refunded_count, sum(refunded) AS refunded,
                    sum(charged_back_count)::bigint AS charged_back_count,
                    sum(charged_back) AS charged_back, sum(settled_count)::bigint AS settled_count,
                    sum(settled_gross) AS settled_gross, sum(settled_fees) AS settled_fees,
                    sum(settled_net) AS settled_net
               FROM (SELECT merchant_id AS m, (event_time AT TIME ZONE 'UTC')::date AS d,
                            currency::text AS c,
                            count(*) FILTER (WHERE kind = 'CAPTURE') AS captured_count,
                            coalesce(sum(amount) FILTER (WHERE kind = 'CAPTURE'), 0)::numeric(24,4) AS captured,
                            count(*) FILTER (WHERE kind = 'REFUND') AS refunded_count,
                            coalesce(sum(amount) FILTER (WHERE kind = 'REFUND'), 0)::numeric(24,4) AS refunded,
                            count(*) FILTER (WHERE kind = 'CHARGEBACK') AS charged_back_count,
                            coalesce(sum(amount) FILTER (WHERE kind = 'CHARGEBACK'), 0)::numeric(24,4) AS charged_back,
                            0::bigint AS settled_count, 0::numeric(24,4) AS settled_gross,
                            0::numeric(24,4) AS settled_fees, 0::numeric(24,4) AS settled_net
                       FROM {ev} GROUP BY 1, 2, 3
                     UNION ALL
                     SELECT merchant_id, settlement_date, currency::text, 0, 0::numeric(24,4), 0,
                            0::numeric(24,4), 0, 0::numeric(24,4), count(*), sum(gross)::numeric(24,4),
                            sum(fee)::numeric(24,4), sum(net)::numeric(24,4)
                       FROM {li} GROUP BY 1, 2, 3) u
              GROUP BY {keys}"
        )
    }

    /// Row counts of both sides in the range.
    pub async fn counts(&mut self) -> anyhow::Result<(RowCounts, RowCounts)> {
        let (l, s) = (&self.live, &self.shadow);
        let dl = self.in_range("x", "topic", "partition", "\"offset\"");
        let sql = format!(
            "WITH {ctes}
             SELECT (SELECT count(*) FROM l_ev), (SELECT count(*) FROM l_li),
                    (SELECT count(*) FROM {l}.dead_letters x WHERE x.replayed_at IS NULL AND {dl}),
                    (SELECT count(*) FROM {s}.payment_events), (SELECT count(*) FROM {s}.settlement_lines),
                    (SELECT count(*) FROM {s}.dead_letters)",
            ctes = self.rows_in_range_ctes()
        );
        let (a, b, c, d, e, f): (i64, i64, i64, i64, i64, i64) =
            sqlx::query_as(&sql).fetch_one(&mut *self.tx).await?;
        Ok((
            RowCounts {
                payment_events: a,
                settlement_lines: b,
                dead_letters: c,
            },
            RowCounts {
                payment_events: d,
                settlement_lines: e,
                dead_letters: f,
            },
        ))
    }

    /// Per merchant and currency, the live rows in the range next to the replay's.
    pub async fn merchant_totals(&mut self, out: &mut impl ComparisonSink) -> anyhow::Result<()> {
        let side = |prefix: &str| {
            format!(
                "CASE WHEN {prefix}.m IS NULL THEN NULL ELSE jsonb_build_object(
                    'payment_events', {prefix}.captured_count + {prefix}.refunded_count + {prefix}.charged_back_count,
                    'captured', {prefix}.captured::text, 'refunded', {prefix}.refunded::text,
                    'charged_back', {prefix}.charged_back::text,
                    'settlement_lines', {prefix}.settled_count,
                    'settled_gross', {prefix}.settled_gross::text,
                    'settled_fees', {prefix}.settled_fees::text,
                    'settled_net', {prefix}.settled_net::text) END"
            )
        };
        let sql = format!(
            "WITH {ctes}, l AS ({lsum}), s AS ({ssum})
             SELECT coalesce(s.m, l.m) AS merchant_id, coalesce(s.c, l.c) AS currency,
                    {lj} AS live, {sj} AS replay
               FROM s FULL JOIN l ON l.m = s.m AND l.c = s.c
              ORDER BY coalesce(s.m, l.m) COLLATE \"C\", coalesce(s.c, l.c) COLLATE \"C\"",
            ctes = self.rows_in_range_ctes(),
            lsum = Self::sums_sql("l_ev", "l_li", "m, c"),
            ssum = Self::sums_sql("s_ev", "s_li", "m, c"),
            lj = side("l"),
            sj = side("s"),
        );
        let mut rows =
            sqlx::query_as::<_, (String, String, Option<Json<Sums>>, Option<Json<Sums>>)>(&sql)
                .fetch(&mut *self.tx);
        while let Some((merchant_id, currency, live, replay)) = rows.try_next().await? {
            out.merchant_total(&MerchantTotal {
                merchant_id,
                currency,
                live: live.map(|j| j.0),
                replay: replay.map(|j| j.0),
            })?;
        }
        Ok(())
    }

    async fn stream(
        &mut self,
        kind: &'static str,
        sql: &str,
        complete: Option<bool>,
        out: &mut impl ComparisonSink,
    ) -> anyhow::Result<()> {
        let mut q = sqlx::query_as::<_, Row>(sql);
        if let Some(c) = complete {
            q = q.bind(c);
        }
        let mut rows = q.fetch(&mut *self.tx);
        while let Some(r) = rows.try_next().await? {
            out.difference(&Difference {
                kind,
                key: r.key,
                problem: r.problem,
                values: r.values,
                source: r.positions.first().cloned(),
                positions: r.positions,
            })?;
        }
        Ok(())
    }

    /// Payment events and settlement lines, by id.
    pub async fn rows(&mut self, out: &mut impl ComparisonSink) -> anyhow::Result<()> {
        for (kind, table, key, columns) in [
            (
                "payment_event",
                "payment_events",
                "event_id",
                &EVENT_COLUMNS[..],
            ),
            (
                "settlement_line",
                "settlement_lines",
                "line_id",
                &LINE_COLUMNS[..],
            ),
            (
                "bank_payout",
                "bank_payouts",
                "statement_line_id",
                &PAYOUT_COLUMNS[..],
            ),
        ] {
            let (l, s) = (&self.live, &self.shadow);
            let sql = format!(
                "SELECT key, problem, values, positions FROM (
                    SELECT coalesce(s.{key}, l.{key}) AS key, {PROBLEM} AS problem,
                           {values} AS values,
                           jsonb_build_array(jsonb_build_object(
                               'topic', coalesce(s.source_topic, l.source_topic),
                               'partition', coalesce(s.source_partition, l.source_partition),
                               'offset', coalesce(s.source_offset, l.source_offset))) AS positions,
                           coalesce(s.present OR l.inr, false) AS relevant
                      FROM (SELECT x.*, true AS present FROM {s}.{table} x) s
                      FULL JOIN (SELECT x.*, true AS present, {inr} AS inr FROM {l}.{table} x) l
                        ON l.{key} = s.{key}) d
                  WHERE relevant AND jsonb_array_length(values) > 0
                  ORDER BY key COLLATE \"C\"",
                values = values_sql(columns, &POSITION_COLUMNS),
                inr = self.row_in_range("x"),
            );
            self.stream(kind, &sql, None, out).await?;
        }
        Ok(())
    }

    /// Open dead letters, by position.
    pub async fn dead_letters(&mut self, out: &mut impl ComparisonSink) -> anyhow::Result<()> {
        let side = |schema: &str| {
            format!(
                "SELECT x.topic, x.partition, x.\"offset\", x.error_kind, x.error_message,
                        encode(sha256(x.key), 'hex') AS key_sha256,
                        encode(sha256(x.payload), 'hex') AS payload_sha256,
                        x.broker_timestamp, true AS present
                   FROM {schema}.dead_letters x"
            )
        };
        self.by_position(
            "dead_letter",
            side,
            "x.replayed_at IS NULL AND",
            &DEAD_LETTER_COLUMNS,
            out,
        )
        .await
    }

    /// Conflicting duplicates, by the position of the conflicting record.
    pub async fn conflicting_duplicates(
        &mut self,
        out: &mut impl ComparisonSink,
    ) -> anyhow::Result<()> {
        let side = |schema: &str| {
            format!(
                "SELECT x.topic, x.partition, x.\"offset\", x.record_type, x.record_id,
                        x.stored_topic, x.stored_partition, x.stored_offset, x.stored_fields,
                        x.incoming_fields, x.differing_fields,
                        encode(sha256(x.payload), 'hex') AS payload_sha256, true AS present
                   FROM {schema}.conflicting_duplicates x"
            )
        };
        self.by_position("conflicting_duplicate", side, "", &CONFLICT_COLUMNS, out)
            .await
    }

    /// Rows kept per log position (dead letters, conflicting duplicates): live (filtered by
    /// `live_filter`, within the audited range) against the shadow, column by column.
    async fn by_position(
        &mut self,
        kind: &'static str,
        side: impl Fn(&str) -> String,
        live_filter: &str,
        columns: &[&str],
        out: &mut impl ComparisonSink,
    ) -> anyhow::Result<()> {
        let (l, s) = (&self.live, &self.shadow);
        let sql = format!(
            "SELECT key, problem, values, positions FROM (
                SELECT coalesce(s.topic, l.topic) AS t, coalesce(s.partition, l.partition) AS p,
                       coalesce(s.\"offset\", l.\"offset\") AS o,
                       coalesce(s.topic, l.topic) || ':' || coalesce(s.partition, l.partition) || ':'
                           || coalesce(s.\"offset\", l.\"offset\") AS key,
                       {PROBLEM} AS problem, {values} AS values
                  FROM ({ss}) s
                  FULL JOIN ({ls} WHERE {live_filter} {inr}) l
                    ON l.topic = s.topic AND l.partition = s.partition AND l.\"offset\" = s.\"offset\") d
              CROSS JOIN LATERAL (SELECT jsonb_build_array(jsonb_build_object(
                    'topic', d.t, 'partition', d.p, 'offset', d.o)) AS positions) pos
              WHERE jsonb_array_length(values) > 0
              ORDER BY t COLLATE \"C\", p, o",
            values = values_sql(columns, &[]),
            ss = side(s),
            ls = side(l),
            inr = self.in_range("x", "topic", "partition", "\"offset\""),
        );
        self.stream(kind, &sql, None, out).await
    }

    /// The items of the comparable references (see the module doc), as a list of CTEs (for
    /// a `WITH`). `complete` is the SQL for whether the range is the whole log (a bound
    /// parameter or a literal).
    fn items_cte(&self, complete: &str) -> String {
        let (l, s) = (&self.live, &self.shadow);
        let inr = self.row_in_range("x");
        let values = values_sql(&ITEM_COLUMNS, &[]);
        format!(
            "lrec AS (
                SELECT payment_reference AS ref, bool_and(inr) AS all_in FROM (
                    SELECT x.payment_reference, {inr} AS inr FROM {l}.payment_events x
                    UNION ALL
                    SELECT x.payment_reference, {inr} FROM {l}.settlement_lines x) a
                 GROUP BY 1),
             srec AS (SELECT payment_reference AS ref FROM {s}.payment_events
                      UNION SELECT payment_reference FROM {s}.settlement_lines),
             pairs AS (
                SELECT coalesce(s.payment_reference, l.payment_reference) AS ref,
                       {PROBLEM} AS problem, {values} AS values,
                       l.status AS l_status, s.status AS s_status, l.deadline AS l_deadline,
                       s.deadline AS s_deadline, l.watermark AS l_watermark,
                       s.watermark AS s_watermark
                  FROM (SELECT x.*, true AS present FROM {s}.reconciliation_items x) s
                  FULL JOIN (SELECT x.*, true AS present FROM {l}.reconciliation_items x) l
                    ON l.payment_reference = s.payment_reference),
             judged AS (
                SELECT p.*,
                       coalesce(lr.all_in, true) AND (lr.ref IS NOT NULL OR sr.ref IS NOT NULL OR {complete})
                           AS comparable,
                       coalesce(jsonb_array_length(p.values) = 1
                           AND p.values->0->>'column' = 'status'
                           AND ((p.l_status = 'EXPECTED' AND p.s_status IN {DEADLINE_STATUSES}
                                 AND p.s_watermark > p.l_deadline)
                             OR (p.s_status = 'EXPECTED' AND p.l_status IN {DEADLINE_STATUSES}
                                 AND p.l_watermark > p.s_deadline)), false) AS apart
                  FROM pairs p
                  LEFT JOIN lrec lr ON lr.ref = p.ref
                  LEFT JOIN srec sr ON sr.ref = p.ref)"
        )
    }

    /// Reconciliation items; returns (compared, not comparable, judged at different
    /// watermarks).
    pub async fn items(
        &mut self,
        out: &mut impl ComparisonSink,
    ) -> anyhow::Result<(i64, i64, i64)> {
        let (l, s) = (&self.live, &self.shadow);
        let positions = |schema: &str| {
            format!(
                "SELECT coalesce(jsonb_agg(jsonb_build_object('topic', t, 'partition', p, 'offset', o)
                                  ORDER BY t COLLATE \"C\", p, o), '[]'::jsonb) AS positions
                   FROM (SELECT t, p, o FROM (
                           SELECT source_topic AS t, source_partition AS p, source_offset AS o
                             FROM {schema}.payment_events WHERE payment_reference = d.ref
                           UNION ALL
                           SELECT source_topic, source_partition, source_offset
                             FROM {schema}.settlement_lines WHERE payment_reference = d.ref) r
                          ORDER BY t COLLATE \"C\", p, o LIMIT 20) y"
            )
        };
        let cte = self.items_cte("$1");
        let sql = format!(
            "WITH {cte}
             SELECT d.ref AS key, d.problem, d.values,
                    coalesce(nullif(sp.positions, '[]'::jsonb), lp.positions) AS positions
               FROM (SELECT * FROM judged
                      WHERE comparable AND NOT apart AND jsonb_array_length(values) > 0) d
              CROSS JOIN LATERAL ({sp}) sp
              CROSS JOIN LATERAL ({lp}) lp
              ORDER BY d.ref COLLATE \"C\"",
            sp = positions(s),
            lp = positions(l),
        );
        let complete = self.complete;
        self.stream("reconciliation_item", &sql, Some(complete), out)
            .await?;
        let counts: (i64, i64, i64) = sqlx::query_as(&format!(
            "WITH {cte}
             SELECT count(*) FILTER (WHERE comparable), count(*) FILTER (WHERE NOT comparable),
                    count(*) FILTER (WHERE comparable AND apart)
               FROM judged"
        ))
        .bind(complete)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(counts)
    }

    /// Per merchant, day and currency: `merchant_daily_totals` for a complete range, the
    /// sums of the rows in the range otherwise.
    pub async fn daily_totals(&mut self, out: &mut impl ComparisonSink) -> anyhow::Result<()> {
        let (l, s) = (&self.live, &self.shadow);
        let (sources, columns) = if self.complete {
            let nonzero = format!(
                "({}) IS DISTINCT FROM ({})",
                DAILY_COLUMNS.join(", "),
                vec!["0"; DAILY_COLUMNS.len()].join(", ")
            );
            // An item judged at different watermarks (EXPECTED on one side, a deadline's
            // exception on the other: not a difference, see `items`) is counted in the
            // expected column of one side's bucket and in the exception column of the
            // other's. Such items move to the shadow's column on the live side, so the
            // counts compare as the items do; every other count is compared as stored.
            let cte = self.items_cte("true");
            let live_columns: Vec<String> = DAILY_COLUMNS
                .iter()
                .map(|c| match *c {
                    "expected_count" => {
                        "x.expected_count - coalesce(sh.n, 0) AS expected_count".to_owned()
                    }
                    "exception_count" => {
                        "x.exception_count + coalesce(sh.n, 0) AS exception_count".to_owned()
                    }
                    c => format!("x.{c}"),
                })
                .collect();
            (
                format!(
                    "{cte},
                     shift AS (
                        SELECT i.merchant_id AS m, i.business_date AS d, trim(i.currency) AS c,
                               sum(CASE WHEN j.l_status = 'EXPECTED' THEN 1 ELSE -1 END) AS n
                          FROM judged j JOIN {l}.reconciliation_items i ON i.payment_reference = j.ref
                         WHERE j.comparable AND j.apart GROUP BY 1, 2, 3),
                     s AS (SELECT merchant_id AS m, business_date AS d, trim(currency) AS c, x.*,
                                  true AS present
                             FROM {s}.merchant_daily_totals x WHERE {nonzero}),
                     l AS (SELECT * FROM (
                             SELECT x.merchant_id AS m, x.business_date AS d, trim(x.currency) AS c,
                                    {live}, true AS present
                               FROM {l}.merchant_daily_totals x
                               LEFT JOIN shift sh ON sh.m = x.merchant_id AND sh.d = x.business_date
                                                 AND sh.c = trim(x.currency)) x
                            WHERE {nonzero})",
                    live = live_columns.join(", "),
                ),
                &DAILY_COLUMNS[..],
            )
        } else {
            (
                format!(
                    "{ctes},
                     s AS (SELECT *, true AS present FROM ({ssum}) a),
                     l AS (SELECT *, true AS present FROM ({lsum}) b)",
                    ctes = self.rows_in_range_ctes(),
                    ssum = Self::sums_sql("s_ev", "s_li", "m, d, c"),
                    lsum = Self::sums_sql("l_ev", "l_li", "m, d, c"),
                ),
                &DAILY_COLUMNS[..10],
            )
        };
        let diffs = format!(
            "diffs AS (
                SELECT coalesce(s.m, l.m) AS m, coalesce(s.d, l.d) AS d, coalesce(s.c, l.c) AS c,
                       {PROBLEM} AS problem, {values} AS values
                  FROM s FULL JOIN l ON l.m = s.m AND l.d = s.d AND l.c = s.c)",
            values = values_sql(columns, &[]),
        );
        let n: i64 = sqlx::query_scalar(&format!(
            "WITH {sources}, {diffs} SELECT count(*) FROM diffs WHERE jsonb_array_length(values) > 0"
        ))
        .fetch_one(&mut *self.tx)
        .await?;
        if n == 0 {
            return Ok(());
        }
        // The first records of each bucket (events by day of event time, lines by
        // settlement date), computed in one pass rather than per difference.
        let sql = format!(
            "WITH {sources}, {diffs},
             bp AS (
                SELECT m, d, c, jsonb_agg(jsonb_build_object('topic', t, 'partition', p, 'offset', o)
                                          ORDER BY t COLLATE \"C\", p, o) AS positions
                  FROM (SELECT *, row_number() OVER (PARTITION BY m, d, c
                                                     ORDER BY t COLLATE \"C\", p, o) AS n
                          FROM (SELECT merchant_id AS m, (event_time AT TIME ZONE 'UTC')::date AS d,
                                       trim(currency) AS c, source_topic AS t,
                                       source_partition AS p, source_offset AS o
                                  FROM {s}.payment_events
                                UNION ALL
                                SELECT merchant_id, settlement_date, trim(currency), source_topic,
                                       source_partition, source_offset
                                  FROM {s}.settlement_lines) r) z
                 WHERE n <= 10 GROUP BY m, d, c)
             SELECT diffs.m || '/' || diffs.d::text || '/' || diffs.c AS key, problem, values,
                    coalesce(bp.positions, '[]'::jsonb) AS positions
               FROM diffs LEFT JOIN bp ON bp.m = diffs.m AND bp.d = diffs.d AND bp.c = diffs.c
              WHERE jsonb_array_length(values) > 0
              ORDER BY diffs.m COLLATE \"C\", diffs.d, diffs.c COLLATE \"C\""
        );
        self.stream("merchant_daily_total", &sql, None, out).await
    }

    /// Payout items (kind/key) whose live records all lie in the range, or every one for a
    /// complete range, on every column and the running state; returns (compared, not
    /// comparable, judged at different watermarks) as for [`Comparison::items`].
    pub async fn payout_items(
        &mut self,
        out: &mut impl ComparisonSink,
    ) -> anyhow::Result<(i64, i64, i64)> {
        let (l, s) = (&self.live, &self.shadow);
        let inr = self.row_in_range("x");
        let values = values_sql(&PAYOUT_ITEM_COLUMNS, &[]);
        let cte = format!(
            "WITH lrec AS (
                SELECT kind, key, bool_and(inr) AS all_in FROM (
                    SELECT 'BATCH' AS kind, x.batch_id AS key, {inr} AS inr
                      FROM {l}.settlement_lines x
                    UNION ALL
                    SELECT CASE WHEN x.batch_reference IS NULL THEN 'LINE' ELSE 'BATCH' END,
                           coalesce(x.batch_reference, x.statement_line_id), {inr}
                      FROM {l}.bank_payouts x) a
                 GROUP BY 1, 2),
             pairs AS (
                SELECT coalesce(s.kind, l.kind) AS kind, coalesce(s.key, l.key) AS key,
                       {PROBLEM} AS problem, {values} AS values,
                       l.status AS l_status, s.status AS s_status, l.deadline AS l_deadline,
                       s.deadline AS s_deadline, l.watermark AS l_watermark,
                       s.watermark AS s_watermark
                  FROM (SELECT x.*, true AS present FROM {s}.payout_items x) s
                  FULL JOIN (SELECT x.*, true AS present FROM {l}.payout_items x) l
                    ON l.kind = s.kind AND l.key = s.key),
             judged AS (
                SELECT p.*, ($1 OR coalesce(lr.all_in, false)) AS comparable,
                       coalesce(jsonb_array_length(p.values) = 1
                           AND p.values->0->>'column' = 'status'
                           AND ((p.l_status = 'PAYOUT_PENDING'
                                 AND p.s_status IN {PAYOUT_DEADLINE_STATUSES}
                                 AND p.s_watermark > p.l_deadline)
                             OR (p.s_status = 'PAYOUT_PENDING'
                                 AND p.l_status IN {PAYOUT_DEADLINE_STATUSES}
                                 AND p.l_watermark > p.s_deadline)), false) AS apart
                  FROM pairs p
                  LEFT JOIN lrec lr ON lr.kind = p.kind AND lr.key = p.key)"
        );
        let positions = |schema: &str| {
            format!(
                "SELECT coalesce(jsonb_agg(jsonb_build_object('topic', t, 'partition', p, 'offset', o)
                                  ORDER BY t COLLATE \"C\", p, o), '[]'::jsonb) AS positions
                   FROM (SELECT t, p, o FROM (
                           SELECT source_topic AS t, source_partition AS p, source_offset AS o
                             FROM {schema}.settlement_lines
                            WHERE d.kind = 'BATCH' AND batch_id = d.key
                           UNION ALL
                           SELECT source_topic, source_partition, source_offset
                             FROM {schema}.bank_payouts
                            WHERE coalesce(batch_reference, statement_line_id) = d.key) r
                          ORDER BY t COLLATE \"C\", p, o LIMIT 20) y"
            )
        };
        let sql = format!(
            "{cte}
             SELECT d.kind || '/' || d.key AS key, d.problem, d.values,
                    coalesce(nullif(sp.positions, '[]'::jsonb), lp.positions) AS positions
               FROM (SELECT * FROM judged
                      WHERE comparable AND NOT apart AND jsonb_array_length(values) > 0) d
              CROSS JOIN LATERAL ({sp}) sp
              CROSS JOIN LATERAL ({lp}) lp
              ORDER BY d.kind, d.key COLLATE \"C\"",
            sp = positions(s),
            lp = positions(l),
        );
        let complete = self.complete;
        self.stream("payout_item", &sql, Some(complete), out)
            .await?;
        let counts: (i64, i64, i64) = sqlx::query_as(&format!(
            "{cte}
             SELECT count(*) FILTER (WHERE comparable), count(*) FILTER (WHERE NOT comparable),
                    count(*) FILTER (WHERE comparable AND apart)
               FROM judged"
        ))
        .bind(complete)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(counts)
    }

    /// Per account, value date and currency: `payout_daily_totals` for a complete range,
    /// the sums of the statement lines in the range otherwise.
    pub async fn payout_daily_totals(
        &mut self,
        out: &mut impl ComparisonSink,
    ) -> anyhow::Result<()> {
        let (l, s) = (&self.live, &self.shadow);
        let inr = self.row_in_range("x");
        let sums = |rows: &str| {
            format!(
                "SELECT account_id AS a, value_date AS d, trim(currency) AS c,
                        count(*)::bigint AS payout_count,
                        coalesce(sum(amount) FILTER (WHERE amount > 0), 0)::numeric(24,4) AS credited,
                        coalesce(sum(-amount) FILTER (WHERE amount < 0), 0)::numeric(24,4) AS debited,
                        true AS present
                   FROM ({rows}) r GROUP BY 1, 2, 3"
            )
        };
        let sources = if self.complete {
            format!(
                "s AS (SELECT account_id AS a, value_date AS d, trim(currency) AS c, x.*,
                              true AS present FROM {s}.payout_daily_totals x),
                 l AS (SELECT account_id AS a, value_date AS d, trim(currency) AS c, x.*,
                              true AS present FROM {l}.payout_daily_totals x)"
            )
        } else {
            format!(
                "s AS ({ss}), l AS ({ls})",
                ss = sums(&format!(
                    "SELECT y.* FROM {s}.bank_payouts y WHERE NOT EXISTS (
                        SELECT 1 FROM {l}.bank_payouts x
                         WHERE x.statement_line_id = y.statement_line_id AND NOT {inr})"
                )),
                ls = sums(&format!("SELECT x.* FROM {l}.bank_payouts x WHERE {inr}")),
            )
        };
        let sql = format!(
            "WITH {sources}
             SELECT key, problem, values, '[]'::jsonb AS positions FROM (
                SELECT coalesce(s.a, l.a) || '/' || coalesce(s.d, l.d)::text || '/'
                           || coalesce(s.c, l.c) AS key,
                       {PROBLEM} AS problem, {values} AS values
                  FROM s FULL JOIN l ON l.a = s.a AND l.d = s.d AND l.c = s.c) diffs
              WHERE jsonb_array_length(values) > 0
              ORDER BY key COLLATE \"C\"",
            values = values_sql(&PAYOUT_DAILY_COLUMNS, &[]),
        );
        self.stream("payout_daily_total", &sql, None, out).await
    }

    /// Ends the read-only snapshot.
    pub async fn end(self) -> anyhow::Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }
}
