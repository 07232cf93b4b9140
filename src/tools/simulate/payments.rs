//! Payments and their settlement lines: captures, refunds and chargebacks, the lines that
//! settle them with the injected settlement faults, and the totals and statuses they must end in.

use super::*;

/// Generates a whole simulation: records, reference data, expected totals and statuses.
pub fn simulate(
    o: &SimulationOptions,
    encoder_payment_schema_id: u32,
) -> anyhow::Result<Simulation> {
    let currencies = parse_currencies(o)?;
    let (merchants, rates) = reference_data(o)?;
    let snapshot = Snapshot::new(merchants.clone(), rates.clone(), 0);
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let start = start_of(o);
    let span = chrono::Duration::from_std(o.span).unwrap_or(chrono::Duration::days(10));
    let spacing = span / (o.payments.max(1) as i32);
    let mut out = Vec::new();
    let mut late = Vec::new();
    let mut expected = ExpectedTotals::default();
    let mut statuses = BTreeMap::new();
    let faults = [
        Fault::MissingSettlement,
        Fault::AmountMismatch,
        Fault::FeeMismatch,
        Fault::OverSettled,
        Fault::CurrencyMismatch,
    ];
    // Faults go only into payments whose deadlines every partition's watermark will have
    // passed by the end (a day to spare): the watermark is the lowest over partitions, which
    // depends on how keys fall on partitions, so a fault nearer the end could be judged
    // either way.
    let last = start + spacing * (o.payments.saturating_sub(1) as i32);
    // A line comes 24 h after its payment, or in the next day's 04:00 burst (at most 28 h).
    let line_delay = match o.settlement_rhythm {
        SettlementRhythm::WithPayment => chrono::Duration::hours(24),
        SettlementRhythm::DailyBurst => chrono::Duration::hours(28),
    };
    let judged_by = last
        - o.allowed_lateness_chrono()
        - o.settlement_deadline_chrono()
            .max(line_delay + o.payment_deadline_chrono())
        - chrono::Duration::days(1);
    // Daily bursts: lines waiting for their burst, and when the next one is due.
    let mut burst: Vec<SettlementLine> = Vec::new();
    let burst_time = |t: DateTime<Utc>| {
        (t.date_naive() + chrono::Days::new(1))
            .and_hms_opt(4, 0, 0)
            .expect("04:00")
            .and_utc()
    };
    for i in 0..o.payments {
        let t = start + spacing * (i as i32);
        let in_window = t < judged_by;
        if burst.first().is_some_and(|l| l.event_time <= t) {
            let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut burst)
                .into_iter()
                .partition(|l| l.event_time <= t);
            burst = rest;
            for l in due {
                push_line(o, &mut rng, l, &mut expected, &mut out, &mut late);
            }
        }
        let unknown = rng.random_bool(o.unknown_merchant_share.clamp(0.0, 1.0));
        let k = rng.random_range(0..o.merchants);
        let merchant = if unknown {
            format!("merchant-unknown-{k:03}")
        } else {
            format!("merchant-{k:03}")
        };
        let currency = currencies[rng.random_range(0..currencies.len())];
        let scale = currency.minor_units();
        let minor: i64 = rng.random_range(100..100_000) * 10i64.pow(scale) / 100;
        let amount = Decimal::new(minor.max(1), scale);
        let reference = format!("pay-{}-{i}", o.seed);
        let capture = PaymentEvent {
            event_id: format!("evt-{}-{i}-c", o.seed),
            payment_reference: reference.clone(),
            merchant_id: merchant.clone(),
            kind: PaymentEventKind::Capture,
            amount,
            currency,
            event_time: t,
            psp_reference: Some(format!("psp-{i}")),
        };
        let mut events = vec![capture];
        if rng.random_bool(o.refund_share.clamp(0.0, 1.0)) {
            let refund = round(
                amount * Decimal::new(rng.random_range(10..=100), 2),
                currency,
            );
            if refund > Decimal::ZERO {
                events.push(PaymentEvent {
                    event_id: format!("evt-{}-{i}-r", o.seed),
                    kind: PaymentEventKind::Refund,
                    amount: refund,
                    event_time: t + chrono::Duration::seconds(30),
                    ..events[0].clone()
                });
            }
        }
        let mut fault = if rng.random_bool(o.mismatch_share.clamp(0.0, 1.0)) && in_window {
            faults[rng.random_range(0..faults.len())]
        } else {
            Fault::None
        };
        // The acquirer settles in the merchant's currency at the rate of the event's time.
        let terms = snapshot.merchant_at(&merchant, t);
        let settle_in = terms.as_ref().map_or(currency, |m| m.settlement_currency);
        let other_currency = currencies.iter().copied().find(|c| *c != settle_in);
        if fault == Fault::CurrencyMismatch && other_currency.is_none() {
            fault = Fault::AmountMismatch;
        }
        let settle_scale = settle_in.minor_units();
        let mut lines = Vec::new();
        let date = (t + chrono::Duration::hours(24)).date_naive();
        for (n, e) in events.iter().enumerate() {
            if fault == Fault::MissingSettlement {
                break;
            }
            let rate = snapshot
                .rate_at(e.currency, settle_in, e.event_time)
                .unwrap_or(Decimal::ONE);
            let mut line_currency = settle_in;
            let mut gross = round(e.signed_amount() * rate, settle_in);
            let mut fee = match (&terms, e.kind) {
                (Some(m), PaymentEventKind::Capture) => round(
                    gross * m.fee_bps / Decimal::new(10_000, 0) + m.fee_fixed,
                    settle_in,
                ),
                _ => Decimal::ZERO,
            };
            if n == 0 {
                match fault {
                    Fault::AmountMismatch => gross += Decimal::ONE,
                    Fault::FeeMismatch => fee += Decimal::new(1, settle_scale),
                    Fault::CurrencyMismatch => {
                        line_currency = other_currency.expect("checked above");
                        gross = round(e.signed_amount(), line_currency);
                        fee = Decimal::ZERO;
                    }
                    _ => {}
                }
            }
            let line = SettlementLine {
                line_id: format!("line-{}-{i}-{n}", o.seed),
                batch_id: batch_id(o.seed, &merchant, date, line_currency),
                payment_reference: reference.clone(),
                merchant_id: merchant.clone(),
                gross,
                fee,
                net: gross - fee,
                currency: line_currency,
                settlement_date: date,
                event_time: e.event_time + chrono::Duration::hours(24),
            };
            if n == 0 && fault == Fault::OverSettled {
                // The same capture settled again in a later batch, under a new line id.
                lines.push(SettlementLine {
                    line_id: format!("line-{}-{i}-again", o.seed),
                    batch_id: format!("{}-again", line.batch_id),
                    ..line.clone()
                });
            }
            lines.push(line);
        }
        let status = match fault {
            _ if unknown => Status::MissingReference,
            Fault::None => Status::Matched,
            Fault::MissingSettlement => Status::MissingSettlement,
            Fault::AmountMismatch => Status::AmountMismatch,
            Fault::FeeMismatch => Status::FeeMismatch,
            Fault::OverSettled => Status::OverSettled,
            Fault::CurrencyMismatch => Status::CurrencyMismatch,
        };
        statuses.insert(reference.clone(), status);
        for e in events {
            let k = format!("{}/{}/{}", e.merchant_id, e.currency, e.kind.as_str());
            let t = expected.payments.entry(k).or_default();
            t.count += 1;
            t.sum += e.amount;
            expected.payment_events += 1;
            if rng.random_bool(o.duplicate_share.clamp(0.0, 1.0)) {
                out.push(Generated::Payment(e.clone()));
            }
            out.push(Generated::Payment(e));
        }
        for mut l in lines {
            match o.settlement_rhythm {
                SettlementRhythm::WithPayment => {
                    push_line(o, &mut rng, l, &mut expected, &mut out, &mut late)
                }
                SettlementRhythm::DailyBurst => {
                    l.event_time = burst_time(t);
                    burst.push(l);
                }
            }
        }
        // Now and then a settlement line for a payment that never comes.
        if rng.random_bool(o.unexpected_share.clamp(0.0, 1.0)) && in_window {
            let reference = format!("unexpected-{}-{i}", o.seed);
            // In the merchant's own settlement currency, so nothing but the missing payment
            // is wrong with it.
            let settle_k = currencies[k as usize % currencies.len()];
            let gross = round(amount, settle_k).max(Decimal::ONE);
            let settled_for = format!("merchant-{k:03}");
            let line = SettlementLine {
                line_id: format!("line-{}-{i}-unexpected", o.seed),
                batch_id: batch_id(o.seed, &settled_for, date, settle_k),
                payment_reference: reference.clone(),
                merchant_id: settled_for,
                gross,
                fee: Decimal::ZERO,
                net: gross,
                currency: settle_k,
                settlement_date: date,
                event_time: t + chrono::Duration::hours(24),
            };
            statuses.insert(reference, Status::UnexpectedSettlement);
            match o.settlement_rhythm {
                SettlementRhythm::WithPayment => {
                    push_line(o, &mut rng, line, &mut expected, &mut out, &mut late)
                }
                SettlementRhythm::DailyBurst => burst.push(SettlementLine {
                    event_time: burst_time(t),
                    ..line
                }),
            }
        }
    }
    for l in std::mem::take(&mut burst) {
        push_line(o, &mut rng, l, &mut expected, &mut out, &mut late);
    }
    let (late_payouts, payout_statuses) = if o.payouts {
        add_payouts(
            o,
            &mut rng,
            &currencies,
            last,
            &mut out,
            &late,
            &mut expected,
        )
    } else {
        (Vec::new(), BTreeMap::new())
    };
    out.extend(late);
    out.extend(late_payouts);
    for status in statuses.values() {
        *expected
            .statuses
            .entry(status.as_str().to_owned())
            .or_default() += 1;
    }
    for status in payout_statuses.values() {
        *expected
            .payout_statuses
            .entry(status.as_str().to_owned())
            .or_default() += 1;
    }
    // Spread malformed records evenly through the stream.
    let malformed = malformed_records(o.malformed, encoder_payment_schema_id, o.seed);
    expected.dead_letters = malformed.len() as i64;
    let step = (out.len() / (malformed.len() + 1)).max(1);
    for (n, m) in malformed.into_iter().enumerate() {
        let at = ((n + 1) * step + n).min(out.len());
        out.insert(at, m);
    }
    expected.records = out.len() as i64;
    Ok(Simulation {
        records: out,
        totals: expected,
        statuses,
        payout_statuses,
        merchants,
        rates,
    })
}

/// Counts a settlement line in the expected totals and queues it: sometimes twice
/// (duplicate), sometimes at the very end (late).
pub(super) fn push_line(
    o: &SimulationOptions,
    rng: &mut ChaCha8Rng,
    l: SettlementLine,
    expected: &mut ExpectedTotals,
    out: &mut Vec<Generated>,
    late: &mut Vec<Generated>,
) {
    let t = expected
        .settlements
        .entry(format!("{}/{}", l.merchant_id, l.currency))
        .or_default();
    t.count += 1;
    t.gross += l.gross;
    t.fee += l.fee;
    t.net += l.net;
    expected.settlement_lines += 1;
    if rng.random_bool(o.duplicate_share.clamp(0.0, 1.0)) {
        out.push(Generated::Settlement(l.clone()));
    }
    if rng.random_bool(o.late_share.clamp(0.0, 1.0)) {
        late.push(Generated::Settlement(l));
    } else {
        out.push(Generated::Settlement(l));
    }
}
