//! Years of history, generated inside PostgreSQL for `payrecon bench --prefill N`: the
//! growth stage measures the service on top of it (`tools::bench::growth`).
//!
//! Everything is `INSERT ... SELECT` over `generate_series` in chunks, so N = 50 million
//! records never cross the network or pass through the service. The history is shaped like
//! the service's own rows: per payment a capture (one in ten also a refund), its settlement
//! line(s), a reconciliation item (97% MATCHED, 2.5% in an exception status, 0.5% still
//! EXPECTED with a deadline past the bench's horizon), two history rows, an outbox row per
//! exception (published), a dead letter per 10,000 payments (one in ten still open); one
//! bank payout, payout item and two payout history rows per settlement batch; and the daily
//! and running totals those rows imply (shard `prefill`), so `report --verify` still holds.
//!
//! Ids are zero-padded (`pf-e-0000000042`) so every btree grows at its right edge, as the
//! service's time-ordered ids mostly do. The items carry no running state (`state` NULL, the
//! form of an item judged before states existed): none of them is ever evaluated again, and
//! the rows are that much (~450 bytes) smaller than the service's.
//!
//! Only the bench calls this, on a database of its own.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// The generated payments of one chunk, with everything derived from the payment number
/// `i`: its time (spread evenly over the span that ends at `$5`), merchant, currency,
/// amount, refund, fee and final status. Parameters: `$1..$2` the chunk, `$3` the total,
/// `$4` the span in seconds, `$5` its end.
const BASE: &str = "
    SELECT i, t, 'merchant-' || lpad(k::text, 3, '0') AS merchant,
           (ARRAY['EUR', 'USD', 'GBP', 'JPY'])[1 + (k % 4)::int] AS cur,
           lpad(i::text, 10, '0') AS n, 'pf-p-' || lpad(i::text, 10, '0') AS ref,
           a, CASE WHEN i % 10 = 3 THEN round(a / 4, d) ELSE 0 END AS refund,
           round(a * 0.015, d) AS fee, (t + interval '1 day') AS settled_at,
           CASE i % 200 WHEN 0 THEN 'MISSING_SETTLEMENT' WHEN 1 THEN 'MISSING_SETTLEMENT'
                        WHEN 2 THEN 'AMOUNT_MISMATCH' WHEN 3 THEN 'AMOUNT_MISMATCH'
                        WHEN 4 THEN 'FEE_MISMATCH' WHEN 5 THEN 'FEE_MISMATCH'
                        WHEN 6 THEN 'EXPECTED' ELSE 'MATCHED' END AS status
      FROM generate_series($1::bigint, $2::bigint - 1) AS i,
           LATERAL (SELECT $5::timestamptz
                           - (($3::bigint - i)::float8 * $4::float8 / $3::float8)
                             * interval '1 second' AS t,
                           (i # (i >> 5)) % 20 AS k) AS x,
           LATERAL (SELECT CASE WHEN k % 4 = 3 THEN 0 ELSE 2 END AS d) AS y,
           LATERAL (SELECT round((10 + (i * 7919) % 100000 / 100.0)::numeric, d) AS a) AS z";

/// Captures, and refunds an hour later.
const EVENTS: &str = "
    INSERT INTO payment_events (event_id, payment_reference, merchant_id, kind, amount, currency,
                                event_time, psp_reference, source_topic, source_partition,
                                source_offset, ingested_at)
    SELECT 'pf-e-' || n, ref, merchant, 'CAPTURE', a, cur, t, 'psp-' || n,
           'payments.transactions', (i % 12)::int, i / 12, t + interval '2 seconds'
      FROM base
    UNION ALL
    SELECT 'pf-r-' || n, ref, merchant, 'REFUND', refund, cur, t + interval '1 hour', NULL,
           'payments.transactions', (i % 12)::int, 1000000000 + i / 12,
           t + interval '1 hour 2 seconds'
      FROM base WHERE refund > 0";

/// A line per capture a day later (none for MISSING_SETTLEMENT and EXPECTED; one unit more
/// gross or fee for the mismatches), a negative line per refund.
const LINES: &str = "
    INSERT INTO settlement_lines (line_id, batch_id, payment_reference, merchant_id, gross, fee,
                                  net, currency, settlement_date, event_time, source_topic,
                                  source_partition, source_offset, ingested_at)
    SELECT line_id, 'pf-b-' || merchant || '-' || to_char(day, 'YYYYMMDD') || '-' || cur,
           ref, merchant, gross, fee, gross - fee, cur, day, settled_at,
           'settlements.lines', (i % 12)::int, off, settled_at + interval '2 seconds'
      FROM (SELECT 'pf-l-' || n AS line_id, ref, merchant, cur, i, settled_at,
                   (settled_at AT TIME ZONE 'UTC')::date AS day, i / 12 AS off,
                   a + CASE status WHEN 'AMOUNT_MISMATCH' THEN 1 ELSE 0 END AS gross,
                   fee + CASE status WHEN 'FEE_MISMATCH' THEN 1 ELSE 0 END AS fee
              FROM base WHERE status NOT IN ('MISSING_SETTLEMENT', 'EXPECTED')
            UNION ALL
            SELECT 'pf-lr-' || n, ref, merchant, cur, i, settled_at,
                   (settled_at AT TIME ZONE 'UTC')::date, 1000000000 + i / 12, -refund, 0
              FROM base WHERE refund > 0 AND status NOT IN ('MISSING_SETTLEMENT', 'EXPECTED'))
           AS l";

const ITEMS: &str = "
    INSERT INTO reconciliation_items (payment_reference, merchant_id, business_date, currency,
                                      status, expected_gross, expected_fee, expected_net,
                                      settled_currency, settled_gross, settled_fee, settled_net,
                                      payment_events, settlement_lines, deadline, reason,
                                      watermark, evaluations, created_at, updated_at)
    SELECT ref, merchant, (t AT TIME ZONE 'UTC')::date, cur, status, a - refund, fee,
           a - refund - fee, CASE WHEN lines > 0 THEN cur END,
           CASE WHEN lines > 0 THEN sg END, CASE WHEN lines > 0 THEN sf END,
           CASE WHEN lines > 0 THEN sg - sf END,
           CASE WHEN refund > 0 THEN 2 ELSE 1 END, lines,
           CASE WHEN status = 'EXPECTED' THEN $5::timestamptz + interval '400 days' END,
           'prefilled history: ' || lower(status), t + interval '2 days', 2, t,
           t + interval '1 day'
      FROM (SELECT *, a - refund + CASE status WHEN 'AMOUNT_MISMATCH' THEN 1 ELSE 0 END AS sg,
                   fee + CASE status WHEN 'FEE_MISMATCH' THEN 1 ELSE 0 END AS sf,
                   CASE WHEN status IN ('MISSING_SETTLEMENT', 'EXPECTED') THEN 0
                        WHEN refund > 0 THEN 2 ELSE 1 END AS lines
              FROM base) AS b";

/// Two status changes per item (none yet → EXPECTED → its status), and an outbox row,
/// published, for each change into an exception status.
const HISTORY: &str = "
    , h AS (
        INSERT INTO reconciliation_history (payment_reference, from_status, to_status, cause,
                                            caused_by, watermark, reason, consumer_group,
                                            evaluated_by, recorded_at)
        SELECT ref, NULL, 'EXPECTED', 'RECORDS', ARRAY['pf-e-' || n], t,
               'awaiting settlement', 'payrecon', 'prefill', t + interval '2 seconds'
          FROM base
        UNION ALL
        SELECT ref, 'EXPECTED', status,
               CASE status WHEN 'MISSING_SETTLEMENT' THEN 'DEADLINE' ELSE 'RECORDS' END,
               CASE status WHEN 'MISSING_SETTLEMENT' THEN '{}'::text[]
                           ELSE ARRAY['pf-l-' || n] END,
               settled_at, 'prefilled history: ' || lower(status), 'payrecon', 'prefill',
               settled_at + interval '2 seconds'
          FROM base WHERE status <> 'EXPECTED'
        RETURNING id, payment_reference, from_status, to_status, watermark, recorded_at)
    INSERT INTO exceptions_outbox (history_id, payment_reference, merchant_id, from_status,
                                   to_status, opened, currency, expected_gross, settled_gross,
                                   reason, watermark, created_at, published_at, leg)
    SELECT h.id, h.payment_reference, 'merchant-' || lpad(k::text, 3, '0'),
           h.from_status, h.to_status, true, (ARRAY['EUR', 'USD', 'GBP', 'JPY'])[1 + (k % 4)::int],
           NULL, NULL, 'prefilled history', h.watermark, h.recorded_at,
           h.recorded_at + interval '1 second', 'SETTLEMENT'
      FROM h, LATERAL (SELECT substr(h.payment_reference, 6)::bigint AS i) AS n,
           LATERAL (SELECT (i # (i >> 5)) % 20 AS k) AS m
     WHERE h.to_status NOT IN ('MATCHED', 'EXPECTED')";

/// A dead letter per 10,000 payments (its bytes do not decode); nine in ten re-driven.
const DEAD_LETTERS: &str = "
    INSERT INTO dead_letters (topic, partition, \"offset\", key, payload, error_kind,
                              error_message, broker_timestamp, created_at, replayed_at,
                              replay_attempts)
    SELECT 'payments.transactions', (i % 12)::int, 2000000000 + i, convert_to(ref, 'UTF8'),
           '\\x00000000'::bytea || decode(md5(n), 'hex'), 'undecodable_body',
           'prefilled history: the body does not decode with its writer schema', t, t,
           CASE WHEN i % 100000 <> 5 THEN t + interval '1 day' END,
           CASE WHEN i % 100000 <> 5 THEN 1 ELSE 0 END
      FROM base WHERE i % 10000 = 5";

/// The settlement batches of the history, once the lines are in: a payout per batch the
/// day after its settlement date, a PAYOUT_MATCHED item and two history rows each.
const PAYOUTS: [&str; 4] = [
    "CREATE TEMP TABLE pf_batches AS
     SELECT batch_id, currency, min(merchant_id) AS merchant_id, count(*) AS lines,
            sum(net) AS net, max(event_time) AS last_line, min(settlement_date) AS day
       FROM settlement_lines GROUP BY batch_id, currency",
    "INSERT INTO bank_payouts (statement_line_id, account_id, value_date, amount, currency,
                               batch_reference, description, event_time, source_topic,
                               source_partition, source_offset, ingested_at)
     SELECT 'pf-s-' || batch_id, 'acct-' || merchant_id, day + 1, net, currency, batch_id,
            'SETTLEMENT ' || batch_id, last_line + interval '1 day', 'bank.payouts', 0,
            row_number() OVER (ORDER BY last_line, batch_id),
            last_line + interval '1 day 2 seconds'
       FROM pf_batches WHERE net <> 0",
    "INSERT INTO payout_items (kind, key, merchant_id, account_id, business_date, currency,
                               status, expected_net, paid, difference, settlement_lines,
                               payouts, deadline, reason, watermark, evaluations, state,
                               created_at, updated_at)
     SELECT 'BATCH', batch_id, merchant_id, 'acct-' || merchant_id, day, currency,
            'PAYOUT_MATCHED', net, net, 0, lines, 1, NULL, 'prefilled history: paid',
            last_line + interval '2 days', 2,
            jsonb_build_object('lines', lines, 'net', jsonb_build_object(currency, net::text),
                               'last_line_time', last_line, 'settlement_date', day,
                               'merchant_id', merchant_id, 'payouts', 1,
                               'paid', jsonb_build_object(currency, net::text),
                               'first_payout_time', last_line + interval '1 day',
                               'value_date', day + 1,
                               'account_id', 'acct-' || merchant_id)::text,
            last_line, last_line + interval '1 day'
       FROM pf_batches WHERE net <> 0",
    "INSERT INTO payout_history (kind, key, from_status, to_status, cause, caused_by,
                                 watermark, reason, consumer_group, evaluated_by, recorded_at)
     SELECT 'BATCH', batch_id, s.from_status, s.to_status, 'RECORDS', '{}', last_line + s.after,
            'prefilled history', 'payrecon', 'prefill', last_line + s.after
       FROM pf_batches,
            (VALUES (NULL, 'PAYOUT_PENDING', interval '0'),
                    ('PAYOUT_PENDING', 'PAYOUT_MATCHED', interval '1 day')) AS s(from_status, to_status, after)
      WHERE net <> 0",
];

/// The totals the history implies, in shard `prefill` (the database held nothing before).
const TOTALS: [&str; 4] = [
    "INSERT INTO merchant_payment_totals_by_shard (merchant_id, currency, kind, shard,
                                                   event_count, amount_sum)
     SELECT merchant_id, currency, kind, 'prefill', count(*), sum(amount)
       FROM payment_events GROUP BY 1, 2, 3",
    "INSERT INTO merchant_settlement_totals_by_shard (merchant_id, currency, shard, line_count,
                                                      gross_sum, fee_sum, net_sum)
     SELECT merchant_id, currency, 'prefill', count(*), sum(gross), sum(fee), sum(net)
       FROM settlement_lines GROUP BY 1, 2",
    "INSERT INTO payout_daily_totals_by_shard (account_id, value_date, currency, shard,
                                               payout_count, credited, debited)
     SELECT account_id, value_date, currency, 'prefill', count(*),
            coalesce(sum(amount) FILTER (WHERE amount > 0), 0),
            coalesce(sum(-amount) FILTER (WHERE amount < 0), 0)
       FROM bank_payouts GROUP BY 1, 2, 3",
    "INSERT INTO merchant_daily_totals_by_shard
         (merchant_id, business_date, currency, shard, captured_count, captured, refunded_count,
          refunded, charged_back_count, charged_back, settled_count, settled_gross,
          settled_fees, settled_net, matched_count, expected_count, exception_count)
     SELECT merchant_id, business_date, currency, 'prefill',
            captured_count, captured, refunded_count, refunded, charged_back_count,
            charged_back, settled_count, settled_gross, settled_fees, settled_net,
            matched_count, expected_count, exception_count
       FROM merchant_daily_totals_recomputed",
];

/// One chunk of the history: payments `from..to` of `total`, spread over `span_secs`
/// seconds that end at `end`; one transaction.
pub async fn prefill_chunk(
    pool: &PgPool,
    (from, to, total): (i64, i64, i64),
    span_secs: f64,
    end: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // A bench database: a crash loses the chunk, and the bench starts over anyway.
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    let with_base = format!("WITH base AS ({BASE})");
    for statement in [EVENTS, LINES, ITEMS, DEAD_LETTERS] {
        sqlx::query(&format!("{with_base} {statement}"))
            .bind(from)
            .bind(to)
            .bind(total)
            .bind(span_secs)
            .bind(end)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(&format!("{with_base} {HISTORY}"))
        .bind(from)
        .bind(to)
        .bind(total)
        .bind(span_secs)
        .bind(end)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// The payouts and totals of the history, after the last chunk.
pub async fn prefill_finish(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for statement in PAYOUTS.iter().chain(TOTALS.iter()) {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    sqlx::query("DROP TABLE pf_batches")
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// `VACUUM (ANALYZE)` of the database: visibility maps and statistics as autovacuum would
/// leave them on a database that has run for years.
pub async fn vacuum_analyze(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("VACUUM (ANALYZE)").execute(pool).await?;
    Ok(())
}

/// One table's size and tuples (`pg_stat_user_tables`, `pg_total_relation_size`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableSize {
    pub table: String,
    pub live_tuples: i64,
    pub dead_tuples: i64,
    /// Heap, indexes and TOAST, bytes.
    pub total_bytes: i64,
    /// Heap alone, bytes.
    pub heap_bytes: i64,
    pub autovacuums: i64,
}

/// Size and tuples of every table of the database, largest first.
pub async fn table_sizes(pool: &PgPool) -> Result<Vec<TableSize>, sqlx::Error> {
    let rows: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT relname::text, n_live_tup, n_dead_tup, pg_total_relation_size(relid),
                pg_relation_size(relid), autovacuum_count + vacuum_count
           FROM pg_stat_user_tables
          ORDER BY pg_total_relation_size(relid) DESC, relname",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(table, live_tuples, dead_tuples, total_bytes, heap_bytes, autovacuums)| TableSize {
                table,
                live_tuples,
                dead_tuples,
                total_bytes,
                heap_bytes,
                autovacuums,
            },
        )
        .collect())
}

/// The statements that run per batch, per deadline sweep, per relay round and per report,
/// as the service sends them (the store's own text, parameters as literals the bench fills
/// in: `{watermark}` the bench's event-time watermark, `{day}` a day of the prefilled
/// history, `{refs}` prefilled references, `{batches}` prefilled batch ids). Their plans at
/// size are what docs/growth.md records.
pub const PLANS: [(&str, &str); 14] = [
    (
        "sweep: due reconciliation items",
        "SELECT payment_reference FROM reconciliation_items
          WHERE status = 'EXPECTED' AND deadline < '{watermark}'
          ORDER BY deadline LIMIT 1000 FOR UPDATE SKIP LOCKED",
    ),
    (
        "sweep: due payout items",
        "SELECT kind, key FROM payout_items
          WHERE status = 'PAYOUT_PENDING' AND deadline < '{watermark}'
          ORDER BY deadline LIMIT 1000 FOR UPDATE SKIP LOCKED",
    ),
    (
        "sweep: items missing reference data",
        "SELECT payment_reference FROM reconciliation_items
          WHERE status = 'MISSING_REFERENCE' AND payment_reference > ''
          ORDER BY payment_reference LIMIT 1000 FOR UPDATE SKIP LOCKED",
    ),
    (
        "batch: items of the batch's references",
        "SELECT payment_reference, status, state FROM reconciliation_items
          WHERE payment_reference = ANY('{refs}') ORDER BY payment_reference FOR UPDATE",
    ),
    (
        "batch: events of the batch's references",
        "SELECT event_id, amount FROM payment_events WHERE payment_reference = ANY('{refs}')",
    ),
    (
        "batch: payout sums of the batch's settlement batches",
        "SELECT batch_id, currency, count(*), sum(net), max(event_time), min(settlement_date),
                min(merchant_id COLLATE \"C\")
           FROM settlement_lines WHERE '{batches}'::text[] IS NULL OR batch_id = ANY('{batches}')
          GROUP BY 1, 2",
    ),
    (
        "batch: history of the batch's references (replay, open exceptions)",
        "SELECT id, to_status FROM reconciliation_history
          WHERE payment_reference = ANY('{refs}') ORDER BY payment_reference, id",
    ),
    (
        "health: backlog of due items and unpublished outbox rows",
        "SELECT (SELECT count(*) FROM reconciliation_items
                  WHERE status = 'EXPECTED' AND deadline < '{watermark}')
              + (SELECT count(*) FROM payout_items
                  WHERE status = 'PAYOUT_PENDING' AND deadline < '{watermark}'),
                (SELECT count(*) FROM exceptions_outbox WHERE published_at IS NULL)",
    ),
    (
        "relay: unpublished outbox rows",
        "SELECT seq FROM exceptions_outbox WHERE published_at IS NULL ORDER BY seq LIMIT 500",
    ),
    (
        "dead letters: open ones",
        "SELECT id FROM dead_letters WHERE replayed_at IS NULL ORDER BY id",
    ),
    (
        "report: the latest day",
        "SELECT max(business_date) FROM merchant_daily_report
          WHERE business_date >= (
              SELECT max(business_date) - 31 FROM merchant_daily_totals_by_shard)",
    ),
    (
        "report: open exceptions of a day",
        "SELECT count(*) FROM open_exceptions WHERE business_date = '{day}'",
    ),
    (
        "report: merchants of a day",
        "SELECT * FROM merchant_daily_report WHERE business_date = '{day}'
          ORDER BY merchant_id, currency",
    ),
    (
        "report: payouts of a day",
        "SELECT * FROM payout_status_summary WHERE business_date = '{day}'",
    ),
];

/// `EXPLAIN (ANALYZE, BUFFERS)` of `sql` in a transaction that is rolled back (the sweeps
/// lock rows); the plan's lines.
pub async fn explain(pool: &PgPool, sql: &str) -> Result<Vec<String>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"))
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok(lines)
}
