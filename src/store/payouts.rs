//! The payout leg's rows: bank statement lines (insert-or-ignore, with their daily totals per
//! shard) and payout items (locked, folded, judged by [`crate::reconcile::payout`], written
//! with their history and outbox rows), inside the batch transaction.
//!
//! ## Locking
//! A settlement batch's lines come from every partition (they are keyed by payment
//! reference), so two instances' transactions can touch the same batch. The items are
//! locked last in the transaction, all in one statement and in key order (an upsert that
//! inserts a new item or locks the stored one), so the lock is held only from there to the
//! commit and two transactions never wait on each other in a cycle.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use sqlx::{Postgres, Transaction};

use super::batch::{Fields, Keyed, Source, StoredRow, amount, time};
use super::reconcile::Evaluator;
use crate::domain::{BankPayout, SettlementLine};
use crate::reconcile::payout::{self, PayoutKey, PayoutRules, PayoutState, PayoutStatus};

/// What the payout leg changed in one transaction.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PayoutOutcome {
    /// Payout items judged.
    pub evaluated: u64,
    /// Status changes by the status entered.
    pub status_changes: BTreeMap<PayoutStatus, u64>,
    /// Outbox rows written: payout exceptions opened and resolved.
    pub exceptions_opened: u64,
    pub exceptions_resolved: u64,
}

impl PayoutOutcome {
    pub fn merge(&mut self, other: PayoutOutcome) {
        self.evaluated += other.evaluated;
        for (s, n) in other.status_changes {
            *self.status_changes.entry(s).or_default() += n;
        }
        self.exceptions_opened += other.exceptions_opened;
        self.exceptions_resolved += other.exceptions_resolved;
    }
}

/// Why an item is judged in this transaction.
struct Target<'r> {
    lines: Vec<&'r SettlementLine>,
    payouts: Vec<&'r BankPayout>,
}

const ID_SEPARATOR: char = '\u{1f}';

/// Folds the transaction's new lines and statement lines into their payout items, judges
/// them and the items the watermark made due, and writes what changed.
pub(crate) async fn reconcile(
    tx: &mut Transaction<'_, Postgres>,
    who: &Evaluator<'_>,
    rules: &PayoutRules,
    lines: &[&SettlementLine],
    payouts: &[&BankPayout],
) -> Result<PayoutOutcome, sqlx::Error> {
    let mut targets: BTreeMap<PayoutKey, Target<'_>> = BTreeMap::new();
    fn target<'m, 'r>(
        targets: &'m mut BTreeMap<PayoutKey, Target<'r>>,
        k: PayoutKey,
    ) -> &'m mut Target<'r> {
        targets.entry(k).or_insert_with(|| Target {
            lines: Vec::new(),
            payouts: Vec::new(),
        })
    }
    for l in lines {
        target(&mut targets, PayoutKey::Batch(l.batch_id.clone()))
            .lines
            .push(l);
    }
    for p in payouts {
        target(&mut targets, PayoutKey::of_payout(p))
            .payouts
            .push(p);
    }
    // Items the watermark made due; locked ones are another transaction's to judge.
    let due: Vec<(String, String)> = sqlx::query_as(
        "SELECT kind, key FROM payout_items
          WHERE status = 'PAYOUT_PENDING' AND deadline < $1
          ORDER BY deadline LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(who.watermark)
    .bind(who.rules.due_sweep_limit)
    .fetch_all(&mut **tx)
    .await?;
    for (kind, key) in due {
        if let Some(k) = PayoutKey::parse(&kind, key) {
            target(&mut targets, k);
        }
    }
    if targets.is_empty() {
        return Ok(PayoutOutcome::default());
    }
    let stored = lock_items(tx, targets.keys()).await?;
    // A stored state that does not parse (a hand edit, another release) is rebuilt from the
    // item's stored records, this transaction's included, so nothing is folded on top of it.
    let unreadable: Vec<&PayoutKey> = (stored.iter())
        .filter(|(_, (_, state))| state.is_none())
        .map(|(k, _)| k)
        .collect();
    let rebuilt = if unreadable.is_empty() {
        BTreeMap::new()
    } else {
        tracing::warn!(
            items = unreadable.len(),
            "payout item states that do not parse; rebuilt from their records"
        );
        super::verify_payouts::recomputed_states(tx, Some(&unreadable)).await?
    };
    let mut rows = Rows::default();
    let mut out = PayoutOutcome::default();
    for (key, t) in &targets {
        let state = match stored.get(key) {
            Some((_, None)) => rebuilt.get(key).cloned().unwrap_or_default(),
            prior => payout::fold(
                prior.and_then(|(_, s)| s.clone()).unwrap_or_default(),
                t.lines.iter().copied(),
                t.payouts.iter().copied(),
            ),
        };
        let prior_status = stored.get(key).and_then(|(status, _)| *status);
        let v = payout::judge(key, &state, who.watermark, rules);
        out.evaluated += 1;
        let changed = prior_status != Some(v.status);
        // As on the settlement leg: only entering or leaving an exception is published, so
        // opened - resolved is the number of open exceptions. A change from one exception to
        // another (UNEXPECTED to AMOUNT_MISMATCH once the batch's lines arrive) is history only.
        let publish = v.status.is_exception() != prior_status.is_some_and(|s| s.is_exception());
        if changed {
            *out.status_changes.entry(v.status).or_default() += 1;
            if publish {
                if v.status.is_exception() {
                    out.exceptions_opened += 1;
                } else {
                    out.exceptions_resolved += 1;
                }
            }
        }
        let cause = if t.lines.is_empty() && t.payouts.is_empty() {
            "DEADLINE"
        } else {
            "RECORDS"
        };
        let caused_by: Vec<&str> = (t.lines.iter().map(|l| l.line_id.as_str()))
            .chain(t.payouts.iter().map(|p| p.statement_line_id.as_str()))
            .collect();
        rows.push(
            key,
            &state,
            &v,
            prior_status,
            (
                changed,
                publish,
                cause,
                caused_by.join(&ID_SEPARATOR.to_string()),
            ),
        );
    }
    write(tx, who, &rows).await?;
    Ok(out)
}

/// Inserts an item for each key that has none and locks every one, in key order, in one
/// statement; returns the stored status and state of those that existed (`None`: a state
/// that does not parse).
async fn lock_items<'k>(
    tx: &mut Transaction<'_, Postgres>,
    keys: impl Iterator<Item = &'k PayoutKey>,
) -> Result<HashMap<PayoutKey, (Option<PayoutStatus>, Option<PayoutState>)>, sqlx::Error> {
    let (kinds, names): (Vec<&str>, Vec<&str>) = keys.map(|k| (k.kind(), k.key())).unzip();
    // A new item is a placeholder until the write below (same transaction). Existing rows
    // are locked by the no-op update; `xmax = 0` tells the inserted ones.
    let rows: Vec<(String, String, bool, String, String)> = sqlx::query_as(
        "INSERT INTO payout_items AS i (kind, key, business_date, status, settlement_lines,
                payouts, reason, watermark, state, evaluations)
         SELECT k.kind, k.key, DATE '1970-01-01', 'PAYOUT_PENDING', 0, 0, '', '-infinity',
                '{}', 0
           FROM UNNEST($1::text[], $2::text[]) AS k(kind, key)
          ORDER BY k.kind, k.key
         ON CONFLICT (kind, key) DO UPDATE SET evaluations = i.evaluations
         RETURNING i.kind, i.key, (i.xmax = 0), i.status, i.state::text",
    )
    .bind(&kinds)
    .bind(&names)
    .fetch_all(&mut **tx)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for (kind, key, inserted, status, state) in rows {
        if inserted {
            continue;
        }
        let key = PayoutKey::parse(&kind, key)
            .ok_or_else(|| sqlx::Error::Decode(format!("payout item kind {kind:?}").into()))?;
        let state = serde_json::from_str::<PayoutState>(&state).ok();
        out.insert(key, (PayoutStatus::parse(&status), state));
    }
    Ok(out)
}

/// Column vectors of the items written, and of their history rows.
#[derive(Default)]
struct Rows {
    kinds: Vec<&'static str>,
    keys: Vec<String>,
    merchants: Vec<Option<String>>,
    accounts: Vec<Option<String>>,
    dates: Vec<NaiveDate>,
    currencies: Vec<Option<&'static str>>,
    statuses: Vec<&'static str>,
    expected: Vec<Option<Decimal>>,
    paid: Vec<Option<Decimal>>,
    differences: Vec<Option<Decimal>>,
    lines: Vec<i32>,
    payouts: Vec<i32>,
    deadlines: Vec<Option<DateTime<Utc>>>,
    reasons: Vec<String>,
    states: Vec<String>,
    from: Vec<Option<&'static str>>,
    changed: Vec<bool>,
    publish: Vec<bool>,
    causes: Vec<&'static str>,
    caused_by: Vec<String>,
}

impl Rows {
    fn push(
        &mut self,
        key: &PayoutKey,
        state: &PayoutState,
        v: &payout::PayoutVerdict,
        from: Option<PayoutStatus>,
        (changed, publish, cause, caused_by): (bool, bool, &'static str, String),
    ) {
        let expected = state.expected();
        let paid = state.paid_total();
        self.kinds.push(key.kind());
        self.keys.push(key.key().to_owned());
        self.merchants.push(state.merchant_id.clone());
        self.accounts.push(state.account_id.clone());
        self.dates.push(
            state
                .business_date()
                .unwrap_or_else(|| DateTime::<Utc>::UNIX_EPOCH.date_naive()),
        );
        self.currencies
            .push(expected.or(paid).map(|(c, _)| c.code()));
        self.statuses.push(v.status.as_str());
        self.expected.push(expected.map(|(_, a)| a));
        self.paid.push(paid.map(|(_, a)| a));
        self.differences.push(v.difference);
        self.lines.push(state.lines.try_into().unwrap_or(i32::MAX));
        self.payouts
            .push(state.payouts.try_into().unwrap_or(i32::MAX));
        self.deadlines.push(v.deadline);
        self.reasons.push(v.reason.clone());
        self.states
            .push(serde_json::to_string(state).expect("a payout state serializes"));
        self.from.push(from.map(|s| s.as_str()));
        self.changed.push(changed);
        self.publish.push(publish);
        self.causes.push(cause);
        self.caused_by.push(caused_by);
    }
}

/// Writes every judged item, a history row per status change and an outbox row per
/// exception opened or resolved, in one statement.
async fn write(
    tx: &mut Transaction<'_, Postgres>,
    who: &Evaluator<'_>,
    r: &Rows,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH c AS (
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::date[],
                   $6::text[], $7::text[], $8::numeric[], $9::numeric[], $10::numeric[],
                   $11::int[], $12::int[], $13::timestamptz[], $14::text[], $15::text[],
                   $16::text[], $17::bool[], $18::bool[], $19::text[], $20::text[])
                   WITH ORDINALITY
                AS c(kind, key, merchant_id, account_id, business_date, currency, status,
                     expected, paid, difference, lines, payouts, deadline, reason, state,
                     from_status, changed, publish, cause, caused_by, n)
         ), u AS (
            UPDATE payout_items i
               SET merchant_id = c.merchant_id, account_id = c.account_id,
                   business_date = c.business_date, currency = c.currency, status = c.status,
                   expected_net = c.expected, paid = c.paid, difference = c.difference,
                   settlement_lines = c.lines, payouts = c.payouts, deadline = c.deadline,
                   reason = c.reason, watermark = GREATEST(i.watermark, $21),
                   evaluations = i.evaluations + 1, state = c.state,
                   updated_at = now()
              FROM c
             WHERE i.kind = c.kind AND i.key = c.key
            RETURNING 1
         ), h AS (
            INSERT INTO payout_history (kind, key, from_status, to_status, cause, caused_by,
                   watermark, reason, consumer_group, evaluated_by)
            SELECT kind, key, from_status, status, cause,
                   CASE WHEN caused_by = '' THEN '{}'::text[]
                        ELSE string_to_array(caused_by, chr(31)) END,
                   $21, reason, $22, $23
              FROM c WHERE changed ORDER BY n
            RETURNING id, kind, key
         ), o AS (
            INSERT INTO exceptions_outbox (leg, history_id, payment_reference, merchant_id,
                   account_id, from_status, to_status, opened, currency, expected_gross,
                   settled_gross, reason, watermark)
            SELECT 'PAYOUT', h.id, c.key, coalesce(c.merchant_id, ''), c.account_id,
                   c.from_status, c.status,
                   c.status NOT IN ('PAYOUT_MATCHED', 'PAYOUT_PENDING'), c.currency,
                   c.expected, c.paid, c.reason, $21
              FROM h JOIN c ON c.kind = h.kind AND c.key = h.key
             WHERE c.publish
             ORDER BY h.id
            RETURNING 1
         )
         SELECT (SELECT count(*) FROM u), (SELECT count(*) FROM o)",
    )
    .bind(&r.kinds)
    .bind(&r.keys)
    .bind(&r.merchants)
    .bind(&r.accounts)
    .bind(&r.dates)
    .bind(&r.currencies)
    .bind(&r.statuses)
    .bind(&r.expected)
    .bind(&r.paid)
    .bind(&r.differences)
    .bind(&r.lines)
    .bind(&r.payouts)
    .bind(&r.deadlines)
    .bind(&r.reasons)
    .bind(&r.states)
    .bind(&r.from)
    .bind(&r.changed)
    .bind(&r.publish)
    .bind(&r.causes)
    .bind(&r.caused_by)
    .bind(who.watermark)
    .bind(who.group)
    .bind(who.instance)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Inserts statement lines (ignoring known ids) and adds the inserted ones to the per-shard
/// daily totals in the same statement. Returns the ids inserted.
pub(crate) async fn insert_payouts(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[String],
    shard: &str,
    payouts: &[&(BankPayout, Source)],
) -> Result<Vec<String>, sqlx::Error> {
    if payouts.is_empty() {
        return Ok(Vec::new());
    }
    let n = payouts.len();
    let mut ids = Vec::with_capacity(n);
    let mut accounts = Vec::with_capacity(n);
    let mut dates: Vec<NaiveDate> = Vec::with_capacity(n);
    let mut amounts: Vec<Decimal> = Vec::with_capacity(n);
    let mut currencies = Vec::with_capacity(n);
    let mut references: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut descriptions = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let mut src_topics = Vec::with_capacity(n);
    let mut src_parts = Vec::with_capacity(n);
    let mut src_offsets = Vec::with_capacity(n);
    for (b, s) in payouts.iter().copied() {
        ids.push(b.statement_line_id.as_str());
        accounts.push(b.account_id.as_str());
        dates.push(b.value_date);
        amounts.push(b.amount);
        currencies.push(b.currency.code());
        references.push(b.batch_reference.as_deref());
        descriptions.push(b.description.as_str());
        times.push(b.event_time);
        src_topics.push(topics[s.topic].as_str());
        src_parts.push(s.partition);
        src_offsets.push(s.offset);
    }
    sqlx::query_scalar(
        "WITH ins AS (
            INSERT INTO bank_payouts (statement_line_id, account_id, value_date, amount,
                   currency, batch_reference, description, event_time, source_topic,
                   source_partition, source_offset)
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::date[], $4::numeric[], $5::text[],
                   $6::text[], $7::text[], $8::timestamptz[], $9::text[], $10::int[],
                   $11::bigint[])
            ON CONFLICT (statement_line_id) DO NOTHING
            RETURNING statement_line_id, account_id, value_date, currency, amount
         ), totals AS (
            INSERT INTO payout_daily_totals_by_shard AS t (account_id, value_date, currency,
                   shard, payout_count, credited, debited)
            SELECT account_id, value_date, currency, $12, count(*),
                   coalesce(sum(amount) FILTER (WHERE amount > 0), 0),
                   coalesce(sum(-amount) FILTER (WHERE amount < 0), 0)
              FROM ins GROUP BY account_id, value_date, currency
             ORDER BY account_id, value_date, currency
            ON CONFLICT (account_id, value_date, currency, shard) DO UPDATE
               SET payout_count = t.payout_count + excluded.payout_count,
                   credited = t.credited + excluded.credited,
                   debited = t.debited + excluded.debited
            RETURNING 1
         )
         SELECT statement_line_id FROM ins",
    )
    .bind(&ids)
    .bind(&accounts)
    .bind(&dates)
    .bind(&amounts)
    .bind(&currencies)
    .bind(&references)
    .bind(&descriptions)
    .bind(&times)
    .bind(&src_topics)
    .bind(&src_parts)
    .bind(&src_offsets)
    .bind(shard)
    .fetch_all(&mut **tx)
    .await
}

#[allow(clippy::too_many_arguments)]
fn payout_fields(
    account: &str,
    value_date: NaiveDate,
    value: Decimal,
    currency: &str,
    reference: Option<&str>,
    description: &str,
    event_time: DateTime<Utc>,
) -> Fields {
    vec![
        ("account_id", Some(account.to_owned())),
        ("value_date", Some(value_date.to_string())),
        ("amount", amount(value)),
        ("currency", Some(currency.trim().to_owned())),
        ("batch_reference", reference.map(str::to_owned)),
        ("description", Some(description.to_owned())),
        ("event_time", time(event_time)),
    ]
}

impl Keyed for BankPayout {
    const TYPE: &'static str = "bank_payout";

    fn id(&self) -> &str {
        &self.statement_line_id
    }

    fn fields(&self) -> Fields {
        payout_fields(
            &self.account_id,
            self.value_date,
            self.amount,
            self.currency.code(),
            self.batch_reference.as_deref(),
            &self.description,
            self.event_time,
        )
    }

    fn insert<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        topics: &'a [String],
        shard: &'a str,
        records: &'a [&'a (Self, Source)],
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>> {
        Box::pin(insert_payouts(tx, topics, shard, records))
    }

    fn stored<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<HashMap<String, StoredRow>, sqlx::Error>> {
        Box::pin(async move {
            type Row = (
                String,
                String,
                NaiveDate,
                Decimal,
                String,
                Option<String>,
                String,
                DateTime<Utc>,
                String,
                i32,
                i64,
            );
            let rows: Vec<Row> = sqlx::query_as(
                "SELECT statement_line_id, account_id, value_date, amount, currency,
                        batch_reference, description, event_time, source_topic,
                        source_partition, source_offset
                   FROM bank_payouts WHERE statement_line_id = ANY($1)",
            )
            .bind(ids)
            .fetch_all(&mut **tx)
            .await?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    let fields = payout_fields(&r.1, r.2, r.3, &r.4, r.5.as_deref(), &r.6, r.7);
                    (
                        r.0,
                        StoredRow {
                            fields,
                            position: (r.8, r.9, r.10),
                        },
                    )
                })
                .collect())
        })
    }
}
