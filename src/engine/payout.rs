//! The payout leg inside the batch transaction: payout items locked, folded with the new
//! settlement lines and bank statement lines, judged by [`crate::reconcile::payout`], and
//! written with their history and outbox rows ([`crate::store::payout_items`]).
//!
//! ## Locking
//! A settlement batch's lines come from every partition (they are keyed by payment
//! reference), so two instances' transactions can touch the same batch. The items are
//! locked last in the transaction, all in one statement and in key order (an upsert that
//! inserts a new item or locks the stored one), so the lock is held only from there to the
//! commit and two transactions never wait on each other in a cycle.

use std::collections::BTreeMap;

use sqlx::{PgConnection, Postgres, Transaction};

use super::reconciler::Evaluator;
use crate::domain::{BankPayout, Currency, SettlementLine};
use crate::reconcile::PayoutOutcome;
use crate::reconcile::payout::{self, PayoutKey, PayoutRules, PayoutState};
use crate::store::payout_items::{self, ItemRows};

/// Why an item is judged in this transaction.
struct ItemRecords<'r> {
    lines: Vec<&'r SettlementLine>,
    payouts: Vec<&'r BankPayout>,
}

/// Joins the ids of the records that caused a change (arrays of arrays must be rectangular
/// in PostgreSQL).
const ID_SEPARATOR: char = '\u{1f}';

/// Folds the transaction's new lines and statement lines into their payout items, judges
/// them and the items the watermark made due, and writes what changed.
pub async fn reconcile(
    tx: &mut Transaction<'_, Postgres>,
    who: &Evaluator<'_>,
    rules: &PayoutRules,
    lines: &[&SettlementLine],
    payouts: &[&BankPayout],
) -> Result<PayoutOutcome, sqlx::Error> {
    let mut targets: BTreeMap<PayoutKey, ItemRecords<'_>> = BTreeMap::new();
    fn target<'m, 'r>(
        targets: &'m mut BTreeMap<PayoutKey, ItemRecords<'r>>,
        k: PayoutKey,
    ) -> &'m mut ItemRecords<'r> {
        targets.entry(k).or_insert_with(|| ItemRecords {
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
    let due = payout_items::due_items(tx, who.watermark, who.rules.due_sweep_limit).await?;
    for (kind, key) in due {
        if let Some(k) = PayoutKey::parse(&kind, key) {
            target(&mut targets, k);
        }
    }
    if targets.is_empty() {
        return Ok(PayoutOutcome::default());
    }
    let stored = payout_items::lock_items(tx, targets.keys()).await?;
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
        recomputed_states(tx, Some(&unreadable)).await?
    };
    let mut rows = ItemRows::default();
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
    payout_items::write(tx, (who.watermark, who.group, who.instance), &rows).await?;
    Ok(out)
}

/// The state of every payout item (or of `only` those) from the stored records, by the
/// service's own fold rules (sums per currency, least/greatest times, dates and ids; ids
/// compare bytewise). The batch rebuilds a stored state that does not parse with it.
pub async fn recomputed_states(
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
    let (lines, payouts) = payout_items::record_sums(conn, &batches, &lines_only).await?;
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
