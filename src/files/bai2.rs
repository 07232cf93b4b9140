//! BAI2 cash-management files: one bank payout per `16` (transaction detail) record.
//!
//! Hand-written, record by record (the `bai2` and `use-bai2` crates are small, young and read
//! a whole file; see docs/files.md). Records are comma-separated and end with `/`; `88`
//! lines continue the record before them. Structure: `01` file header, `02` group header,
//! `03` account identifier and summary, `16` details, `49` account trailer, `98` group
//! trailer, `99` file trailer. Amounts carry implied decimals (the currency's minor units).
//!
//! Integrity: every trailer's control total (49 = Σ amounts of the account's 03 and 16
//! records; 98 = Σ 49; 99 = Σ 98, in minor units as written even across currencies) and record count, the number of accounts and groups, and,
//! when the 03 summary carries them, opening ledger (010) + credits − debits = closing
//! ledger (015).

use std::io::{BufReader, Read};

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::{
    Emitter, Leg, LineReader, ParseOptions, Rejection, Sink, StatementInfo, check_balance,
    start_of_day,
};
use crate::domain::{BankPayout, Currency};

/// A record with its continuations joined, and where it started.
struct Rec {
    line: u64,
    text: String,
    /// Physical lines (the record plus its 88s), for the trailers' counts.
    lines: u64,
}

#[derive(Default)]
struct Group {
    line: u64,
    date: Option<NaiveDate>,
    currency: Option<Currency>,
    total: Decimal,
    accounts: u64,
    records: u64,
}

struct Account {
    line: u64,
    id: String,
    currency: Currency,
    total: Decimal,
    records: u64,
    opening: Option<Decimal>,
    closing: Option<Decimal>,
    net: Decimal,
}

/// Reads a BAI2 file.
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
    let mut pending: Option<Rec> = None;
    let mut header: Option<(String, u64)> = None; // (identity, line)
    let mut file_total = Decimal::ZERO;
    let mut file_groups = 0u64;
    let mut file_records = 0u64;
    let mut group: Option<Group> = None;
    let mut account: Option<Account> = None;
    let mut ended = false;
    let mut accounts: Vec<String> = Vec::new();
    let mut currencies: Vec<Currency> = Vec::new();

    let mut handle = |rec: Rec,
                      emitter: &mut Emitter<'_, '_>,
                      info: &mut StatementInfo|
     -> Result<(), Rejection> {
        let at = format!("line {}", rec.line);
        if ended {
            return Err(Rejection::new(&at, "a record after the file trailer (99)"));
        }
        let body = rec.text.as_str();
        let code = body.get(..2).unwrap_or("");
        file_records += rec.lines;
        if let Some(g) = &mut group {
            g.records += rec.lines;
        }
        if let Some(a) = &mut account {
            a.records += rec.lines;
        }
        let fields = |n: usize| body.splitn(n, ',').map(str::trim).collect::<Vec<_>>();
        match code {
            "01" => {
                if header.is_some() || rec.line != 1 {
                    return Err(Rejection::new(
                        &at,
                        "the file header (01) must come first, once",
                    ));
                }
                let f = fields(9);
                if f.len() < 6 {
                    return Err(Rejection::new(
                        &at,
                        "a file header with fewer than 6 fields",
                    ));
                }
                if f.get(8).is_some_and(|v| *v != "2") {
                    return Err(Rejection::new(
                        &at,
                        format!("version {:?}, expected 2", f[8]),
                    ));
                }
                date(&at, f[3], options)?;
                header = Some((format!("{}/{}/{}", f[1], f[2], f[3]), rec.line));
                info.sequence = Some(f[5].to_owned()).filter(|s| !s.is_empty());
            }
            _ if header.is_none() => {
                return Err(Rejection::new(
                    &at,
                    "the file does not start with a file header (01)",
                ));
            }
            "02" => {
                if group.is_some() {
                    return Err(Rejection::new(&at, "a group header (02) inside a group"));
                }
                let f = fields(9);
                if f.len() < 5 {
                    return Err(Rejection::new(
                        &at,
                        "a group header with fewer than 5 fields",
                    ));
                }
                if f[3] == "4" {
                    return Err(Rejection::new(
                        &at,
                        "a test group (status 4) is not imported",
                    ));
                }
                let currency = match f.get(6).filter(|c| !c.is_empty()) {
                    Some(c) => Some(super::currency(&at, c)?),
                    None => None,
                };
                group = Some(Group {
                    line: rec.line,
                    date: Some(date(&at, f[4], options)?),
                    currency,
                    records: rec.lines,
                    ..Default::default()
                });
                file_groups += 1;
            }
            "03" => {
                let g = group
                    .as_mut()
                    .ok_or_else(|| Rejection::new(&at, "an account (03) outside a group"))?;
                if account.is_some() {
                    return Err(Rejection::new(
                        &at,
                        "an account (03) before the previous one's trailer (49)",
                    ));
                }
                let f: Vec<&str> = body.split(',').map(str::trim).collect();
                if f.len() < 2 || f[1].is_empty() {
                    return Err(Rejection::new(
                        &at,
                        "an account record without an account number",
                    ));
                }
                let currency = match f.get(2).filter(|c| !c.is_empty()) {
                    Some(c) => super::currency(&at, c)?,
                    None => g
                        .currency
                        .unwrap_or(Currency::from_code("USD").expect("known")),
                };
                let mut a = Account {
                    line: rec.line,
                    id: f[1].to_owned(),
                    currency,
                    total: Decimal::ZERO,
                    records: rec.lines,
                    opening: None,
                    closing: None,
                    net: Decimal::ZERO,
                };
                let mut i = 3;
                while i < f.len() && !f[i].is_empty() {
                    let type_code = f[i];
                    let amount = f.get(i + 1).copied().unwrap_or("");
                    let value = if amount.is_empty() {
                        None
                    } else {
                        Some(minor(&at, amount, currency)?)
                    };
                    if let Some(v) = value {
                        a.total += v;
                        match type_code {
                            "010" => a.opening = Some(v),
                            "015" => a.closing = Some(v),
                            _ => {}
                        }
                    }
                    // type, amount, item count, funds type (+ its own fields)
                    i += 3;
                    i += 1 + funds_extra(&at, &f, i)?;
                }
                accounts.push(a.id.clone());
                currencies.push(currency);
                account = Some(a);
            }
            "16" => {
                let g = group
                    .as_ref()
                    .ok_or_else(|| Rejection::new(&at, "a detail (16) outside a group"))?;
                let a = account
                    .as_mut()
                    .ok_or_else(|| Rejection::new(&at, "a detail (16) outside an account"))?;
                let head: Vec<&str> = body.splitn(5, ',').collect();
                if head.len() < 4 {
                    return Err(Rejection::new(
                        &at,
                        "a detail record with fewer than 4 fields",
                    ));
                }
                let type_code: u32 = head[1].trim().parse().map_err(|_| {
                    Rejection::new(&at, format!("{:?} is not a type code", head[1]))
                })?;
                let amount = minor(&at, head[2].trim(), a.currency)?;
                a.total += amount;
                // Funds type and its fields, then bank ref, customer ref, text (the text may
                // hold commas: it runs to the end of the record).
                let mut rest: Vec<&str> = vec![head[3].trim()];
                let mut tail = head.get(4).copied().unwrap_or("");
                let extra = match head[3].trim() {
                    "V" => 2,
                    "S" => 3,
                    "D" => {
                        let (n, t) = tail.split_once(',').unwrap_or((tail, ""));
                        tail = t;
                        let n: usize = n.trim().parse().map_err(|_| {
                            Rejection::new(&at, "a distributed availability (D) without a count")
                        })?;
                        if n > 100 {
                            return Err(Rejection::new(
                                &at,
                                "more than 100 availability distributions",
                            ));
                        }
                        2 * n
                    }
                    _ => 0,
                };
                let mut value_date = g.date.expect("set with the group");
                for k in 0..extra {
                    let (v, t) = tail.split_once(',').unwrap_or((tail, ""));
                    if head[3].trim() == "V" && k == 0 && !v.trim().is_empty() {
                        value_date = date(&at, v.trim(), options)?;
                    }
                    rest.push(v);
                    tail = t;
                }
                let mut parts = tail.splitn(3, ',');
                let _bank_ref = parts.next().unwrap_or("").trim();
                let customer_ref = parts.next().unwrap_or("").trim();
                let text = parts.next().unwrap_or("").trim();
                let signed = match type_code {
                    100..=399 => Some(amount),
                    400..=699 => Some(-amount),
                    _ => None,
                };
                match signed {
                    None => info.skipped += 1,
                    Some(v) => {
                        a.net += v;
                        let payout = BankPayout {
                            statement_line_id: String::new(),
                            account_id: a.id.clone(),
                            value_date,
                            amount: v,
                            currency: a.currency,
                            batch_reference: Some(customer_ref.to_owned())
                                .filter(|s| !s.is_empty()),
                            description: text.chars().take(2000).collect(),
                            event_time: start_of_day(value_date),
                        };
                        emitter.emit(at.clone(), Leg::Payout(payout))?;
                    }
                }
            }
            "49" => {
                let a = account
                    .take()
                    .ok_or_else(|| Rejection::new(&at, "an account trailer (49) without its 03"))?;
                let f = fields(4);
                let total = trailer_amount(&at, f.get(1), a.currency)?;
                if total != a.total {
                    return Err(Rejection::new(
                        &at,
                        format!(
                            "account {} control total {total} is not the sum {} of its amounts",
                            a.id, a.total
                        ),
                    ));
                }
                count(&at, f.get(2), a.records, "account")?;
                if let (Some(o), Some(c)) = (a.opening, a.closing) {
                    check_balance(&format!("line {} (account {})", a.line, a.id), o, a.net, c)?;
                    if info.opening.is_none() {
                        info.opening = Some(o);
                    }
                    info.closing = Some(c);
                }
                let g = group.as_mut().expect("an account is inside a group");
                g.total += a.total;
                g.accounts += 1;
            }
            "98" => {
                if account.is_some() {
                    return Err(Rejection::new(
                        &at,
                        "a group trailer (98) before the account trailer (49)",
                    ));
                }
                let g = group
                    .take()
                    .ok_or_else(|| Rejection::new(&at, "a group trailer (98) without its 02"))?;
                let f = fields(5);
                let currency = g
                    .currency
                    .unwrap_or(Currency::from_code("USD").expect("known"));
                let total = trailer_amount(&at, f.get(1), currency)?;
                if total != g.total {
                    return Err(Rejection::new(
                        &at,
                        format!(
                            "group (line {}) control total {total} is not the sum {} of its accounts",
                            g.line, g.total
                        ),
                    ));
                }
                count(&at, f.get(2), g.accounts, "accounts in the group")?;
                count(&at, f.get(3), g.records, "group")?;
                // The file's control total adds the amounts as written (minor units),
                // whatever the groups' currencies.
                file_total += g.total * Decimal::from(10u64.pow(currency.minor_units()));
            }
            "99" => {
                if group.is_some() {
                    return Err(Rejection::new(&at, "the file trailer (99) inside a group"));
                }
                let f = fields(5);
                // In minor units as written: a currency without decimals reads them so.
                let total =
                    trailer_amount(&at, f.get(1), Currency::from_code("JPY").expect("known"))?;
                if total != file_total {
                    return Err(Rejection::new(
                        &at,
                        format!(
                            "file control total {total} is not the sum {} of its groups (in minor units)",
                            file_total.normalize()
                        ),
                    ));
                }
                count(&at, f.get(2), file_groups, "groups in the file")?;
                count(&at, f.get(3), file_records, "file")?;
                ended = true;
            }
            "88" => {
                return Err(Rejection::new(
                    &at,
                    "a continuation (88) with nothing to continue",
                ));
            }
            other => {
                return Err(Rejection::new(
                    &at,
                    format!("unknown record type {other:?}"),
                ));
            }
        }
        Ok(())
    };

    while let Some((n, line)) = lines.next_line()? {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let body = line.strip_suffix('/').unwrap_or(line);
        if let Some(more) = body.strip_prefix("88,") {
            match &mut pending {
                Some(rec) => {
                    if rec.text.len() + more.len() > options.max_line {
                        return Err(Rejection::new(
                            format!("line {n}"),
                            "a record longer than the line limit",
                        ));
                    }
                    rec.text.push(',');
                    rec.text.push_str(more);
                    rec.lines += 1;
                    continue;
                }
                None => {
                    return Err(Rejection::new(
                        format!("line {n}"),
                        "a continuation (88) with nothing to continue",
                    ));
                }
            }
        }
        if let Some(rec) = pending.take() {
            handle(rec, &mut emitter, &mut info)?;
        }
        pending = Some(Rec {
            line: n,
            text: body.to_owned(),
            lines: 1,
        });
    }
    match pending.take() {
        Some(rec) => handle(rec, &mut emitter, &mut info)?,
        None => return Err(Rejection::new("file", "the file is empty")),
    }
    if !ended {
        return Err(Rejection::new(
            "file",
            "no file trailer (99): the file is truncated",
        ));
    }
    info.statement_id = header.map(|(id, _)| id);
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

/// How many fields follow a funds type at `f[i]` (03 summaries).
fn funds_extra(at: &str, f: &[&str], i: usize) -> Result<usize, Rejection> {
    Ok(match f.get(i).copied().unwrap_or("") {
        "V" => 2,
        "S" => 3,
        "D" => {
            let n: usize = f.get(i + 1).and_then(|n| n.parse().ok()).ok_or_else(|| {
                Rejection::new(at, "a distributed availability (D) without a count")
            })?;
            1 + 2 * n
        }
        _ => 0,
    })
}

/// An amount in minor units (implied decimals), optionally signed.
fn minor(at: &str, text: &str, currency: Currency) -> Result<Decimal, Rejection> {
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::new(
            at,
            format!("{text:?} is not a BAI2 amount (digits in minor units, no decimal point)"),
        ));
    }
    let v: i64 = digits.parse().expect("checked digits");
    let d = Decimal::new(if negative { -v } else { v }, currency.minor_units());
    Ok(d)
}

fn trailer_amount(
    at: &str,
    field: Option<&&str>,
    currency: Currency,
) -> Result<Decimal, Rejection> {
    let text = field.copied().unwrap_or("");
    minor(at, text, currency)
}

fn count(at: &str, field: Option<&&str>, actual: u64, what: &str) -> Result<(), Rejection> {
    let text = field.copied().unwrap_or("").trim();
    let stated: u64 = text
        .parse()
        .map_err(|_| Rejection::new(at, format!("{text:?} is not a record count")))?;
    if stated != actual {
        return Err(Rejection::new(
            at,
            format!("the trailer counts {stated} for the {what}, the file has {actual}"),
        ));
    }
    Ok(())
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
