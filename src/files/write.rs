//! Writing settlement lines and bank payouts as the files PSPs and banks deliver: the
//! simulator's settlement and payout faults as files in every format (`payrecon simulate
//! --files DIR`, `payrecon demo --from-files`). What the parsers in this module's siblings
//! read back is what was written, except where a format cannot carry a field:
//! - MT940 and BAI2 carry dates, not times: an entry's event time reads back as its value
//!   date's midnight; an MT940 reference holds at most 16 characters, so a longer batch
//!   reference is written as `NONREF` (it reads back as none).
//! - Entry ids are the importer's (`file-<digest>-<index>`), never the records' own.
//!
//! camt.053 and camt.054 (statement creation time per statement) and the CSV reports
//! (creation time per row) keep every field, so the demo from files stays exact with them.

use std::collections::HashMap;
use std::fmt::Write;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::Format;
use crate::domain::{BankPayout, Currency, SettlementLine};

/// An amount with the currency's minor units, `.` as the decimal mark, no sign.
fn minor(amount: Decimal, currency: Currency) -> String {
    format!("{:.*}", currency.minor_units() as usize, amount.abs())
}

/// A signed amount with the currency's minor units.
fn signed(amount: Decimal, currency: Currency) -> String {
    format!("{:.*}", currency.minor_units() as usize, amount)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A settlement report (`Stripe` or `Adyen`) holding `lines`, in their order.
pub fn settlement_report(format: Format, lines: &[SettlementLine]) -> anyhow::Result<Vec<u8>> {
    let mut w = ::csv::Writer::from_writer(Vec::new());
    match format {
        Format::Stripe => {
            w.write_record([
                "automatic_payout_id",
                "automatic_payout_effective_at",
                "balance_transaction_id",
                "created_utc",
                "available_on_utc",
                "currency",
                "gross",
                "fee",
                "net",
                "reporting_category",
                "source_id",
                "description",
                "connected_account",
            ])?;
            for l in lines {
                let date = l.settlement_date.format("%Y-%m-%d").to_string();
                w.write_record([
                    l.batch_id.as_str(),
                    &date,
                    &l.line_id,
                    &rfc3339(l.event_time),
                    &date,
                    &l.currency.code().to_lowercase(),
                    &signed(l.gross, l.currency),
                    &signed(l.fee, l.currency),
                    &signed(l.net, l.currency),
                    if l.gross < Decimal::ZERO {
                        "refund"
                    } else {
                        "charge"
                    },
                    &l.payment_reference,
                    "",
                    &l.merchant_id,
                ])?;
            }
        }
        Format::Adyen => {
            w.write_record([
                "Company Account",
                "Merchant Account",
                "Psp Reference",
                "Merchant Reference",
                "Payment Method",
                "Creation Date",
                "TimeZone",
                "Booking Date",
                "Type",
                "Net Currency",
                "Net Debit (NC)",
                "Net Credit (NC)",
                "Commission (NC)",
                "Markup (NC)",
                "Scheme Fees (NC)",
                "Interchange (NC)",
                "Batch Number",
            ])?;
            for l in lines {
                let (debit, credit) = if l.net < Decimal::ZERO {
                    (minor(l.net, l.currency), String::new())
                } else {
                    (String::new(), minor(l.net, l.currency))
                };
                w.write_record([
                    "Payrecon",
                    l.merchant_id.as_str(),
                    &l.line_id,
                    &l.payment_reference,
                    "card",
                    &rfc3339(l.event_time),
                    "UTC",
                    &l.settlement_date.format("%Y-%m-%d").to_string(),
                    if l.gross < Decimal::ZERO {
                        "Refunded"
                    } else {
                        "Settled"
                    },
                    l.currency.code(),
                    &debit,
                    &credit,
                    &signed(l.fee, l.currency),
                    "",
                    "",
                    "",
                    &l.batch_id,
                ])?;
            }
        }
        other => anyhow::bail!("{other} is not a settlement report format"),
    }
    Ok(w.into_inner()?)
}

/// Writes bank statements, keeping each account's running balance and statement sequence
/// across the files it writes (so consecutive files chain as a bank's do).
#[derive(Debug, Default)]
pub struct StatementWriter {
    balances: HashMap<(String, Currency), Decimal>,
    sequences: HashMap<String, u64>,
    files: u64,
}

/// One statement: an account's entries in one currency created at one time.
struct Statement<'a> {
    account: &'a str,
    currency: Currency,
    created: DateTime<Utc>,
    entries: Vec<&'a BankPayout>,
}

/// Consecutive payouts of one account, currency and event time form one statement.
fn statements(payouts: &[BankPayout]) -> Vec<Statement<'_>> {
    let mut out: Vec<Statement<'_>> = Vec::new();
    for p in payouts {
        match out.last_mut() {
            Some(s)
                if s.account == p.account_id
                    && s.currency == p.currency
                    && s.created == p.event_time =>
            {
                s.entries.push(p)
            }
            _ => out.push(Statement {
                account: &p.account_id,
                currency: p.currency,
                created: p.event_time,
                entries: vec![p],
            }),
        }
    }
    out
}

fn xml(text: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(text)
}

impl StatementWriter {
    /// A statement file in `format` (camt.053, camt.054, MT940, BAI2) holding `payouts` in
    /// their order; `prefix` names its statements (`<prefix>-<file>-<k>`).
    pub fn file(
        &mut self,
        format: Format,
        prefix: &str,
        payouts: &[BankPayout],
    ) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(!payouts.is_empty(), "a statement file needs an entry");
        self.files += 1;
        let file = self.files;
        let mut s = String::new();
        match format {
            Format::Camt053 | Format::Camt054 => {
                let (ns, root, stmt) = if format == Format::Camt053 {
                    ("camt.053.001.08", "BkToCstmrStmt", "Stmt")
                } else {
                    ("camt.054.001.08", "BkToCstmrDbtCdtNtfctn", "Ntfctn")
                };
                let created = payouts
                    .iter()
                    .map(|p| p.event_time)
                    .max()
                    .expect("non-empty");
                let _ = write!(
                    s,
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Document xmlns=\"urn:iso:std:iso:20022:tech:xsd:{ns}\"><{root}>\
                     <GrpHdr><MsgId>{}-{file}</MsgId><CreDtTm>{}</CreDtTm></GrpHdr>\n",
                    xml(prefix),
                    rfc3339(created)
                );
                for (k, st) in statements(payouts).into_iter().enumerate() {
                    let seq = self.next_sequence(st.account);
                    let _ = writeln!(
                        s,
                        "<{stmt}><Id>{}-{file}-{k}</Id><ElctrncSeqNb>{seq}</ElctrncSeqNb><CreDtTm>{}</CreDtTm>\
                         <Acct><Id><Othr><Id>{}</Id></Othr></Id><Ccy>{}</Ccy></Acct>",
                        xml(prefix),
                        rfc3339(st.created),
                        xml(st.account),
                        st.currency.code()
                    );
                    let key = (st.account.to_owned(), st.currency);
                    let opening = self.balances.get(&key).copied().unwrap_or_default();
                    let closing = opening + st.entries.iter().map(|p| p.amount).sum::<Decimal>();
                    self.balances.insert(key, closing);
                    if format == Format::Camt053 {
                        let date = st.created.date_naive();
                        for (code, amount) in [("OPBD", opening), ("CLBD", closing)] {
                            let _ = writeln!(
                                s,
                                "<Bal><Tp><CdOrPrtry><Cd>{code}</Cd></CdOrPrtry></Tp><Amt Ccy=\"{}\">{}</Amt>\
                                 <CdtDbtInd>{}</CdtDbtInd><Dt><Dt>{date}</Dt></Dt></Bal>",
                                st.currency.code(),
                                minor(amount, st.currency),
                                if amount < Decimal::ZERO {
                                    "DBIT"
                                } else {
                                    "CRDT"
                                }
                            );
                        }
                    }
                    for p in &st.entries {
                        let _ = writeln!(
                            s,
                            "<Ntry><Amt Ccy=\"{}\">{}</Amt><CdtDbtInd>{}</CdtDbtInd><Sts><Cd>BOOK</Cd></Sts>\
                             <BookgDt><Dt>{d}</Dt></BookgDt><ValDt><Dt>{d}</Dt></ValDt>\
                             <AcctSvcrRef>{}</AcctSvcrRef><NtryDtls><TxDtls><Refs><EndToEndId>{}</EndToEndId></Refs></TxDtls></NtryDtls>\
                             <AddtlNtryInf>{}</AddtlNtryInf></Ntry>",
                            p.currency.code(),
                            minor(p.amount, p.currency),
                            if p.amount < Decimal::ZERO {
                                "DBIT"
                            } else {
                                "CRDT"
                            },
                            xml(&p.statement_line_id),
                            xml(p.batch_reference.as_deref().unwrap_or("NOTPROVIDED")),
                            xml(&p.description),
                            d = p.value_date,
                        );
                    }
                    let _ = writeln!(s, "</{stmt}>");
                }
                let _ = writeln!(s, "</{root}></Document>");
            }
            Format::Mt940 => {
                for (k, st) in statements(payouts).into_iter().enumerate() {
                    let seq = self.next_sequence(st.account);
                    let key = (st.account.to_owned(), st.currency);
                    let opening = self.balances.get(&key).copied().unwrap_or_default();
                    let closing = opening + st.entries.iter().map(|p| p.amount).sum::<Decimal>();
                    self.balances.insert(key, closing);
                    let date = st.created.format("%y%m%d");
                    let balance = |b: Decimal| {
                        format!(
                            "{}{date}{}{}",
                            if b < Decimal::ZERO { "D" } else { "C" },
                            st.currency.code(),
                            mt_amount(b, st.currency)
                        )
                    };
                    let _ = write!(
                        s,
                        ":20:{}\r\n:25:{}\r\n:28C:{seq}/1\r\n:60F:{}\r\n",
                        mt_text(&format!("{file}-{k}"), 16),
                        mt_text(st.account, 35),
                        balance(opening)
                    );
                    for p in &st.entries {
                        let reference = p
                            .batch_reference
                            .as_deref()
                            .filter(|r| r.len() <= 16 && mt_text(r, 16) == *r)
                            .unwrap_or("NONREF");
                        let _ = write!(
                            s,
                            ":61:{}{}{}NTRF{reference}\r\n:86:{}\r\n",
                            p.value_date.format("%y%m%d"),
                            if p.amount < Decimal::ZERO { "D" } else { "C" },
                            mt_amount(p.amount, p.currency),
                            mt_text(&p.description, 390)
                        );
                    }
                    let _ = write!(s, ":62F:{}\r\n-\r\n", balance(closing));
                }
            }
            Format::Bai2 => {
                let created = payouts
                    .iter()
                    .map(|p| p.event_time)
                    .max()
                    .expect("non-empty");
                let (date, time) = (created.format("%y%m%d"), created.format("%H%M"));
                let mut records = 0u64;
                let mut file_total = 0i128;
                let mut body = String::new();
                let statements = statements(payouts);
                let groups = statements.len();
                for st in &statements {
                    let cents = |d: Decimal| {
                        (d * Decimal::from(10u64.pow(st.currency.minor_units())))
                            .trunc()
                            .mantissa()
                    };
                    // The group's as-of date is its entries' value date.
                    let _ = writeln!(
                        body,
                        "02,PAYRECON,{},1,{},{},{},2/",
                        bai_text(prefix),
                        st.created.format("%y%m%d"),
                        st.created.format("%H%M"),
                        st.currency.code()
                    );
                    let _ = writeln!(
                        body,
                        "03,{},{},,,,/",
                        bai_text(st.account),
                        st.currency.code()
                    );
                    let mut account_total = 0i128;
                    for p in &st.entries {
                        let code = if p.amount < Decimal::ZERO { 475 } else { 165 };
                        let amount = cents(p.amount.abs());
                        account_total += amount;
                        let _ = writeln!(
                            body,
                            "16,{code},{amount},0,{},{},{}/",
                            bai_text(&p.statement_line_id),
                            bai_text(p.batch_reference.as_deref().unwrap_or("")),
                            bai_text(&p.description)
                        );
                    }
                    let account_records = st.entries.len() as u64 + 2;
                    let _ = writeln!(body, "49,{account_total},{account_records}/");
                    let _ = writeln!(body, "98,{account_total},1,{}/", account_records + 2);
                    records += account_records + 2;
                    file_total += account_total;
                }
                let _ = writeln!(s, "01,PAYRECON,RECEIVER,{date},{time},{file},,,2/");
                s.push_str(&body);
                let _ = writeln!(s, "99,{file_total},{groups},{}/", records + 2);
            }
            other => anyhow::bail!("{other} is not a bank statement format"),
        }
        Ok(s.into_bytes())
    }

    fn next_sequence(&mut self, account: &str) -> u64 {
        let n = self.sequences.entry(account.to_owned()).or_default();
        *n += 1;
        *n
    }
}

/// An MT940 amount: comma as the decimal mark, which is always there (`100,` for 100 JPY).
fn mt_amount(amount: Decimal, currency: Currency) -> String {
    let s = minor(amount, currency).replace('.', ",");
    if s.contains(',') { s } else { s + "," }
}

/// Text in SWIFT's character set (other characters become `.`), at most `max` characters.
fn mt_text(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "/-?:().,'+ ".contains(c) {
                c
            } else {
                '.'
            }
        })
        .take(max)
        .collect()
}

/// A BAI2 field: no commas or slashes (they end fields and records).
fn bai_text(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c == ',' || c == '/' || c.is_control() {
                ' '
            } else {
                c
            }
        })
        .collect()
}
