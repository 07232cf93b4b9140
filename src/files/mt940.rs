//! SWIFT MT940 customer statements: one bank payout per `:61:` line.
//!
//! Hand-written, line by line (the `mt940` crate parses a whole `&str` with a pest grammar,
//! so it cannot stream a large file; see docs/files.md). Tags: `:20:` reference, `:25:`
//! account, `:28C:` statement/sequence number, `:60F:`/`:60M:` opening balance, `:61:` entry
//! with an optional `:86:` after it, `:62F:`/`:62M:` closing balance; `:64:`/`:65:` are read
//! and ignored. Messages may be wrapped in `{1:}{2:}{4:` ... `-}` blocks; several messages
//! (statements) may follow each other. Amounts use a comma as decimal separator.

use std::io::{BufReader, Read};

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::{
    Emitter, Leg, LineReader, ParseOptions, Rejection, Sink, StatementInfo, check_balance,
    parse_amount, start_of_day,
};
use crate::domain::{BankPayout, Currency};

#[derive(Default)]
struct Statement {
    line: u64,
    reference: Option<String>,
    account: Option<String>,
    sequence: Option<String>,
    currency: Option<Currency>,
    opening: Option<Decimal>,
    closing: Option<Decimal>,
    sum: Decimal,
    pending: Option<(String, BankPayout)>,
}

/// Reads an MT940 file.
pub fn parse(
    input: &mut dyn Read,
    options: &ParseOptions,
    sink: Sink<'_>,
) -> Result<StatementInfo, Rejection> {
    let mut lines = LineReader::new(
        BufReader::with_capacity(64 * 1024, super::decode_text(input, None)),
        options.max_line,
    );
    let mut emitter = Emitter::new(sink);
    let mut info = StatementInfo::default();
    let mut ids: Vec<String> = Vec::new();
    let mut sequences: Vec<String> = Vec::new();
    let mut accounts: Vec<String> = Vec::new();
    let mut currencies: Vec<Currency> = Vec::new();
    let mut stmt: Option<Statement> = None;
    // The tag being read: (name, first line number, content lines joined with '\n').
    let mut tag: Option<(String, u64, String)> = None;
    let mut statements = 0usize;

    let mut finish_tag = |tag: Option<(String, u64, String)>,
                          stmt: &mut Option<Statement>,
                          emitter: &mut Emitter<'_, '_>|
     -> Result<(), Rejection> {
        let Some((name, line, content)) = tag else {
            return Ok(());
        };
        let at = format!("line {line} (:{name}:)");
        if name == "20" {
            if let Some(done) = stmt.take()
                && let Some(s) = finish(done, emitter)?
            {
                record(s, &mut ids, &mut sequences, &mut accounts, &mut currencies);
            }
            *stmt = Some(Statement {
                line,
                reference: Some(content.trim().to_owned()),
                ..Default::default()
            });
            return Ok(());
        }
        let s = stmt
            .as_mut()
            .ok_or_else(|| Rejection::new(&at, "a tag before the statement's :20:"))?;
        match name.as_str() {
            "21" | "64" | "65" | "13D" | "34F" => {}
            "25" => s.account = Some(content.trim().to_owned()),
            "28C" | "28" => s.sequence = Some(content.trim().to_owned()),
            "60F" | "60M" => {
                let (v, c) = balance(&at, &content, options)?;
                if s.opening.is_some() {
                    return Err(Rejection::new(&at, "a second opening balance"));
                }
                s.currency = Some(c);
                s.opening = Some(v);
            }
            "62F" | "62M" => {
                let (v, c) = balance(&at, &content, options)?;
                same_currency(&at, s.currency, c)?;
                flush(s, emitter)?;
                s.closing = Some(v);
            }
            "61" => {
                flush(s, emitter)?;
                if s.closing.is_some() {
                    return Err(Rejection::new(&at, "an entry after the closing balance"));
                }
                let currency = s.currency.ok_or_else(|| {
                    Rejection::new(&at, "an entry before the opening balance (:60F:)")
                })?;
                let account = s
                    .account
                    .clone()
                    .ok_or_else(|| Rejection::new(&at, "an entry before the account (:25:)"))?;
                let payout = entry(&at, &content, currency, account, options)?;
                s.sum += payout.amount;
                s.pending = Some((format!("line {line}"), payout));
            }
            "86" => {
                if let Some((_, p)) = &mut s.pending {
                    let text = content.replace('\n', " ");
                    if !p.description.is_empty() {
                        p.description.push(' ');
                    }
                    p.description.push_str(&text);
                    truncate(&mut p.description, 2000);
                }
            }
            other => {
                return Err(Rejection::new(&at, format!("unknown tag :{other}:")));
            }
        }
        Ok(())
    };

    while let Some((n, raw)) = lines.next_line()? {
        let mut line = raw;
        // Block wrappers: `{1:...}{2:...}{4:` opens the text block, `-}` closes it.
        if line.starts_with('{') {
            match line.find("{4:") {
                Some(i) => line = &line[i + 3..],
                None => continue,
            }
            if line.is_empty() {
                continue;
            }
        }
        let trimmed = line.trim_end();
        if trimmed == "-}" || trimmed == "-" || trimmed.starts_with("-}{") {
            finish_tag(tag.take(), &mut stmt, &mut emitter)?;
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix(':')
            && let Some(end) = rest.find(':')
            && end <= 3
            && rest[..end].bytes().all(|b| b.is_ascii_alphanumeric())
        {
            finish_tag(tag.take(), &mut stmt, &mut emitter)?;
            let name = rest[..end].to_owned();
            if name == "20" {
                statements += 1;
            }
            tag = Some((name, n, rest[end + 1..].to_owned()));
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        match &mut tag {
            Some((_, _, content)) => {
                if content.len() + trimmed.len() > options.max_line {
                    return Err(Rejection::new(
                        format!("line {n}"),
                        "a field longer than the line limit",
                    ));
                }
                content.push('\n');
                content.push_str(trimmed);
            }
            None => {
                return Err(Rejection::new(
                    format!("line {n}"),
                    "text outside any tag (not an MT940 file?)",
                ));
            }
        }
    }
    finish_tag(tag.take(), &mut stmt, &mut emitter)?;
    if let Some(done) = stmt.take() {
        let s = finish(done, &mut emitter)?;
        if let Some(s) = s {
            ids.push(s.0);
            sequences.push(s.1);
            accounts.push(s.2);
            currencies.push(s.3);
            info.closing = Some(s.5);
            if info.opening.is_none() {
                info.opening = Some(s.4);
            }
        }
    }
    if statements == 0 {
        return Err(Rejection::new("file", "no statement (:20:) in the file"));
    }
    info.statement_id = Some(ids.join("+"));
    info.sequence = Some(sequences.join("+")).filter(|s| !s.replace('+', "").is_empty());
    accounts.dedup();
    if accounts.len() == 1 {
        info.account = accounts.pop();
    }
    currencies.dedup();
    if currencies.len() == 1 {
        info.currency = currencies.pop();
    }
    info.total = emitter.total;
    Ok(info)
}

type Done = (String, String, String, Currency, Decimal, Decimal);

fn record(
    s: Done,
    ids: &mut Vec<String>,
    sequences: &mut Vec<String>,
    accounts: &mut Vec<String>,
    currencies: &mut Vec<Currency>,
) {
    ids.push(s.0);
    sequences.push(s.1);
    accounts.push(s.2);
    currencies.push(s.3);
}

fn flush(s: &mut Statement, emitter: &mut Emitter<'_, '_>) -> Result<(), Rejection> {
    if let Some((at, p)) = s.pending.take() {
        emitter.emit(at, Leg::Payout(p))?;
    }
    Ok(())
}

/// Ends a statement: its entries must take the opening balance to the closing one.
fn finish(mut s: Statement, emitter: &mut Emitter<'_, '_>) -> Result<Option<Done>, Rejection> {
    flush(&mut s, emitter)?;
    let at = format!(
        "line {} (statement {})",
        s.line,
        s.reference.as_deref().unwrap_or("")
    );
    let account = s
        .account
        .ok_or_else(|| Rejection::new(&at, "no account (:25:)"))?;
    let opening = s
        .opening
        .ok_or_else(|| Rejection::new(&at, "no opening balance (:60F:/:60M:)"))?;
    let closing = s
        .closing
        .ok_or_else(|| Rejection::new(&at, "no closing balance (:62F:/:62M:); truncated?"))?;
    check_balance(&at, opening, s.sum, closing)?;
    Ok(Some((
        s.reference.unwrap_or_default(),
        s.sequence.unwrap_or_default(),
        account,
        s.currency.expect("set with the opening balance"),
        opening,
        closing,
    )))
}

fn same_currency(at: &str, expected: Option<Currency>, c: Currency) -> Result<(), Rejection> {
    match expected {
        Some(e) if e != c => Err(Rejection::new(
            at,
            format!("currency {c} in a statement in {e}: one currency per statement"),
        )),
        _ => Ok(()),
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn date(at: &str, yymmdd: &str, options: &ParseOptions) -> Result<NaiveDate, Rejection> {
    let ok = yymmdd.len() == 6 && yymmdd.bytes().all(|b| b.is_ascii_digit());
    let d = ok
        .then(|| {
            NaiveDate::from_ymd_opt(
                2000 + yymmdd[0..2].parse::<i32>().ok()?,
                yymmdd[2..4].parse().ok()?,
                yymmdd[4..6].parse().ok()?,
            )
        })
        .flatten()
        .ok_or_else(|| Rejection::new(at, format!("{yymmdd:?} is not a valid date (YYMMDD)")))?;
    options.check_date(at, d)
}

/// `:60F:`/`:62F:` = `1!a6!n3!a15d`: D|C, YYMMDD, currency, amount.
fn balance(
    at: &str,
    content: &str,
    options: &ParseOptions,
) -> Result<(Decimal, Currency), Rejection> {
    let c = content.trim();
    if c.len() < 11 || !c.is_char_boundary(1) || !c.is_char_boundary(7) || !c.is_char_boundary(10) {
        return Err(Rejection::new(
            at,
            format!("{c:?} is not a balance (D|C YYMMDD CCY amount)"),
        ));
    }
    let sign = match &c[..1] {
        "C" => Decimal::ONE,
        "D" => Decimal::NEGATIVE_ONE,
        other => return Err(Rejection::new(at, format!("{other:?} is neither C nor D"))),
    };
    date(at, &c[1..7], options)?;
    let currency = super::currency(at, &c[7..10])?;
    let amount =
        parse_amount(&c[10..], ',', None, Some(currency)).map_err(|e| Rejection::new(at, e))?;
    if amount.is_sign_negative() {
        return Err(Rejection::new(
            at,
            "a balance amount is unsigned (the sign is D/C)",
        ));
    }
    Ok((sign * amount, currency))
}

/// `:61:` = `6!n[4!n]2a[1!a]15d1!a3!c16x[//16x]` then an optional line of 34x.
fn entry(
    at: &str,
    content: &str,
    currency: Currency,
    account_id: String,
    options: &ParseOptions,
) -> Result<BankPayout, Rejection> {
    let (first, supplementary) = match content.split_once('\n') {
        Some((f, s)) => (f, s.replace('\n', " ")),
        None => (content, String::new()),
    };
    let bad = |what: &str| Rejection::new(at, format!("{what} in {first:?}"));
    if !first.is_ascii() {
        return Err(bad("non-ASCII characters"));
    }
    let b = first.as_bytes();
    if b.len() < 6 {
        return Err(bad("no value date"));
    }
    let value_date = date(at, &first[..6], options)?;
    let mut i = 6;
    if b.len() >= i + 4 && b[i..i + 4].iter().all(u8::is_ascii_digit) {
        i += 4; // entry date MMDD
    }
    let sign = if first[i..].starts_with("RC") || first[i..].starts_with("ED") {
        i += 2;
        Decimal::NEGATIVE_ONE
    } else if first[i..].starts_with("RD") || first[i..].starts_with("EC") {
        i += 2;
        Decimal::ONE
    } else if first[i..].starts_with('C') {
        i += 1;
        Decimal::ONE
    } else if first[i..].starts_with('D') {
        i += 1;
        Decimal::NEGATIVE_ONE
    } else {
        return Err(bad("no debit/credit mark (C, D, RC, RD)"));
    };
    if b.get(i).is_some_and(u8::is_ascii_alphabetic) {
        i += 1; // funds code
    }
    let start = i;
    while b
        .get(i)
        .is_some_and(|c| c.is_ascii_digit() || *c == b',' || *c == b'.')
    {
        i += 1;
    }
    if i == start || i - start > 15 {
        return Err(bad("no amount (15d)"));
    }
    let amount = parse_amount(&first[start..i], ',', None, Some(currency))
        .map_err(|e| Rejection::new(at, e))?;
    if b.len() < i + 4 {
        return Err(bad("no transaction type (e.g. NTRF)"));
    }
    i += 4;
    let rest = &first[i..];
    let (customer, bank) = match rest.split_once("//") {
        Some((c, b)) => (c, Some(b)),
        None => (rest, None),
    };
    let customer = customer.trim();
    if customer.len() > 16 || bank.is_some_and(|b| b.len() > 16) {
        return Err(bad("a reference longer than 16 characters"));
    }
    let batch_reference =
        (!customer.is_empty() && customer != "NONREF").then(|| customer.to_owned());
    Ok(BankPayout {
        statement_line_id: String::new(),
        account_id,
        value_date,
        amount: sign * amount,
        currency,
        batch_reference,
        description: supplementary.trim().to_owned(),
        event_time: start_of_day(value_date),
    })
}
