//! `payrecon report --verify`: the checks that run the matcher again over the stored records
//! (items and payout items re-judged with the service's own code path), and the whole
//! verification in one read-only snapshot. The SQL checks are [`crate::store::verify`].

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;

use super::payout::recomputed_states;
use super::reconciler::{Evaluator, judge_records};
use crate::reconcile::payout::{self, PayoutKey, PayoutRules, PayoutState};
use crate::reconcile::{Rules, Status};
use crate::reference::Snapshot;
use crate::store::verify::{
    CHECKS, Check, Difference, MAX_SHOWN, StoredVerdict, reference_loaded_at, sql_check,
    stored_payout_items, stored_verdicts,
};
use crate::store::{Store, records};

/// Items re-evaluated per round trip.
const REEVALUATION_CHUNK: i64 = 1000;

/// Runs every check of [`CHECKS`] in one read-only snapshot, the items re-evaluated with
/// `rules` and `snapshot` (the reference data: load it just before, so it is as current as
/// the snapshot of the tables).
pub async fn verify(
    store: &Store,
    rules: &Rules,
    snapshot: &Snapshot,
) -> Result<Vec<Check>, sqlx::Error> {
    let mut tx = store.read_only_snapshot().await?;
    let conn: &mut PgConnection = &mut tx;
    let mut checks = Vec::with_capacity(CHECKS.len());
    for (name, _, _) in CHECKS {
        checks.push(match name {
            "item_verdicts" => item_verdicts(conn, rules, snapshot).await?,
            "payout_verdicts" => payout_verdicts(conn, &rules.payout).await?,
            _ => sql_check(conn, name).await?,
        });
    }
    tx.commit().await?;
    Ok(checks)
}

/// Re-evaluates every item that has records with the service's own code path (`records_of`,
/// `judge`), at the watermark stored with the item, and compares what the matcher decides.
async fn item_verdicts(
    conn: &mut PgConnection,
    rules: &Rules,
    snapshot: &Snapshot,
) -> Result<Check, sqlx::Error> {
    // Reference data loaded after an item's last evaluation explains a difference (the
    // service re-evaluates only MISSING_REFERENCE items when reference data changes).
    let reference_loaded = reference_loaded_at(conn).await?;
    let mut check = Check::new("item_verdicts");
    let mut after = String::new();
    loop {
        let items = stored_verdicts(conn, &after, REEVALUATION_CHUNK).await?;
        let Some(last) = items.last() else {
            return Ok(check);
        };
        after = last.payment_reference.clone();
        let refs: Vec<&str> = items.iter().map(|i| i.payment_reference.as_str()).collect();
        let mut records = records::records_of(conn, &refs).await?;
        for item in &items {
            // An item without records is item_records' finding; nothing to judge here.
            let Some((events, lines)) = records.remove(&item.payment_reference) else {
                continue;
            };
            let who = Evaluator {
                group: "",
                instance: "",
                rules,
                snapshot,
                watermark: item.watermark,
            };
            let (state, evaluation, bucket) = judge_records(&who, &events, &lines);
            check.checked += 1;
            let differs = verdict_difference(item, &evaluation, bucket.currency.code());
            if let Some(mut d) = differs.or_else(|| state_difference(item, &state)) {
                check.differing += 1;
                if reference_loaded.is_some_and(|t| t > item.updated_at) {
                    d.recomputed
                        .push_str(" (reference data loaded since the item's last evaluation)");
                }
                if check.differences.len() < MAX_SHOWN as usize {
                    check.differences.push(d);
                }
            }
        }
    }
}

/// The stored running state against the one folded from the item's records, if it differs
/// (a state that does not parse differs; a NULL one is rebuilt at the next evaluation).
fn state_difference(
    item: &StoredVerdict,
    state: &crate::reconcile::ItemState,
) -> Option<Difference> {
    let stored = item.state.as_deref()?;
    let parsed = serde_json::from_str::<crate::reconcile::ItemState>(stored).ok();
    (parsed.as_ref() != Some(state)).then(|| Difference {
        key: item.payment_reference.clone(),
        stored: format!("state={stored}"),
        recomputed: format!("state={}", serde_json::to_string(state).unwrap_or_default()),
    })
}

/// The differing fields of a stored verdict and a re-evaluation, if any.
fn verdict_difference(
    item: &StoredVerdict,
    e: &crate::reconcile::Evaluation,
    currency: &str,
) -> Option<Difference> {
    let StoredVerdict {
        payment_reference: reference,
        status,
        currency: stored_currency,
        expected_gross: gross,
        expected_fee: fee,
        expected_net: net,
        deadline,
        reason,
        ..
    } = item;
    let amount =
        |a: Option<Decimal>| a.map_or_else(|| "NULL".to_owned(), |a| a.normalize().to_string());
    let time = |t: Option<DateTime<Utc>>| t.map_or_else(|| "NULL".to_owned(), |t| t.to_rfc3339());
    let micros = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros());
    let mut stored = Vec::new();
    let mut recomputed = Vec::new();
    let mut field = |name: &str, differs: bool, s: String, r: String| {
        if differs {
            stored.push(format!("{name}={s}"));
            recomputed.push(format!("{name}={r}"));
        }
    };
    let recomputed_status = e.status.as_str();
    field(
        "status",
        Status::parse(status) != Some(e.status),
        status.clone(),
        recomputed_status.to_owned(),
    );
    field(
        "currency",
        stored_currency.trim() != currency,
        stored_currency.trim().to_owned(),
        currency.to_owned(),
    );
    let expected = [
        e.expected.map(|a| a.gross),
        e.expected.map(|a| a.fee),
        e.expected.map(|a| a.net),
    ];
    for ((name, s), r) in ["expected_gross", "expected_fee", "expected_net"]
        .into_iter()
        .zip([*gross, *fee, *net])
        .zip(expected)
    {
        field(name, s != r, amount(s), amount(r));
    }
    field(
        "deadline",
        micros(*deadline) != micros(e.deadline),
        time(*deadline),
        time(e.deadline),
    );
    field(
        "reason",
        *reason != e.reason,
        format!("{reason:?}"),
        format!("{:?}", e.reason),
    );
    (!stored.is_empty()).then(|| Difference {
        key: reference.clone(),
        stored: stored.join(" "),
        recomputed: recomputed.join(" "),
    })
}

/// Every payout item equals the service's judgement of its records at its watermark, and
/// every batch or unreferenced statement line has an item.
async fn payout_verdicts(
    conn: &mut PgConnection,
    rules: &PayoutRules,
) -> Result<Check, sqlx::Error> {
    let mut recomputed = recomputed_states(conn, None).await?;
    let stored = stored_payout_items(conn).await?;
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
