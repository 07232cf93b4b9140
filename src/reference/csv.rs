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

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::{FxRate, MerchantStatus, MerchantVersion};
use crate::domain::Currency;

/// The content of one file.
#[derive(Debug, Clone, PartialEq)]
pub enum ReferenceFile {
    Merchants(Vec<MerchantVersion>),
    Rates(Vec<FxRate>),
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
        DateTime::parse_from_rfc3339(v)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| self.err(field, format!("{v:?} is not an RFC 3339 time ({e})")))
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

/// Parses and validates a whole file.
pub fn parse(input: impl Read) -> Result<ReferenceFile, CsvError> {
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
    let mut seen = std::collections::HashSet::new();
    for (i, record) in reader.records().enumerate() {
        let number = i + 2;
        let record = record.map_err(|e| CsvError {
            row: number,
            field: "-".into(),
            message: e.to_string(),
        })?;
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
    Ok(if is_merchants {
        ReferenceFile::Merchants(merchants)
    } else {
        ReferenceFile::Rates(rates)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merchants_parse_with_optional_overrides() {
        let file = "merchant_id,valid_from,name,settlement_currency,fee_bps,fee_fixed,status,settlement_deadline\n\
                    m1,2026-01-01T00:00:00Z,Shop,EUR,150,0.10,ACTIVE,3d\n\
                    m1,2026-03-01T00:00:00Z,Shop,EUR,175,0.10,ACTIVE,\n";
        let ReferenceFile::Merchants(m) = parse(file.as_bytes()).unwrap() else {
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
}
