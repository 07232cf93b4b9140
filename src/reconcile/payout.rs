//! The payout leg: a settlement batch's net total against the bank statement lines that
//! carry its batch reference. Pure: no I/O, no clock; time enters only as the event-time
//! watermark, so the same records give the same verdict live and on replay.
//!
//! ## The item
//! One [`PayoutState`] per settlement batch (`batch_id` of its lines, the `batch_reference`
//! of its payouts; matched exactly, surrounding spaces trimmed by the codec), and one per
//! statement line that carries no batch reference at all (no batch can ever explain it).
//! The state holds running sums only (lines and their net per currency, payouts and their
//! amounts per currency, first and last times), so a batch's records fold into it without
//! re-reading: [`fold`] of the stored state and a transaction's new records equals the
//! state of all of them ([`PayoutState::of`]), which the tests check for any split.
//!
//! ## Rules
//! - **Deadline**: a batch's payout is due `payout_deadline` after its *last* line's event
//!   time (a late line restarts the clock); a credit that names no known batch waits as long
//!   after its *first* payout's event time for the batch's lines. Due means the watermark is
//!   strictly after the deadline, as on the settlement leg.
//! - **Split and partial payouts** are summed: two credits of 60 and 40 pay a batch of 100.
//! - **Differences wait for the deadline**: short, over or unexplained stays
//!   [`PayoutStatus::Pending`] until due, since a payout or a line still in time can fix
//!   it. [`PayoutStatus::Matched`] and [`PayoutStatus::CurrencyMismatch`] are reported at
//!   once (a later credit cannot turn a wrong currency right), as are statement lines with no
//!   batch reference ([`PayoutStatus::Unexpected`]).
//! - **Tolerance**: paid equals net when |paid − net| ≤ max(absolute, relative × |net|),
//!   truncated to the currency's minor units.
//! - **A batch that nets to zero** (refunds offsetting captures) owes no payout: MATCHED
//!   with nothing paid.
//! - **Precedence**: CURRENCY_MISMATCH (lines or payouts in several currencies, or payouts
//!   in another currency than the lines), MATCHED, PENDING (not due), then by what is there:
//!   MISSING (lines, nothing paid), UNEXPECTED (payouts, no line), AMOUNT_MISMATCH.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use super::Tolerance;
use crate::domain::{BankPayout, Currency, SettlementLine};

/// The verdict on one settlement batch's payout (or on one unexplained credit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PayoutStatus {
    /// The payouts add up to the batch's net total, within tolerance.
    Matched,
    /// Not matched yet, within the payout deadline (nothing paid, paid in part, or a credit
    /// waiting for its batch's lines).
    Pending,
    /// Due, and nothing was paid out for the batch.
    Missing,
    /// Due, and the payouts differ from the net total (short, e.g. a reserve withheld, or
    /// over) beyond tolerance.
    AmountMismatch,
    /// Lines or payouts in several currencies, or payouts in another currency than the lines.
    CurrencyMismatch,
    /// A credit no settlement batch explains: its batch never came before the deadline, or
    /// the statement line names no batch at all.
    Unexpected,
}

impl PayoutStatus {
    pub const ALL: [PayoutStatus; 6] = [
        PayoutStatus::Matched,
        PayoutStatus::Pending,
        PayoutStatus::Missing,
        PayoutStatus::AmountMismatch,
        PayoutStatus::CurrencyMismatch,
        PayoutStatus::Unexpected,
    ];

    /// The symbol PostgreSQL, metrics, the exceptions topic and reports carry.
    pub fn as_str(&self) -> &'static str {
        match self {
            PayoutStatus::Matched => "PAYOUT_MATCHED",
            PayoutStatus::Pending => "PAYOUT_PENDING",
            PayoutStatus::Missing => "PAYOUT_MISSING",
            PayoutStatus::AmountMismatch => "PAYOUT_AMOUNT_MISMATCH",
            PayoutStatus::CurrencyMismatch => "PAYOUT_CURRENCY_MISMATCH",
            PayoutStatus::Unexpected => "PAYOUT_UNEXPECTED",
        }
    }

    pub fn parse(symbol: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == symbol)
    }

    /// Whether a person has to look at it: everything except MATCHED and PENDING.
    pub fn is_exception(&self) -> bool {
        !matches!(self, PayoutStatus::Matched | PayoutStatus::Pending)
    }
}

impl fmt::Display for PayoutStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a payout item is about: a settlement batch, or a statement line without a batch
/// reference. Stored as (`kind`, `key`), so a batch id and a line id never collide.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PayoutKey {
    Batch(String),
    Line(String),
}

impl PayoutKey {
    pub fn kind(&self) -> &'static str {
        match self {
            PayoutKey::Batch(_) => "BATCH",
            PayoutKey::Line(_) => "LINE",
        }
    }

    pub fn key(&self) -> &str {
        match self {
            PayoutKey::Batch(k) | PayoutKey::Line(k) => k,
        }
    }

    pub fn parse(kind: &str, key: String) -> Option<Self> {
        match kind {
            "BATCH" => Some(PayoutKey::Batch(key)),
            "LINE" => Some(PayoutKey::Line(key)),
            _ => None,
        }
    }

    /// The item a statement line counts in.
    pub fn of_payout(p: &BankPayout) -> Self {
        match &p.batch_reference {
            Some(b) => PayoutKey::Batch(b.clone()),
            None => PayoutKey::Line(p.statement_line_id.clone()),
        }
    }
}

/// The running sums of one payout item (stored as JSON in `payout_items.state`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutState {
    /// Settlement lines of the batch and their net, per currency.
    pub lines: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub net: BTreeMap<Currency, Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_line_time: Option<DateTime<Utc>>,
    /// The earliest settlement date of the lines (the batch's business date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settlement_date: Option<NaiveDate>,
    /// The least merchant id among the lines (a batch normally has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merchant_id: Option<String>,
    /// Statement lines carrying the batch reference and their amounts, per currency.
    pub payouts: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub paid: BTreeMap<Currency, Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_payout_time: Option<DateTime<Utc>>,
    /// The earliest value date of the payouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_date: Option<NaiveDate>,
    /// The least account id among the payouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
}

fn least<T: Ord + Clone>(a: &mut Option<T>, b: &T) {
    if a.as_ref().is_none_or(|x| b < x) {
        *a = Some(b.clone());
    }
}

fn greatest<T: Ord + Clone>(a: &mut Option<T>, b: &T) {
    if a.as_ref().is_none_or(|x| b > x) {
        *a = Some(b.clone());
    }
}

impl PayoutState {
    /// The state of exactly these records.
    pub fn of<'a>(
        lines: impl IntoIterator<Item = &'a SettlementLine>,
        payouts: impl IntoIterator<Item = &'a BankPayout>,
    ) -> Self {
        fold(PayoutState::default(), lines, payouts)
    }

    fn add_line(&mut self, l: &SettlementLine) {
        self.lines += 1;
        *self.net.entry(l.currency).or_default() += l.net;
        greatest(&mut self.last_line_time, &l.event_time);
        least(&mut self.settlement_date, &l.settlement_date);
        least(&mut self.merchant_id, &l.merchant_id);
    }

    fn add_payout(&mut self, p: &BankPayout) {
        self.payouts += 1;
        *self.paid.entry(p.currency).or_default() += p.amount;
        least(&mut self.first_payout_time, &p.event_time);
        least(&mut self.value_date, &p.value_date);
        least(&mut self.account_id, &p.account_id);
    }

    /// The batch's net total when its lines are in one currency.
    pub fn expected(&self) -> Option<(Currency, Decimal)> {
        single(&self.net)
    }

    /// The sum paid when the payouts are in one currency.
    pub fn paid_total(&self) -> Option<(Currency, Decimal)> {
        single(&self.paid)
    }

    /// The item's business date: the batch's settlement date, else the first value date.
    pub fn business_date(&self) -> Option<NaiveDate> {
        self.settlement_date.or(self.value_date)
    }
}

fn single(m: &BTreeMap<Currency, Decimal>) -> Option<(Currency, Decimal)> {
    match m.len() {
        1 => m.iter().next().map(|(c, a)| (*c, *a)),
        _ => None,
    }
}

/// The state after `lines` and `payouts` (records this transaction inserted, never
/// re-deliveries) are added to `prior`. Pure sums: order and split do not matter.
pub fn fold<'a>(
    mut prior: PayoutState,
    lines: impl IntoIterator<Item = &'a SettlementLine>,
    payouts: impl IntoIterator<Item = &'a BankPayout>,
) -> PayoutState {
    for l in lines {
        prior.add_line(l);
    }
    for p in payouts {
        prior.add_payout(p);
    }
    prior
}

/// The configured rules of the payout leg.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PayoutRules {
    pub deadline: Duration,
    pub tolerance: Tolerance,
}

/// A judgement of one payout item.
#[derive(Debug, Clone, PartialEq)]
pub struct PayoutVerdict {
    pub status: PayoutStatus,
    pub reason: String,
    /// When the item falls due (PENDING items are judged again once the watermark passes it).
    pub deadline: Option<DateTime<Utc>>,
    /// paid − net, when both are in one and the same currency.
    pub difference: Option<Decimal>,
}

/// An amount with exactly the currency's minor units (12.3 EUR prints as 12.30 EUR, however
/// the sum's scale came out).
fn money(a: Decimal, c: Currency) -> String {
    let dp = c.minor_units();
    format!("{:.*} {}", dp as usize, a.round_dp(dp), c)
}

fn currencies(m: &BTreeMap<Currency, Decimal>) -> String {
    m.keys().map(|c| c.code()).collect::<Vec<_>>().join(", ")
}

/// Judges `state` (of item `key`) at `watermark`; see the module doc for the rules.
pub fn judge(
    key: &PayoutKey,
    state: &PayoutState,
    watermark: DateTime<Utc>,
    rules: &PayoutRules,
) -> PayoutVerdict {
    let verdict = |status, reason: String, deadline, difference| PayoutVerdict {
        status,
        reason,
        deadline,
        difference,
    };
    if let PayoutKey::Line(id) = key {
        let paid = state
            .paid_total()
            .map_or_else(|| currencies(&state.paid), |(c, a)| money(a, c));
        return verdict(
            PayoutStatus::Unexpected,
            format!(
                "statement line {id} credits {paid} without a batch reference: no settlement batch can explain it"
            ),
            None,
            None,
        );
    }
    let deadline = (state.last_line_time.or(state.first_payout_time)).map(|t| {
        t.checked_add_signed(rules.deadline)
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    });
    let due = deadline.is_some_and(|d| watermark > d);
    let when = deadline.map_or_else(String::new, |d| d.to_rfc3339());
    if state.net.len() > 1 {
        return verdict(
            PayoutStatus::CurrencyMismatch,
            format!(
                "the batch's lines are in several currencies ({}): no single payout can match",
                currencies(&state.net)
            ),
            deadline,
            None,
        );
    }
    if state.paid.len() > 1 {
        return verdict(
            PayoutStatus::CurrencyMismatch,
            format!(
                "the batch was paid out in several currencies ({})",
                currencies(&state.paid)
            ),
            deadline,
            None,
        );
    }
    let expected = state.expected();
    let paid = state.paid_total();
    if let (Some((ec, _)), Some((pc, pa))) = (expected, paid)
        && ec != pc
    {
        return verdict(
            PayoutStatus::CurrencyMismatch,
            format!(
                "the batch settled in {ec} but {} was paid out",
                money(pa, pc)
            ),
            deadline,
            None,
        );
    }
    match (expected, paid) {
        (Some((c, net)), paid) => {
            let paid_amount = paid.map_or(Decimal::ZERO, |(_, a)| a);
            let diff = paid_amount - net;
            let allowed = (rules.tolerance.absolute)
                .max(rules.tolerance.relative * net.abs())
                .round_dp_with_strategy(c.minor_units(), RoundingStrategy::ToZero);
            if diff.abs() <= allowed {
                let reason = if paid.is_none() {
                    format!("the batch nets to {}: nothing to pay out", money(net, c))
                } else {
                    format!(
                        "{} paid in {} payout(s) for a net of {}",
                        money(paid_amount, c),
                        state.payouts,
                        money(net, c)
                    )
                };
                return verdict(PayoutStatus::Matched, reason, deadline, Some(diff));
            }
            if !due {
                return verdict(
                    PayoutStatus::Pending,
                    format!(
                        "{} of {} paid; due by {when}",
                        money(paid_amount, c),
                        money(net, c)
                    ),
                    deadline,
                    Some(diff),
                );
            }
            if paid.is_none() {
                return verdict(
                    PayoutStatus::Missing,
                    format!("no payout of the net {} by {when}", money(net, c)),
                    deadline,
                    Some(diff),
                );
            }
            let (word, by) = if diff < Decimal::ZERO {
                ("short", -diff)
            } else {
                ("over", diff)
            };
            verdict(
                PayoutStatus::AmountMismatch,
                format!(
                    "{} paid in {} payout(s) for a net of {}: {word} by {} (tolerance {})",
                    money(paid_amount, c),
                    state.payouts,
                    money(net, c),
                    money(by, c),
                    money(allowed, c)
                ),
                deadline,
                Some(diff),
            )
        }
        (None, Some((c, a))) => {
            let status = if due {
                PayoutStatus::Unexpected
            } else {
                PayoutStatus::Pending
            };
            let reason = if due {
                format!(
                    "{} paid out for batch {} but no settlement line of it came by {when}",
                    money(a, c),
                    key.key()
                )
            } else {
                format!(
                    "{} paid out for batch {}; waiting for its settlement lines until {when}",
                    money(a, c),
                    key.key()
                )
            };
            verdict(status, reason, deadline, None)
        }
        // Neither lines nor payouts: an empty state is never stored.
        (None, None) => verdict(PayoutStatus::Pending, "no records".into(), deadline, None),
    }
}

#[cfg(test)]
mod tests {
    use super::PayoutStatus::*;
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn cur(c: &str) -> Currency {
        Currency::from_code(c).unwrap()
    }

    fn t(h: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_790_000_000 + h * 3600, 0).unwrap()
    }

    fn line(id: &str, net: &str, c: &str, hour: i64) -> SettlementLine {
        SettlementLine {
            line_id: id.into(),
            batch_id: "B1".into(),
            payment_reference: format!("p-{id}"),
            merchant_id: "m1".into(),
            gross: d(net),
            fee: Decimal::ZERO,
            net: d(net),
            currency: cur(c),
            settlement_date: t(hour).date_naive(),
            event_time: t(hour),
        }
    }

    fn payout(id: &str, amount: &str, c: &str, hour: i64) -> BankPayout {
        BankPayout {
            statement_line_id: id.into(),
            account_id: "DE00 1234".into(),
            value_date: t(hour).date_naive(),
            amount: d(amount),
            currency: cur(c),
            batch_reference: Some("B1".into()),
            description: "ACQ PAYOUT B1".into(),
            event_time: t(hour),
        }
    }

    fn rules(abs: &str, rel: &str) -> PayoutRules {
        PayoutRules {
            deadline: Duration::hours(72),
            tolerance: Tolerance {
                absolute: d(abs),
                relative: d(rel),
            },
        }
    }

    struct Case {
        name: &'static str,
        lines: Vec<SettlementLine>,
        payouts: Vec<BankPayout>,
        /// Watermark, in hours.
        at: i64,
        rules: PayoutRules,
        status: PayoutStatus,
        difference: Option<&'static str>,
    }

    #[test]
    fn every_status_by_table() {
        let none = rules("0", "0");
        let cases = vec![
            Case {
                name: "paid in full",
                lines: vec![line("l1", "60.00", "EUR", 0), line("l2", "40.00", "EUR", 1)],
                payouts: vec![payout("s1", "100.00", "EUR", 24)],
                at: 24,
                rules: none,
                status: Matched,
                difference: Some("0"),
            },
            Case {
                name: "a split payout summed",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![
                    payout("s1", "70.00", "EUR", 24),
                    payout("s2", "30.00", "EUR", 30),
                ],
                at: 30,
                rules: none,
                status: Matched,
                difference: Some("0"),
            },
            Case {
                name: "partially paid before the deadline waits",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![payout("s1", "70.00", "EUR", 24)],
                at: 72,
                rules: none,
                status: Pending,
                difference: Some("-30"),
            },
            Case {
                name: "partially paid after the deadline is short",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![payout("s1", "70.00", "EUR", 24)],
                at: 73,
                rules: none,
                status: AmountMismatch,
                difference: Some("-30"),
            },
            Case {
                name: "over-paid after the deadline",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![payout("s1", "100.01", "EUR", 24)],
                at: 100,
                rules: none,
                status: AmountMismatch,
                difference: Some("0.01"),
            },
            Case {
                name: "over-paid before the deadline waits for a late line",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![payout("s1", "150.00", "EUR", 24)],
                at: 24,
                rules: none,
                status: Pending,
                difference: Some("50"),
            },
            Case {
                name: "nothing paid, not due",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![],
                at: 72,
                rules: none,
                status: Pending,
                difference: Some("-100"),
            },
            Case {
                name: "nothing paid, due exactly at the deadline is still in time",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![],
                at: 72,
                rules: none,
                status: Pending,
                difference: Some("-100"),
            },
            Case {
                name: "nothing paid, past the deadline",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![],
                at: 73,
                rules: none,
                status: Missing,
                difference: Some("-100"),
            },
            Case {
                name: "a late line restarts the clock",
                lines: vec![
                    line("l1", "100.00", "EUR", 0),
                    line("l2", "1.00", "EUR", 10),
                ],
                payouts: vec![],
                at: 80,
                rules: none,
                status: Pending,
                difference: Some("-101"),
            },
            Case {
                name: "a batch netting to zero owes nothing",
                lines: vec![
                    line("l1", "50.00", "EUR", 0),
                    line("l2", "-50.00", "EUR", 0),
                ],
                payouts: vec![],
                at: 500,
                rules: none,
                status: Matched,
                difference: Some("0"),
            },
            Case {
                name: "a negative batch is paid by a debit",
                lines: vec![line("l1", "-20.00", "EUR", 0)],
                payouts: vec![payout("s1", "-20.00", "EUR", 5)],
                at: 5,
                rules: none,
                status: Matched,
                difference: Some("0"),
            },
            Case {
                name: "a payout before its lines waits",
                lines: vec![],
                payouts: vec![payout("s1", "100.00", "EUR", 0)],
                at: 72,
                rules: none,
                status: Pending,
                difference: None,
            },
            Case {
                name: "a payout whose batch never came is unexpected",
                lines: vec![],
                payouts: vec![payout("s1", "100.00", "EUR", 0)],
                at: 73,
                rules: none,
                status: Unexpected,
                difference: None,
            },
            Case {
                name: "paid in another currency",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![payout("s1", "100.00", "USD", 1)],
                at: 1,
                rules: none,
                status: CurrencyMismatch,
                difference: None,
            },
            Case {
                name: "lines in two currencies",
                lines: vec![line("l1", "100.00", "EUR", 0), line("l2", "1.00", "GBP", 0)],
                payouts: vec![],
                at: 1,
                rules: none,
                status: CurrencyMismatch,
                difference: None,
            },
            Case {
                name: "paid in two currencies",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![
                    payout("s1", "50.00", "EUR", 1),
                    payout("s2", "50.00", "USD", 1),
                ],
                at: 1,
                rules: none,
                status: CurrencyMismatch,
                difference: None,
            },
            Case {
                name: "short by exactly the absolute tolerance matches",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![payout("s1", "99.50", "EUR", 1)],
                at: 1,
                rules: rules("0.50", "0"),
                status: Matched,
                difference: Some("-0.5"),
            },
            Case {
                name: "one cent beyond the absolute tolerance waits, then mismatches",
                lines: vec![line("l1", "100.00", "EUR", 0)],
                payouts: vec![payout("s1", "99.49", "EUR", 1)],
                at: 73,
                rules: rules("0.50", "0"),
                status: AmountMismatch,
                difference: Some("-0.51"),
            },
            Case {
                name: "the relative tolerance scales with the net",
                lines: vec![line("l1", "10000.00", "EUR", 0)],
                payouts: vec![payout("s1", "9990.00", "EUR", 1)],
                at: 1,
                rules: rules("0.50", "0.001"),
                status: Matched,
                difference: Some("-10"),
            },
            Case {
                name: "the relative allowance is truncated to minor units",
                lines: vec![line("l1", "1.99", "EUR", 0)],
                payouts: vec![payout("s1", "1.98", "EUR", 1)],
                at: 73,
                rules: rules("0", "0.005"),
                status: AmountMismatch,
                difference: Some("-0.01"),
            },
            Case {
                name: "a reserve withheld is short",
                lines: vec![line("l1", "1000.00", "EUR", 0)],
                payouts: vec![payout("s1", "900.00", "EUR", 1)],
                at: 200,
                rules: none,
                status: AmountMismatch,
                difference: Some("-100"),
            },
        ];
        for c in cases {
            let state = PayoutState::of(&c.lines, &c.payouts);
            let v = judge(&PayoutKey::Batch("B1".into()), &state, t(c.at), &c.rules);
            assert_eq!(v.status, c.status, "{}: {}", c.name, v.reason);
            assert_eq!(v.difference, c.difference.map(d), "{}", c.name);
            if c.status == Pending {
                assert!(v.deadline.is_some_and(|dl| t(c.at) <= dl), "{}", c.name);
            }
        }
    }

    #[test]
    fn a_statement_line_without_a_batch_reference_is_unexpected_at_once() {
        let mut p = payout("s9", "12.00", "EUR", 0);
        p.batch_reference = None;
        let key = PayoutKey::of_payout(&p);
        assert_eq!(key, PayoutKey::Line("s9".into()));
        let v = judge(&key, &PayoutState::of([], [&p]), t(0), &rules("0", "0"));
        assert_eq!(v.status, Unexpected);
        assert!(
            v.reason.contains("s9") && v.reason.contains("12.00 EUR"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn statuses_round_trip_and_only_matched_and_pending_are_calm() {
        for s in PayoutStatus::ALL {
            assert_eq!(PayoutStatus::parse(s.as_str()), Some(s));
        }
        let calm: Vec<_> = (PayoutStatus::ALL.into_iter())
            .filter(|s| !s.is_exception())
            .collect();
        assert_eq!(calm, [Matched, Pending]);
    }

    #[test]
    fn the_transitions_of_a_batch_over_time() {
        // Lines, then a first part, the deadline, the rest: PENDING, PENDING, MISMATCH, MATCHED.
        let r = rules("0", "0");
        let key = PayoutKey::Batch("B1".into());
        let s0 = PayoutState::of(&[line("l1", "100.00", "EUR", 0)], []);
        assert_eq!(judge(&key, &s0, t(1), &r).status, Pending);
        let s1 = fold(s0, [], &[payout("s1", "60.00", "EUR", 20)]);
        assert_eq!(judge(&key, &s1, t(20), &r).status, Pending);
        assert_eq!(judge(&key, &s1, t(90), &r).status, AmountMismatch);
        let s2 = fold(s1, [], &[payout("s2", "40.00", "EUR", 95)]);
        assert_eq!(judge(&key, &s2, t(95), &r).status, Matched);
    }

    #[test]
    fn the_state_survives_its_json_form() {
        let s = PayoutState::of(
            &[line("l1", "100.00", "EUR", 0), line("l2", "1.5", "GBP", 3)],
            &[payout("s1", "60.00", "EUR", 20)],
        );
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<PayoutState>(&json).unwrap(), s);
        let empty = serde_json::to_string(&PayoutState::default()).unwrap();
        assert_eq!(empty, r#"{"lines":0,"payouts":0}"#);
    }

    proptest! {
        /// Folding records in any split into transactions equals the state of all of them.
        #[test]
        fn incremental_state_equals_the_state_of_all_records(
            nets in proptest::collection::vec((-5000i64..5000, 0usize..2, 0i64..100), 0..12),
            pays in proptest::collection::vec((-5000i64..5000, 0usize..2, 0i64..100), 0..6),
            cuts in proptest::collection::vec(0usize..20, 0..5),
            at in 0i64..300,
        ) {
            let cs = ["EUR", "USD"];
            let lines: Vec<_> = nets.iter().enumerate()
                .map(|(i, (n, c, h))| line(&format!("l{i}"), &Decimal::new(*n, 2).to_string(), cs[*c], *h))
                .collect();
            let payouts: Vec<_> = pays.iter().enumerate()
                .filter(|(_, (n, _, _))| *n != 0)
                .map(|(i, (n, c, h))| payout(&format!("s{i}"), &Decimal::new(*n, 2).to_string(), cs[*c], *h))
                .collect();
            let whole = PayoutState::of(&lines, &payouts);
            // Records as one interleaved log, cut into transactions at `cuts`.
            let mut log: Vec<(Option<&SettlementLine>, Option<&BankPayout>)> = Vec::new();
            let (mut li, mut pi) = (lines.iter(), payouts.iter());
            loop {
                match (li.next(), pi.next()) {
                    (None, None) => break,
                    (l, p) => {
                        if let Some(l) = l { log.push((Some(l), None)); }
                        if let Some(p) = p { log.push((None, Some(p))); }
                    }
                }
            }
            let mut state = PayoutState::default();
            let mut start = 0;
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (log.len() + 1)).collect();
            bounds.push(log.len());
            bounds.sort();
            for end in bounds {
                let part = &log[start..end.max(start)];
                let stored = serde_json::to_string(&state).unwrap();
                state = fold(
                    serde_json::from_str(&stored).unwrap(),
                    part.iter().filter_map(|r| r.0),
                    part.iter().filter_map(|r| r.1),
                );
                start = end.max(start);
            }
            prop_assert_eq!(&state, &whole);
            let key = PayoutKey::Batch("B1".into());
            let r = rules("0.01", "0");
            prop_assert_eq!(judge(&key, &state, t(at), &r), judge(&key, &whole, t(at), &r));
        }
    }
}
