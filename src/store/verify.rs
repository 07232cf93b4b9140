//! `payrecon report --verify`, the SQL: every table the service derives, compared with what
//! it derives from, in one REPEATABLE READ READ ONLY snapshot. It only reads. The checks that
//! run the matcher again are in [`crate::engine::verify`].
//!
//! Each [`Check`] is one set-based query (the re-evaluation of the items is the exception: it
//! runs the matcher in Rust, over the items in key order, in chunks) and reports what it
//! compared and every difference as (key, stored, recomputed), the first [`MAX_SHOWN`] of them
//! by key. What each check proves is in [`CHECKS`]; docs/operations.md (`payrecon report`)
//! also says what each cannot prove.
//!
//! What none of them can prove: that the stored events and lines are the records of the log
//! (an event deleted together with its share of every total and item looks consistent; that
//! is what `payrecon replay` is for), and anything about the reference data itself.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgConnection, Postgres, Transaction};

use super::Store;

/// Differences listed per check (the count is always complete): a broken table should not
/// print millions of lines.
pub const MAX_SHOWN: i64 = 100;

/// The checks, in the order they run and are printed: (name, table, what it proves).
pub const CHECKS: [(&str, &str, &str); 14] = [
    (
        "payment_totals",
        "merchant_payment_totals",
        "event_count and amount_sum per merchant, currency and kind equal count(*) and sum(amount) \
         of payment_events; no row missing on either side",
    ),
    (
        "settlement_totals",
        "merchant_settlement_totals",
        "line_count, gross_sum, fee_sum and net_sum per merchant and currency equal the sums of \
         settlement_lines; no row missing on either side",
    ),
    (
        "daily_totals",
        "merchant_daily_totals",
        "every column equals merchant_daily_totals_recomputed (all-zero rows count as absent)",
    ),
    (
        "item_records",
        "reconciliation_items",
        "merchant_id and business_date (of the earliest event, else line), payment_events, \
         settlement_lines, settled_currency and settled gross/fee/net equal those recomputed \
         from payment_events and settlement_lines; every reference with a record has an item \
         and every item has a record",
    ),
    (
        "item_verdicts",
        "reconciliation_items",
        "status, currency, expected gross/fee/net, deadline, reason and the running state equal \
         a re-evaluation by the service's matcher of the item's records (the state folded from \
         nothing over all of them) at the item's stored watermark, with the \
         reference data and rules as they are now (a reference-data change after the \
         evaluation shows as a difference and is marked so)",
    ),
    (
        "item_history",
        "reconciliation_history",
        "every item has history and the to_status of its latest history row is its status; no \
         history for a reference without an item",
    ),
    (
        "history_chains",
        "reconciliation_history",
        "per reference, in id order, the first row has no from_status and every other row's \
         from_status is the previous row's to_status",
    ),
    (
        "exceptions_outbox",
        "exceptions_outbox",
        "every outbox row belongs to an existing history row into or out of an exception \
         status, with the same reference, from/to status and opened flag, and its reference \
         has an item; every such history row has exactly one outbox row",
    ),
    (
        "payout_totals",
        "payout_daily_totals",
        "payout_count, credited and debited per account, value date and currency equal \
         payout_daily_totals_recomputed (the sums of bank_payouts); no row missing on either side",
    ),
    (
        "payout_verdicts",
        "payout_items",
        "every payout item's running state equals the sums of its batch's settlement lines and \
         its bank statement lines, and its status, deadline and reason equal the payout \
         matcher's judgement of them at the item's watermark; every batch and every \
         statement line without a batch reference has an item",
    ),
    (
        "payout_history",
        "payout_history",
        "every payout item's latest history row has its status, and per item, in id order, \
         each row's from_status is the previous row's to_status (none on the first)",
    ),
    (
        "payout_outbox",
        "exceptions_outbox",
        "every outbox row of leg PAYOUT belongs to a payout history row into or out of a \
         payout exception status, with the same key, statuses and opened flag; every such \
         history row has exactly one",
    ),
    (
        "offsets_records_applied",
        "consumer_offsets",
        "per group and partition: distinct log positions with a row (event, line or dead \
         letter) below next_offset <= records_applied <= next_offset (equal to next_offset \
         only with contiguous offsets from 0; the gap to the lower bound is re-deliveries \
         ignored as duplicates)",
    ),
    (
        "offsets_cover_rows",
        "consumer_offsets",
        "no payment event, settlement line or dead letter has an offset at or beyond its \
         partition's stored next_offset (an effect committed without its offset), or a \
         partition without a stored offset",
    ),
];

/// One difference: a row of the checked table (or of its source) that does not agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The row's key in the checked table, e.g. `merchant-000/EUR/CAPTURE`.
    pub key: String,
    /// What the table stores (only the differing columns), or `missing`.
    pub stored: String,
    /// What it should store according to its source, or `missing`.
    pub recomputed: String,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable name, for scripts and the exit message.
    pub name: &'static str,
    /// The derived table checked.
    pub table: &'static str,
    /// What a pass proves.
    pub proves: &'static str,
    /// Rows (or keys, or partitions) compared.
    pub checked: i64,
    /// How many of them differ; `differences` holds the first [`MAX_SHOWN`] by key.
    pub differing: i64,
    pub differences: Vec<Difference>,
    /// Figures that explain a pass without being a difference (offset gaps, re-deliveries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.differing == 0
    }

    pub fn new(name: &'static str) -> Check {
        let (_, table, proves) = CHECKS
            .iter()
            .find(|(n, _, _)| *n == name)
            .copied()
            .expect("every check is listed in CHECKS");
        Check {
            name,
            table,
            proves,
            checked: 0,
            differing: 0,
            differences: Vec::new(),
            note: None,
        }
    }
}

/// SQL that compares `columns` of rows `a` and `b`: (the differing columns of `a`, the same of
/// `b`, whether any differ). A side whose `key` column is NULL is `missing`.
fn compare_columns(columns: &[&str], key: &str) -> (String, String, String) {
    let side = |t: &str| {
        let parts: Vec<String> = columns
            .iter()
            .map(|c| {
                format!(
                    "CASE WHEN a.{c} IS DISTINCT FROM b.{c} \
                          THEN '{c}=' || coalesce({t}.{c}::text, 'NULL') END"
                )
            })
            .collect();
        format!(
            "CASE WHEN {t}.{key} IS NULL THEN 'missing' ELSE concat_ws(' ', {}) END",
            parts.join(", ")
        )
    };
    let tuple = |t: &str| {
        let cols: Vec<String> = columns.iter().map(|c| format!("{t}.{c}")).collect();
        format!("({})", cols.join(", "))
    };
    (
        side("a"),
        side("b"),
        format!(
            "(a.{key} IS NULL OR b.{key} IS NULL OR {} IS DISTINCT FROM {})",
            tuple("a"),
            tuple("b")
        ),
    )
}

/// The query of a check whose comparison rows `j` have columns (key, stored, recomputed,
/// differs): how many rows, how many differ, and the first `$1` differing ones by key. Always
/// returns at least one row (with NULL key when nothing differs).
fn check_sql(j: &str) -> String {
    format!(
        "WITH j AS ({j})
         SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM j WHERE differs),
                d.key, d.stored, d.recomputed
           FROM (VALUES (1)) AS one(x)
           LEFT JOIN LATERAL (SELECT key, stored, recomputed FROM j WHERE differs
                               ORDER BY key LIMIT $1) d ON true"
    )
}

/// A row of [`check_sql`]: compared, differing, then one difference (key, stored,
/// recomputed), NULL when there is none.
type CheckRow = (i64, i64, Option<String>, Option<String>, Option<String>);

async fn run_sql_check(
    conn: &mut PgConnection,
    name: &'static str,
    j: &str,
) -> Result<Check, sqlx::Error> {
    let rows: Vec<CheckRow> = sqlx::query_as(&check_sql(j))
        .bind(MAX_SHOWN)
        .fetch_all(&mut *conn)
        .await?;
    let mut check = Check::new(name);
    for (checked, differing, key, stored, recomputed) in rows {
        check.checked = checked;
        check.differing = differing;
        if let Some(key) = key {
            check.differences.push(Difference {
                key,
                stored: stored.unwrap_or_default(),
                recomputed: recomputed.unwrap_or_default(),
            });
        }
    }
    Ok(check)
}

fn payment_totals_sql() -> String {
    let (stored, recomputed, differs) = compare_columns(&["event_count", "amount_sum"], "kind");
    format!(
        "SELECT concat_ws('/', coalesce(a.merchant_id, b.merchant_id),
                          trim(coalesce(a.currency, b.currency)), coalesce(a.kind, b.kind)) AS key,
                {stored} AS stored, {recomputed} AS recomputed, {differs} AS differs
           FROM merchant_payment_totals a
           FULL JOIN (SELECT merchant_id, currency, kind, count(*) AS event_count,
                             sum(amount) AS amount_sum
                        FROM payment_events GROUP BY 1, 2, 3) b
             ON a.merchant_id = b.merchant_id AND a.currency = b.currency AND a.kind = b.kind"
    )
}

fn settlement_totals_sql() -> String {
    let (stored, recomputed, differs) = compare_columns(
        &["line_count", "gross_sum", "fee_sum", "net_sum"],
        "merchant_id",
    );
    format!(
        "SELECT concat_ws('/', coalesce(a.merchant_id, b.merchant_id),
                          trim(coalesce(a.currency, b.currency))) AS key,
                {stored} AS stored, {recomputed} AS recomputed, {differs} AS differs
           FROM merchant_settlement_totals a
           FULL JOIN (SELECT merchant_id, currency, count(*) AS line_count,
                             sum(gross) AS gross_sum, sum(fee) AS fee_sum, sum(net) AS net_sum
                        FROM settlement_lines GROUP BY 1, 2) b
             ON a.merchant_id = b.merchant_id AND a.currency = b.currency"
    )
}

fn daily_totals_sql() -> String {
    let columns = crate::reconcile::DAILY_COLUMNS;
    let (stored, recomputed, differs) = compare_columns(&columns, "merchant_id");
    let zeros = vec!["0"; columns.len()].join(", ");
    format!(
        "SELECT concat_ws('/', coalesce(a.merchant_id, b.merchant_id),
                          coalesce(a.business_date, b.business_date)::text,
                          trim(coalesce(a.currency, b.currency))) AS key,
                {stored} AS stored, {recomputed} AS recomputed, {differs} AS differs
           FROM (SELECT * FROM merchant_daily_totals
                  -- Rows every item has moved out of again hold only zeros: absent.
                  WHERE ({cols}) IS DISTINCT FROM ({zeros})) a
           FULL JOIN merchant_daily_totals_recomputed b
             ON a.merchant_id = b.merchant_id AND a.business_date = b.business_date
            AND a.currency = b.currency",
        cols = columns.join(", "),
    )
}

/// What an item stores that follows from its records alone, without pricing. The anchor
/// (merchant and business date) is the earliest event by (event_time, event_id), else the
/// earliest line, as in `judge`; ids compare bytewise (COLLATE "C") as Rust sorts them.
fn item_records_sql() -> String {
    let (stored, recomputed, differs) = compare_columns(
        &[
            "merchant_id",
            "business_date",
            "payment_events",
            "settlement_lines",
            "settled_currency",
            "settled_gross",
            "settled_fee",
            "settled_net",
        ],
        "payment_reference",
    );
    format!(
        "WITH ev AS (
            SELECT payment_reference, count(*) AS n,
                   (array_agg(merchant_id ORDER BY event_time, event_id COLLATE \"C\"))[1]
                       AS merchant_id,
                   (min(event_time) AT TIME ZONE 'UTC')::date AS business_date
              FROM payment_events GROUP BY 1
         ), li AS (
            SELECT payment_reference, count(*) AS n,
                   (array_agg(merchant_id ORDER BY event_time, line_id COLLATE \"C\"))[1]
                       AS merchant_id,
                   (min(event_time) AT TIME ZONE 'UTC')::date AS business_date,
                   -- The matcher sums the lines only when they share one currency.
                   CASE WHEN count(DISTINCT currency) = 1 THEN min(currency) END
                       AS settled_currency,
                   CASE WHEN count(DISTINCT currency) = 1 THEN sum(gross) END AS settled_gross,
                   CASE WHEN count(DISTINCT currency) = 1 THEN sum(fee) END AS settled_fee,
                   CASE WHEN count(DISTINCT currency) = 1 THEN sum(net) END AS settled_net
              FROM settlement_lines GROUP BY 1
         ), b AS (
            SELECT payment_reference,
                   coalesce(ev.merchant_id, li.merchant_id) AS merchant_id,
                   coalesce(ev.business_date, li.business_date) AS business_date,
                   coalesce(ev.n, 0)::integer AS payment_events,
                   coalesce(li.n, 0)::integer AS settlement_lines,
                   li.settled_currency, li.settled_gross, li.settled_fee, li.settled_net
              FROM ev FULL JOIN li USING (payment_reference)
         )
         SELECT coalesce(a.payment_reference, b.payment_reference) AS key,
                {stored} AS stored, {recomputed} AS recomputed, {differs} AS differs
           FROM (SELECT payment_reference, merchant_id, business_date, payment_events,
                        settlement_lines, settled_currency, settled_gross, settled_fee,
                        settled_net
                   FROM reconciliation_items) a
           FULL JOIN b ON a.payment_reference = b.payment_reference"
    )
}

fn item_history_sql() -> &'static str {
    "SELECT coalesce(a.payment_reference, b.payment_reference) AS key,
            CASE WHEN a.payment_reference IS NULL THEN 'no item'
                 ELSE 'status=' || a.status END AS stored,
            CASE WHEN b.payment_reference IS NULL THEN 'no history'
                 ELSE format('latest history #%s to_status=%s', b.id, b.to_status) END
                AS recomputed,
            a.status IS DISTINCT FROM b.to_status AS differs
       FROM reconciliation_items a
       FULL JOIN (SELECT DISTINCT ON (payment_reference) payment_reference, id, to_status
                    FROM reconciliation_history ORDER BY payment_reference, id DESC) b
         ON a.payment_reference = b.payment_reference"
}

fn history_chains_sql() -> &'static str {
    "SELECT format('%s #%s', payment_reference, id) AS key,
            'from_status=' || coalesce(from_status, 'NULL') AS stored,
            CASE WHEN previous IS NULL THEN 'from_status=NULL (first row of the reference)'
                 ELSE format('from_status=%s (to_status of #%s)', previous, previous_id) END
                AS recomputed,
            from_status IS DISTINCT FROM previous AS differs
       FROM (SELECT id, payment_reference, from_status,
                    lag(to_status) OVER w AS previous, lag(id) OVER w AS previous_id
               FROM reconciliation_history
             WINDOW w AS (PARTITION BY payment_reference ORDER BY id)) h"
}

/// The outbox is derived from the history: exactly the changes into or out of an exception
/// status (every status but MATCHED and EXPECTED; no from_status counts as no exception).
fn exceptions_outbox_sql() -> &'static str {
    "SELECT coalesce('outbox seq ' || o.seq, 'history #' || h.id) AS key,
            CASE WHEN o.seq IS NULL THEN 'missing'
                 ELSE format('history_id=%s %s %s->%s opened=%s', o.history_id,
                             o.payment_reference, coalesce(o.from_status, 'NULL'), o.to_status,
                             o.opened) END AS stored,
            CASE WHEN h.id IS NULL THEN 'no such history row'
                 WHEN i.payment_reference IS NULL THEN 'no item for the reference'
                 WHEN NOT h.publishes THEN format('history #%s %s %s->%s is not published',
                      h.id, h.payment_reference, coalesce(h.from_status, 'NULL'), h.to_status)
                 WHEN o.seq IS NOT NULL AND count(*) OVER (PARTITION BY h.id) > 1
                      THEN format('one outbox row per history row, not %s',
                                  count(*) OVER (PARTITION BY h.id))
                 ELSE format('history_id=%s %s %s->%s opened=%s', h.id, h.payment_reference,
                             coalesce(h.from_status, 'NULL'), h.to_status, h.opens) END
                AS recomputed,
            o.seq IS NULL OR h.id IS NULL OR i.payment_reference IS NULL OR NOT h.publishes
                OR (o.payment_reference, o.from_status, o.to_status, o.opened)
                   IS DISTINCT FROM (h.payment_reference, h.from_status, h.to_status, h.opens)
                OR count(*) OVER (PARTITION BY h.id) > 1 AS differs
       FROM (SELECT * FROM exceptions_outbox WHERE leg = 'SETTLEMENT') o
       FULL JOIN (SELECT id, payment_reference, from_status, to_status,
                         to_status NOT IN ('MATCHED', 'EXPECTED') AS opens,
                         (to_status NOT IN ('MATCHED', 'EXPECTED'))
                             <> coalesce(from_status NOT IN ('MATCHED', 'EXPECTED'), false)
                             AS publishes
                    FROM reconciliation_history) h
         ON h.id = o.history_id
       LEFT JOIN reconciliation_items i
         ON i.payment_reference = coalesce(o.payment_reference, h.payment_reference)
      WHERE o.seq IS NOT NULL OR h.publishes"
}

/// Distinct log positions that left a row (an event, a line, a dead letter or a conflicting
/// duplicate): a dead letter replayed later has an event or line at its own position, which
/// must count once.
const POSITIONS: &str = "SELECT source_topic AS topic, source_partition AS partition,
                                source_offset AS log_offset FROM payment_events
                         UNION
                         SELECT source_topic, source_partition, source_offset
                           FROM settlement_lines
                         UNION
                         SELECT source_topic, source_partition, source_offset
                           FROM bank_payouts
                         UNION
                         SELECT topic, partition, \"offset\" FROM dead_letters
                         UNION
                         SELECT topic, partition, \"offset\" FROM conflicting_duplicates";

fn offsets_records_applied_sql() -> String {
    format!(
        "WITH r AS (
            SELECT o.consumer_group, o.topic, o.partition, count(*) AS n
              FROM ({POSITIONS}) p
              JOIN consumer_offsets o
                ON o.topic = p.topic AND o.partition = p.partition AND p.log_offset < o.next_offset
             GROUP BY 1, 2, 3
         )
         SELECT format('%s/%s[%s]', o.consumer_group, o.topic, o.partition) AS key,
                'records_applied=' || o.records_applied AS stored,
                format('between %s (positions below next_offset with a row) and %s (next_offset)',
                       coalesce(r.n, 0), o.next_offset) AS recomputed,
                NOT (o.records_applied BETWEEN coalesce(r.n, 0) AND o.next_offset) AS differs
           FROM consumer_offsets o
           LEFT JOIN r USING (consumer_group, topic, partition)"
    )
}

/// A row is covered when some group's offset of its partition is past it: with more than one
/// group on the same tables, the furthest one.
fn offsets_cover_rows_sql() -> &'static str {
    "WITH o AS (
        SELECT topic, partition, max(next_offset) AS next_offset
          FROM consumer_offsets GROUP BY 1, 2
     ), r AS (
        SELECT 'payment_events' AS source, source_topic AS topic,
               source_partition AS partition, source_offset AS log_offset FROM payment_events
        UNION ALL
        SELECT 'settlement_lines', source_topic, source_partition, source_offset
          FROM settlement_lines
        UNION ALL
        SELECT 'bank_payouts', source_topic, source_partition, source_offset
          FROM bank_payouts
        UNION ALL
        SELECT 'dead_letters', topic, partition, \"offset\" FROM dead_letters
        UNION ALL
        SELECT 'conflicting_duplicates', topic, partition, \"offset\" FROM conflicting_duplicates
     )
     SELECT format('%s %s[%s]', r.source, r.topic, r.partition) AS key,
            coalesce('next_offset=' || o.next_offset, 'no stored offset') AS stored,
            format('%s row(s) at or beyond it, offsets %s..%s',
                   count(*) FILTER (WHERE o.next_offset IS NULL OR r.log_offset >= o.next_offset),
                   min(r.log_offset) FILTER (WHERE o.next_offset IS NULL
                                              OR r.log_offset >= o.next_offset),
                   max(r.log_offset)) AS recomputed,
            bool_or(o.next_offset IS NULL OR r.log_offset >= o.next_offset) AS differs
       FROM r LEFT JOIN o USING (topic, partition)
      GROUP BY r.source, r.topic, r.partition, o.next_offset"
}

/// The figures a pass of `offsets_records_applied` leaves unexplained, summed over
/// partitions: offsets never applied (log start not read, transaction markers, compaction)
/// and records applied without a row (re-deliveries ignored as duplicates).
async fn offsets_note(conn: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
    let (unread, without_row): (Option<Decimal>, Option<Decimal>) = sqlx::query_as(&format!(
        "WITH r AS (
            SELECT o.consumer_group, o.topic, o.partition, count(*) AS n
              FROM ({POSITIONS}) p
              JOIN consumer_offsets o
                ON o.topic = p.topic AND o.partition = p.partition AND p.log_offset < o.next_offset
             GROUP BY 1, 2, 3
         )
         SELECT sum(o.next_offset - o.records_applied),
                sum(o.records_applied - coalesce(r.n, 0))
           FROM consumer_offsets o LEFT JOIN r USING (consumer_group, topic, partition)"
    ))
    .fetch_one(&mut *conn)
    .await?;
    Ok(match (unread, without_row) {
        (Some(unread), Some(without_row)) => Some(format!(
            "{unread} offset(s) below next_offset not applied as records (log start not read, \
             transaction markers, compaction); {without_row} record(s) applied without a row \
             of their own (re-deliveries ignored as duplicates)"
        )),
        _ => None,
    })
}

/// The checks that are one query each, by name (the others re-run the matcher).
pub async fn sql_check(conn: &mut PgConnection, name: &'static str) -> Result<Check, sqlx::Error> {
    let sql = match name {
        "payment_totals" => payment_totals_sql(),
        "settlement_totals" => settlement_totals_sql(),
        "daily_totals" => daily_totals_sql(),
        "item_records" => item_records_sql(),
        "item_history" => item_history_sql().to_owned(),
        "history_chains" => history_chains_sql().to_owned(),
        "exceptions_outbox" => exceptions_outbox_sql().to_owned(),
        "payout_totals" => payout_totals_sql(),
        "payout_history" => payout_history_sql().to_owned(),
        "payout_outbox" => payout_outbox_sql().to_owned(),
        "offsets_records_applied" => offsets_records_applied_sql(),
        "offsets_cover_rows" => offsets_cover_rows_sql().to_owned(),
        other => unreachable!("{other} is not a SQL check"),
    };
    let mut check = run_sql_check(conn, name, &sql).await?;
    if name == "offsets_records_applied" {
        check.note = offsets_note(conn).await?;
    }
    Ok(check)
}

impl Store {
    /// A REPEATABLE READ READ ONLY transaction: every check of one verification reads the
    /// same snapshot.
    pub async fn read_only_snapshot(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}

/// When reference data was last loaded (merchants or FX rates).
pub async fn reference_loaded_at(
    conn: &mut PgConnection,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT greatest((SELECT max(loaded_at) FROM merchants),
                         (SELECT max(loaded_at) FROM fx_rates))",
    )
    .fetch_one(&mut *conn)
    .await
}

/// What an item stores that depends on pricing, and when and at which watermark it was last
/// evaluated.
#[derive(sqlx::FromRow)]
pub struct StoredVerdict {
    pub payment_reference: String,
    pub status: String,
    pub currency: String,
    pub expected_gross: Option<Decimal>,
    pub expected_fee: Option<Decimal>,
    pub expected_net: Option<Decimal>,
    pub deadline: Option<DateTime<Utc>>,
    pub reason: String,
    /// The watermark of the item's last evaluation: the re-evaluation uses it, so an
    /// EXPECTED item is judged as it was, not against today's watermark.
    pub watermark: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The running state as text (NULL: judged before items kept their state).
    pub state: Option<String>,
}

/// Up to `limit` items after `after` in key order, as stored.
pub async fn stored_verdicts(
    conn: &mut PgConnection,
    after: &str,
    limit: i64,
) -> Result<Vec<StoredVerdict>, sqlx::Error> {
    sqlx::query_as(
        "SELECT payment_reference, status, currency, expected_gross, expected_fee,
                expected_net, deadline, reason, watermark, updated_at, state::text AS state
           FROM reconciliation_items
          WHERE payment_reference > $1 ORDER BY payment_reference LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await
}

/// A payout item as stored: kind, key, status, deadline, reason, watermark, state.
pub type StoredPayoutItem = (
    String,
    String,
    String,
    Option<DateTime<Utc>>,
    String,
    DateTime<Utc>,
    String,
);

/// Every payout item as stored, in key order.
pub async fn stored_payout_items(
    conn: &mut PgConnection,
) -> Result<Vec<StoredPayoutItem>, sqlx::Error> {
    sqlx::query_as(
        "SELECT kind, key, status, deadline, reason, watermark, state::text
           FROM payout_items ORDER BY kind, key",
    )
    .fetch_all(&mut *conn)
    .await
}

fn payout_totals_sql() -> String {
    let (stored, recomputed, differs) =
        compare_columns(&["payout_count", "credited", "debited"], "account_id");
    format!(
        "SELECT concat_ws('/', coalesce(a.account_id, b.account_id),
                          coalesce(a.value_date, b.value_date)::text,
                          trim(coalesce(a.currency, b.currency))) AS key,
                {stored} AS stored, {recomputed} AS recomputed, {differs} AS differs
           FROM payout_daily_totals a
           FULL JOIN payout_daily_totals_recomputed b
             ON a.account_id = b.account_id AND a.value_date = b.value_date
            AND a.currency = b.currency"
    )
}

fn payout_history_sql() -> &'static str {
    "SELECT format('%s/%s', coalesce(a.kind, b.kind), coalesce(a.key, b.key)) AS key,
            CASE WHEN a.key IS NULL THEN 'no item' ELSE 'status=' || a.status END AS stored,
            CASE WHEN b.key IS NULL THEN 'no history'
                 ELSE format('latest history #%s to_status=%s', b.id, b.to_status) END
                AS recomputed,
            a.status IS DISTINCT FROM b.to_status AS differs
       FROM payout_items a
       FULL JOIN (SELECT DISTINCT ON (kind, key) kind, key, id, to_status
                    FROM payout_history ORDER BY kind, key, id DESC) b
         ON a.kind = b.kind AND a.key = b.key
     UNION ALL
     SELECT format('%s/%s #%s', kind, key, id),
            'from_status=' || coalesce(from_status, 'NULL'),
            CASE WHEN previous IS NULL THEN 'from_status=NULL (first row of the item)'
                 ELSE format('from_status=%s (to_status of #%s)', previous, previous_id) END,
            from_status IS DISTINCT FROM previous
       FROM (SELECT id, kind, key, from_status,
                    lag(to_status) OVER w AS previous, lag(id) OVER w AS previous_id
               FROM payout_history WINDOW w AS (PARTITION BY kind, key ORDER BY id)) h"
}

/// The payout outbox rows are exactly the payout history rows into or out of an exception.
fn payout_outbox_sql() -> &'static str {
    "WITH h AS (
        SELECT id, key, from_status, to_status,
               to_status NOT IN ('PAYOUT_MATCHED', 'PAYOUT_PENDING') AS opens,
               (to_status NOT IN ('PAYOUT_MATCHED', 'PAYOUT_PENDING'))
                   <> coalesce(from_status NOT IN ('PAYOUT_MATCHED', 'PAYOUT_PENDING'), false)
                   AS publishes
          FROM payout_history
     ), o AS (SELECT * FROM exceptions_outbox WHERE leg = 'PAYOUT')
     SELECT coalesce('outbox seq ' || o.seq, 'payout history #' || h.id) AS key,
            CASE WHEN o.seq IS NULL THEN 'missing'
                 ELSE format('history_id=%s %s %s->%s opened=%s', o.history_id,
                             o.payment_reference, coalesce(o.from_status, 'NULL'), o.to_status,
                             o.opened) END AS stored,
            CASE WHEN h.id IS NULL THEN 'no such payout history row'
                 WHEN NOT h.publishes THEN format('history #%s %s->%s is not published', h.id,
                      coalesce(h.from_status, 'NULL'), h.to_status)
                 WHEN o.seq IS NOT NULL AND count(*) OVER (PARTITION BY h.id) > 1
                      THEN format('one outbox row per history row, not %s',
                                  count(*) OVER (PARTITION BY h.id))
                 ELSE format('history_id=%s %s %s->%s opened=%s', h.id, h.key,
                             coalesce(h.from_status, 'NULL'), h.to_status, h.opens) END
                AS recomputed,
            o.seq IS NULL OR h.id IS NULL OR NOT h.publishes
                OR (o.payment_reference, o.from_status, o.to_status, o.opened)
                   IS DISTINCT FROM (h.key, h.from_status, h.to_status, h.opens)
                OR count(*) OVER (PARTITION BY h.id) > 1 AS differs
       FROM o FULL JOIN h ON h.id = o.history_id
      WHERE o.seq IS NOT NULL OR h.publishes"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_has_a_unique_name() {
        let mut names: Vec<&str> = CHECKS.iter().map(|(n, _, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CHECKS.len());
    }

    #[test]
    fn compared_columns_show_only_the_differing_ones_and_missing_rows() {
        let (stored, _, differs) = compare_columns(&["x", "y"], "k");
        assert!(
            stored.starts_with("CASE WHEN a.k IS NULL THEN 'missing'"),
            "{stored}"
        );
        assert!(
            stored.contains("WHEN a.y IS DISTINCT FROM b.y THEN 'y='"),
            "{stored}"
        );
        assert_eq!(
            differs,
            "(a.k IS NULL OR b.k IS NULL OR (a.x, a.y) IS DISTINCT FROM (b.x, b.y))"
        );
    }
}
