//! The verdict on a payment reference, and how it changes from one evaluation to the next.

use std::fmt;

/// The verdict on one payment reference. [`Status::as_str`] is the symbol PostgreSQL, metrics
/// and reports carry; the module doc gives the rules and their precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Settled gross and fee equal what the payment events call for, within tolerance.
    Matched,
    /// Not matched yet, but a record that would complete it may still arrive in time.
    Expected,
    /// Due, and settled gross differs from expected gross beyond tolerance.
    AmountMismatch,
    /// Due, gross agrees, but the fee differs beyond tolerance.
    FeeMismatch,
    /// A settlement line is not in the merchant's settlement currency.
    CurrencyMismatch,
    /// Payment events past their settlement deadline, and no settlement line at all.
    MissingSettlement,
    /// Settlement lines past their payment deadline, and no payment event at all.
    UnexpectedSettlement,
    /// Due, and something was settled twice (more capture lines than captures, too much gross).
    OverSettled,
    /// Merchant terms or an FX rate are missing; re-evaluated when the reference data arrives.
    MissingReference,
}

impl Status {
    /// Every status, e.g. to register one counter per status at zero.
    pub const ALL: [Status; 9] = [
        Status::Matched,
        Status::Expected,
        Status::AmountMismatch,
        Status::FeeMismatch,
        Status::CurrencyMismatch,
        Status::MissingSettlement,
        Status::UnexpectedSettlement,
        Status::OverSettled,
        Status::MissingReference,
    ];

    /// The symbol used in PostgreSQL, metrics and reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Matched => "MATCHED",
            Status::Expected => "EXPECTED",
            Status::AmountMismatch => "AMOUNT_MISMATCH",
            Status::FeeMismatch => "FEE_MISMATCH",
            Status::CurrencyMismatch => "CURRENCY_MISMATCH",
            Status::MissingSettlement => "MISSING_SETTLEMENT",
            Status::UnexpectedSettlement => "UNEXPECTED_SETTLEMENT",
            Status::OverSettled => "OVER_SETTLED",
            Status::MissingReference => "MISSING_REFERENCE",
        }
    }

    /// Parses the PostgreSQL symbol.
    pub fn parse(symbol: &str) -> Option<Self> {
        Status::ALL.into_iter().find(|s| s.as_str() == symbol)
    }

    /// Whether a person has to look at it: everything except MATCHED and EXPECTED.
    pub fn is_exception(&self) -> bool {
        !matches!(self, Status::Matched | Status::Expected)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of status between two evaluations of one reference: one history row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The stored status before; `None` when the reference is evaluated for the first time.
    pub from: Option<Status>,
    /// The status now.
    pub to: Status,
}

impl Transition {
    /// Whether an exception was cleared, e.g. a late settlement turning MISSING_SETTLEMENT into
    /// MATCHED, so resolutions can be counted apart from new exceptions.
    pub fn resolves_exception(&self) -> bool {
        self.from.is_some_and(|s| s.is_exception()) && !self.to.is_exception()
    }
}

/// The history row to record when a reference's status goes from `previous` to `next`;
/// `None` when nothing changed.
pub fn transition(previous: Option<Status>, next: Status) -> Option<Transition> {
    (previous != Some(next)).then_some(Transition {
        from: previous,
        to: next,
    })
}

#[cfg(test)]
mod tests {
    use super::Status::*;
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_symbol() {
        for status in Status::ALL {
            assert_eq!(Status::parse(status.as_str()), Some(status), "{status}");
        }
        assert_eq!(Status::parse("matched"), None);
    }

    #[test]
    fn only_matched_and_expected_are_not_exceptions() {
        let calm: Vec<_> = Status::ALL
            .into_iter()
            .filter(|s| !s.is_exception())
            .collect();
        assert_eq!(calm, [Matched, Expected]);
    }

    #[test]
    fn a_transition_is_recorded_only_when_the_status_changes() {
        // (previous, next, recorded, resolves an exception)
        let cases = [
            (None, Expected, true, false),
            (None, Matched, true, false),
            (Some(Expected), Expected, false, false),
            (Some(MissingSettlement), MissingSettlement, false, false),
            (Some(Expected), Matched, true, false),
            (Some(Expected), MissingSettlement, true, false),
            (Some(MissingSettlement), Matched, true, true),
            (Some(MissingReference), Expected, true, true),
            (Some(Matched), OverSettled, true, false),
            (Some(AmountMismatch), FeeMismatch, true, false),
        ];
        for (previous, next, recorded, resolves) in cases {
            let name = format!("{previous:?} -> {next}");
            let t = transition(previous, next);
            assert_eq!(t.is_some(), recorded, "{name}");
            if let Some(t) = t {
                assert_eq!((t.from, t.to), (previous, next), "{name}");
                assert_eq!(t.resolves_exception(), resolves, "{name}");
            }
        }
    }
}
