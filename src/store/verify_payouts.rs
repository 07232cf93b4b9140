//! `payrecon report --verify`'s checks of the payout leg: payout items against a
//! re-judgement from the settlement lines and bank statement lines, their history chains,
//! their outbox rows, and the payout daily totals. Read-only, inside the caller's snapshot.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;

use super::verify::{Check, Difference, MAX_SHOWN, compare_columns};
use crate::domain::Currency;
use crate::reconcile::payout::{self, PayoutKey, PayoutRules, PayoutState};

/// The payout items' per-currency sums recomputed from the records, as (key, currency) rows.
type LineAgg = (
    String,
    String,
    i64,
    Decimal,
    DateTime<Utc>,
    NaiveDate,
    String,
);
type PayoutAgg = (
    String,
    String,
    String,
    i64,
    Decimal,
    DateTime<Utc>,
    NaiveDate,
    String,
);

/// The state of every payout item (or of `only` those) from the stored records, by the
/// service's own fold rules (sums per currency, least/greatest times, dates and ids; ids
/// compare bytewise). The store rebuilds a stored state that does not parse with it.
pub(super) async fn recomputed_states(
    conn: &mut PgConnection,
    only: Option<&[&PayoutKey]>,
) -> Result<BTreeMap<PayoutKey, PayoutState>, sqlx::Error> {
    let of_kind = |kind: &str| -> Option<Vec<&str>> {
        only.map(|keys| {
            (keys.iter())
                .filter(|k| k.kind() == kind)
                .map(|k| k.key())
                .collect()
        })
    };
    let (batches, lines_only) = (of_kind("BATCH"), of_kind("LINE"));
    let lines: Vec<LineAgg> = sqlx::query_as(
        "SELECT batch_id, currency, count(*), sum(net), max(event_time), min(settlement_date),
                min(merchant_id COLLATE \"C\")
           FROM settlement_lines WHERE $1::text[] IS NULL OR batch_id = ANY($1) GROUP BY 1, 2",
    )
    .bind(&batches)
    .fetch_all(&mut *conn)
    .await?;
    let payouts: Vec<PayoutAgg> = sqlx::query_as(
        "SELECT CASE WHEN batch_reference IS NULL THEN 'LINE' ELSE 'BATCH' END,
                coalesce(batch_reference, statement_line_id), currency, count(*), sum(amount),
                min(event_time), min(value_date), min(account_id COLLATE \"C\")
           FROM bank_payouts
          WHERE $1::text[] IS NULL OR batch_reference = ANY($1)
             OR (batch_reference IS NULL AND statement_line_id = ANY($2))
          GROUP BY 1, 2, 3",
    )
    .bind(&batches)
    .bind(&lines_only)
    .fetch_all(&mut *conn)
    .await?;
    let currency = |c: &str| {
        Currency::from_code(c.trim()).map_err(|e| sqlx::Error::Decode(e.to_string().into()))
    };
    let mut out: BTreeMap<PayoutKey, PayoutState> = BTreeMap::new();
    for (batch, c, n, net, last, date, merchant) in lines {
        let s = out.entry(PayoutKey::Batch(batch)).or_default();
        s.lines += n;
        *s.net.entry(currency(&c)?).or_default() += net;
        s.last_line_time = s.last_line_time.max(Some(last));
        s.settlement_date = Some(s.settlement_date.map_or(date, |d| d.min(date)));
        s.merchant_id = Some(match s.merchant_id.take() {
            Some(m) if m <= merchant => m,
            _ => merchant,
        });
    }
    for (kind, key, c, n, paid, first, date, account) in payouts {
        let Some(k) = PayoutKey::parse(&kind, key) else {
            continue;
        };
        let s = out.entry(k).or_default();
        s.payouts += n;
        *s.paid.entry(currency(&c)?).or_default() += paid;
        s.first_payout_time = Some(s.first_payout_time.map_or(first, |t| t.min(first)));
        s.value_date = Some(s.value_date.map_or(date, |d| d.min(date)));
        s.account_id = Some(match s.account_id.take() {
            Some(a) if a <= account => a,
            _ => account,
        });
    }
    Ok(out)
}

type StoredItem = (
    String,
    String,
    String,
    Option<DateTime<Utc>>,
    String,
    DateTime<Utc>,
    String,
);

/// Every payout item equals the service's judgement of its records at its watermark, and
/// every batch or unreferenced statement line has an item.
pub(super) async fn payout_verdicts(
    conn: &mut PgConnection,
    rules: &PayoutRules,
) -> Result<Check, sqlx::Error> {
    let mut recomputed = recomputed_states(conn, None).await?;
    let stored: Vec<StoredItem> = sqlx::query_as(
        "SELECT kind, key, status, deadline, reason, watermark, state::text
           FROM payout_items ORDER BY kind, key",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut check = Check::new("payout_verdicts");
    let mut differences = Vec::new();
    for (kind, key, status, deadline, reason, watermark, state) in stored {
        check.checked += 1;
        let label = format!("{kind}/{key}");
        let Some(k) = PayoutKey::parse(&kind, key) else {
            differences.push(diff(
                &label,
                "kind=".to_owned() + &kind,
                "no such kind".into(),
            ));
            continue;
        };
        let Some(mut expected) = recomputed.remove(&k) else {
            differences.push(diff(&label, format!("status={status}"), "missing".into()));
            continue;
        };
        // A state that does not parse (text can hold anything) is a difference, not an error.
        let mut state: PayoutState = match serde_json::from_str(&state) {
            Ok(state) => state,
            Err(e) => {
                differences.push(diff(
                    &label,
                    format!("state does not parse: {e}"),
                    format!(
                        "state={}",
                        serde_json::to_string(&expected).unwrap_or_default()
                    ),
                ));
                continue;
            }
        };
        // Amounts compared by value (the sums keep the columns' scale, the state its own).
        for a in (state.net.values_mut().chain(state.paid.values_mut()))
            .chain(expected.net.values_mut().chain(expected.paid.values_mut()))
        {
            *a = a.normalize();
        }
        let v = payout::judge(&k, &expected, watermark, rules);
        let mut s = Vec::new();
        let mut r = Vec::new();
        if state != expected {
            s.push(format!(
                "state={}",
                serde_json::to_string(&state).unwrap_or_default()
            ));
            r.push(format!(
                "state={}",
                serde_json::to_string(&expected).unwrap_or_default()
            ));
        }
        if status != v.status.as_str() {
            s.push(format!("status={status}"));
            r.push(format!("status={}", v.status));
        }
        if deadline.map(|d| d.timestamp_micros()) != v.deadline.map(|d| d.timestamp_micros()) {
            s.push(format!("deadline={deadline:?}"));
            r.push(format!("deadline={:?}", v.deadline));
        }
        if reason != v.reason {
            s.push(format!("reason={reason:?}"));
            r.push(format!("reason={:?}", v.reason));
        }
        if !s.is_empty() {
            differences.push(diff(&label, s.join(" "), r.join(" ")));
        }
    }
    for k in recomputed.into_keys() {
        check.checked += 1;
        differences.push(diff(
            &format!("{}/{}", k.kind(), k.key()),
            "missing".into(),
            "an item for its records".into(),
        ));
    }
    differences.sort_by(|a, b| a.key.cmp(&b.key));
    check.differing = differences.len() as i64;
    differences.truncate(MAX_SHOWN as usize);
    check.differences = differences;
    Ok(check)
}

fn diff(key: &str, stored: String, recomputed: String) -> Difference {
    Difference {
        key: key.to_owned(),
        stored,
        recomputed,
    }
}

pub(super) fn payout_totals_sql() -> String {
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

pub(super) fn payout_history_sql() -> &'static str {
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
pub(super) fn payout_outbox_sql() -> &'static str {
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
