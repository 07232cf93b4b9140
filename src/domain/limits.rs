//! Bounds a record must respect before it may reach the store, beyond its own business rules.
//!
//! A record can be valid Avro, pass every business rule and still be refused by PostgreSQL
//! (a NUL character in a text column, an id longer than a btree entry, a timestamp the column
//! cannot hold) or be harmful once stored (an event time years ahead pushes the event-time
//! watermark and opens false deadline exceptions for every merchant). [`Limits::check`] finds
//! those records up front so the consumer dead-letters them with a specific reason; the
//! engine's refusal isolation (`engine::isolate`) remains the safety net for anything missed.
//!
//! Pure: no I/O, no clock. Event times are judged against the record's *broker timestamp*,
//! which is in the log, so a replay reaches the same verdict as the live run.

use chrono::{DateTime, Duration, NaiveDate, Utc};

use super::{BankPayout, InvalidRecord, PaymentEvent, Record, SettlementLine};

/// The bounds; [`Limits::default`] fits any real payment system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest id or reference (event_id, payment_reference, merchant_id, line_id, batch_id,
    /// psp_reference), in UTF-8 bytes. Far below PostgreSQL's ~2.7 KB btree entry limit,
    /// far above real ids (UUIDs are 36, PSP references rarely exceed 64).
    pub max_id_bytes: usize,
    /// How far an event time may lie after the record's broker timestamp (clock skew between
    /// the producer and the broker). Beyond it the producer's clock is broken.
    pub max_event_time_ahead: Duration,
    /// How far an event time may lie before the record's broker timestamp (late delivery,
    /// backfills: ten years by default). Beyond it the event time is implausible (a clock
    /// reset to 1970 or 2000).
    pub max_event_time_behind: Duration,
    /// How far a business date (a settlement line's `settlement_date`, a payout's
    /// `value_date`) may lie after the UTC date of the record's own event time. Settlement
    /// and value dates follow the money by days, not years: a line dated 9999-12-31 is a
    /// broken producer, and stored it would open a bucket (a daily total, a partition, an
    /// archive period) of its own.
    pub max_business_date_ahead: Duration,
    /// How far a business date may lie before the UTC date of the record's event time (a
    /// monthly statement produced at month end, a late settlement report).
    pub max_business_date_behind: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_id_bytes: 200,
            max_event_time_ahead: Duration::hours(1),
            max_event_time_behind: Duration::days(3650),
            max_business_date_ahead: Duration::days(92),
            max_business_date_behind: Duration::days(92),
        }
    }
}

/// The earliest and latest times and dates any record may carry, whatever its broker
/// timestamp says: inside PostgreSQL's `timestamptz`/`date` ranges and ISO 8601's four-digit
/// years, so a record without a broker timestamp can still not break a column.
/// Longest free text (a statement line's description) in UTF-8 bytes.
pub const MAX_FREE_TEXT_BYTES: usize = 2000;

fn earliest() -> DateTime<Utc> {
    DateTime::from_timestamp(0, 0).expect("the epoch")
}

fn latest() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(9999, 12, 31)
        .and_then(|d| d.and_hms_opt(23, 59, 59))
        .expect("a valid date")
        .and_utc()
}

impl Limits {
    /// Applies the record's business rules ([`PaymentEvent::validate`],
    /// [`SettlementLine::validate`]) and these bounds. `broker_time` is the record's Kafka
    /// timestamp; without one only the absolute bounds apply.
    pub fn check(
        &self,
        record: &Record,
        broker_time: Option<DateTime<Utc>>,
    ) -> Result<(), InvalidRecord> {
        match record {
            Record::Payment(p) => self.check_payment(p, broker_time),
            Record::Settlement(s) => self.check_settlement(s, broker_time),
            Record::Payout(b) => self.check_payout(b, broker_time),
        }
    }

    fn check_payout(
        &self,
        b: &BankPayout,
        broker_time: Option<DateTime<Utc>>,
    ) -> Result<(), InvalidRecord> {
        self.id("statement_line_id", &b.statement_line_id)?;
        self.id("account_id", &b.account_id)?;
        if let Some(reference) = &b.batch_reference {
            self.id("batch_reference", reference)?;
        }
        self.free_text("description", &b.description)?;
        self.event_time(b.event_time, broker_time)?;
        self.date("value_date", b.value_date)?;
        self.business_date("value_date", b.value_date, b.event_time)?;
        b.validate()
    }

    /// Free text (a statement's description): any printable text and line breaks, no NUL or
    /// other control characters, at most [`MAX_FREE_TEXT_BYTES`].
    fn free_text(&self, field: &'static str, value: &str) -> Result<(), InvalidRecord> {
        if let Some((at, c)) =
            (value.char_indices()).find(|(_, c)| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err(InvalidRecord::Text {
                field,
                detail: format!("control character U+{:04X} at byte {at}", c as u32),
            });
        }
        if value.len() > MAX_FREE_TEXT_BYTES {
            return Err(InvalidRecord::TooLong {
                field,
                bytes: value.len(),
                max: MAX_FREE_TEXT_BYTES,
            });
        }
        Ok(())
    }

    fn date(&self, field: &'static str, date: NaiveDate) -> Result<(), InvalidRecord> {
        if date < earliest().date_naive() || date > latest().date_naive() {
            return Err(InvalidRecord::EventTime {
                field,
                detail: format!("{date} is outside 1970-01-01 ..= 9999-12-31"),
            });
        }
        Ok(())
    }

    /// A business date within the window around the UTC date of the record's event time.
    /// Judged against the event time (in the record, hence in the log), so a replay reaches
    /// the same verdict; the event time itself was already judged against the broker's.
    fn business_date(
        &self,
        field: &'static str,
        date: NaiveDate,
        event_time: DateTime<Utc>,
    ) -> Result<(), InvalidRecord> {
        let day = event_time.date_naive();
        let offset = date.signed_duration_since(day);
        let (too_far, how, max) = if offset > Duration::zero() {
            (
                offset > self.max_business_date_ahead,
                "after",
                self.max_business_date_ahead,
            )
        } else {
            (
                -offset > self.max_business_date_behind,
                "before",
                self.max_business_date_behind,
            )
        };
        if too_far {
            return Err(InvalidRecord::BusinessDate {
                field,
                detail: format!(
                    "{date} is {} days {how} the record's event date {day} (at most {} days allowed): implausible for a business date",
                    offset.num_days().abs(),
                    max.num_days()
                ),
            });
        }
        Ok(())
    }

    fn check_payment(
        &self,
        p: &PaymentEvent,
        broker_time: Option<DateTime<Utc>>,
    ) -> Result<(), InvalidRecord> {
        self.id("event_id", &p.event_id)?;
        self.id("payment_reference", &p.payment_reference)?;
        self.id("merchant_id", &p.merchant_id)?;
        if let Some(psp) = &p.psp_reference {
            self.id("psp_reference", psp)?;
        }
        self.event_time(p.event_time, broker_time)?;
        p.validate()
    }

    fn check_settlement(
        &self,
        s: &SettlementLine,
        broker_time: Option<DateTime<Utc>>,
    ) -> Result<(), InvalidRecord> {
        self.id("line_id", &s.line_id)?;
        self.id("batch_id", &s.batch_id)?;
        self.id("payment_reference", &s.payment_reference)?;
        self.id("merchant_id", &s.merchant_id)?;
        self.event_time(s.event_time, broker_time)?;
        self.date("settlement_date", s.settlement_date)?;
        self.business_date("settlement_date", s.settlement_date, s.event_time)?;
        s.validate()
    }

    /// An id: text PostgreSQL can store (no NUL), printable (no control characters, which
    /// break reports, CSV exports and log lines), and bounded.
    fn id(&self, field: &'static str, value: &str) -> Result<(), InvalidRecord> {
        if let Some((at, c)) = value.char_indices().find(|(_, c)| c.is_control()) {
            return Err(InvalidRecord::Text {
                field,
                detail: format!(
                    "control character U+{:04X} at byte {at} (PostgreSQL text cannot hold NUL; ids must be printable)",
                    c as u32
                ),
            });
        }
        if value.len() > self.max_id_bytes {
            return Err(InvalidRecord::TooLong {
                field,
                bytes: value.len(),
                max: self.max_id_bytes,
            });
        }
        Ok(())
    }

    fn event_time(
        &self,
        t: DateTime<Utc>,
        broker_time: Option<DateTime<Utc>>,
    ) -> Result<(), InvalidRecord> {
        let bad = |detail: String| InvalidRecord::EventTime {
            field: "event_time",
            detail,
        };
        if t < earliest() || t > latest() {
            return Err(bad(format!(
                "{} is outside 1970-01-01 ..= 9999-12-31",
                t.to_rfc3339()
            )));
        }
        let Some(broker) = broker_time else {
            return Ok(());
        };
        if t > broker + self.max_event_time_ahead {
            return Err(bad(format!(
                "{} is {} ahead of the broker timestamp {} (at most {} allowed): the producer's clock is wrong",
                t.to_rfc3339(),
                human(t - broker),
                broker.to_rfc3339(),
                human(self.max_event_time_ahead)
            )));
        }
        if t < broker - self.max_event_time_behind {
            return Err(bad(format!(
                "{} is {} behind the broker timestamp {} (at most {} allowed)",
                t.to_rfc3339(),
                human(broker - t),
                broker.to_rfc3339(),
                human(self.max_event_time_behind)
            )));
        }
        Ok(())
    }
}

fn human(d: Duration) -> String {
    d.to_std()
        .map(|d| {
            humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
        })
        .unwrap_or_else(|_| format!("{} s", d.num_seconds()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Currency, PaymentEventKind};

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    fn payment() -> PaymentEvent {
        PaymentEvent {
            event_id: "e1".into(),
            payment_reference: "p1".into(),
            merchant_id: "m1".into(),
            kind: PaymentEventKind::Capture,
            amount: "10.00".parse().unwrap(),
            currency: Currency::from_code("EUR").unwrap(),
            event_time: at(1_800_000_000_000),
            psp_reference: Some("psp".into()),
        }
    }

    /// (what is changed, the change, whether it is accepted, the class of refusal).
    #[test]
    fn every_bound_refuses_with_its_own_class() {
        type Change = fn(&mut PaymentEvent);
        let broker = Some(at(1_800_000_000_000));
        let cases: [(&str, Change, Option<&str>); 9] = [
            ("clean", |_| {}, None),
            ("NUL in an id", |p| p.event_id = "e\0".into(), Some("text")),
            (
                "newline in a reference",
                |p| p.payment_reference = "p\n1".into(),
                Some("text"),
            ),
            (
                "NUL in the psp reference",
                |p| p.psp_reference = Some("\0".into()),
                Some("text"),
            ),
            (
                "an id at the bound",
                |p| p.merchant_id = "m".repeat(200),
                None,
            ),
            (
                "an id over the bound",
                |p| p.merchant_id = "m".repeat(201),
                Some("too_long"),
            ),
            (
                "multi-byte characters count as bytes",
                |p| p.event_id = "é".repeat(101),
                Some("too_long"),
            ),
            (
                "two hours ahead",
                |p| p.event_time = at(1_800_000_000_000 + 7_200_000),
                Some("event_time"),
            ),
            ("before 1970", |p| p.event_time = at(-1), Some("event_time")),
        ];
        for (what, change, refused) in cases {
            let mut p = payment();
            change(&mut p);
            let got = Limits::default().check(&Record::Payment(p), broker);
            match (refused, got) {
                (None, Ok(())) => {}
                (Some(class), Err(e)) => assert_eq!(e.class(), class, "{what}: {e}"),
                (want, got) => panic!("{what}: expected {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn event_times_are_judged_against_the_broker_timestamp_not_the_clock() {
        let limits = Limits::default();
        let broker = at(1_000_000_000_000);
        let mut p = payment();
        p.event_time = broker + Duration::minutes(59);
        assert!(
            limits
                .check(&Record::Payment(p.clone()), Some(broker))
                .is_ok()
        );
        p.event_time = broker - Duration::days(3649);
        assert!(
            limits
                .check(&Record::Payment(p.clone()), Some(broker))
                .is_ok()
        );
        p.event_time = broker - Duration::days(3651);
        let e = limits
            .check(&Record::Payment(p.clone()), Some(broker))
            .unwrap_err();
        assert!(e.to_string().contains("behind the broker timestamp"), "{e}");
        // Without a broker timestamp only the absolute range applies.
        assert!(limits.check(&Record::Payment(p), None).is_ok());
    }

    fn line(settlement_date: NaiveDate) -> SettlementLine {
        SettlementLine {
            line_id: "l1".into(),
            batch_id: "b1".into(),
            payment_reference: "p1".into(),
            merchant_id: "m1".into(),
            gross: "10.00".parse().unwrap(),
            fee: "0.20".parse().unwrap(),
            net: "9.80".parse().unwrap(),
            currency: Currency::from_code("EUR").unwrap(),
            settlement_date,
            // 2027-01-15T08:00:00Z
            event_time: at(1_800_000_000_000),
        }
    }

    fn payout(value_date: NaiveDate) -> BankPayout {
        BankPayout {
            statement_line_id: "s1".into(),
            account_id: "a1".into(),
            value_date,
            amount: "9.80".parse().unwrap(),
            currency: Currency::from_code("EUR").unwrap(),
            batch_reference: Some("b1".into()),
            description: "payout".into(),
            event_time: at(1_800_000_000_000),
        }
    }

    #[test]
    fn business_dates_far_from_the_event_date_are_refused_as_implausible() {
        let limits = Limits::default();
        let day = at(1_800_000_000_000).date_naive();
        let broker = Some(at(1_800_000_000_000));
        let days = |n: i64| day + Duration::days(n);
        // (the date, accepted)
        let cases = [
            (day, true),
            (days(3), true),
            (days(92), true),
            (days(93), false),
            (days(-92), true),
            (days(-93), false),
            (NaiveDate::from_ymd_opt(9999, 12, 31).unwrap(), false),
            (NaiveDate::from_ymd_opt(1970, 1, 1).unwrap(), false),
        ];
        for (date, accepted) in cases {
            for (field, record) in [
                ("settlement_date", Record::Settlement(line(date))),
                ("value_date", Record::Payout(payout(date))),
            ] {
                match (accepted, limits.check(&record, broker)) {
                    (true, Ok(())) => {}
                    (false, Err(e)) => {
                        assert_eq!(e.class(), "business_date", "{field} {date}: {e}");
                        let text = e.to_string();
                        assert!(text.contains(field), "{text}");
                        assert!(text.contains("at most 92 days"), "{text}");
                    }
                    (want, got) => panic!("{field} {date}: accepted {want}, got {got:?}"),
                }
            }
        }
        // Judged against the record's event time, not the broker's: without a broker
        // timestamp the window still applies.
        let e = limits
            .check(&Record::Settlement(line(days(400))), None)
            .unwrap_err();
        assert_eq!(e.class(), "business_date");
    }

    #[test]
    fn the_business_date_window_is_configurable_in_each_direction() {
        let limits = Limits {
            max_business_date_ahead: Duration::days(7),
            max_business_date_behind: Duration::days(1),
            ..Limits::default()
        };
        let day = at(1_800_000_000_000).date_naive();
        let check = |n: i64| {
            limits
                .check(&Record::Settlement(line(day + Duration::days(n))), None)
                .is_ok()
        };
        assert!(check(7));
        assert!(!check(8));
        assert!(check(-1));
        assert!(!check(-2));
    }
}
