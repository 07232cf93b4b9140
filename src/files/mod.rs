//! Settlement reports and bank statements as files: streaming parsers that turn a PSP CSV
//! report, an ISO 20022 camt.053/camt.054, a SWIFT MT940 or a BAI2 file into the legs payrecon
//! already consumes (settlement lines, bank payouts).
//!
//! This module owns reading and checking a file; it does no I/O beyond the `Read` it is given
//! and never talks to Kafka or PostgreSQL (that is [`import`]). A file is read twice:
//! [`check`] reads it whole and verifies its integrity (balances, control totals, record
//! counts, one account and currency per statement, dates, amount precision) and computes its
//! SHA-256 digest; only a file that passes is read again by [`entries`], which yields its
//! entries with deterministic ids. Memory stays bounded whatever the file size: every reader
//! works record by record, and a line (or, in XML, a run of bytes without a `>`) longer than
//! [`ParseOptions::max_line`] rejects the file instead of being buffered.
//!
//! ## Layout
//! - [`csv`] - PSP settlement CSV (presets `stripe`, `adyen`, and a generic mapping).
//! - [`camt`] - ISO 20022 camt.053 and camt.054 (quick-xml pull reader, DTDs refused).
//! - [`mt940`] - SWIFT MT940.
//! - [`bai2`] - BAI2.
//! - [`import`] - the import registry and the producer that puts entries on the topics.
//! - [`inbox`] - the `payrecon import` command and the watched inbox.
//! - [`synthetic`] - files of any size generated while read (bench, tests).

pub mod bai2;
pub mod camt;
pub mod csv;
pub mod import;
pub mod inbox;
pub mod mt940;
pub mod synthetic;
mod text;
pub mod write;

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use crate::domain::{BankPayout, Currency, SettlementLine};

pub use text::{LineReader, decode_text};

/// A file format payrecon reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Stripe-style payout reconciliation / balance transactions export.
    Stripe,
    /// Adyen-style settlement details report.
    Adyen,
    /// A CSV settlement report read with a mapping of its own ([`csv::CsvMapping`]).
    Csv,
    Camt053,
    Camt054,
    Mt940,
    Bai2,
}

impl Format {
    pub fn as_str(&self) -> &'static str {
        match self {
            Format::Stripe => "stripe",
            Format::Adyen => "adyen",
            Format::Csv => "csv",
            Format::Camt053 => "camt053",
            Format::Camt054 => "camt054",
            Format::Mt940 => "mt940",
            Format::Bai2 => "bai2",
        }
    }

    pub const ALL: [Format; 7] = [
        Format::Stripe,
        Format::Adyen,
        Format::Csv,
        Format::Camt053,
        Format::Camt054,
        Format::Mt940,
        Format::Bai2,
    ];

    /// Tells the format from the first bytes of a file (after any byte-order mark), or
    /// `None` when they say nothing recognisable (a generic CSV must be named).
    pub fn detect(head: &[u8]) -> Option<Format> {
        let head = String::from_utf8_lossy(head);
        let text = head.trim_start_matches('\u{feff}').trim_start();
        if text.starts_with('<') {
            if text.contains("camt.054") || text.contains("BkToCstmrDbtCdtNtfctn") {
                return Some(Format::Camt054);
            }
            if text.contains("camt.053") || text.contains("BkToCstmrStmt") {
                return Some(Format::Camt053);
            }
            return None;
        }
        if text.starts_with("01,") {
            return Some(Format::Bai2);
        }
        if text.starts_with(":20:") || text.starts_with("{1:") {
            return Some(Format::Mt940);
        }
        let first_line = text.lines().next().unwrap_or("");
        if first_line.contains("balance_transaction_id") {
            return Some(Format::Stripe);
        }
        if first_line.contains("Psp Reference") && first_line.contains("Merchant Account") {
            return Some(Format::Adyen);
        }
        None
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown format {s:?} (auto, stripe, adyen, csv, camt053, camt054, mt940, bai2)"
                )
            })
    }
}

/// Why a file is refused, and where: the whole file is rejected, nothing of it applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {reason}")]
pub struct Rejection {
    /// `line 12`, `Stmt[1]/Ntry[3]/Amt`, `file`...
    pub location: String,
    pub reason: String,
}

impl Rejection {
    pub fn new(location: impl Into<String>, reason: impl Into<String>) -> Self {
        Rejection {
            location: location.into(),
            reason: reason.into(),
        }
    }

    /// For I/O errors of the file's reader (including the guards' limits).
    pub fn io(location: impl Into<String>, e: &io::Error) -> Self {
        Rejection::new(location, format!("cannot read the file: {e}"))
    }
}

/// What a file's header and trailers say about it, gathered by the integrity pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatementInfo {
    /// The statement's own id (camt `Stmt/Id`, MT940 `:20:`, BAI2 file id, Stripe payout id,
    /// Adyen batch number); several statements in one file are joined with `+`.
    pub statement_id: Option<String>,
    /// Its sequence number (camt `ElctrncSeqNb`/`LglSeqNb`, MT940 `:28C:`, BAI2 file id).
    pub sequence: Option<String>,
    /// The account (IBAN, account number, merchant account).
    pub account: Option<String>,
    pub currency: Option<Currency>,
    pub opening: Option<Decimal>,
    pub closing: Option<Decimal>,
    /// Entries the file yields (settlement lines or payouts).
    pub entries: u64,
    /// Entries read but not yielded (pending camt entries, Adyen payout rows...).
    pub skipped: u64,
    /// Σ of the yielded entries' amounts (net for settlement lines).
    pub total: Decimal,
}

/// One leg a file entry becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum Leg {
    Settlement(SettlementLine),
    Payout(BankPayout),
}

impl Leg {
    fn set_id(&mut self, id: String) {
        match self {
            Leg::Settlement(s) => s.line_id = id,
            Leg::Payout(p) => p.statement_line_id = id,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Leg::Settlement(s) => &s.line_id,
            Leg::Payout(p) => &p.statement_line_id,
        }
    }

    fn amount(&self) -> Decimal {
        match self {
            Leg::Settlement(s) => s.net,
            Leg::Payout(p) => p.amount,
        }
    }
}

/// One entry of a file, where it was found, and the leg it becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// 0-based position among the file's yielded entries; with the statement identity it
    /// makes the leg's id.
    pub index: u64,
    /// Where in the file: `line 12`, `Stmt[1]/Ntry[3]`.
    pub location: String,
    pub leg: Leg,
}

/// Limits and choices of a parse.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// Earliest and latest date a file may carry (inclusive); anything else is a typo or an
    /// attack (year 9999).
    pub dates: (NaiveDate, NaiveDate),
    /// Longest line (or XML run without `>`) accepted, in bytes.
    pub max_line: usize,
    /// Deepest XML nesting accepted.
    pub max_depth: usize,
    /// The mapping for [`Format::Csv`] (ignored by the presets and the bank formats).
    pub csv: Option<csv::CsvMapping>,
    /// The merchant a Stripe report belongs to when it has no `connected_account` column.
    pub merchant_id: Option<String>,
}

impl Default for ParseOptions {
    fn default() -> Self {
        let today = Utc::now().date_naive();
        ParseOptions {
            dates: (
                NaiveDate::from_ymd_opt(2000, 1, 1).expect("valid date"),
                today + chrono::Days::new(366),
            ),
            max_line: 64 * 1024,
            max_depth: 32,
            csv: None,
            merchant_id: None,
        }
    }
}

impl ParseOptions {
    /// Checks that `date` is within [`ParseOptions::dates`].
    pub fn check_date(&self, location: &str, date: NaiveDate) -> Result<NaiveDate, Rejection> {
        if date < self.dates.0 || date > self.dates.1 {
            return Err(Rejection::new(
                location,
                format!(
                    "date {date} is outside the plausible range {} to {}",
                    self.dates.0, self.dates.1
                ),
            ));
        }
        Ok(date)
    }
}

/// Receives entries from a parser. Returning an error stops the parse.
pub type Sink<'a> = &'a mut dyn FnMut(Entry) -> Result<(), Rejection>;

/// Parses `input` (already decoded to UTF-8 where the format needs it) in `format`, feeding
/// each entry to `sink` (ids still empty), and returns what the file says about itself once
/// every integrity check of the format has passed.
pub fn parse(
    format: Format,
    input: &mut dyn Read,
    options: &ParseOptions,
    sink: Sink<'_>,
) -> Result<StatementInfo, Rejection> {
    match format {
        Format::Stripe | Format::Adyen | Format::Csv => csv::parse(format, input, options, sink),
        Format::Camt053 | Format::Camt054 => camt::parse(format, input, options, sink),
        Format::Mt940 => mt940::parse(input, options, sink),
        Format::Bai2 => bai2::parse(input, options, sink),
    }
}

/// A file that passed the integrity pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub format: Format,
    /// SHA-256 of the file's bytes, lower-case hex.
    pub digest: String,
    pub bytes: u64,
    pub info: StatementInfo,
    /// The prefix of every entry id: derived from the statement identity when the file has
    /// one, else from the digest, so the same statement always gives the same ids.
    pub id_prefix: String,
}

/// Something that can be opened more than once (a path; in tests, bytes or a generator).
pub trait Source {
    fn open(&self) -> io::Result<Box<dyn Read + Send>>;
}

impl Source for std::path::Path {
    fn open(&self) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(std::fs::File::open(self)?))
    }
}

impl Source for std::path::PathBuf {
    fn open(&self) -> io::Result<Box<dyn Read + Send>> {
        self.as_path().open()
    }
}

impl Source for Vec<u8> {
    fn open(&self) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(io::Cursor::new(self.clone())))
    }
}

/// Counts and hashes what passes through.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Reads the first bytes of a source to tell its format.
pub fn detect(source: &dyn Source) -> Result<Format, Rejection> {
    let mut head = Vec::with_capacity(4096);
    source
        .open()
        .and_then(|r| r.take(4096).read_to_end(&mut head))
        .map_err(|e| Rejection::io("file", &e))?;
    if head.is_empty() {
        return Err(Rejection::new("file", "the file is empty"));
    }
    // UTF-16 files are sniffed after decoding their first bytes.
    let decoded = if head.starts_with(&[0xff, 0xfe]) || head.starts_with(&[0xfe, 0xff]) {
        let mut out = Vec::new();
        let _ = decode_text(io::Cursor::new(&head), None).read_to_end(&mut out);
        out
    } else {
        head
    };
    Format::detect(&decoded).ok_or_else(|| {
        Rejection::new(
            "file",
            "cannot tell the format from the first bytes; name it with --format",
        )
    })
}

/// Pass 1: reads the whole file, checks its integrity, computes its digest and the entry id
/// prefix. Nothing is emitted.
pub fn check(
    source: &dyn Source,
    format: Format,
    options: &ParseOptions,
) -> Result<Checked, Rejection> {
    let reader = source.open().map_err(|e| Rejection::io("file", &e))?;
    let mut hashing = Hashing {
        inner: reader,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let mut entries = 0u64;
    let info = {
        let mut sink = |_: Entry| {
            entries += 1;
            Ok(())
        };
        parse(format, &mut hashing, options, &mut sink)?
    };
    // Drain what the parser did not need (trailing bytes still belong to the digest).
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| Rejection::io("file", &e))?;
    if hashing.bytes == 0 {
        return Err(Rejection::new("file", "the file is empty"));
    }
    if entries == 0 && info.skipped == 0 && format != Format::Camt053 && format != Format::Mt940 {
        return Err(Rejection::new("file", "the file holds no entries"));
    }
    let digest = hex(&hashing.hasher.finalize());
    let identity = match &info.statement_id {
        Some(id) => format!(
            "{}|{}|{}|{}",
            format.as_str(),
            info.account.as_deref().unwrap_or(""),
            id,
            info.sequence.as_deref().unwrap_or("")
        ),
        None => format!("digest|{digest}"),
    };
    let id_prefix = format!("file-{}", &hex(&Sha256::digest(identity.as_bytes()))[..20]);
    Ok(Checked {
        format,
        digest,
        bytes: hashing.bytes,
        info: StatementInfo { entries, ..info },
        id_prefix,
    })
}

/// Pass 2: reads the file again and hands each entry, id set, to `sink`. Call only with a
/// [`Checked`] from [`check`] of the same source.
pub fn entries(
    source: &dyn Source,
    checked: &Checked,
    options: &ParseOptions,
    sink: Sink<'_>,
) -> Result<(), Rejection> {
    let mut reader = source.open().map_err(|e| Rejection::io("file", &e))?;
    let mut hashing = Hashing {
        inner: &mut reader,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let mut with_id = |mut e: Entry| {
        e.leg.set_id(entry_id(&checked.id_prefix, e.index));
        sink(e)
    };
    parse(checked.format, &mut hashing, options, &mut with_id)?;
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| Rejection::io("file", &e))?;
    // The file changed between the two passes: whatever was emitted carries ids of the first
    // version's statement; the caller must not mark the import done.
    if hex(&hashing.hasher.finalize()) != checked.digest {
        return Err(Rejection::new(
            "file",
            "the file changed while it was imported",
        ));
    }
    Ok(())
}

/// The id of the `index`th entry of a statement.
pub fn entry_id(prefix: &str, index: u64) -> String {
    format!("{prefix}-{index}")
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses a decimal amount written with `decimal` as separator, allowing `thousands` as a
/// group separator (groups of three) only when given, and at most the currency's decimals.
pub fn parse_amount(
    text: &str,
    decimal: char,
    thousands: Option<char>,
    currency: Option<Currency>,
) -> Result<Decimal, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("the amount is empty".into());
    }
    let (negative, body) = match t.as_bytes()[0] {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (int, frac) = match body.split_once(decimal) {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    let mut digits = String::with_capacity(body.len());
    match thousands {
        Some(sep) if int.contains(sep) => {
            let groups: Vec<&str> = int.split(sep).collect();
            let ok = !groups[0].is_empty()
                && groups[0].len() <= 3
                && groups[1..].iter().all(|g| g.len() == 3);
            if !ok {
                return Err(format!("{t:?}: misplaced thousands separator"));
            }
            groups.iter().for_each(|g| digits.push_str(g));
        }
        _ => digits.push_str(int),
    }
    if digits.is_empty() && frac.is_none_or(str::is_empty) {
        return Err(format!("{t:?} is not an amount"));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(
            if thousands.is_none() && (int.contains(',') || int.contains('.')) {
                format!("{t:?}: thousands separators are not allowed here")
            } else {
                format!("{t:?} is not an amount")
            },
        );
    }
    let frac = frac.unwrap_or("");
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{t:?} is not an amount"));
    }
    if let Some(c) = currency {
        let significant = frac.trim_end_matches('0').len() as u32;
        if significant > c.minor_units() {
            return Err(format!(
                "{t:?} has more decimals than {} allows ({})",
                c.code(),
                c.minor_units()
            ));
        }
    }
    if digits.len() + frac.len() > 24 {
        return Err(format!("{t:?} has too many digits"));
    }
    let mut value: Decimal = format!(
        "{}.{}",
        if digits.is_empty() { "0" } else { &digits },
        if frac.is_empty() { "0" } else { frac }
    )
    .parse()
    .map_err(|e| format!("{t:?}: {e}"))?;
    if negative {
        value = -value;
    }
    // Written with fewer decimals than the currency has ("100,"): shown at its full scale.
    if let Some(c) = currency
        && value.scale() < c.minor_units()
    {
        value.rescale(c.minor_units());
    }
    Ok(value)
}

/// Parses an ISO 4217 code into a payrecon currency, naming the location when unknown.
pub fn currency(location: &str, code: &str) -> Result<Currency, Rejection> {
    Currency::from_code(code.trim()).map_err(|e| Rejection::new(location, e.to_string()))
}

/// The event time of an entry dated `date` with no time of its own: the start of that day.
pub fn start_of_day(date: NaiveDate) -> DateTime<Utc> {
    date.and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc()
}

/// Checks opening + entries = closing for a statement.
pub(crate) fn check_balance(
    location: &str,
    opening: Decimal,
    entries: Decimal,
    closing: Decimal,
) -> Result<(), Rejection> {
    if opening + entries != closing {
        return Err(Rejection::new(
            location,
            format!(
                "opening balance {opening} + entries {entries} = {} is not the closing balance {closing}",
                opening + entries
            ),
        ));
    }
    Ok(())
}

/// Tracks the next entry index and hands entries to the sink.
pub(crate) struct Emitter<'a, 'b> {
    pub sink: Sink<'a>,
    pub next: u64,
    pub total: Decimal,
    _marker: std::marker::PhantomData<&'b ()>,
}

impl<'a> Emitter<'a, '_> {
    pub fn new(sink: Sink<'a>) -> Self {
        Emitter {
            sink,
            next: 0,
            total: Decimal::ZERO,
            _marker: std::marker::PhantomData,
        }
    }

    pub fn emit(&mut self, location: String, leg: Leg) -> Result<(), Rejection> {
        self.total += leg.amount();
        let index = self.next;
        self.next += 1;
        (self.sink)(Entry {
            index,
            location,
            leg,
        })
    }
}

#[cfg(test)]
mod tests;
