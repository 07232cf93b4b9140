//! The running state of one payment reference ([`ItemState`]): everything the matcher needs
//! to judge it, kept with the item and updated by each record exactly once, in the
//! transaction that inserts the record. A batch reads the states of the references it
//! touches, folds its new records into them ([`fold`]) and judges the result ([`judge`]); it
//! does not re-read the references' earlier records.
//!
//! The full recomputation is the same fold started from nothing over all of a reference's
//! records, so the two agree by construction wherever a fold applies; the property tests
//! check it for random sequences of records and batch boundaries. A fold does not apply, and
//! the caller re-reads the reference's records, when the stored sums were priced with
//! reference data that no longer holds:
//! - the merchant's pricing terms (settlement currency, percentage and fixed fee) valid at the
//!   reference's anchor are not the ones the sums were priced with (a new merchant version, a
//!   correction, an earlier record moving the anchor into another version);
//! - the FX rates that priced its events changed (a rate version loaded or corrected at or
//!   before its latest event in that currency: [`ReferenceData::rate_fingerprint`]);
//! - an FX rate was missing (MISSING_REFERENCE): it may have arrived since.
//!
//! Tolerances and deadlines do not enter the sums; [`judge`] takes them from the terms valid
//! now, as the full evaluation does.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::Status;
use super::terms::{Amounts, Evaluation, MissingData, Terms, difference, fee_of, round};
use crate::domain::{Currency, PaymentEvent, PaymentEventKind, SettlementLine};

/// What prices a reference: the merchant's terms and FX rates as of given times.
pub trait ReferenceData {
    /// The merchant's terms valid at `at`, defaults filled in; `None`: unknown then.
    fn terms_at(&self, merchant_id: &str, at: DateTime<Utc>) -> Option<Terms>;
    /// Units of `to` for one `from` at `at`.
    fn rate_at(&self, from: Currency, to: Currency, at: DateTime<Utc>) -> Option<Decimal>;
    /// A fingerprint of every rate version that can convert `from` into `to` at any time up to
    /// `up_to` (both directions): equal fingerprints mean every such conversion is unchanged.
    fn rate_fingerprint(&self, from: Currency, to: Currency, up_to: DateTime<Utc>) -> u64;
}

/// The record whose merchant and time the reference is priced and bucketed by: its first
/// payment event in (event time, id) order, or its first settlement line while it has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    pub time: DateTime<Utc>,
    pub id: String,
    pub merchant_id: String,
    #[serde(with = "code")]
    pub currency: Currency,
    /// A payment event (else a settlement line).
    pub event: bool,
}

/// The part of a merchant's terms the expected sums are priced with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pricing {
    #[serde(with = "code")]
    pub currency: Currency,
    pub fee_bps: Decimal,
    pub fee_fixed: Decimal,
}

impl Pricing {
    pub fn of(terms: &Terms) -> Pricing {
        Pricing {
            currency: terms.settlement_currency,
            fee_bps: terms.fee_bps,
            fee_fixed: terms.fee_fixed,
        }
    }
}

/// The rates of one event currency the sums were priced with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatesSeen {
    #[serde(with = "code")]
    pub currency: Currency,
    /// The latest event time in this currency.
    pub up_to: DateTime<Utc>,
    pub fingerprint: u64,
}

/// The sums of the settlement lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LineSums {
    None,
    One(#[serde(with = "amounts")] Amounts),
    /// Lines in more than one currency: no sum.
    Mixed,
}

/// The first line (in (event time, id) order) not in the settlement currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForeignLine {
    pub time: DateTime<Utc>,
    pub line_id: String,
    #[serde(with = "code")]
    pub currency: Currency,
    pub merchant_id: String,
}

/// The currency and time of an event no rate converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingRate {
    #[serde(with = "code")]
    pub currency: Currency,
    pub at: DateTime<Utc>,
}

/// Everything [`judge`] needs about one reference (module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemState {
    pub anchor: Anchor,
    /// The terms the sums were priced with; `None`: the merchant was unknown at the anchor.
    pub pricing: Option<Pricing>,
    /// What the events call for in the pricing currency (zero without pricing).
    pub expected_gross: Decimal,
    pub expected_fee: Decimal,
    /// The first event (in order) no rate converted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_rate: Option<MissingRate>,
    /// Per event currency other than the pricing currency.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rates: Vec<RatesSeen>,
    pub events: u32,
    pub captures: u32,
    pub last_event: Option<DateTime<Utc>>,
    pub lines: u32,
    /// Lines with a positive gross.
    pub capture_lines: u32,
    pub last_line: Option<DateTime<Utc>>,
    pub settled: LineSums,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign_line: Option<ForeignLine>,
}

fn key_of_event(e: &PaymentEvent) -> (DateTime<Utc>, &str) {
    (e.event_time, e.event_id.as_str())
}

fn key_of_line(l: &SettlementLine) -> (DateTime<Utc>, &str) {
    (l.event_time, l.line_id.as_str())
}

/// The anchor after `events` and `lines` join `prior` (see [`Anchor`]).
fn anchor(prior: Option<&Anchor>, events: &[&PaymentEvent], lines: &[&SettlementLine]) -> Anchor {
    let first_event = events
        .iter()
        .copied()
        .min_by(|a, b| key_of_event(a).cmp(&key_of_event(b)));
    let first_line = lines
        .iter()
        .copied()
        .min_by(|a, b| key_of_line(a).cmp(&key_of_line(b)));
    let of_event = |e: &PaymentEvent| Anchor {
        time: e.event_time,
        id: e.event_id.clone(),
        merchant_id: e.merchant_id.clone(),
        currency: e.currency,
        event: true,
    };
    let of_line = |l: &SettlementLine| Anchor {
        time: l.event_time,
        id: l.line_id.clone(),
        merchant_id: l.merchant_id.clone(),
        currency: l.currency,
        event: false,
    };
    let earlier = |a: &Anchor, key: (DateTime<Utc>, &str)| key < (a.time, a.id.as_str());
    match (prior, first_event, first_line) {
        (Some(p), Some(e), _) if p.event => {
            if earlier(p, key_of_event(e)) {
                of_event(e)
            } else {
                p.clone()
            }
        }
        (_, Some(e), _) => of_event(e),
        (Some(p), None, _) if p.event => p.clone(),
        (Some(p), None, Some(l)) => {
            if earlier(p, key_of_line(l)) {
                of_line(l)
            } else {
                p.clone()
            }
        }
        (Some(p), None, None) => p.clone(),
        (None, None, Some(l)) => of_line(l),
        (None, None, None) => unreachable!("fold is only called with records or a prior state"),
    }
}

/// Folds new records into `prior` (`None`: a reference without records yet). `None` when the
/// prior sums cannot be carried forward (module doc): the caller folds all of the
/// reference's records into `None` instead, which always succeeds.
pub fn fold(
    prior: Option<&ItemState>,
    events: &[&PaymentEvent],
    lines: &[&SettlementLine],
    data: &impl ReferenceData,
) -> Option<ItemState> {
    let anchor = anchor(prior.map(|p| &p.anchor), events, lines);
    let pricing = data
        .terms_at(&anchor.merchant_id, anchor.time)
        .map(|t| Pricing::of(&t));
    if let Some(p) = prior {
        if p.pricing != pricing || p.missing_rate.is_some() {
            return None;
        }
        if let Some(pricing) = pricing {
            let changed = p.rates.iter().any(|r| {
                data.rate_fingerprint(r.currency, pricing.currency, r.up_to) != r.fingerprint
            });
            if changed {
                return None;
            }
        }
    }
    let mut s = prior.cloned().unwrap_or_else(|| ItemState {
        anchor: anchor.clone(),
        pricing,
        expected_gross: Decimal::ZERO,
        expected_fee: Decimal::ZERO,
        missing_rate: None,
        rates: Vec::new(),
        events: 0,
        captures: 0,
        last_event: None,
        lines: 0,
        capture_lines: 0,
        last_line: None,
        settled: LineSums::None,
        foreign_line: None,
    });
    s.anchor = anchor;

    let mut events = events.to_vec();
    events.sort_by(|a, b| key_of_event(a).cmp(&key_of_event(b)));
    for e in events {
        s.events += 1;
        if e.kind == PaymentEventKind::Capture {
            s.captures += 1;
        }
        s.last_event = s.last_event.max(Some(e.event_time));
        let Some(pricing) = pricing else { continue };
        if e.currency != pricing.currency {
            match s.rates.iter_mut().find(|r| r.currency == e.currency) {
                Some(r) => r.up_to = r.up_to.max(e.event_time),
                None => s.rates.push(RatesSeen {
                    currency: e.currency,
                    up_to: e.event_time,
                    fingerprint: 0,
                }),
            }
        }
        if s.missing_rate.is_some() {
            continue; // the sums mean nothing until the rate arrives
        }
        match data.rate_at(e.currency, pricing.currency, e.event_time) {
            _ if e.currency == pricing.currency => price(&mut s, e, Decimal::ONE, &pricing),
            Some(rate) => price(&mut s, e, rate, &pricing),
            None => {
                s.missing_rate = Some(MissingRate {
                    currency: e.currency,
                    at: e.event_time,
                })
            }
        }
    }
    if s.missing_rate.is_some() {
        // Meaningless until the rate arrives; zero, so the state does not depend on which
        // events were priced before the gap was found.
        s.expected_gross = Decimal::ZERO;
        s.expected_fee = Decimal::ZERO;
    }
    if let Some(pricing) = pricing {
        for r in &mut s.rates {
            r.fingerprint = data.rate_fingerprint(r.currency, pricing.currency, r.up_to);
        }
        s.rates.sort_by_key(|r| r.currency);
    }

    for l in lines {
        s.lines += 1;
        if l.gross > Decimal::ZERO {
            s.capture_lines += 1;
        }
        s.last_line = s.last_line.max(Some(l.event_time));
        s.settled = match s.settled {
            LineSums::None => LineSums::One(Amounts {
                currency: l.currency,
                gross: l.gross,
                fee: l.fee,
                net: l.net,
            }),
            LineSums::One(a) if a.currency == l.currency => LineSums::One(Amounts {
                gross: a.gross + l.gross,
                fee: a.fee + l.fee,
                net: a.net + l.net,
                ..a
            }),
            _ => LineSums::Mixed,
        };
        if pricing.is_some_and(|p| p.currency != l.currency) {
            let first = s
                .foreign_line
                .as_ref()
                .is_none_or(|f| key_of_line(l) < (f.time, f.line_id.as_str()));
            if first {
                s.foreign_line = Some(ForeignLine {
                    time: l.event_time,
                    line_id: l.line_id.clone(),
                    currency: l.currency,
                    merchant_id: l.merchant_id.clone(),
                });
            }
        }
    }
    Some(s)
}

/// The state of a reference from all of its records at once: the full recomputation every
/// fold must agree with (a fold from nothing always applies).
pub fn recompute(
    events: &[&PaymentEvent],
    lines: &[&SettlementLine],
    data: &impl ReferenceData,
) -> ItemState {
    fold(None, events, lines, data).expect("a fold from nothing always applies")
}

/// Adds one event, converted at `rate` and rounded, to the expected sums.
fn price(s: &mut ItemState, e: &PaymentEvent, rate: Decimal, pricing: &Pricing) {
    let gross = round(e.signed_amount() * rate, pricing.currency);
    s.expected_gross += gross;
    if e.kind == PaymentEventKind::Capture {
        s.expected_fee += fee_of(gross, pricing.fee_bps, pricing.fee_fixed, pricing.currency);
    }
}

/// Where an item counts in `merchant_daily_totals`: its anchor's merchant and UTC date, in
/// the settlement currency (the anchor's own while the merchant is unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub merchant_id: String,
    pub date: NaiveDate,
    pub currency: Currency,
}

/// The verdict on a reference from its state, the terms valid at its anchor now and the
/// event-time `watermark` (the rules: the module doc of [`crate::reconcile`]).
pub fn judge(
    s: &ItemState,
    data: &impl ReferenceData,
    watermark: DateTime<Utc>,
) -> (Evaluation, Bucket) {
    let terms = data.terms_at(&s.anchor.merchant_id, s.anchor.time);
    let bucket = Bucket {
        merchant_id: s.anchor.merchant_id.clone(),
        date: s.anchor.time.date_naive(),
        currency: terms
            .as_ref()
            .map_or(s.anchor.currency, |t| t.settlement_currency),
    };
    (verdict(s, terms.as_ref(), watermark), bucket)
}

/// [`judge`] with the terms given (`None`: merchant unknown).
pub fn verdict(s: &ItemState, terms: Option<&Terms>, watermark: DateTime<Utc>) -> Evaluation {
    let settled = match s.settled {
        LineSums::One(a) => Some(a),
        LineSums::None | LineSums::Mixed => None,
    };
    let verdict = |status, expected, deadline, reason| Evaluation {
        status,
        expected,
        settled,
        missing_reference: None,
        deadline,
        reason,
    };
    let missing = |missing: MissingData| Evaluation {
        reason: format!("{missing}; evaluated again when it arrives"),
        missing_reference: Some(missing),
        ..verdict(Status::MissingReference, None, None, String::new())
    };
    let Some(terms) = terms else {
        return missing(MissingData::Merchant {
            merchant_id: s.anchor.merchant_id.clone(),
        });
    };
    let currency = terms.settlement_currency;
    if let Some(MissingRate { currency: from, at }) = s.missing_rate {
        return missing(MissingData::FxRate {
            from,
            to: currency,
            at,
        });
    }
    let expected = Amounts {
        currency,
        gross: s.expected_gross,
        fee: s.expected_fee,
        net: s.expected_gross - s.expected_fee,
    };
    if let Some(line) = &s.foreign_line {
        let reason = format!(
            "line {} is in {}, but merchant {} is settled in {currency}",
            line.line_id, line.currency, line.merchant_id
        );
        return verdict(Status::CurrencyMismatch, Some(expected), None, reason);
    }
    let got = settled.unwrap_or(Amounts::zero(currency));
    let tolerance = terms.tolerance;
    let gross_diff = difference("gross", expected.gross, got.gross, tolerance, currency);
    let fee_diff = difference("fee", expected.fee, got.fee, tolerance, currency);
    let after =
        |t: DateTime<Utc>, d: Duration| t.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC);
    let deadline = (s.last_event.map(|t| after(t, terms.settlement_deadline)))
        .max(s.last_line.map(|t| after(t, terms.payment_deadline)));
    let (events, lines) = (s.events, s.lines);

    // In the precedence order of the module doc.
    let status = if events > 0 && lines > 0 && gross_diff.is_none() && fee_diff.is_none() {
        Status::Matched
    } else if deadline.is_none_or(|d| watermark <= d) {
        Status::Expected
    } else if lines == 0 {
        Status::MissingSettlement
    } else if events == 0 {
        Status::UnexpectedSettlement
    } else if gross_diff.is_some() && s.capture_lines > s.captures && got.gross > expected.gross {
        Status::OverSettled
    } else if gross_diff.is_some() {
        Status::AmountMismatch
    } else {
        Status::FeeMismatch
    };

    let until = deadline.map_or_else(String::new, |d| d.to_rfc3339());
    let settled_text = settled.map_or_else(|| "nothing".to_owned(), |s| s.to_string());
    let [gross_diff, fee_diff] = [gross_diff, fee_diff].map(Option::unwrap_or_default);
    let (capture_lines, captures) = (s.capture_lines, s.captures);
    let reason = match status {
        Status::Matched => format!("settled {got} matches {expected}"),
        Status::Expected if deadline.is_none() => "no payment event and no settlement line".into(),
        Status::Expected => {
            format!("expected {expected}, settled {settled_text}; in time until {until}")
        }
        Status::MissingSettlement => {
            format!("nothing settled of {expected}; deadline {until} passed")
        }
        Status::UnexpectedSettlement => {
            format!("settled {got} with no payment; deadline {until} passed")
        }
        Status::OverSettled => {
            format!("more capture lines ({capture_lines}) than captures ({captures}); {gross_diff}")
        }
        Status::AmountMismatch => gross_diff,
        _ => fee_diff, // FEE_MISMATCH: the other statuses returned above
    };
    let deadline = deadline.filter(|_| status == Status::Expected);
    verdict(status, Some(expected), deadline, reason)
}

/// A currency as its ISO code.
mod code {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::domain::Currency;

    pub(super) fn serialize<S: Serializer>(c: &Currency, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.code())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Currency, D::Error> {
        let code = String::deserialize(d)?;
        Currency::from_code(&code).map_err(serde::de::Error::custom)
    }
}

/// [`Amounts`] as (currency code, gross, fee, net).
mod amounts {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::domain::Currency;
    use crate::reconcile::Amounts;

    pub(super) fn serialize<S: Serializer>(a: &Amounts, s: S) -> Result<S::Ok, S::Error> {
        (a.currency.code(), a.gross, a.fee, a.net).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Amounts, D::Error> {
        let (code, gross, fee, net) = <(String, Decimal, Decimal, Decimal)>::deserialize(d)?;
        let currency = Currency::from_code(&code).map_err(serde::de::Error::custom)?;
        Ok(Amounts {
            currency,
            gross,
            fee,
            net,
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;
    use crate::config::Settings;
    use crate::reconcile::{Priced, Rules};
    use crate::reference::{FxRate, MerchantStatus, MerchantVersion, Snapshot};

    fn cur(code: &str) -> Currency {
        Currency::from_code(code).unwrap()
    }

    fn at(hours: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::hours(hours)
    }

    fn merchant(id: &str, from: i64, currency: &str, bps: i64) -> MerchantVersion {
        MerchantVersion {
            merchant_id: id.into(),
            valid_from: at(from),
            name: id.into(),
            settlement_currency: cur(currency),
            fee_bps: Decimal::from(bps),
            fee_fixed: Decimal::new(10, 2),
            status: MerchantStatus::Active,
            tolerance_abs: None,
            tolerance_rel: None,
            settlement_deadline: None,
            payment_deadline: None,
        }
    }

    fn rate(base: &str, quote: &str, from: i64, rate: &str) -> FxRate {
        FxRate {
            base: cur(base),
            quote: cur(quote),
            valid_from: at(from),
            rate: rate.parse().unwrap(),
        }
    }

    /// Merchant m1 (EUR, a fee change at hour 30), m2 (USD), no m3; EUR/USD rates with a
    /// change at hour 20, no JPY rate before hour 40.
    fn snapshot(extra_rates: &[FxRate], extra_merchants: &[MerchantVersion]) -> Snapshot {
        let mut merchants = vec![
            merchant("m1", 0, "EUR", 150),
            merchant("m1", 30, "EUR", 175),
            merchant("m2", 0, "USD", 200),
        ];
        merchants.extend_from_slice(extra_merchants);
        let mut rates = vec![
            rate("USD", "EUR", 0, "0.91"),
            rate("USD", "EUR", 20, "0.93"),
            rate("EUR", "JPY", 40, "160.5"),
        ];
        rates.extend_from_slice(extra_rates);
        Snapshot::new(merchants, rates, 1)
    }

    fn rules() -> Rules {
        Rules::from_settings(
            &Settings::load_from(None, std::iter::empty())
                .unwrap()
                .reconciliation,
        )
    }

    #[derive(Debug, Clone)]
    enum Rec {
        Event(PaymentEvent),
        Line(SettlementLine),
    }

    fn record() -> impl Strategy<Value = Rec> {
        let currency = prop_oneof![Just("EUR"), Just("USD"), Just("JPY")];
        let merchant = prop_oneof![4 => Just("m1"), 2 => Just("m2"), 1 => Just("m3")];
        let event = (
            0u32..3,
            1i64..100_000,
            currency.clone(),
            0i64..60,
            merchant.clone(),
            0u32..1000,
        )
            .prop_map(|(kind, cents, c, hour, m, id)| {
                let currency = cur(c);
                let kind = [
                    PaymentEventKind::Capture,
                    PaymentEventKind::Refund,
                    PaymentEventKind::Chargeback,
                ][kind as usize];
                let amount =
                    Decimal::new(cents, currency.minor_units()).round_dp(currency.minor_units());
                Rec::Event(PaymentEvent {
                    event_id: format!("e{id}"),
                    payment_reference: "p".into(),
                    merchant_id: m.into(),
                    kind,
                    amount: amount.max(Decimal::ONE),
                    currency,
                    event_time: at(hour),
                    psp_reference: None,
                })
            });
        let line = (
            -50_000i64..100_000,
            0i64..500,
            currency,
            0i64..60,
            merchant,
            0u32..1000,
        )
            .prop_map(|(cents, fee, c, hour, m, id)| {
                let currency = cur(c);
                let gross = Decimal::new(cents, 2);
                let fee = Decimal::new(fee, 2);
                Rec::Line(SettlementLine {
                    line_id: format!("l{id}"),
                    batch_id: "b".into(),
                    payment_reference: "p".into(),
                    merchant_id: m.into(),
                    gross,
                    fee,
                    net: gross - fee,
                    currency,
                    settlement_date: at(hour).date_naive(),
                    event_time: at(hour),
                })
            });
        prop_oneof![3 => event, 2 => line]
    }

    /// Records with unique ids (the store inserts each id once).
    fn records() -> impl Strategy<Value = Vec<Rec>> {
        prop::collection::vec(record(), 1..14).prop_map(|rs| {
            let mut seen = std::collections::HashSet::new();
            rs.into_iter()
                .filter(|r| match r {
                    Rec::Event(e) => seen.insert(e.event_id.clone()),
                    Rec::Line(l) => seen.insert(l.line_id.clone()),
                })
                .collect()
        })
    }

    fn split(rs: &[Rec]) -> (Vec<&PaymentEvent>, Vec<&SettlementLine>) {
        let mut events = Vec::new();
        let mut lines = Vec::new();
        for r in rs {
            match r {
                Rec::Event(e) => events.push(e),
                Rec::Line(l) => lines.push(l),
            }
        }
        (events, lines)
    }

    /// What the store does: fold each batch into the stored state, or fold every record so
    /// far from nothing when the state cannot be carried forward. Returns the state and how
    /// many batches needed the re-read.
    fn incremental(
        rs: &[Rec],
        cuts: &[usize],
        data_per_batch: &dyn Fn(usize) -> Snapshot,
        rules: &Rules,
    ) -> (ItemState, usize, usize) {
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (rs.len() + 1)).collect();
        bounds.push(0);
        bounds.push(rs.len());
        bounds.sort_unstable();
        bounds.dedup();
        let mut state: Option<ItemState> = None;
        let mut rereads = 0;
        for (n, w) in bounds.windows(2).enumerate() {
            let snapshot = data_per_batch(n);
            let data = Priced {
                rules,
                snapshot: &snapshot,
            };
            let (events, lines) = split(&rs[w[0]..w[1]]);
            state = match fold(state.as_ref(), &events, &lines, &data) {
                Some(s) => Some(s),
                None => {
                    rereads += 1;
                    let (events, lines) = split(&rs[..w[1]]);
                    fold(None, &events, &lines, &data)
                }
            };
        }
        let batches = bounds.len() - 1;
        (state.expect("at least one record"), rereads, batches)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// For random records arriving in random batches, the state folded batch by batch
        /// equals the state folded from all records at once, and so do the verdicts at any
        /// watermark.
        #[test]
        fn incremental_state_equals_the_full_recomputation(
            rs in records(),
            cuts in prop::collection::vec(0usize..20, 0..6),
            watermark in 0i64..400,
        ) {
            let rules = rules();
            let (state, _, _) = incremental(&rs, &cuts, &|_| snapshot(&[], &[]), &rules);
            let fixed = snapshot(&[], &[]);
            let data = Priced { rules: &rules, snapshot: &fixed };
            let (events, lines) = split(&rs);
            let full = fold(None, &events, &lines, &data).unwrap();
            prop_assert_eq!(&state, &full);
            prop_assert_eq!(judge(&state, &data, at(watermark)), judge(&full, &data, at(watermark)));
        }

        /// Reference data that changes between batches (a rate version before earlier
        /// events, a merchant version, the missing rate arriving) is noticed: the result
        /// equals the full recomputation with the final reference data.
        #[test]
        fn reference_data_changes_between_batches_are_recomputed(
            rs in records(),
            cuts in prop::collection::vec(0usize..20, 1..6),
            change_at in 0usize..4,
            which in 0usize..4,
        ) {
            let rules = rules();
            let change = |n: usize| -> Snapshot {
                if n < change_at {
                    return snapshot(&[], &[]);
                }
                match which {
                    0 => snapshot(&[rate("USD", "EUR", 5, "0.95")], &[]),
                    1 => snapshot(&[rate("EUR", "JPY", 0, "158.25")], &[]),
                    2 => snapshot(&[], &[merchant("m1", 10, "EUR", 160)]),
                    _ => snapshot(&[], &[merchant("m3", 0, "EUR", 100)]),
                }
            };
            let (state, _, batches) = incremental(&rs, &cuts, &change, &rules);
            // The reference data the last batch was judged with.
            let last = change(batches - 1);
            let data = Priced { rules: &rules, snapshot: &last };
            let (events, lines) = split(&rs);
            let full = fold(None, &events, &lines, &data).unwrap();
            prop_assert_eq!(state, full);
        }
    }

    /// A rate version loaded for a time before events already priced changes their price:
    /// the fold refuses to carry the sums forward, and the re-read prices them anew.
    #[test]
    fn a_rate_loaded_before_priced_events_makes_the_item_re_read() {
        let rules = rules();
        let e = |id: &str, hour: i64| PaymentEvent {
            event_id: id.into(),
            payment_reference: "p".into(),
            merchant_id: "m1".into(),
            kind: PaymentEventKind::Capture,
            amount: Decimal::new(10_000, 2),
            currency: cur("USD"),
            event_time: at(hour),
            psp_reference: None,
        };
        let (e1, e2) = (e("e1", 10), e("e2", 11));
        let before = snapshot(&[], &[]);
        let data = Priced {
            rules: &rules,
            snapshot: &before,
        };
        let s = fold(None, &[&e1], &[], &data).unwrap();
        assert_eq!(s.expected_gross, Decimal::new(9100, 2), "100 USD at 0.91");
        // Unchanged reference data, or a rate from after the priced event: carried forward.
        assert!(fold(Some(&s), &[&e2], &[], &data).is_some());
        let later = snapshot(&[rate("USD", "EUR", 12, "0.99")], &[]);
        let data = Priced {
            rules: &rules,
            snapshot: &later,
        };
        assert!(fold(Some(&s), &[&e2], &[], &data).is_some());
        // A version starting before it: re-read.
        let earlier = snapshot(&[rate("USD", "EUR", 5, "0.95")], &[]);
        let data = Priced {
            rules: &rules,
            snapshot: &earlier,
        };
        assert_eq!(fold(Some(&s), &[&e2], &[], &data), None);
        let full = fold(None, &[&e1, &e2], &[], &data).unwrap();
        assert_eq!(full.expected_gross, Decimal::new(19_000, 2), "both at 0.95");
        // A new fee for the merchant at the anchor: re-read too.
        let fee = snapshot(&[], &[merchant("m1", 5, "EUR", 300)]);
        let data = Priced {
            rules: &rules,
            snapshot: &fee,
        };
        assert_eq!(fold(Some(&s), &[&e2], &[], &data), None);
    }

    /// The state survives its trip through PostgreSQL's jsonb unchanged.
    #[test]
    fn the_state_round_trips_through_json() {
        let rules = rules();
        let snapshot = snapshot(&[], &[]);
        let data = Priced {
            rules: &rules,
            snapshot: &snapshot,
        };
        let e = PaymentEvent {
            event_id: "e\u{1f}1".into(),
            payment_reference: "p".into(),
            merchant_id: "m1".into(),
            kind: PaymentEventKind::Capture,
            amount: Decimal::new(12_345, 2),
            currency: cur("USD"),
            event_time: at(3),
            psp_reference: None,
        };
        let s = fold(None, &[&e], &[], &data).unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ItemState>(&json).unwrap(), s);
    }
}
