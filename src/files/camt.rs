//! ISO 20022 camt.053 (bank-to-customer statement) and camt.054 (debit/credit notification):
//! one bank payout per booked `Ntry`.
//!
//! Read with quick-xml's pull reader, element by element: no DOM, no DTD (a `<!DOCTYPE` rejects
//! the file, so no entity can be defined, let alone expanded; only the five predefined
//! entities and character references are resolved), nesting at most
//! [`ParseOptions::max_depth`] deep, and no run of more than [`ParseOptions::max_line`] bytes
//! without a `>`. Element names are matched by local name, so any `camt.05x.001.NN`
//! namespace (02, 08...) reads the same; `Sts` may be text (v02) or `Sts/Cd` (v08+).

use std::io::{BufReader, Read};

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use rust_decimal::Decimal;

use super::text::Guard;
use super::{
    Emitter, Format, Leg, ParseOptions, Rejection, Sink, StatementInfo, check_balance, decode_text,
    parse_amount, start_of_day,
};
use crate::domain::{BankPayout, Currency};

/// The statement (or notification) being read.
#[derive(Default)]
struct Statement {
    index: usize,
    id: Option<String>,
    sequence: Option<String>,
    created: Option<DateTime<Utc>>,
    account: Option<String>,
    currency: Option<Currency>,
    opening: Option<Decimal>,
    closing: Option<Decimal>,
    booked: Decimal,
    entries: u64,
    /// Σ |Amt| of every entry, for `TxsSummry/TtlNtries/Sum`.
    gross: Decimal,
    summary_count: Option<u64>,
    summary_sum: Option<Decimal>,
}

#[derive(Default)]
struct Balance {
    code: Option<String>,
    amount: Option<(Decimal, Currency)>,
    credit: Option<bool>,
}

#[derive(Default)]
struct NtryState {
    index: usize,
    amount: Option<(Decimal, Currency)>,
    credit: Option<bool>,
    status: Option<String>,
    booking: Option<NaiveDate>,
    value: Option<NaiveDate>,
    reference: Option<String>,
    description: String,
    tx_count: u64,
    tx_sum: Option<Decimal>,
    tx_missing_amount: bool,
    end_to_end: Option<String>,
    creditor_ref: Option<String>,
}

/// Reads a camt.053 or camt.054 document.
pub fn parse(
    format: Format,
    input: &mut dyn Read,
    options: &ParseOptions,
    sink: Sink<'_>,
) -> Result<StatementInfo, Rejection> {
    let guarded = Guard::new(decode_text(input, None), options.max_line, b">\n");
    let mut reader = Reader::from_reader(BufReader::with_capacity(64 * 1024, guarded));
    {
        let config = reader.config_mut();
        config.expand_empty_elements = true;
        config.check_end_names = true;
    }
    let (root, statement_tag) = match format {
        Format::Camt053 => ("BkToCstmrStmt", "Stmt"),
        _ => ("BkToCstmrDbtCdtNtfctn", "Ntfctn"),
    };
    let mut emitter = Emitter::new(sink);
    let mut info = StatementInfo::default();
    let mut ids = Vec::new();
    let mut sequences = Vec::new();
    let mut accounts: Vec<String> = Vec::new();
    let mut currencies: Vec<Currency> = Vec::new();

    let mut buf = Vec::new();
    let mut stack: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut saw_root = false;
    let mut group_created: Option<DateTime<Utc>> = None;
    let mut statements = 0usize;
    let mut stmt: Option<Statement> = None;
    let mut bal: Option<Balance> = None;
    let mut ntry: Option<NtryState> = None;
    let mut ntry_count = 0usize;

    loop {
        buf.clear();
        macro_rules! here {
            () => {
                locate(statement_tag, &stmt, &ntry, &stack)
            };
        }
        let event = reader.read_event_into(&mut buf).map_err(|e| {
            Rejection::new(
                here!(),
                format!("malformed XML at byte {}: {e}", reader.buffer_position()),
            )
        })?;
        match event {
            Event::DocType(_) => {
                return Err(Rejection::new(
                    "document",
                    "a DOCTYPE is refused (bank statements have none; entities are never expanded)",
                ));
            }
            Event::Start(e) => {
                let name = local(&e, &stack)?;
                if stack.len() >= options.max_depth {
                    return Err(Rejection::new(
                        here!(),
                        format!("elements nested deeper than {}", options.max_depth),
                    ));
                }
                text.clear();
                let parent = stack.last().map(String::as_str);
                match (name.as_str(), parent) {
                    ("Document", None) => {}
                    (n, Some("Document")) if n == root => saw_root = true,
                    (n, None) if n == root => saw_root = true,
                    (_, None) => {
                        return Err(Rejection::new(
                            "document",
                            format!("<{name}> is not a {format} document"),
                        ));
                    }
                    (n, Some(p)) if n == statement_tag && p == root => {
                        statements += 1;
                        ntry_count = 0;
                        stmt = Some(Statement {
                            index: statements,
                            ..Default::default()
                        });
                    }
                    ("Bal", Some(p)) if p == statement_tag && stmt.is_some() => {
                        bal = Some(Balance::default())
                    }
                    ("Ntry", Some(p)) if p == statement_tag && stmt.is_some() => {
                        ntry_count += 1;
                        ntry = Some(NtryState {
                            index: ntry_count,
                            ..Default::default()
                        });
                    }
                    ("TxDtls", _) => {
                        if let Some(n) = &mut ntry {
                            n.tx_count += 1;
                        }
                    }
                    ("Amt", _) => {
                        let ccy = attribute(&e, "Ccy")
                            .map_err(|r| Rejection::new(here!() + "/Amt", r))?;
                        stack.push(name);
                        stack.push(format!("@{ccy}"));
                        continue;
                    }
                    _ => {}
                }
                stack.push(name);
            }
            Event::Text(t) => {
                let s = t
                    .decode()
                    .map_err(|_| Rejection::new(here!(), "text is not valid UTF-8"))?;
                append(&mut text, &s, options.max_line, &here!())?;
            }
            Event::CData(t) => {
                let s = std::str::from_utf8(&t)
                    .map_err(|_| Rejection::new(here!(), "text is not valid UTF-8"))?;
                append(&mut text, s, options.max_line, &here!())?;
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => match &*r {
                        b"amp" => "&".into(),
                        b"lt" => "<".into(),
                        b"gt" => ">".into(),
                        b"quot" => "\"".into(),
                        b"apos" => "'".into(),
                        other => {
                            return Err(Rejection::new(
                                here!(),
                                format!(
                                    "entity &{}; is not defined (entities are never expanded)",
                                    String::from_utf8_lossy(other)
                                ),
                            ));
                        }
                    },
                    Err(e) => return Err(Rejection::new(here!(), e.to_string())),
                };
                append(&mut text, &resolved, options.max_line, &here!())?;
            }
            Event::End(_) => {
                let at = here!();
                let mut ccy = None;
                if stack.last().is_some_and(|s| s.starts_with('@')) {
                    ccy = stack.pop().map(|s| s[1..].to_owned());
                }
                let Some(name) = stack.pop() else {
                    return Err(Rejection::new(at, "an end tag without a start"));
                };
                let path = stack.iter().map(String::as_str).collect::<Vec<_>>();
                let value = std::mem::take(&mut text);
                let value = value.trim();
                // Where we are relative to the statement: [.., Stmt, a, b, name].
                let in_stmt = path.iter().rposition(|p| *p == statement_tag);
                let rel: Vec<&str> = match in_stmt {
                    Some(i) => path[i + 1..].to_vec(),
                    None => Vec::new(),
                };
                if name == "CreDtTm" && path.last() == Some(&"GrpHdr") {
                    group_created = Some(parse_datetime(&at, value, options)?);
                }
                if let Some(s) = &mut stmt {
                    let first = rel.first().copied();
                    match (first, rel.len(), name.as_str()) {
                        (None, 0, "Id") => s.id = Some(value.to_owned()),
                        (None, 0, "ElctrncSeqNb") => s.sequence = Some(value.to_owned()),
                        (None, 0, "LglSeqNb") if s.sequence.is_none() => {
                            s.sequence = Some(value.to_owned())
                        }
                        (None, 0, "CreDtTm") => {
                            s.created = Some(parse_datetime(&at, value, options)?)
                        }
                        (Some("Acct"), _, "IBAN") => s.account = Some(value.to_owned()),
                        (Some("Acct"), 3, "Id") if rel[1..] == ["Id", "Othr"] => {
                            s.account = Some(value.to_owned())
                        }
                        (Some("Acct"), 1, "Ccy") => s.currency = Some(super::currency(&at, value)?),
                        (Some("TxsSummry"), 2, "NbOfNtries") if rel[1] == "TtlNtries" => {
                            s.summary_count = Some(value.parse().map_err(|_| {
                                Rejection::new(&at, format!("{value:?} is not a count"))
                            })?)
                        }
                        (Some("TxsSummry"), 2, "Sum") if rel[1] == "TtlNtries" => {
                            s.summary_sum = Some(
                                parse_amount(value, '.', None, None)
                                    .map_err(|e| Rejection::new(&at, e))?,
                            )
                        }
                        _ => {}
                    }
                    if let Some(b) = &mut bal {
                        match name.as_str() {
                            "Cd" if rel.ends_with(&["Tp", "CdOrPrtry"]) => {
                                b.code = Some(value.to_owned())
                            }
                            "Amt" if rel == ["Bal"] => {
                                b.amount = Some(amount(&at, value, ccy.as_deref())?)
                            }
                            "CdtDbtInd" if rel == ["Bal"] => b.credit = Some(credit(&at, value)?),
                            "Dt" | "DtTm" if rel == ["Bal", "Dt"] => {
                                options.check_date(&at, parse_date(&at, value)?)?;
                            }
                            "Bal" => {
                                let b = bal.take().expect("in a balance");
                                let (value, currency) = b.amount.ok_or_else(|| {
                                    Rejection::new(&at, "a balance without an amount")
                                })?;
                                same_currency(&at, &mut s.currency, currency)?;
                                let credit = b.credit.ok_or_else(|| {
                                    Rejection::new(&at, "a balance without CdtDbtInd")
                                })?;
                                let signed = if credit { value } else { -value };
                                match b.code.as_deref() {
                                    Some("OPBD" | "PRCD") => s.opening = Some(signed),
                                    Some("CLBD") => s.closing = Some(signed),
                                    _ => {}
                                }
                            }
                            _ => {}
                        }
                    }
                    if let Some(n) = &mut ntry {
                        let r = &rel[1.min(rel.len())..];
                        match name.as_str() {
                            "Amt" if r.is_empty() => {
                                n.amount = Some(amount(&at, value, ccy.as_deref())?)
                            }
                            "Amt"
                                if r == ["NtryDtls", "TxDtls"]
                                    || r == ["NtryDtls", "TxDtls", "AmtDtls", "TxAmt"] =>
                            {
                                let (v, _) = amount(&at, value, ccy.as_deref())?;
                                n.tx_sum = Some(n.tx_sum.unwrap_or_default() + v);
                            }
                            "CdtDbtInd" if r.is_empty() => n.credit = Some(credit(&at, value)?),
                            "Sts" if r.is_empty() && !value.is_empty() => {
                                n.status = Some(value.to_owned())
                            }
                            "Cd" if r == ["Sts"] => n.status = Some(value.to_owned()),
                            "Dt" | "DtTm" if r == ["BookgDt"] => {
                                n.booking = Some(options.check_date(&at, parse_date(&at, value)?)?)
                            }
                            "Dt" | "DtTm" if r == ["ValDt"] => {
                                n.value = Some(options.check_date(&at, parse_date(&at, value)?)?)
                            }
                            "AcctSvcrRef" if r.is_empty() => n.reference = Some(value.to_owned()),
                            "NtryRef" if r.is_empty() && n.reference.is_none() => {
                                n.reference = Some(value.to_owned())
                            }
                            "AddtlNtryInf" | "Ustrd" => describe(&mut n.description, value),
                            "EndToEndId" if value != "NOTPROVIDED" && !value.is_empty() => {
                                n.end_to_end = Some(value.to_owned())
                            }
                            "Ref" if r.ends_with(&["CdtrRefInf"]) => {
                                n.creditor_ref = Some(value.to_owned())
                            }
                            "TxDtls" if n.tx_sum.is_none() => n.tx_missing_amount = true,
                            _ => {}
                        }
                    }
                    if name == "Ntry" && rel.is_empty() {
                        let n = ntry.take().expect("in an entry");
                        finish_entry(&at, n, s, format, options, &mut emitter, &mut info)?;
                    } else if name == statement_tag && in_stmt.is_none() {
                        let s = stmt.take().expect("in a statement");
                        finish_statement(&at, &s, format)?;
                        ids.push(s.id.clone().unwrap_or_default());
                        sequences.push(s.sequence.clone().unwrap_or_default());
                        if let Some(a) = s.account.clone() {
                            accounts.push(a);
                        }
                        if let Some(c) = s.currency {
                            currencies.push(c);
                        }
                        if statements == 1 {
                            info.opening = s.opening;
                        }
                        info.closing = s.closing;
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(Rejection::new(
            stack.join("/"),
            "the file ends inside this element (truncated?)",
        ));
    }
    if !saw_root {
        return Err(Rejection::new(
            "document",
            format!("no {root} element: not a {format} file"),
        ));
    }
    if format == Format::Camt053 && statements == 0 {
        return Err(Rejection::new(
            "document",
            "no statement (Stmt) in the file",
        ));
    }
    let _ = group_created;
    if ids.iter().all(|i| !i.is_empty()) && !ids.is_empty() {
        info.statement_id = Some(ids.join("+"));
        info.sequence = Some(sequences.join("+")).filter(|s| !s.replace('+', "").is_empty());
    }
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

/// Where the reader is, for a rejection: `Stmt[2]/Ntry[5]/Amt`.
fn locate(
    statement_tag: &str,
    stmt: &Option<Statement>,
    ntry: &Option<NtryState>,
    stack: &[String],
) -> String {
    let mut at = String::new();
    if let Some(s) = stmt {
        at = format!("{statement_tag}[{}]", s.index);
        if let Some(n) = ntry {
            at.push_str(&format!("/Ntry[{}]", n.index));
        }
    }
    if let Some(last) = stack.iter().rev().find(|s| !s.starts_with('@')) {
        if !at.is_empty() {
            at.push('/');
        }
        at.push_str(last);
    }
    if at.is_empty() { "document".into() } else { at }
}

fn local(e: &BytesStart<'_>, stack: &[String]) -> Result<String, Rejection> {
    std::str::from_utf8(e.local_name().as_ref())
        .map(str::to_owned)
        .map_err(|_| Rejection::new(stack.join("/"), "an element name is not valid UTF-8"))
}

fn attribute(e: &BytesStart<'_>, name: &str) -> Result<String, String> {
    match e.try_get_attribute(name) {
        Ok(Some(a)) => a
            .unescape_value()
            .map(|v| v.trim().to_owned())
            .map_err(|e| format!("attribute {name}: {e}")),
        Ok(None) => Err(format!("the attribute {name} is missing")),
        Err(e) => Err(format!("attribute {name}: {e}")),
    }
}

fn append(text: &mut String, s: &str, max: usize, at: &str) -> Result<(), Rejection> {
    if text.len() + s.len() > max {
        return Err(Rejection::new(at, format!("text longer than {max} bytes")));
    }
    text.push_str(s);
    Ok(())
}

/// Free text is kept for people, up to 2000 bytes.
fn describe(description: &mut String, value: &str) {
    if !description.is_empty() && description.len() < 2000 {
        description.push(' ');
    }
    for c in value.chars() {
        if description.len() + c.len_utf8() > 2000 {
            return;
        }
        description.push(c);
    }
}

fn amount(at: &str, value: &str, ccy: Option<&str>) -> Result<(Decimal, Currency), Rejection> {
    let ccy = ccy.ok_or_else(|| Rejection::new(at, "an amount without its Ccy attribute"))?;
    let currency = super::currency(at, ccy)?;
    if value.starts_with('-') || value.starts_with('+') {
        return Err(Rejection::new(
            at,
            format!("{value:?}: camt amounts are unsigned (the sign is CdtDbtInd)"),
        ));
    }
    let v = parse_amount(value, '.', None, Some(currency)).map_err(|e| Rejection::new(at, e))?;
    Ok((v, currency))
}

fn credit(at: &str, value: &str) -> Result<bool, Rejection> {
    match value {
        "CRDT" => Ok(true),
        "DBIT" => Ok(false),
        _ => Err(Rejection::new(
            at,
            format!("CdtDbtInd {value:?} is neither CRDT nor DBIT"),
        )),
    }
}

fn parse_date(at: &str, value: &str) -> Result<NaiveDate, Rejection> {
    let day = value.get(..10).unwrap_or(value);
    NaiveDate::parse_from_str(day, "%Y-%m-%d")
        .map_err(|e| Rejection::new(at, format!("{value:?} is not a valid date: {e}")))
}

fn parse_datetime(
    at: &str,
    value: &str,
    options: &ParseOptions,
) -> Result<DateTime<Utc>, Rejection> {
    let t = DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f").map(|t| t.and_utc())
        })
        .map_err(|e| Rejection::new(at, format!("{value:?} is not a valid date and time: {e}")))?;
    options.check_date(at, t.date_naive())?;
    Ok(t)
}

fn same_currency(at: &str, slot: &mut Option<Currency>, c: Currency) -> Result<(), Rejection> {
    match slot {
        Some(s) if *s != c => Err(Rejection::new(
            at,
            format!(
                "currency {c} in a statement of account currency {s}: one currency per statement"
            ),
        )),
        Some(_) => Ok(()),
        None => {
            *slot = Some(c);
            Ok(())
        }
    }
}

fn finish_entry(
    at: &str,
    n: NtryState,
    s: &mut Statement,
    format: Format,
    options: &ParseOptions,
    emitter: &mut Emitter<'_, '_>,
    info: &mut StatementInfo,
) -> Result<(), Rejection> {
    let (value, currency) = n
        .amount
        .ok_or_else(|| Rejection::new(at, "an entry without an amount (Amt)"))?;
    same_currency(at, &mut s.currency, currency)?;
    let credit = n
        .credit
        .ok_or_else(|| Rejection::new(at, "an entry without CdtDbtInd"))?;
    if let Some(sum) = n.tx_sum
        && !n.tx_missing_amount
        && sum != value
    {
        return Err(Rejection::new(
            at,
            format!("the entry's amount {value} is not the sum {sum} of its transactions"),
        ));
    }
    s.entries += 1;
    s.gross += value;
    let signed = if credit { value } else { -value };
    let status = n.status.as_deref().unwrap_or("BOOK");
    if status != "BOOK" {
        info.skipped += 1;
        return Ok(());
    }
    s.booked += signed;
    let value_date = n
        .value
        .or(n.booking)
        .ok_or_else(|| Rejection::new(at, "an entry without a value or booking date"))?;
    let account_id = s
        .account
        .clone()
        .ok_or_else(|| Rejection::new(at, "an entry before the statement's account (Acct)"))?;
    let batch_reference = if n.tx_count <= 1 {
        n.end_to_end.or(n.creditor_ref)
    } else {
        n.creditor_ref
    };
    let _ = options;
    let payout = BankPayout {
        statement_line_id: String::new(),
        account_id,
        value_date,
        amount: signed,
        currency,
        batch_reference,
        description: n.description.trim().to_owned(),
        event_time: s.created.unwrap_or_else(|| start_of_day(value_date)),
    };
    let _ = format;
    emitter.emit(at.trim_end_matches("/Ntry").to_owned(), Leg::Payout(payout))
}

fn finish_statement(at: &str, s: &Statement, format: Format) -> Result<(), Rejection> {
    if s.account.is_none() {
        return Err(Rejection::new(
            at,
            "the statement names no account (Acct/Id)",
        ));
    }
    if let Some(count) = s.summary_count
        && count != s.entries
    {
        return Err(Rejection::new(
            at,
            format!(
                "TxsSummry/TtlNtries/NbOfNtries says {count} entries, the statement has {}",
                s.entries
            ),
        ));
    }
    if let Some(sum) = s.summary_sum
        && sum != s.gross
    {
        return Err(Rejection::new(
            at,
            format!(
                "TxsSummry/TtlNtries/Sum says {sum}, the entries add up to {}",
                s.gross
            ),
        ));
    }
    if format == Format::Camt053 {
        let opening = s.opening.ok_or_else(|| {
            Rejection::new(at, "no opening booked balance (Bal with Cd OPBD or PRCD)")
        })?;
        let closing = s
            .closing
            .ok_or_else(|| Rejection::new(at, "no closing booked balance (Bal with Cd CLBD)"))?;
        check_balance(at, opening, s.booked, closing)?;
    }
    Ok(())
}
