//! PSP settlement reports as CSV: one settlement line per row.
//!
//! Two presets follow published layouts: `stripe` (the payout reconciliation / balance
//! transactions export: `automatic_payout_id`, `balance_transaction_id`, `gross`, `fee`,
//! `net`, `currency`, `source_id`...) and `adyen` (the settlement details report: `Merchant
//! Account`, `Psp Reference`, `Merchant Reference`, `Net Debit (NC)`/`Net Credit (NC)`,
//! `Commission (NC)`... `Batch Number`). Anything else is read with a [`CsvMapping`] from a
//! TOML file. Read with the `csv` crate, record by record; a line longer than the limit is
//! refused by the [`Guard`] below the reader before the crate buffers it.

use std::collections::HashMap;
use std::io::Read;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use csv::ByteRecord;
use rust_decimal::Decimal;
use serde::Deserialize;

use super::text::Guard;
use super::{
    Emitter, Format, Leg, ParseOptions, Rejection, Sink, StatementInfo, decode_text, parse_amount,
    start_of_day,
};
use crate::domain::{Currency, SettlementLine};

/// How the amounts of a report are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sign {
    /// Money owed to the merchant is positive (refunds negative), as payrecon stores it.
    #[default]
    AsIs,
    /// The report writes it the other way round.
    Inverted,
}

/// How to read a CSV settlement report: which columns hold what, and how numbers and dates
/// are written. Every column list names the header cells to read; for text the first
/// non-empty cell wins, for amounts the cells are added (a name starting with `-` is
/// subtracted; an empty cell counts as zero).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvMapping {
    #[serde(default = "comma")]
    pub delimiter: char,
    /// An encoding label (`utf-8`, `latin1`, `windows-1252`, `utf-16le`...); a byte-order
    /// mark overrides it. Default: UTF-8.
    #[serde(default)]
    pub encoding: Option<String>,
    #[serde(default = "dot")]
    pub decimal: char,
    /// The thousands separator the report may use; without it, `1,234.00` is refused.
    #[serde(default)]
    pub thousands: Option<char>,
    /// chrono format of a date cell.
    #[serde(default = "iso_date")]
    pub date_format: String,
    /// chrono format of a date-and-time cell (UTC).
    #[serde(default = "iso_datetime")]
    pub datetime_format: String,
    #[serde(default)]
    pub sign: Sign,
    pub batch_id: Vec<String>,
    pub payment_reference: Vec<String>,
    #[serde(default)]
    pub merchant_id: Vec<String>,
    /// The merchant of every line when no column names it.
    #[serde(default)]
    pub fixed_merchant_id: Option<String>,
    pub currency: Vec<String>,
    pub settlement_date: Vec<String>,
    /// When the PSP produced the line; default: the settlement date's midnight (UTC).
    #[serde(default)]
    pub event_time: Vec<String>,
    /// Two of gross, fee and net are enough; the third is derived (`net = gross - fee`).
    #[serde(default)]
    pub gross: Vec<String>,
    #[serde(default)]
    pub fee: Vec<String>,
    #[serde(default)]
    pub net: Vec<String>,
    /// A column naming the row type, and the types that are not settlement lines.
    #[serde(default)]
    pub type_column: Option<String>,
    #[serde(default)]
    pub skip_types: Vec<String>,
    /// Row types that are the batch's payout: not emitted; the batch must net to them.
    #[serde(default)]
    pub payout_types: Vec<String>,
}

fn comma() -> char {
    ','
}
fn dot() -> char {
    '.'
}
fn iso_date() -> String {
    "%Y-%m-%d".into()
}
fn iso_datetime() -> String {
    "%Y-%m-%d %H:%M:%S".into()
}

fn cols(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

impl CsvMapping {
    /// Reads a mapping from a TOML file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Self::from_toml(&text)
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let c = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?;
        Ok(c.try_deserialize()?)
    }

    /// Stripe's payout reconciliation (itemized) / balance transactions export.
    pub fn stripe() -> Self {
        CsvMapping {
            delimiter: ',',
            encoding: None,
            decimal: '.',
            thousands: None,
            date_format: iso_date(),
            datetime_format: iso_datetime(),
            sign: Sign::AsIs,
            batch_id: cols(&["automatic_payout_id"]),
            payment_reference: cols(&["source_id", "balance_transaction_id"]),
            merchant_id: cols(&["connected_account"]),
            fixed_merchant_id: None,
            currency: cols(&["currency"]),
            settlement_date: cols(&["automatic_payout_effective_at", "available_on_utc"]),
            event_time: cols(&["created_utc", "created"]),
            gross: cols(&["gross"]),
            fee: cols(&["fee"]),
            net: cols(&["net"]),
            type_column: None,
            skip_types: vec![],
            payout_types: vec![],
        }
    }

    /// Adyen's settlement details report.
    pub fn adyen() -> Self {
        CsvMapping {
            delimiter: ',',
            encoding: None,
            decimal: '.',
            thousands: None,
            date_format: iso_date(),
            datetime_format: iso_datetime(),
            sign: Sign::AsIs,
            batch_id: cols(&["Batch Number"]),
            payment_reference: cols(&["Merchant Reference", "Psp Reference"]),
            merchant_id: cols(&["Merchant Account"]),
            fixed_merchant_id: None,
            currency: cols(&["Net Currency"]),
            settlement_date: cols(&["Booking Date", "Creation Date"]),
            event_time: cols(&["Creation Date"]),
            gross: vec![],
            fee: cols(&[
                "Commission (NC)",
                "Markup (NC)",
                "Scheme Fees (NC)",
                "Interchange (NC)",
            ]),
            net: cols(&["Net Credit (NC)", "-Net Debit (NC)"]),
            type_column: Some("Type".into()),
            skip_types: vec![],
            payout_types: cols(&["MerchantPayout"]),
        }
    }
}

/// A column list resolved against the header: (index, subtract).
type Resolved = Vec<(usize, bool)>;

struct Columns {
    batch_id: Resolved,
    payment_reference: Resolved,
    merchant_id: Resolved,
    currency: Resolved,
    settlement_date: Resolved,
    event_time: Resolved,
    gross: Resolved,
    fee: Resolved,
    net: Resolved,
    kind: Option<usize>,
    width: usize,
}

fn resolve(
    header: &HashMap<String, usize>,
    names: &[String],
    what: &str,
    required: bool,
) -> Result<Resolved, Rejection> {
    let mut out = Vec::new();
    for name in names {
        let (subtract, bare) = match name.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, name.as_str()),
        };
        if let Some(&i) = header.get(bare) {
            out.push((i, subtract));
        }
    }
    if required && out.is_empty() {
        return Err(Rejection::new(
            "line 1",
            format!("the header has no column for {what} (expected one of {names:?})"),
        ));
    }
    Ok(out)
}

/// Reads a CSV report and feeds a settlement line per row to `sink`.
pub fn parse(
    format: Format,
    input: &mut dyn Read,
    options: &ParseOptions,
    sink: Sink<'_>,
) -> Result<StatementInfo, Rejection> {
    let mapping = match format {
        Format::Stripe => CsvMapping::stripe(),
        Format::Adyen => CsvMapping::adyen(),
        _ => options.csv.clone().ok_or_else(|| {
            Rejection::new(
                "file",
                "the csv format needs a mapping (--mapping FILE.toml)",
            )
        })?,
    };
    let encoding = match &mapping.encoding {
        None => None,
        Some(label) => Some(
            encoding_rs::Encoding::for_label(label.as_bytes())
                .ok_or_else(|| Rejection::new("mapping", format!("unknown encoding {label:?}")))?,
        ),
    };
    if !mapping.delimiter.is_ascii() {
        return Err(Rejection::new(
            "mapping",
            "the delimiter must be one ASCII character",
        ));
    }
    let guarded = Guard::new(decode_text(input, encoding), options.max_line, b"\n");
    let mut reader = ::csv::ReaderBuilder::new()
        .delimiter(mapping.delimiter as u8)
        .has_headers(false)
        .flexible(true)
        .from_reader(guarded);
    let mut record = ByteRecord::new();
    let read = |reader: &mut ::csv::Reader<_>, record: &mut ByteRecord, line: u64| {
        reader.read_byte_record(record).map_err(|e| {
            let at = e.position().map(|p| p.line()).unwrap_or(line);
            Rejection::new(format!("line {at}"), csv_error(&e))
        })
    };
    if !read(&mut reader, &mut record, 1)? {
        return Err(Rejection::new("file", "the file is empty"));
    }
    let mut header = HashMap::new();
    for (i, cell) in record.iter().enumerate() {
        let name = std::str::from_utf8(cell)
            .map_err(|_| Rejection::new("line 1", "the header is not valid UTF-8"))?;
        header.insert(name.trim().trim_start_matches('\u{feff}').to_owned(), i);
    }
    let amounts = [&mapping.gross, &mapping.fee, &mapping.net]
        .iter()
        .filter(|c| !c.is_empty())
        .count();
    if amounts < 2 {
        return Err(Rejection::new(
            "mapping",
            "two of gross, fee and net must be mapped",
        ));
    }
    let mut columns = Columns {
        batch_id: resolve(&header, &mapping.batch_id, "the batch id", true)?,
        payment_reference: resolve(
            &header,
            &mapping.payment_reference,
            "the payment reference",
            true,
        )?,
        merchant_id: resolve(
            &header,
            &mapping.merchant_id,
            "the merchant",
            mapping.fixed_merchant_id.is_none() && options.merchant_id.is_none(),
        )?,
        currency: resolve(&header, &mapping.currency, "the currency", true)?,
        settlement_date: resolve(
            &header,
            &mapping.settlement_date,
            "the settlement date",
            true,
        )?,
        event_time: resolve(&header, &mapping.event_time, "the event time", false)?,
        gross: resolve(&header, &mapping.gross, "gross", !mapping.gross.is_empty())?,
        fee: resolve(&header, &mapping.fee, "fee", !mapping.fee.is_empty())?,
        net: resolve(&header, &mapping.net, "net", !mapping.net.is_empty())?,
        kind: match &mapping.type_column {
            Some(name) => Some(*header.get(name.as_str()).ok_or_else(|| {
                Rejection::new("line 1", format!("the header has no column {name:?}"))
            })?),
            None => None,
        },
        width: 0,
    };
    columns.width = [
        &columns.batch_id,
        &columns.payment_reference,
        &columns.merchant_id,
        &columns.currency,
        &columns.settlement_date,
        &columns.event_time,
        &columns.gross,
        &columns.fee,
        &columns.net,
    ]
    .iter()
    .flat_map(|r| r.iter().map(|(i, _)| *i))
    .chain(columns.kind)
    .max()
    .unwrap_or(0)
        + 1;
    let fixed_merchant = mapping
        .fixed_merchant_id
        .clone()
        .or_else(|| options.merchant_id.clone());

    let mut emitter = Emitter::new(sink);
    let mut info = StatementInfo::default();
    let mut batches: HashMap<String, (Decimal, Option<Decimal>, String)> = HashMap::new();
    let mut merchants: Option<Option<String>> = None;
    let mut currencies: Option<Option<Currency>> = None;
    let mut line = 1u64;
    while read(&mut reader, &mut record, line + 1)? {
        line = record.position().map(|p| p.line()).unwrap_or(line + 1);
        let at = format!("line {line}");
        if record.iter().all(|c| c.iter().all(u8::is_ascii_whitespace)) {
            continue;
        }
        if record.len() < columns.width {
            return Err(Rejection::new(
                &at,
                format!(
                    "{} fields, fewer than the {} the mapping reads (a truncated line?)",
                    record.len(),
                    columns.width
                ),
            ));
        }
        let mut cells = Vec::with_capacity(record.len());
        for (i, cell) in record.iter().enumerate() {
            cells.push(std::str::from_utf8(cell).map_err(|e| {
                Rejection::new(
                    &at,
                    format!(
                        "field {} is not valid UTF-8 at byte {} (name the file's encoding)",
                        i + 1,
                        e.valid_up_to() + 1
                    ),
                )
            })?);
        }
        let text = |r: &Resolved| {
            r.iter()
                .map(|(i, _)| cells[*i].trim())
                .find(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let kind = columns.kind.map(|i| cells[i].trim());
        if kind.is_some_and(|k| mapping.skip_types.iter().any(|s| s == k)) {
            info.skipped += 1;
            continue;
        }
        let code = text(&columns.currency)
            .ok_or_else(|| Rejection::new(&at, "the currency is empty"))?
            .to_ascii_uppercase();
        let currency = super::currency(&at, &code)?;
        let amount = |r: &Resolved, what: &str| -> Result<Option<Decimal>, Rejection> {
            if r.is_empty() {
                return Ok(None);
            }
            let mut sum = Decimal::ZERO;
            for (i, subtract) in r {
                let cell = cells[*i].trim();
                if cell.is_empty() {
                    continue;
                }
                let v = parse_amount(cell, mapping.decimal, mapping.thousands, Some(currency))
                    .map_err(|e| Rejection::new(&at, format!("{what}: {e}")))?;
                sum += if *subtract { -v } else { v };
            }
            Ok(Some(match mapping.sign {
                Sign::AsIs => sum,
                Sign::Inverted => -sum,
            }))
        };
        let (gross, fee, net) = match (
            amount(&columns.gross, "gross")?,
            amount(&columns.fee, "fee")?,
            amount(&columns.net, "net")?,
        ) {
            (Some(g), Some(f), Some(n)) => (g, f, n),
            (Some(g), Some(f), None) => (g, f, g - f),
            (Some(g), None, Some(n)) => (g, g - n, n),
            (None, Some(f), Some(n)) => (n + f, f, n),
            _ => unreachable!("two amounts are mapped"),
        };
        let batch_id = text(&columns.batch_id).unwrap_or_default();
        if kind.is_some_and(|k| mapping.payout_types.iter().any(|s| s == k)) {
            info.skipped += 1;
            let entry = batches.entry(batch_id).or_default();
            entry.1 = Some(entry.1.unwrap_or_default() + net);
            entry.2 = at;
            continue;
        }
        let date_cell = text(&columns.settlement_date)
            .ok_or_else(|| Rejection::new(&at, "the settlement date is empty"))?;
        let settlement_date = options.check_date(&at, parse_date(&at, &date_cell, &mapping)?)?;
        let event_time = match text(&columns.event_time) {
            Some(cell) => {
                let t = parse_datetime(&at, &cell, &mapping)?;
                options.check_date(&at, t.date_naive())?;
                t
            }
            None => start_of_day(settlement_date),
        };
        let merchant_id = text(&columns.merchant_id)
            .or_else(|| fixed_merchant.clone())
            .unwrap_or_default();
        track(&mut merchants, Some(merchant_id.clone()));
        track(&mut currencies, Some(currency));
        let slot = batches.entry(batch_id.clone()).or_default();
        slot.0 += net;
        if batches.len() > 100_000 {
            return Err(Rejection::new(
                &at,
                "more than 100000 batches in one report",
            ));
        }
        let line = SettlementLine {
            line_id: String::new(),
            batch_id,
            payment_reference: text(&columns.payment_reference).unwrap_or_default(),
            merchant_id,
            gross,
            fee,
            net,
            currency,
            settlement_date,
            event_time,
        };
        emitter.emit(at, Leg::Settlement(line))?;
    }
    // A batch with its payout row must net to it: Σ lines + payout (a debit) = 0.
    let mut sorted: Vec<_> = batches.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (batch, (sum, payout, at)) in &sorted {
        if let Some(payout) = payout
            && *sum + *payout != Decimal::ZERO
        {
            return Err(Rejection::new(
                at.as_str(),
                format!(
                    "batch {batch}: the lines net to {sum} but the payout row pays {}",
                    -*payout
                ),
            ));
        }
    }
    if sorted.len() == 1 {
        info.statement_id = Some(sorted[0].0.clone()).filter(|s| !s.is_empty());
    }
    info.account = merchants.flatten();
    info.currency = currencies.flatten();
    info.total = emitter.total;
    Ok(info)
}

/// Keeps `value` while every row agrees, `None` once they differ.
fn track<T: PartialEq>(slot: &mut Option<Option<T>>, value: Option<T>) {
    match slot {
        None => *slot = Some(value),
        Some(v) if *v != value => *slot = Some(None),
        _ => {}
    }
}

fn csv_error(e: &::csv::Error) -> String {
    match e.kind() {
        ::csv::ErrorKind::Io(io) => format!("cannot read the file: {io}"),
        _ => e.to_string(),
    }
}

fn parse_date(at: &str, cell: &str, m: &CsvMapping) -> Result<NaiveDate, Rejection> {
    NaiveDate::parse_from_str(cell, &m.date_format)
        .or_else(|_| NaiveDateTime::parse_from_str(cell, &m.datetime_format).map(|t| t.date()))
        .or_else(|_| DateTime::parse_from_rfc3339(cell).map(|t| t.date_naive()))
        .map_err(|e| Rejection::new(at, format!("{cell:?} is not a valid date: {e}")))
}

fn parse_datetime(at: &str, cell: &str, m: &CsvMapping) -> Result<DateTime<Utc>, Rejection> {
    NaiveDateTime::parse_from_str(cell, &m.datetime_format)
        .map(|t| t.and_utc())
        .or_else(|_| DateTime::parse_from_rfc3339(cell).map(|t| t.with_timezone(&Utc)))
        .or_else(|_| NaiveDate::parse_from_str(cell, &m.date_format).map(start_of_day))
        .or_else(|_| {
            cell.parse::<i64>()
                .ok()
                .and_then(|s| DateTime::from_timestamp(s, 0))
                .ok_or(())
        })
        .map_err(|_| Rejection::new(at, format!("{cell:?} is not a valid date and time")))
}
