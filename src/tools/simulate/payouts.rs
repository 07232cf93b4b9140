//! The bank's payouts of each settlement batch, with the injected payout faults, and the
//! status every payout item must end in.

use super::*;

/// A fault injected into one settlement batch's payout, and the status it ends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PayoutFault {
    /// Paid exactly, in one credit: PAYOUT_MATCHED.
    None,
    /// Nothing paid: PAYOUT_MISSING once due.
    Missing,
    /// A reserve of a tenth withheld: PAYOUT_AMOUNT_MISMATCH once due.
    Short,
    /// A hundredth too much paid: PAYOUT_AMOUNT_MISMATCH once due (until then a late line
    /// could explain it).
    Over,
    /// The net paid in another currency: PAYOUT_CURRENCY_MISMATCH at once.
    Currency,
    /// Two or three credits that sum to the net: PAYOUT_MATCHED.
    Split,
    /// Paid exactly but after the deadline, and produced after everything else: the batch is
    /// PAYOUT_MISSING until the credit comes, then PAYOUT_MATCHED.
    Late,
    /// Paid exactly, plus a credit naming a batch that does not exist: PAYOUT_UNEXPECTED
    /// once the credit has waited the deadline for its batch's lines.
    UnknownBatch,
    /// Paid exactly, plus a statement line with no batch reference: PAYOUT_UNEXPECTED at once.
    NoReference,
}

impl PayoutFault {
    const ALL: [PayoutFault; 8] = [
        PayoutFault::Missing,
        PayoutFault::Short,
        PayoutFault::Over,
        PayoutFault::Currency,
        PayoutFault::Split,
        PayoutFault::Late,
        PayoutFault::UnknownBatch,
        PayoutFault::NoReference,
    ];

    /// Whether its verdict (or, for a late payout, the exception it opens first) waits for a
    /// deadline: such faults go only into batches the final watermark is sure to judge.
    pub(super) fn waits_for_deadline(self) -> bool {
        matches!(
            self,
            PayoutFault::Missing
                | PayoutFault::Short
                | PayoutFault::Over
                | PayoutFault::Late
                | PayoutFault::UnknownBatch
        )
    }
}

/// A settlement batch as generated: what the acquirer's report says it owes.
#[derive(Debug, Clone)]
pub(super) struct Batch {
    pub(super) id: String,
    pub(super) merchant: String,
    pub(super) currency: Currency,
    /// The sum of its distinct lines' net, faulty lines included (the bank pays what the
    /// report says, not what the payments imply).
    pub(super) net: Decimal,
    pub(super) last_line: DateTime<Utc>,
    /// Where in the main stream its last line (a copy not held back) is: its payouts come
    /// after it. None when every line is held back.
    pub(super) last_index: Option<usize>,
}

/// A statement line to produce; `late`: after everything else.
#[derive(Debug, Clone)]
pub(super) struct PlannedPayout {
    pub(super) payout: BankPayout,
    pub(super) late: bool,
}

/// How the statement lines of the batches are made.
pub(super) struct PayoutPlan<'a> {
    pub(super) o: &'a SimulationOptions,
    pub(super) currencies: &'a [Currency],
    pub(super) rules: PayoutRules,
    /// The highest event time of the payments and lines: no statement line is stamped later.
    /// A partition far ahead of the others would move the stream time and, with broker time =
    /// event time, leave the others idle, so the watermark would run ahead of the records.
    pub(super) stream_end: DateTime<Utc>,
    /// Deadlines before this are passed by the final watermark with a day to spare (the
    /// settlement leg's margin), so faults that wait for one are judged by the end.
    pub(super) judged_by: DateTime<Utc>,
    /// Statement lines issued so far (their ids count up).
    pub(super) issued: u64,
}

impl PayoutPlan<'_> {
    pub(super) fn statement_line(
        &mut self,
        b: &Batch,
        batch_reference: Option<String>,
        (amount, currency): (Decimal, Currency),
        at: DateTime<Utc>,
        description: String,
    ) -> BankPayout {
        self.issued += 1;
        BankPayout {
            statement_line_id: format!("stmt-{}-{}", self.o.seed, self.issued),
            account_id: format!("acct-{}", b.merchant),
            value_date: at.date_naive(),
            amount,
            currency,
            batch_reference,
            description,
            event_time: at,
        }
    }

    /// A credit of some hundreds in `currency` that no batch owes.
    pub(super) fn stray_amount(rng: &mut ChaCha8Rng, currency: Currency) -> Decimal {
        let scale = currency.minor_units();
        Decimal::new(
            rng.random_range(1_000..100_000) * 10i64.pow(scale) / 100,
            scale,
        )
    }

    /// The statement lines paying batch `b`, with the fault drawn for it (see
    /// [`PayoutFault`]). A batch that nets to zero owes nothing and gets none.
    pub(super) fn payouts(&mut self, rng: &mut ChaCha8Rng, b: &Batch) -> Vec<PlannedPayout> {
        if b.net.is_zero() {
            return Vec::new();
        }
        let deadline = self.rules.deadline;
        let after = |t: DateTime<Utc>, d: chrono::Duration| t.checked_add_signed(d);
        // Some hours after the last line, well inside the deadline.
        let delay = chrono::Duration::minutes(rng.random_range(4 * 60..=16 * 60)).min(deadline / 2);
        let end = self.stream_end;
        let at = after(b.last_line, delay).unwrap_or(b.last_line).min(end);
        // `minutes` after the payout, but never past the end of the stream.
        let later = |minutes: i64| {
            after(at, chrono::Duration::minutes(minutes))
                .unwrap_or(at)
                .min(end)
        };
        let mut fault = PayoutFault::None;
        if b.net > Decimal::ZERO && rng.random_bool(self.o.payout_fault_share.clamp(0.0, 1.0)) {
            fault = PayoutFault::ALL[rng.random_range(0..PayoutFault::ALL.len())];
        }
        // The latest deadline a fault waits for: the batch's, or its extra credit's (an hour
        // after the payout, since the credit waits for lines from its own time).
        let judged = after(later(60), deadline).is_some_and(|d| d < self.judged_by);
        if fault.waits_for_deadline() && !judged {
            fault = PayoutFault::None;
        }
        let c = b.currency;
        let unit = Decimal::new(1, c.minor_units());
        let part = |share: u32| {
            (b.net / Decimal::from(share))
                .round_dp_with_strategy(c.minor_units(), rust_decimal::RoundingStrategy::ToZero)
                .max(unit)
        };
        let payout = format!("ACQ PAYOUT {}", b.id);
        let reference = Some(b.id.clone());
        let mut out = Vec::new();
        let mut push = |plan: &mut Self, reference, money, at, description, late| {
            let payout = plan.statement_line(b, reference, money, at, description);
            out.push(PlannedPayout { payout, late });
        };
        match fault {
            PayoutFault::None => push(self, reference, (b.net, c), at, payout, false),
            PayoutFault::Missing => {}
            PayoutFault::Short => {
                let paid = b.net - part(10);
                if !paid.is_zero() {
                    let text = format!("{payout} LESS RESERVE");
                    push(self, reference, (paid, c), at, text, false);
                }
            }
            PayoutFault::Over => push(self, reference, (b.net + part(100), c), at, payout, false),
            PayoutFault::Currency => {
                let other = (self.currencies.iter().copied())
                    .chain(Currency::all())
                    .find(|o| *o != c)
                    .expect("there is more than one currency");
                let amount = round(b.net * unit_value(c) / unit_value(other), other)
                    .max(Decimal::new(1, other.minor_units()));
                push(self, reference, (amount, other), at, payout, false);
            }
            PayoutFault::Split => {
                let mut minor = b.net;
                minor.rescale(c.minor_units());
                let mut left = minor.mantissa();
                let parts = rng.random_range(2..=3_i128).min(left);
                for n in 1..=parts {
                    let this = if n == parts {
                        left
                    } else {
                        rng.random_range(1..=left - (parts - n))
                    };
                    left -= this;
                    let amount = Decimal::from_i128_with_scale(this, c.minor_units());
                    let text = format!("{payout} PART {n}/{parts}");
                    let t = later(90 * (n as i64 - 1));
                    push(self, reference.clone(), (amount, c), t, text, false);
                }
            }
            PayoutFault::Late => {
                let late = after(b.last_line, deadline)
                    .and_then(|d| after(d, chrono::Duration::hours(rng.random_range(1..=12))))
                    .expect("a judged deadline is representable");
                push(self, reference, (b.net, c), late, payout, true);
            }
            PayoutFault::UnknownBatch => {
                push(self, reference, (b.net, c), at, payout.clone(), false);
                let unknown = format!("batch-{}-unknown-{}", self.o.seed, self.issued);
                let text = format!("ACQ PAYOUT {unknown}");
                let stray = (Self::stray_amount(rng, c), c);
                push(self, Some(unknown), stray, later(60), text, false);
            }
            PayoutFault::NoReference => {
                push(self, reference, (b.net, c), at, payout.clone(), false);
                let text = format!("CREDIT TRANSFER {}", b.merchant);
                let stray = (Self::stray_amount(rng, c), c);
                push(self, None, stray, later(120), text, false);
            }
        }
        out
    }
}

/// The event time of a generated record (malformed ones have none).
pub(super) fn event_time(r: &Generated) -> Option<DateTime<Utc>> {
    match r {
        Generated::Payment(p) => Some(p.event_time),
        Generated::Settlement(l) => Some(l.event_time),
        Generated::Payout(b) => Some(b.event_time),
        Generated::Malformed { .. } => None,
    }
}

/// The payout leg: the statement lines paying every settlement batch of `out` and
/// `late_lines`, woven into `out`, with their expected totals and the status each payout
/// item must end in. Returns the statement lines to produce after everything else, and the
/// predictions.
///
/// A statement line goes into `out` after its batch's last line and no earlier than the
/// point where the other streams' event times reach its own, so the payouts topic moves
/// with the others and never ahead of them. The predictions are
/// [`payout::judge`] of each item's state from every distinct record, at the watermark
/// every faulted deadline is sure to be behind; the items no fault touched are MATCHED at
/// any watermark.
pub(super) fn add_payouts(
    o: &SimulationOptions,
    rng: &mut ChaCha8Rng,
    currencies: &[Currency],
    last_payment: DateTime<Utc>,
    out: &mut Vec<Generated>,
    late_lines: &[Generated],
    expected: &mut ExpectedTotals,
) -> (Vec<Generated>, BTreeMap<PayoutKey, PayoutStatus>) {
    // The highest event time produced up to each position, and the batches.
    let mut frontier = Vec::with_capacity(out.len());
    let mut high = DateTime::<Utc>::MIN_UTC;
    let mut batches: BTreeMap<String, Batch> = BTreeMap::new();
    let mut states: BTreeMap<PayoutKey, PayoutState> = BTreeMap::new();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut add = |l: &SettlementLine, index: Option<usize>| {
        let b = batches.entry(l.batch_id.clone()).or_insert_with(|| Batch {
            id: l.batch_id.clone(),
            merchant: l.merchant_id.clone(),
            currency: l.currency,
            net: Decimal::ZERO,
            last_line: l.event_time,
            last_index: None,
        });
        b.last_index = b.last_index.max(index);
        // A duplicate is one line, as the service stores it.
        if seen.insert(l.line_id.clone()) {
            b.net += l.net;
            b.last_line = b.last_line.max(l.event_time);
            let state = states
                .entry(PayoutKey::Batch(l.batch_id.clone()))
                .or_default();
            *state = payout::fold(std::mem::take(state), [l], []);
        }
    };
    for (i, r) in out.iter().enumerate() {
        if let Some(t) = event_time(r) {
            high = high.max(t);
        }
        if let Generated::Settlement(l) = r {
            add(l, Some(i));
        }
        frontier.push(high);
    }
    for r in late_lines {
        if let Generated::Settlement(l) = r {
            add(l, None);
        }
    }
    let mut batches: Vec<Batch> = batches.into_values().collect();
    batches.sort_by(|a, b| (a.last_line, &a.id).cmp(&(b.last_line, &b.id)));
    let rules = o.payout_rules();
    let judged_by = last_payment - o.allowed_lateness_chrono() - chrono::Duration::days(1);
    let mut plan = PayoutPlan {
        o,
        currencies,
        rules,
        stream_end: high,
        judged_by,
        issued: 0,
    };
    let mut woven: Vec<(usize, BankPayout)> = Vec::new();
    let mut late = Vec::new();
    for b in &batches {
        for PlannedPayout {
            payout: p,
            late: is_late,
        } in plan.payouts(rng, b)
        {
            let t = expected
                .payouts
                .entry(format!("{}/{}", p.account_id, p.currency))
                .or_default();
            t.count += 1;
            t.sum += p.amount;
            expected.statement_lines += 1;
            let state = states.entry(PayoutKey::of_payout(&p)).or_default();
            *state = payout::fold(std::mem::take(state), [], [&p]);
            let copies = if rng.random_bool(o.duplicate_share.clamp(0.0, 1.0)) {
                2
            } else {
                1
            };
            // After the first position whose event time reaches the payout's (the end when
            // none does), and after the batch's last line.
            let reached = frontier.partition_point(|f| *f < p.event_time) + 1;
            let at = reached
                .min(out.len())
                .max(b.last_index.map_or(0, |i| i + 1));
            for _ in 0..copies {
                if is_late {
                    late.push(Generated::Payout(p.clone()));
                } else {
                    woven.push((at, p.clone()));
                }
            }
        }
    }
    // Stable: the statement lines of one position keep the order they were issued in.
    woven.sort_by_key(|(at, _)| *at);
    let mut woven = woven.into_iter().peekable();
    let mut merged = Vec::with_capacity(out.len() + woven.len());
    for (i, r) in std::mem::take(out).into_iter().enumerate() {
        while let Some((_, p)) = woven.next_if(|(at, _)| *at == i) {
            merged.push(Generated::Payout(p));
        }
        merged.push(r);
    }
    merged.extend(woven.map(|(_, p)| Generated::Payout(p)));
    *out = merged;
    let statuses = states
        .iter()
        .map(|(k, s)| (k.clone(), payout::judge(k, s, judged_by, &rules).status))
        .collect();
    (late, statuses)
}
