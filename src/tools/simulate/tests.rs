//! The generator's own promises: determinism, the shares of faults, expected totals.

use std::collections::{BTreeSet, HashMap};

use super::*;
use crate::domain::PayoutTotal;

/// A simulation with enough faulty payouts that every kind appears.
fn options(payments: u64, seed: u64) -> SimulationOptions {
    SimulationOptions {
        payments,
        seed,
        malformed: 3,
        payout_fault_share: 0.5,
        ..SimulationOptions::default()
    }
}

fn lines(s: &Simulation) -> impl Iterator<Item = &SettlementLine> {
    s.records.iter().filter_map(|r| match r {
        Generated::Settlement(l) => Some(l),
        _ => None,
    })
}

fn payouts(s: &Simulation) -> impl Iterator<Item = &BankPayout> {
    s.records.iter().filter_map(|r| match r {
        Generated::Payout(b) => Some(b),
        _ => None,
    })
}

/// Every payout item's distinct records (by id, as the service stores them).
fn items(s: &Simulation) -> BTreeMap<PayoutKey, (Vec<&SettlementLine>, Vec<&BankPayout>)> {
    let mut by_id: HashMap<&str, &SettlementLine> = HashMap::new();
    for l in lines(s) {
        by_id.entry(&l.line_id).or_insert(l);
    }
    let mut paid: HashMap<&str, &BankPayout> = HashMap::new();
    for b in payouts(s) {
        paid.entry(&b.statement_line_id).or_insert(b);
    }
    let mut out: BTreeMap<PayoutKey, (Vec<_>, Vec<_>)> = BTreeMap::new();
    for l in by_id.into_values() {
        (out.entry(PayoutKey::Batch(l.batch_id.clone()))
            .or_default()
            .0)
            .push(l);
    }
    for b in paid.into_values() {
        (out.entry(PayoutKey::of_payout(b)).or_default().1).push(b);
    }
    out
}

/// What kind of payout an item got, told from its records alone.
fn kind_of(
    key: &PayoutKey,
    (lines, paid): &(Vec<&SettlementLine>, Vec<&BankPayout>),
    deadline: chrono::Duration,
) -> &'static str {
    let net: Decimal = lines.iter().map(|l| l.net).sum();
    let sum: Decimal = paid.iter().map(|b| b.amount).sum();
    let last_line = lines.iter().map(|l| l.event_time).max();
    match key {
        PayoutKey::Line(_) => "no batch reference",
        PayoutKey::Batch(_) if lines.is_empty() => "unknown batch",
        _ if net.is_zero() => "nets to zero",
        _ if paid.is_empty() => "missing",
        _ if paid.iter().any(|b| b.currency != lines[0].currency) => "other currency",
        _ if paid
            .iter()
            .any(|b| last_line.is_some_and(|t| b.event_time > t + deadline)) =>
        {
            "late"
        }
        _ if paid.len() > 1 => "split",
        _ if sum < net => "short",
        _ if sum > net => "over",
        _ => "exact",
    }
}

#[test]
fn every_payout_fault_appears_with_the_status_it_must_end_in() {
    use PayoutStatus::*;
    let o = options(6_000, 42);
    let s = simulate(&o, 1).unwrap();
    let want = [
        ("exact", Matched),
        ("missing", Missing),
        ("short", AmountMismatch),
        ("over", AmountMismatch),
        ("other currency", CurrencyMismatch),
        ("split", Matched),
        ("late", Matched),
        ("unknown batch", Unexpected),
        ("no batch reference", Unexpected),
    ];
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (key, records) in items(&s) {
        let kind = kind_of(&key, &records, o.payout_rules().deadline);
        *seen.entry(kind).or_default() += 1;
        let status = s.payout_statuses[&key];
        match want.iter().find(|(k, _)| *k == kind) {
            Some((_, w)) => assert_eq!(status, *w, "{kind} {key:?}: {records:?}"),
            None => assert_eq!(status, Matched, "{kind} {key:?}"),
        }
    }
    for (kind, _) in want {
        assert!(
            seen.get(kind).is_some_and(|n| *n > 0),
            "no {kind}: {seen:?}"
        );
    }
    // Nothing the simulator did not inject is an exception: one item per fault at most.
    let exceptions = s.payout_statuses.values().filter(|s| s.is_exception());
    assert_eq!(
        exceptions.count(),
        [
            "missing",
            "short",
            "over",
            "other currency",
            "unknown batch",
            "no batch reference"
        ]
        .iter()
        .map(|k| seen[k])
        .sum::<usize>()
    );
    assert!(!s.payout_statuses.values().any(|s| *s == Pending));
    for (status, n) in &s.totals.payout_statuses {
        let predicted = s.payout_statuses.values().filter(|p| p.as_str() == status);
        assert_eq!(predicted.count() as i64, *n, "{status}");
    }
}

#[test]
fn payout_predictions_equal_a_brute_force_judge_at_any_final_watermark() {
    let o = options(3_000, 7);
    let s = simulate(&o, 1).unwrap();
    let rules = o.payout_rules();
    let latest = (s.records.iter()).filter_map(event_time).max().unwrap();
    let items = items(&s);
    assert_eq!(
        items.keys().collect::<Vec<_>>(),
        s.payout_statuses.keys().collect::<Vec<_>>()
    );
    for at in [latest, latest + chrono::Duration::days(365)] {
        for (key, (lines, paid)) in &items {
            let state = PayoutState::of(lines.iter().copied(), paid.iter().copied());
            let v = payout::judge(key, &state, at, &rules);
            assert_eq!(
                v.status, s.payout_statuses[key],
                "{key:?} at {at}: {}",
                v.reason
            );
        }
    }
}

#[test]
fn a_seed_gives_the_same_records_and_predictions_and_another_seed_others() {
    let a = simulate(&options(1_500, 9), 1).unwrap();
    let b = simulate(&options(1_500, 9), 1).unwrap();
    let c = simulate(&options(1_500, 10), 1).unwrap();
    assert_eq!(format!("{:?}", a.records), format!("{:?}", b.records));
    assert_eq!(a.payout_statuses, b.payout_statuses);
    assert_eq!(a.totals, b.totals);
    assert_ne!(format!("{:?}", a.records), format!("{:?}", c.records));
}

#[test]
fn a_settlement_batch_is_one_merchants_lines_of_one_day_in_one_currency() {
    let s = simulate(&options(4_000, 3), 1).unwrap();
    let mut batches: BTreeMap<&str, BTreeSet<(&str, NaiveDate, Currency)>> = BTreeMap::new();
    for l in lines(&s) {
        (batches.entry(&l.batch_id).or_default()).insert((
            &l.merchant_id,
            l.settlement_date,
            l.currency,
        ));
    }
    assert!(batches.len() > 100, "{}", batches.len());
    for (batch, kinds) in &batches {
        assert_eq!(kinds.len(), 1, "{batch} mixes {kinds:?}");
    }
    // Its payouts go to the merchant's account.
    for p in payouts(&s) {
        if let Some(kinds) = p.batch_reference.as_deref().and_then(|b| batches.get(b)) {
            let merchant = kinds.first().unwrap().0;
            assert_eq!(p.account_id, format!("acct-{merchant}"));
        }
    }
}

#[test]
fn payouts_follow_their_lines_and_never_run_ahead_of_the_other_streams() {
    let deadline = options(0, 0).payout_rules().deadline;
    for rhythm in [SettlementRhythm::WithPayment, SettlementRhythm::DailyBurst] {
        for late_share in [0.0, 0.02] {
            let o = SimulationOptions {
                settlement_rhythm: rhythm,
                late_share,
                ..options(3_000, 5)
            };
            let s = simulate(&o, 1).unwrap();
            let mut last_lines: BTreeMap<&str, (usize, DateTime<Utc>)> = BTreeMap::new();
            for (i, r) in s.records.iter().enumerate() {
                if let Generated::Settlement(l) = r {
                    let e = last_lines.entry(&l.batch_id).or_insert((i, l.event_time));
                    *e = (i, e.1.max(l.event_time));
                }
            }
            let mut high = DateTime::<Utc>::MIN_UTC;
            let (mut last_other, mut first_late) = (0, None);
            for (i, r) in s.records.iter().enumerate() {
                let Generated::Payout(p) = r else {
                    if let Some(t) = event_time(r) {
                        (high, last_other) = (high.max(t), i);
                    }
                    continue;
                };
                let case = format!("{rhythm:?}, late share {late_share}: {p:?}");
                assert!(p.event_time <= high, "{case} ahead of {high}");
                let Some((at, t)) = p.batch_reference.as_deref().and_then(|b| last_lines.get(b))
                else {
                    continue;
                };
                if p.event_time > *t + deadline {
                    first_late.get_or_insert(i);
                } else if late_share == 0.0 {
                    assert!(*at < i, "{case} at {i} before its batch's line at {at}");
                }
            }
            // Late payouts come after every payment and line, late lines included.
            let first_late = first_late.expect("a late payout");
            assert!(
                first_late > last_other,
                "{rhythm:?}, late share {late_share}"
            );
        }
    }
}

#[test]
fn a_batch_that_nets_to_zero_owes_no_payout_and_is_matched() {
    let o = SimulationOptions::default();
    let t = start_of(&o);
    let eur = Currency::from_code("EUR").unwrap();
    let mut plan = PayoutPlan {
        o: &o,
        currencies: &[eur],
        rules: o.payout_rules(),
        stream_end: t + chrono::Duration::days(30),
        judged_by: t + chrono::Duration::days(20),
        issued: 0,
    };
    let batch = Batch {
        id: "batch-42-merchant-000-2026-01-02-EUR".into(),
        merchant: "merchant-000".into(),
        currency: eur,
        net: Decimal::ZERO,
        last_line: t,
        last_index: Some(0),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..50 {
        assert!(plan.payouts(&mut rng, &batch).is_empty());
    }
    let line = |net: i64| SettlementLine {
        line_id: format!("l{net}"),
        batch_id: batch.id.clone(),
        payment_reference: format!("p{net}"),
        merchant_id: batch.merchant.clone(),
        gross: Decimal::new(net, 2),
        fee: Decimal::ZERO,
        net: Decimal::new(net, 2),
        currency: eur,
        settlement_date: t.date_naive(),
        event_time: t,
    };
    let (a, b) = (line(5_000), line(-5_000));
    let state = PayoutState::of([&a, &b], []);
    let key = PayoutKey::Batch(batch.id.clone());
    let v = payout::judge(&key, &state, t + chrono::Duration::days(20), &plan.rules);
    assert_eq!(v.status, PayoutStatus::Matched, "{}", v.reason);
}

#[test]
fn without_the_payout_leg_the_other_streams_are_unchanged() {
    // Without malformed records, whose positions depend on the stream's length.
    let o = SimulationOptions {
        malformed: 0,
        ..options(2_000, 11)
    };
    let on = simulate(&o, 1).unwrap();
    let off = simulate(
        &SimulationOptions {
            payouts: false,
            ..o.clone()
        },
        1,
    )
    .unwrap();
    assert_eq!(payouts(&off).count(), 0);
    assert!(off.payout_statuses.is_empty() && off.totals.payout_statuses.is_empty());
    assert_eq!(
        (off.totals.statement_lines, off.totals.payouts.len()),
        (0, 0)
    );
    let others = |s: &Simulation| {
        (s.records.iter())
            .filter(|r| !matches!(r, Generated::Payout(_)))
            .map(|r| format!("{r:?}"))
            .collect::<Vec<_>>()
    };
    let (a, b) = (others(&on), others(&off));
    let first = (a.iter().zip(&b)).position(|(x, y)| x != y);
    assert!(a.len() == b.len() && first.is_none(), "differ at {first:?}");
    assert_eq!(on.statuses, off.statuses);
    assert_eq!(
        on.totals.records - off.totals.records,
        payouts(&on).count() as i64
    );
}

#[test]
fn expected_payout_totals_count_each_statement_line_once() {
    let s = simulate(&options(2_000, 12), 1).unwrap();
    let mut distinct: BTreeMap<&str, &BankPayout> = BTreeMap::new();
    for p in payouts(&s) {
        distinct.insert(&p.statement_line_id, p);
    }
    assert!(payouts(&s).count() > distinct.len(), "no duplicate payout");
    assert_eq!(s.totals.statement_lines, distinct.len() as i64);
    let mut totals: BTreeMap<String, PayoutTotal> = BTreeMap::new();
    for p in distinct.values() {
        let t = totals
            .entry(format!("{}/{}", p.account_id, p.currency))
            .or_default();
        t.count += 1;
        t.sum += p.amount;
    }
    assert_eq!(s.totals.payouts, totals);
    assert_eq!(s.totals.records, s.records.len() as i64);
}

#[test]
fn the_payout_leg_is_on_by_default_and_takes_the_services_deadline() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        o: SimulationOptions,
    }
    assert!(SimulationOptions::default().payouts);
    assert!(
        !Wrapper::parse_from(["simulate", "--payouts", "false"])
            .o
            .payouts
    );
    let mut settings = crate::config::Settings::load(None).unwrap().reconciliation;
    settings.payout_deadline = Duration::from_secs(5 * 3600);
    let o = SimulationOptions::default().with_rules(&settings);
    assert_eq!(o.payout_rules().deadline, chrono::Duration::hours(5));
}
