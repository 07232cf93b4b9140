//! [`evaluate`]: prices one reference's payment events with its merchant's terms and FX rates,
//! sums its settlement lines, and decides the [`Status`].

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::Status;
use super::terms::{Amounts, Evaluation, MissingData, PricedEvent, Terms};
use crate::domain::{Currency, PaymentEvent, SettlementLine};

/// Decides the status of one payment reference from all its payment events and settlement
/// lines, the merchant's terms (`None`: unknown merchant) and the event-time `watermark`: the
/// running state folded from nothing over every record ([`super::state::fold`]), judged
/// ([`super::state::verdict`]). The service folds each batch's records into the stored state
/// instead; this is the same computation over all records at once.
pub fn evaluate(
    events: &[PricedEvent<'_>],
    lines: &[&SettlementLine],
    terms: Option<&Terms>,
    watermark: DateTime<Utc>,
) -> Evaluation {
    if events.is_empty() && lines.is_empty() {
        if terms.is_none() {
            let missing = MissingData::Merchant {
                merchant_id: String::new(),
            };
            return Evaluation {
                status: Status::MissingReference,
                expected: None,
                settled: None,
                reason: format!("{missing}; evaluated again when it arrives"),
                missing_reference: Some(missing),
                deadline: None,
            };
        }
        return Evaluation {
            status: Status::Expected,
            expected: terms.map(|t| Amounts::zero(t.settlement_currency)),
            settled: None,
            missing_reference: None,
            deadline: None,
            reason: "no payment event and no settlement line".into(),
        };
    }
    let given = Given { terms, events };
    let records: Vec<&PaymentEvent> = events.iter().map(|e| e.event).collect();
    let state = super::state::recompute(&records, lines, &given);
    super::state::verdict(&state, terms, watermark)
}

/// Reference data given per call: the same terms for any merchant and time, each event's own
/// rate.
struct Given<'a> {
    terms: Option<&'a Terms>,
    events: &'a [PricedEvent<'a>],
}

impl super::state::ReferenceData for Given<'_> {
    fn terms_at(&self, _merchant_id: &str, _at: DateTime<Utc>) -> Option<Terms> {
        self.terms.cloned()
    }

    fn rate_at(&self, from: Currency, to: Currency, at: DateTime<Utc>) -> Option<Decimal> {
        if from == to {
            return Some(Decimal::ONE);
        }
        (self.events.iter())
            .find(|e| e.event.currency == from && e.event.event_time == at)
            .and_then(|e| e.fx_rate)
    }

    fn rate_fingerprint(&self, _from: Currency, _to: Currency, _up_to: DateTime<Utc>) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use chrono::TimeZone;

    use super::*;
    use crate::domain::PaymentEventKind;
    use crate::domain::PaymentEventKind::{Capture, Chargeback, Refund};
    use crate::reconcile::Tolerance;
    use crate::reconcile::transition;
    use Status::*;
    use chrono::Duration;

    const S: Duration = Duration::seconds(1);

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    /// `"12.50 EUR"` as an amount and its currency.
    fn money_of(s: &str) -> (Decimal, Currency) {
        let (amount, code) = s.split_once(' ').unwrap();
        (d(amount), Currency::from_code(code).unwrap())
    }

    /// `hours` after the start of every scenario.
    fn at(hours: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::hours(hours)
    }

    /// A payment event on reference `p1` and its FX rate (`None` until [`Ev::fx`]).
    struct Ev(PaymentEvent, Option<Decimal>);

    impl Ev {
        fn fx(self, rate: &str) -> Ev {
            Ev(self.0, Some(d(rate)))
        }
    }

    fn ev(kind: PaymentEventKind, money: &str, hour: i64) -> Ev {
        let (amount, currency) = money_of(money);
        Ev(
            PaymentEvent {
                event_id: format!("e-{}-{hour}", kind.as_str()),
                payment_reference: "p1".into(),
                merchant_id: "m1".into(),
                kind,
                amount,
                currency,
                event_time: at(hour),
                psp_reference: None,
            },
            None,
        )
    }

    fn cap(money: &str, hour: i64) -> Ev {
        ev(Capture, money, hour)
    }

    /// A settlement line of `gross` (with currency) and `fee` (same currency).
    fn line(gross: &str, fee: &str, hour: i64) -> SettlementLine {
        let (gross, currency) = money_of(gross);
        SettlementLine {
            line_id: format!("l-{gross}-{hour}"),
            batch_id: format!("b-{hour}"),
            payment_reference: "p1".into(),
            merchant_id: "m1".into(),
            gross,
            fee: d(fee),
            net: gross - d(fee),
            currency,
            settlement_date: at(hour).date_naive(),
            event_time: at(hour),
        }
    }

    /// 1.50 % per capture, no fixed fee, no tolerance, 48 hours for either side.
    fn terms(currency: &str) -> Terms {
        Terms {
            settlement_currency: Currency::from_code(currency).unwrap(),
            fee_bps: d("150"),
            fee_fixed: Decimal::ZERO,
            tolerance: Tolerance::default(),
            settlement_deadline: Duration::hours(48),
            payment_deadline: Duration::hours(48),
        }
    }

    fn eur() -> Option<Terms> {
        Some(terms("EUR"))
    }

    /// EUR terms with 0.50 EUR or 1 % tolerance.
    fn tolerant() -> Option<Terms> {
        let tolerance = Tolerance {
            absolute: d("0.50"),
            relative: d("0.01"),
        };
        Some(Terms {
            tolerance,
            ..terms("EUR")
        })
    }

    struct Case {
        name: &'static str,
        events: Vec<Ev>,
        lines: Vec<SettlementLine>,
        terms: Option<Terms>,
        watermark: DateTime<Utc>,
        expected_status: Status,
    }

    impl Case {
        fn run(&self) -> Evaluation {
            let events: Vec<_> = (self.events.iter())
                .map(|Ev(event, fx_rate)| PricedEvent {
                    event,
                    fx_rate: *fx_rate,
                })
                .collect();
            let lines: Vec<_> = self.lines.iter().collect();
            evaluate(&events, &lines, self.terms.as_ref(), self.watermark)
        }
    }

    #[rustfmt::skip]
    fn cases() -> Vec<Case> {
        let kwd = Some(Terms { fee_fixed: d("0.100"), ..terms("KWD") });
        vec![
            // Matching, at once.
            Case { name: "a capture settled exactly matches at once",
                events: vec![cap("100.00 EUR", 0)], lines: vec![line("100.00 EUR", "1.50", 24)],
                terms: eur(), watermark: at(25), expected_status: Matched },
            Case { name: "partial captures and a refund settled line by line match",
                events: vec![cap("60.00 EUR", 0), cap("40.00 EUR", 1), ev(Refund, "30.00 EUR", 2)],
                lines: vec![line("60.00 EUR", "0.90", 24), line("40.00 EUR", "0.60", 24),
                            line("-30.00 EUR", "0", 26)],
                terms: eur(), watermark: at(30), expected_status: Matched },
            Case { name: "a chargeback settled back as a negative line matches",
                events: vec![cap("100.00 EUR", 0), ev(Chargeback, "100.00 EUR", 10)],
                lines: vec![line("100.00 EUR", "1.50", 24), line("-100.00 EUR", "0", 34)],
                terms: eur(), watermark: at(40), expected_status: Matched },
            Case { name: "one capture split over two lines that add up matches",
                events: vec![cap("100.00 EUR", 0)],
                lines: vec![line("60.00 EUR", "0.90", 24), line("40.00 EUR", "0.60", 24)],
                terms: eur(), watermark: at(25), expected_status: Matched },
            // Rounding at the settlement currency's precision, half away from zero.
            Case { name: "a EUR fee of half a cent rounds up (0.045 -> 0.05)",
                events: vec![cap("3.00 EUR", 0)], lines: vec![line("3.00 EUR", "0.05", 24)],
                terms: eur(), watermark: at(25), expected_status: Matched },
            Case { name: "a EUR fee rounded half to even (0.04) is a fee mismatch when due",
                events: vec![cap("3.00 EUR", 0)], lines: vec![line("3.00 EUR", "0.04", 24)],
                terms: eur(), watermark: at(72) + S, expected_status: FeeMismatch },
            Case { name: "a JPY fee rounds to whole yen (16.5 -> 17)",
                events: vec![cap("1100 JPY", 0)], lines: vec![line("1100 JPY", "17", 24)],
                terms: Some(terms("JPY")), watermark: at(25), expected_status: Matched },
            Case { name: "a JPY fee of 16 instead of 17 is a fee mismatch when due",
                events: vec![cap("1100 JPY", 0)], lines: vec![line("1100 JPY", "16", 24)],
                terms: Some(terms("JPY")), watermark: at(72) + S, expected_status: FeeMismatch },
            Case { name: "a KWD fee keeps three decimals and adds the fixed fee (0.155 + 0.100)",
                events: vec![cap("10.300 KWD", 0)], lines: vec![line("10.300 KWD", "0.255", 24)],
                terms: kwd.clone(), watermark: at(25), expected_status: Matched },
            Case { name: "a KWD fee one fils short is a fee mismatch when due",
                events: vec![cap("10.300 KWD", 0)], lines: vec![line("10.300 KWD", "0.254", 24)],
                terms: kwd, watermark: at(72) + S, expected_status: FeeMismatch },
            // FX conversion into the settlement currency.
            Case { name: "a USD payment is settled in EUR at its rate (92.35, fee 1.39)",
                events: vec![cap("100.00 USD", 0).fx("0.9235")],
                lines: vec![line("92.35 EUR", "1.39", 24)],
                terms: eur(), watermark: at(25), expected_status: Matched },
            Case { name: "each event is converted at its own rate (90.00 - 47.50)",
                events: vec![cap("100.00 USD", 0).fx("0.90"),
                             ev(Refund, "50.00 USD", 5).fx("0.95")],
                lines: vec![line("90.00 EUR", "1.35", 24), line("-47.50 EUR", "0", 29)],
                terms: eur(), watermark: at(30), expected_status: Matched },
            Case { name: "each event is rounded before summing (0.505 -> 0.51, twice)",
                events: vec![cap("1.01 USD", 0).fx("0.5"), cap("1.01 USD", 1).fx("0.5")],
                lines: vec![line("0.51 EUR", "0.01", 24), line("0.51 EUR", "0.01", 25)],
                terms: eur(), watermark: at(26), expected_status: Matched },
            Case { name: "a payment in the settlement currency ignores any rate given",
                events: vec![cap("100.00 EUR", 0).fx("2")],
                lines: vec![line("100.00 EUR", "1.50", 24)],
                terms: eur(), watermark: at(25), expected_status: Matched },
            Case { name: "a USD line for a EUR merchant is a currency mismatch at once",
                events: vec![cap("100.00 EUR", 0)], lines: vec![line("100.00 USD", "1.50", 24)],
                terms: eur(), watermark: at(25), expected_status: CurrencyMismatch },
            Case { name: "a currency mismatch outranks an amount mismatch",
                events: vec![cap("100.00 EUR", 0)], lines: vec![line("120.00 USD", "1.50", 24)],
                terms: eur(), watermark: at(200), expected_status: CurrencyMismatch },
            // Tolerance edges: max(0.50 EUR, 1 % of expected), both ends included.
            Case { name: "gross over by exactly the absolute tolerance matches",
                events: vec![cap("10.00 EUR", 0)], lines: vec![line("10.50 EUR", "0.15", 24)],
                terms: tolerant(), watermark: at(25), expected_status: Matched },
            Case { name: "gross short by exactly the absolute tolerance matches",
                events: vec![cap("10.00 EUR", 0)], lines: vec![line("9.50 EUR", "0.15", 24)],
                terms: tolerant(), watermark: at(25), expected_status: Matched },
            Case { name: "gross one cent beyond the absolute tolerance is an amount mismatch",
                events: vec![cap("10.00 EUR", 0)], lines: vec![line("10.51 EUR", "0.15", 24)],
                terms: tolerant(), watermark: at(72) + S, expected_status: AmountMismatch },
            Case { name: "gross over by exactly the relative tolerance matches",
                events: vec![cap("1000.00 EUR", 0)], lines: vec![line("1010.00 EUR", "15.00", 24)],
                terms: tolerant(), watermark: at(25), expected_status: Matched },
            Case { name: "gross one cent beyond the relative tolerance is an amount mismatch",
                events: vec![cap("1000.00 EUR", 0)], lines: vec![line("1010.01 EUR", "15.00", 24)],
                terms: tolerant(), watermark: at(72) + S, expected_status: AmountMismatch },
            Case { name: "a fee off by exactly the tolerance matches",
                events: vec![cap("10.00 EUR", 0)], lines: vec![line("10.00 EUR", "0.65", 24)],
                terms: tolerant(), watermark: at(25), expected_status: Matched },
            Case { name: "a fee one cent beyond the tolerance is a fee mismatch",
                events: vec![cap("10.00 EUR", 0)], lines: vec![line("10.00 EUR", "0.66", 24)],
                terms: tolerant(), watermark: at(72) + S, expected_status: FeeMismatch },
            // Deadlines against the watermark: due only strictly after the deadline.
            Case { name: "an unsettled capture is expected just before its deadline",
                events: vec![cap("100.00 EUR", 0)], lines: vec![],
                terms: eur(), watermark: at(48) - S, expected_status: Expected },
            Case { name: "an unsettled capture is still expected at its deadline",
                events: vec![cap("100.00 EUR", 0)], lines: vec![],
                terms: eur(), watermark: at(48), expected_status: Expected },
            Case { name: "an unsettled capture is missing just after its deadline",
                events: vec![cap("100.00 EUR", 0)], lines: vec![],
                terms: eur(), watermark: at(48) + S, expected_status: MissingSettlement },
            Case { name: "a later refund restarts the settlement deadline",
                events: vec![cap("100.00 EUR", 0), ev(Refund, "20.00 EUR", 24)], lines: vec![],
                terms: eur(), watermark: at(72), expected_status: Expected },
            Case { name: "a line without payment is expected at its deadline",
                events: vec![], lines: vec![line("100.00 EUR", "1.50", 24)],
                terms: eur(), watermark: at(72), expected_status: Expected },
            Case { name: "a line without payment is unexpected just after its deadline",
                events: vec![], lines: vec![line("100.00 EUR", "1.50", 24)],
                terms: eur(), watermark: at(72) + S, expected_status: UnexpectedSettlement },
            Case { name: "a difference waits for the later deadline (the line's)",
                events: vec![cap("100.00 EUR", 0)], lines: vec![line("101.00 EUR", "1.50", 24)],
                terms: eur(), watermark: at(72), expected_status: Expected },
            Case { name: "a difference past the deadline is an amount mismatch",
                events: vec![cap("100.00 EUR", 0)], lines: vec![line("101.00 EUR", "1.50", 24)],
                terms: eur(), watermark: at(72) + S, expected_status: AmountMismatch },
            Case { name: "a refund whose line has not come yet is expected",
                events: vec![cap("100.00 EUR", 0), ev(Refund, "40.00 EUR", 30)],
                lines: vec![line("100.00 EUR", "1.50", 24)],
                terms: eur(), watermark: at(78), expected_status: Expected },
            Case { name: "a refund never settled is an amount mismatch",
                events: vec![cap("100.00 EUR", 0), ev(Refund, "40.00 EUR", 30)],
                lines: vec![line("100.00 EUR", "1.50", 24)],
                terms: eur(), watermark: at(78) + S, expected_status: AmountMismatch },
            // Over-settlement: more capture lines than captures, and too much gross.
            Case { name: "a capture settled again in a later batch is expected until due",
                events: vec![cap("100.00 EUR", 0)],
                lines: vec![line("100.00 EUR", "1.50", 24), line("100.00 EUR", "1.50", 48)],
                terms: eur(), watermark: at(96), expected_status: Expected },
            Case { name: "a capture settled again in a later batch is over-settled when due",
                events: vec![cap("100.00 EUR", 0)],
                lines: vec![line("100.00 EUR", "1.50", 24), line("100.00 EUR", "1.50", 48)],
                terms: eur(), watermark: at(96) + S, expected_status: OverSettled },
            Case { name: "a partial capture settled twice is over-settled",
                events: vec![cap("60.00 EUR", 0), cap("40.00 EUR", 1)],
                lines: vec![line("60.00 EUR", "0.90", 24), line("40.00 EUR", "0.60", 24),
                            line("40.00 EUR", "0.60", 25)],
                terms: eur(), watermark: at(100), expected_status: OverSettled },
            Case { name: "too much gross on as many lines as captures is an amount mismatch",
                events: vec![cap("100.00 EUR", 0)], lines: vec![line("105.00 EUR", "1.50", 24)],
                terms: eur(), watermark: at(100), expected_status: AmountMismatch },
            // Missing reference data outranks everything.
            Case { name: "an unknown merchant is missing reference data",
                events: vec![cap("100.00 EUR", 0)], lines: vec![],
                terms: None, watermark: at(1), expected_status: MissingReference },
            Case { name: "an unknown merchant outranks a line in another currency",
                events: vec![cap("100.00 EUR", 0)], lines: vec![line("100.00 USD", "1.50", 24)],
                terms: None, watermark: at(100), expected_status: MissingReference },
            Case { name: "a USD payment without a rate is missing reference data",
                events: vec![cap("100.00 USD", 0)], lines: vec![line("92.35 EUR", "1.39", 24)],
                terms: eur(), watermark: at(25), expected_status: MissingReference },
            Case { name: "a missing rate outranks a currency mismatch",
                events: vec![cap("100.00 USD", 0)], lines: vec![line("92.35 GBP", "1.39", 24)],
                terms: eur(), watermark: at(25), expected_status: MissingReference },
        ]
    }

    #[test]
    fn every_case_gets_its_status() {
        let failures: Vec<_> = (cases().iter())
            .map(|case| (case, case.run()))
            .filter(|(case, got)| got.status != case.expected_status)
            .map(|(case, got)| {
                let (want, status, reason) = (case.expected_status, got.status, got.reason);
                format!("{}: expected {want}, got {status} ({reason})", case.name)
            })
            .collect();
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn the_cases_cover_every_status() {
        let covered: BTreeSet<_> = cases().iter().map(|c| c.expected_status).collect();
        assert_eq!(covered, Status::ALL.into_iter().collect());
    }

    fn find(name: &str) -> Evaluation {
        cases().into_iter().find(|c| c.name == name).unwrap().run()
    }

    #[test]
    fn an_evaluation_names_its_numbers() {
        let fx = find("a USD payment is settled in EUR at its rate (92.35, fee 1.39)");
        let eur = Currency::from_code("EUR").unwrap();
        let expected = Amounts {
            currency: eur,
            gross: d("92.35"),
            fee: d("1.39"),
            net: d("90.96"),
        };
        assert_eq!((fx.expected, fx.settled), (Some(expected), Some(expected)));

        let over = find("gross one cent beyond the absolute tolerance is an amount mismatch");
        let want =
            "gross: settled 10.51 EUR, expected 10.00 EUR, difference 0.51 beyond tolerance 0.50";
        assert_eq!(over.reason, want);

        let twice = find("a capture settled again in a later batch is over-settled when due");
        assert!(
            twice
                .reason
                .starts_with("more capture lines (2) than captures (1); gross: settled 200.00")
        );
    }

    #[test]
    fn missing_reference_data_says_what_to_wait_for() {
        let merchant = find("an unknown merchant is missing reference data");
        let want = MissingData::Merchant {
            merchant_id: "m1".into(),
        };
        assert_eq!(
            (merchant.missing_reference, merchant.expected),
            (Some(want), None)
        );

        let rate = find("a USD payment without a rate is missing reference data");
        let [usd, eur] = ["USD", "EUR"].map(|c| Currency::from_code(c).unwrap());
        let want = MissingData::FxRate {
            from: usd,
            to: eur,
            at: at(0),
        };
        assert_eq!(rate.missing_reference, Some(want));
        assert_eq!(
            rate.reason,
            "no USD->EUR rate as of 2026-01-01T00:00:00+00:00; evaluated again when it arrives"
        );
    }

    #[test]
    fn only_an_expected_reference_carries_the_deadline_to_evaluate_again_at() {
        let waiting = find("an unsettled capture is still expected at its deadline");
        assert_eq!(waiting.deadline, Some(at(48)));
        let missing = find("an unsettled capture is missing just after its deadline");
        assert_eq!(missing.deadline, None);
    }

    #[test]
    fn a_late_settlement_turns_a_missing_settlement_into_a_match() {
        let capture = cap("100.00 EUR", 0);
        let events = [PricedEvent {
            event: &capture.0,
            fx_rate: None,
        }];
        let terms = terms("EUR");
        let before = evaluate(&events, &[], Some(&terms), at(48) + S);
        assert_eq!(before.status, MissingSettlement);

        let late = line("100.00 EUR", "1.50", 60);
        let after = evaluate(&events, &[&late], Some(&terms), at(61));
        let t = transition(Some(before.status), after.status).unwrap();
        assert_eq!((t.from, t.to), (Some(MissingSettlement), Matched));
        assert!(t.resolves_exception());
        assert_eq!(transition(Some(after.status), after.status), None);
    }
}
