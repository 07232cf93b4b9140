//! `payrecon reference load FILE.csv`: operator files of merchants or FX rates.
//!
//! The header decides the kind. Merchants:
//! `merchant_id,valid_from,name,settlement_currency,fee_bps,fee_fixed,status` plus optional
//! `tolerance_abs,tolerance_rel,settlement_deadline,payment_deadline` (durations like `3d`,
//! `36h`). FX rates: `base_currency,quote_currency,valid_from,rate` (1 base = rate quote).
//! Times are RFC 3339. A file loads whole or not at all; every error names the row (as a
//! spreadsheet counts them: the header is row 1) and the field.

use std::collections::HashMap;
use std::io::Read;

use chrono::{DateTime, NaiveDate, Timelike, Utc};
use rust_decimal::Decimal;

use super::{FxRate, MerchantStatus, MerchantVersion};
use crate::domain::Currency;

/// The content of one file.
#[derive(Debug, Clone, PartialEq)]
pub enum ReferenceFile {
    Merchants(Vec<MerchantVersion>),
    Rates(Vec<FxRate>),
}

/// A parsed file and where each version came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub content: ReferenceFile,
    /// The row of each version, in the same order (the header is row 1), so a message about
    /// a version can point at its row.
    pub rows: Vec<usize>,
}

/// A validation error, naming where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("row {row}, field `{field}`: {message}")]
pub struct CsvError {
    pub row: usize,
    pub field: String,
    pub message: String,
}

const MERCHANT_COLUMNS: &[&str] = &[
    "merchant_id",
    "valid_from",
    "name",
    "settlement_currency",
    "fee_bps",
    "fee_fixed",
    "status",
];
const MERCHANT_OPTIONAL: &[&str] = &[
    "tolerance_abs",
    "tolerance_rel",
    "settlement_deadline",
    "payment_deadline",
];
const RATE_COLUMNS: &[&str] = &["base_currency", "quote_currency", "valid_from", "rate"];

/// One data row with named access and errors that say where.
struct Row<'a> {
    number: usize,
    columns: &'a HashMap<String, usize>,
    record: &'a csv::StringRecord,
}

impl Row<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> CsvError {
        CsvError {
            row: self.number,
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn text(&self, field: &str) -> Result<&str, CsvError> {
        let value = self
            .optional(field)
            .ok_or_else(|| self.err(field, "is empty"))?;
        Ok(value)
    }

    fn optional(&self, field: &str) -> Option<&str> {
        let v = self.record.get(*self.columns.get(field)?)?.trim();
        (!v.is_empty()).then_some(v)
    }

    fn currency(&self, field: &str) -> Result<Currency, CsvError> {
        Currency::from_code(self.text(field)?).map_err(|e| self.err(field, e.to_string()))
    }

    fn time(&self, field: &str) -> Result<DateTime<Utc>, CsvError> {
        let v = self.text(field)?;
        let t = parse_time(v).map_err(|message| self.err(field, message))?;
        Ok(t)
    }

    fn decimal(&self, field: &str, min_exclusive_zero: bool) -> Result<Decimal, CsvError> {
        let v = self.text(field)?;
        self.parse_decimal(field, v, min_exclusive_zero)
    }

    fn parse_decimal(&self, field: &str, v: &str, positive: bool) -> Result<Decimal, CsvError> {
        let d: Decimal = v
            .parse()
            .map_err(|_| self.err(field, format!("{v:?} is not a decimal number")))?;
        if d < Decimal::ZERO || (positive && d.is_zero()) {
            return Err(self.err(
                field,
                format!(
                    "{v} must be {}",
                    if positive {
                        "greater than 0"
                    } else {
                        "0 or more"
                    }
                ),
            ));
        }
        Ok(d)
    }

    fn optional_decimal(&self, field: &str) -> Result<Option<Decimal>, CsvError> {
        self.optional(field)
            .map(|v| self.parse_decimal(field, v, false))
            .transpose()
    }

    fn optional_duration(&self, field: &str) -> Result<Option<std::time::Duration>, CsvError> {
        self.optional(field)
            .map(|v| {
                humantime::parse_duration(v).map_err(|e| {
                    self.err(
                        field,
                        format!("{v:?} is not a duration like 3d or 36h ({e})"),
                    )
                })
            })
            .transpose()
    }
}

/// A validity start: RFC 3339, or a plain `YYYY-MM-DD` date meaning midnight UTC; no finer
/// than a microsecond, because PostgreSQL would round a finer time and the next load of the
/// same file would no longer find its version by key.
pub fn parse_time(v: &str) -> Result<DateTime<Utc>, String> {
    let t = match DateTime::parse_from_rfc3339(v) {
        Ok(t) => t.with_timezone(&Utc),
        Err(e) => match NaiveDate::parse_from_str(v, "%Y-%m-%d") {
            Ok(d) => d.and_time(chrono::NaiveTime::MIN).and_utc(),
            Err(_) => {
                return Err(format!(
                    "{v:?} is neither an RFC 3339 time nor a YYYY-MM-DD date ({e})"
                ));
            }
        },
    };
    if t.nanosecond() % 1_000 != 0 {
        return Err(format!(
            "{v:?} is more precise than a microsecond, which PostgreSQL cannot store"
        ));
    }
    Ok(t)
}

/// Parses and validates a whole file.
pub fn parse(input: impl Read) -> Result<Parsed, CsvError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(input);
    let header_err = |message: String| CsvError {
        row: 1,
        field: "header".into(),
        message,
    };
    let headers = reader
        .headers()
        .map_err(|e| header_err(e.to_string()))?
        .clone();
    let columns: HashMap<String, usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| (h.to_owned(), i))
        .collect();
    let has_all = |cols: &[&str]| cols.iter().all(|c| columns.contains_key(*c));
    let is_merchants = has_all(MERCHANT_COLUMNS);
    if !is_merchants && !has_all(RATE_COLUMNS) {
        return Err(header_err(format!(
            "expected merchant columns ({}) or FX rate columns ({}), found ({})",
            MERCHANT_COLUMNS.join(","),
            RATE_COLUMNS.join(","),
            headers.iter().collect::<Vec<_>>().join(",")
        )));
    }
    let known: Vec<&str> = if is_merchants {
        [MERCHANT_COLUMNS, MERCHANT_OPTIONAL].concat()
    } else {
        RATE_COLUMNS.to_vec()
    };
    if let Some(unknown) = headers.iter().find(|h| !known.contains(h)) {
        return Err(header_err(format!("unknown column {unknown:?}")));
    }
    let mut merchants = Vec::new();
    let mut rates = Vec::new();
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| CsvError {
            row: e.position().map_or(i + 2, |p| p.line() as usize),
            field: "-".into(),
            message: e.to_string(),
        })?;
        // The line the record starts on: the spreadsheet row for an ordinary file, and still
        // the line to look at when a quoted field spans lines.
        let number = record.position().map_or(i + 2, |p| p.line() as usize);
        rows.push(number);
        let row = Row {
            number,
            columns: &columns,
            record: &record,
        };
        if is_merchants {
            let status = row.text("status")?;
            let m = MerchantVersion {
                merchant_id: row.text("merchant_id")?.to_owned(),
                valid_from: row.time("valid_from")?,
                name: row.text("name")?.to_owned(),
                settlement_currency: row.currency("settlement_currency")?,
                fee_bps: row.decimal("fee_bps", false)?,
                fee_fixed: row.decimal("fee_fixed", false)?,
                status: MerchantStatus::parse(status).ok_or_else(|| {
                    row.err("status", format!("{status:?} is not ACTIVE or SUSPENDED"))
                })?,
                tolerance_abs: row.optional_decimal("tolerance_abs")?,
                tolerance_rel: row.optional_decimal("tolerance_rel")?,
                settlement_deadline: row.optional_duration("settlement_deadline")?,
                payment_deadline: row.optional_duration("payment_deadline")?,
            };
            if !seen.insert((m.merchant_id.clone(), m.valid_from)) {
                return Err(row.err(
                    "valid_from",
                    format!(
                        "merchant {} already has a version starting {}",
                        m.merchant_id, m.valid_from
                    ),
                ));
            }
            merchants.push(m);
        } else {
            let r = FxRate {
                base: row.currency("base_currency")?,
                quote: row.currency("quote_currency")?,
                valid_from: row.time("valid_from")?,
                rate: row.decimal("rate", true)?,
            };
            if r.base == r.quote {
                return Err(row.err("quote_currency", "must differ from base_currency"));
            }
            if !seen.insert((format!("{}{}", r.base, r.quote), r.valid_from)) {
                return Err(row.err(
                    "valid_from",
                    format!(
                        "{}/{} already has a rate starting {}",
                        r.base, r.quote, r.valid_from
                    ),
                ));
            }
            rates.push(r);
        }
    }
    let content = if is_merchants {
        ReferenceFile::Merchants(merchants)
    } else {
        ReferenceFile::Rates(rates)
    };
    Ok(Parsed { content, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merchants_parse_with_optional_overrides() {
        let file = "merchant_id,valid_from,name,settlement_currency,fee_bps,fee_fixed,status,settlement_deadline\n\
                    m1,2026-01-01T00:00:00Z,Shop,EUR,150,0.10,ACTIVE,3d\n\
                    m1,2026-03-01T00:00:00Z,Shop,EUR,175,0.10,ACTIVE,\n";
        let parsed = parse(file.as_bytes()).unwrap();
        assert_eq!(parsed.rows, [2, 3]);
        let ReferenceFile::Merchants(m) = parsed.content else {
            panic!("not merchants")
        };
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0].settlement_deadline,
            Some(std::time::Duration::from_secs(3 * 86400))
        );
        assert_eq!(m[1].settlement_deadline, None);
        assert_eq!(m[1].fee_bps, Decimal::new(175, 0));
    }

    #[test]
    fn errors_name_the_row_and_the_field() {
        let cases = [
            (
                "m1,2026-01-01T00:00:00Z,Shop,XYZ,150,0,ACTIVE",
                2,
                "settlement_currency",
            ),
            ("m1,yesterday,Shop,EUR,150,0,ACTIVE", 2, "valid_from"),
            ("m1,2026-01-01T00:00:00Z,Shop,EUR,-1,0,ACTIVE", 2, "fee_bps"),
            ("m1,2026-01-01T00:00:00Z,Shop,EUR,150,0,CLOSED", 2, "status"),
            (
                ",2026-01-01T00:00:00Z,Shop,EUR,150,0,ACTIVE",
                2,
                "merchant_id",
            ),
        ];
        for (line, row, field) in cases {
            let file = format!(
                "merchant_id,valid_from,name,settlement_currency,fee_bps,fee_fixed,status\n{line}\n"
            );
            let err = parse(file.as_bytes()).unwrap_err();
            assert_eq!((err.row, err.field.as_str()), (row, field), "{line}: {err}");
        }
        let file = "base_currency,quote_currency,valid_from,rate\nUSD,EUR,2026-01-01T00:00:00Z,0.9\nUSD,EUR,2026-01-01T00:00:00Z,0\n";
        let err = parse(file.as_bytes()).unwrap_err();
        assert_eq!((err.row, err.field.as_str()), (3, "rate"), "{err}");
        let err = parse("foo,bar\n1,2\n".as_bytes()).unwrap_err();
        assert_eq!((err.row, err.field.as_str()), (1, "header"));
    }

    #[test]
    fn a_plain_date_is_midnight_utc() {
        let t = |v: &str| parse_time(v).unwrap();
        assert_eq!(t("2026-03-01"), t("2026-03-01T00:00:00Z"));
        assert_eq!(t("2026-03-01T01:00:00+01:00"), t("2026-03-01"));
        assert_eq!(
            t("2026-02-28T23:59:59.123456Z").timestamp_subsec_micros(),
            123_456
        );
        let file = "base_currency,quote_currency,valid_from,rate\nUSD,EUR,2026-03-01,0.9\n";
        let ReferenceFile::Rates(r) = parse(file.as_bytes()).unwrap().content else {
            panic!("not rates")
        };
        assert_eq!(r[0].valid_from, t("2026-03-01T00:00:00Z"));
    }

    #[test]
    fn a_time_that_is_not_a_date_or_finer_than_a_microsecond_is_refused() {
        for bad in [
            "2026-13-01",
            "2026-03-01 00:00",
            "01/03/2026",
            "2026-03-01T00:00:00",
            "2026-03-01T00:00:00.0000001Z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad} was accepted");
        }
        let file = "merchant_id,valid_from,name,settlement_currency,fee_bps,fee_fixed,status\n\
                    m1,2026-02-30,Shop,EUR,150,0,ACTIVE\n";
        let err = parse(file.as_bytes()).unwrap_err();
        assert_eq!((err.row, err.field.as_str()), (2, "valid_from"), "{err}");
    }

    #[test]
    fn rows_are_the_lines_records_start_on() {
        let file = "merchant_id,valid_from,name,settlement_currency,fee_bps,fee_fixed,status\n\
                    m1,2026-01-01,Shop,EUR,150,0,ACTIVE\n\
                    m2,2026-01-01,\"Two\nLines\",EUR,150,0,ACTIVE\n\
                    m3,2026-01-01,Shop,EUR,150,0,ACTIVE\n";
        assert_eq!(parse(file.as_bytes()).unwrap().rows, [2, 3, 5]);
    }
}
