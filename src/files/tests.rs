//! Parser tests from fixtures written after the published layouts, every integrity failure,
//! and hostile files.

use std::io::{self, Read};

use super::*;

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/files")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn options() -> ParseOptions {
    ParseOptions {
        dates: (
            NaiveDate::from_ymd_opt(2020, 1, 1).unwrap(),
            NaiveDate::from_ymd_opt(2030, 12, 31).unwrap(),
        ),
        ..ParseOptions::default()
    }
}

/// Both passes, as an import runs them.
fn read(
    bytes: Vec<u8>,
    format: Format,
    options: &ParseOptions,
) -> Result<(Checked, Vec<Entry>), Rejection> {
    let checked = check(&bytes, format, options)?;
    let mut out = Vec::new();
    entries(&bytes, &checked, options, &mut |e| {
        out.push(e);
        Ok(())
    })?;
    assert_eq!(out.len() as u64, checked.info.entries);
    Ok((checked, out))
}

fn payouts(entries: &[Entry]) -> Vec<&BankPayout> {
    entries
        .iter()
        .map(|e| match &e.leg {
            Leg::Payout(p) => p,
            other => panic!("not a payout: {other:?}"),
        })
        .collect()
}

fn lines(entries: &[Entry]) -> Vec<&SettlementLine> {
    entries
        .iter()
        .map(|e| match &e.leg {
            Leg::Settlement(s) => s,
            other => panic!("not a settlement line: {other:?}"),
        })
        .collect()
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn rejected(bytes: Vec<u8>, format: Format) -> Rejection {
    rejected_with(bytes, format, &options())
}

fn rejected_with(bytes: Vec<u8>, format: Format, options: &ParseOptions) -> Rejection {
    match read(bytes, format, options) {
        Ok((c, _)) => panic!("accepted: {c:?}"),
        Err(r) => r,
    }
}

fn edit(name: &str, from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8(fixture(name)).unwrap();
    assert!(text.contains(from), "{name} has no {from:?}");
    text.replacen(from, to, 1).into_bytes()
}

fn assert_reason(r: &Rejection, location: &str, reason: &str) {
    assert!(
        r.location.contains(location) && r.reason.contains(reason),
        "expected {location:?} / {reason:?}, got {r}"
    );
}

// ---- formats ------------------------------------------------------------------------------

#[test]
fn the_format_is_told_from_the_first_bytes() {
    for (name, format) in [
        ("camt053.xml", Format::Camt053),
        ("camt054.xml", Format::Camt054),
        ("mt940.sta", Format::Mt940),
        ("bai2.txt", Format::Bai2),
        ("stripe.csv", Format::Stripe),
        ("adyen.csv", Format::Adyen),
    ] {
        assert_eq!(detect(&fixture(name)).unwrap(), format, "{name}");
    }
    assert!(detect(&fixture("generic-latin1.csv")).is_err());
    assert!(detect(&Vec::new()).unwrap_err().reason.contains("empty"));
}

#[test]
fn a_camt053_statement_gives_its_booked_entries_as_payouts() {
    let (checked, entries) = read(fixture("camt053.xml"), Format::Camt053, &options()).unwrap();
    let info = &checked.info;
    assert_eq!(info.statement_id.as_deref(), Some("STMT-20261201"));
    assert_eq!(info.sequence.as_deref(), Some("41"));
    assert_eq!(info.account.as_deref(), Some("DE89370400440532013000"));
    assert_eq!(info.currency.map(|c| c.code()), Some("EUR"));
    assert_eq!(
        (info.opening, info.closing),
        (Some(d("1000.00")), Some(d("1920.50")))
    );
    assert_eq!(
        (info.entries, info.skipped),
        (2, 1),
        "the pending entry is skipped"
    );
    let p = payouts(&entries);
    assert_eq!(p[0].amount, d("970.50"));
    assert_eq!(
        p[0].batch_reference.as_deref(),
        Some("batch-m001-2026-11-30")
    );
    assert_eq!(p[0].description, "PSP payout & fees");
    assert_eq!(
        p[0].value_date,
        NaiveDate::from_ymd_opt(2026, 12, 1).unwrap()
    );
    assert_eq!(p[1].amount, d("-50.00"));
    assert_eq!(p[1].batch_reference, None, "NOTPROVIDED is no reference");
    assert_eq!(entries[1].location, "Stmt[1]/Ntry[2]");
    assert!(p.iter().all(|p| p.validate().is_ok()));
}

#[test]
fn entry_ids_are_the_same_on_every_read_and_differ_between_entries() {
    let (a, ea) = read(fixture("camt053.xml"), Format::Camt053, &options()).unwrap();
    let (b, eb) = read(fixture("camt053.xml"), Format::Camt053, &options()).unwrap();
    assert_eq!(a, b);
    let ids: Vec<_> = ea.iter().map(|e| e.leg.id().to_owned()).collect();
    assert_eq!(
        ids,
        eb.iter().map(|e| e.leg.id().to_owned()).collect::<Vec<_>>()
    );
    assert_ne!(ids[0], ids[1]);
    // The same statement re-sent with other bytes (whitespace) keeps its ids: they come from
    // the statement identity, not the digest.
    let (c, ec) = read(
        edit("camt053.xml", "<Stmt>", "<Stmt>\n"),
        Format::Camt053,
        &options(),
    )
    .unwrap();
    assert_ne!(c.digest, a.digest);
    assert_eq!(ec[0].leg.id(), ids[0]);
}

#[test]
fn a_camt054_notification_reads_v08_status_codes_and_batch_bookings() {
    let (checked, entries) = read(fixture("camt054.xml"), Format::Camt054, &options()).unwrap();
    assert_eq!(checked.info.account.as_deref(), Some("ACC-0042"));
    assert_eq!(checked.info.opening, None);
    let p = payouts(&entries);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].amount, d("250.00"));
    assert_eq!(p[0].currency.code(), "USD");
    assert_eq!(
        p[0].batch_reference, None,
        "a batch booking of two transfers names no one batch"
    );
    assert_eq!(p[0].event_time.to_rfc3339(), "2026-12-01T08:30:00+00:00");
}

#[test]
fn an_mt940_statement_gives_its_61_lines_as_payouts() {
    let (checked, entries) = read(fixture("mt940.sta"), Format::Mt940, &options()).unwrap();
    let info = &checked.info;
    assert_eq!(info.statement_id.as_deref(), Some("STMT20261201"));
    assert_eq!(info.sequence.as_deref(), Some("00041/001"));
    assert_eq!(info.account.as_deref(), Some("DE89370400440532013000"));
    assert_eq!(
        (info.opening, info.closing),
        (Some(d("1000.00")), Some(d("1920.50")))
    );
    let p = payouts(&entries);
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].amount, d("970.50"));
    assert_eq!(p[0].batch_reference.as_deref(), Some("batch-m001"));
    assert!(
        p[0].description.contains("batch-m001-2026-11-30"),
        "{}",
        p[0].description
    );
    assert_eq!(p[1].amount, d("-50"));
    assert_eq!(p[1].batch_reference, None, "NONREF is no reference");
    assert_eq!(entries[1].location, "line 10");
}

#[test]
fn crlf_and_lf_mixed_read_the_same() {
    let crlf = fixture("mt940.sta");
    let text = String::from_utf8(crlf.clone()).unwrap();
    let mixed: String = text
        .split("\r\n")
        .enumerate()
        .map(|(i, l)| {
            if i % 2 == 0 {
                format!("{l}\n")
            } else {
                format!("{l}\r\n")
            }
        })
        .collect();
    let (_, a) = read(crlf, Format::Mt940, &options()).unwrap();
    let (_, b) = read(mixed.into_bytes(), Format::Mt940, &options()).unwrap();
    assert_eq!(payouts(&a), payouts(&b));
}

#[test]
fn a_bai2_file_gives_its_16_records_as_payouts() {
    let (checked, entries) = read(fixture("bai2.txt"), Format::Bai2, &options()).unwrap();
    assert_eq!(
        checked.info.statement_id.as_deref(),
        Some("BANKID/CUSTID/261201")
    );
    assert_eq!(checked.info.sequence.as_deref(), Some("7"));
    let p = payouts(&entries);
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].amount, d("1000.00"));
    assert_eq!(p[0].batch_reference.as_deref(), Some("batch-m001"));
    assert_eq!(p[1].amount, d("-100.00"));
    assert_eq!(
        p[1].description, "Chargeback,taken back",
        "88 continues the text"
    );
}

#[test]
fn a_stripe_report_gives_settlement_lines() {
    let (checked, entries) = read(fixture("stripe.csv"), Format::Stripe, &options()).unwrap();
    assert_eq!(checked.info.statement_id.as_deref(), Some("po_1QxY"));
    let l = lines(&entries);
    assert_eq!(l.len(), 2);
    assert_eq!(
        (l[0].gross, l[0].fee, l[0].net),
        (d("100.00"), d("1.50"), d("98.50"))
    );
    assert_eq!(l[0].currency.code(), "EUR");
    assert_eq!(l[0].payment_reference, "pay-1");
    assert_eq!(l[0].merchant_id, "m001");
    assert_eq!(l[0].batch_id, "po_1QxY");
    assert_eq!(l[1].net, d("-20.00"));
    assert!(l.iter().all(|l| l.validate().is_ok()));
}

#[test]
fn an_adyen_report_gives_settlement_lines_that_net_to_its_payout_row() {
    let (checked, entries) = read(fixture("adyen.csv"), Format::Adyen, &options()).unwrap();
    assert_eq!(checked.info.statement_id.as_deref(), Some("17"));
    assert_eq!(checked.info.skipped, 1, "the payout row");
    let l = lines(&entries);
    assert_eq!(
        (l[0].gross, l[0].fee, l[0].net),
        (d("100.00"), d("1.80"), d("98.20"))
    );
    assert_eq!(
        (l[1].gross, l[1].fee, l[1].net),
        (d("-20.00"), d("0.10"), d("-20.10"))
    );
    assert!(l.iter().all(|l| l.validate().is_ok()));
    let r = rejected(edit("adyen.csv", ",78.10,", ",78.00,"), Format::Adyen);
    assert_reason(
        &r,
        "line 4",
        "the lines net to 78.10 but the payout row pays 78.00",
    );
}

#[test]
fn a_generic_mapping_reads_latin1_semicolons_and_comma_decimals() {
    let mapping =
        csv::CsvMapping::from_toml(&String::from_utf8(fixture("generic-latin1.toml")).unwrap())
            .unwrap();
    let o = ParseOptions {
        csv: Some(mapping.clone()),
        ..options()
    };
    let (_, entries) = read(fixture("generic-latin1.csv"), Format::Csv, &o).unwrap();
    let l = lines(&entries);
    assert_eq!(
        (l[0].gross, l[0].fee, l[0].net),
        (d("1234.50"), d("12.35"), d("1222.15"))
    );
    assert_eq!(l[0].merchant_id, "m001");
    // Read as UTF-8 (no encoding named), the Latin-1 header is refused, not garbled.
    let o = ParseOptions {
        csv: Some(csv::CsvMapping {
            encoding: None,
            ..mapping
        }),
        ..options()
    };
    let r = rejected_with(fixture("generic-latin1.csv"), Format::Csv, &o);
    assert_reason(&r, "line 1", "UTF-8");
}

// ---- integrity ----------------------------------------------------------------------------

#[test]
fn every_integrity_failure_rejects_the_whole_file_naming_where() {
    let cases: Vec<(&str, Format, Vec<u8>, &str, &str)> = vec![
        (
            "camt closing balance",
            Format::Camt053,
            edit("camt053.xml", "1920.50", "1920.51"),
            "Stmt[1]",
            "is not the closing balance 1920.51",
        ),
        (
            "camt no opening balance",
            Format::Camt053,
            edit("camt053.xml", "<Cd>OPBD</Cd>", "<Cd>ITBD</Cd>"),
            "Stmt[1]",
            "no opening booked balance",
        ),
        (
            "camt entry count",
            Format::Camt053,
            edit("camt053.xml", "<NbOfNtries>3<", "<NbOfNtries>4<"),
            "Stmt[1]",
            "NbOfNtries says 4",
        ),
        (
            "camt summary sum",
            Format::Camt053,
            edit("camt053.xml", "<Sum>1120.50<", "<Sum>1120.00<"),
            "Stmt[1]",
            "Sum says 1120.00",
        ),
        (
            "camt entry vs transactions",
            Format::Camt054,
            edit(
                "camt054.xml",
                "<Amt Ccy=\"USD\">50.00",
                "<Amt Ccy=\"USD\">49.00",
            ),
            "Ntfctn[1]/Ntry[1]",
            "not the sum 249.00 of its transactions",
        ),
        (
            "camt two currencies",
            Format::Camt053,
            edit(
                "camt053.xml",
                "<Amt Ccy=\"EUR\">50.00",
                "<Amt Ccy=\"USD\">50.00",
            ),
            "Stmt[1]/Ntry[2]",
            "one currency per statement",
        ),
        (
            "camt too many decimals",
            Format::Camt053,
            edit(
                "camt053.xml",
                "970.50</Amt>\n        <CdtDbtInd>",
                "970.505</Amt>\n        <CdtDbtInd>",
            ),
            "Stmt[1]/Ntry[1]/Amt",
            "more decimals than EUR allows",
        ),
        (
            "camt unknown currency",
            Format::Camt053,
            edit(
                "camt053.xml",
                "<Amt Ccy=\"EUR\">50.00",
                "<Amt Ccy=\"XXY\">50.00",
            ),
            "Ntry[2]",
            "unknown currency",
        ),
        (
            "mt940 closing balance",
            Format::Mt940,
            edit(
                "mt940.sta",
                ":62F:C261201EUR1920,50",
                ":62F:C261201EUR1920,00",
            ),
            "statement STMT20261201",
            "is not the closing balance 1920.00",
        ),
        (
            "mt940 second currency",
            Format::Mt940,
            edit("mt940.sta", ":62F:C261201EUR", ":62F:C261201USD"),
            "line 12 (:62F:)",
            "one currency per statement",
        ),
        (
            "mt940 thousands separator",
            Format::Mt940,
            edit("mt940.sta", "C970,50NTRF", "C1.970,50NTRF"),
            "line 6",
            "thousands separators are not allowed",
        ),
        (
            "bai2 account control total",
            Format::Bai2,
            edit("bai2.txt", "49,400000,5/", "49,400001,5/"),
            "line 7",
            "control total 4000.01",
        ),
        (
            "bai2 account record count",
            Format::Bai2,
            edit("bai2.txt", "49,400000,5/", "49,400000,4/"),
            "line 7",
            "counts 4 for the account, the file has 5",
        ),
        (
            "bai2 group count",
            Format::Bai2,
            edit("bai2.txt", "98,400000,1,7/", "98,400000,2,7/"),
            "line 8",
            "accounts in the group",
        ),
        (
            "bai2 file total",
            Format::Bai2,
            edit("bai2.txt", "99,400000,1,9/", "99,300000,1,9/"),
            "line 9",
            "file control total",
        ),
        (
            "bai2 file record count",
            Format::Bai2,
            edit("bai2.txt", "99,400000,1,9/", "99,400000,1,8/"),
            "line 9",
            "for the file",
        ),
        (
            "bai2 ledger balances",
            Format::Bai2,
            String::from_utf8(edit("bai2.txt", "015,190000,,/", "015,190001,,/"))
                .unwrap()
                .replace("400000", "400001")
                .into_bytes(),
            "account 123456789",
            "is not the closing balance 1900.01",
        ),
        (
            "stripe too many decimals",
            Format::Stripe,
            edit("stripe.csv", "100.00,1.50,98.50", "100.001,1.50,98.501"),
            "line 2",
            "more decimals than EUR allows",
        ),
        (
            "stripe thousands separator",
            Format::Stripe,
            edit(
                "stripe.csv",
                "100.00,1.50,98.50",
                "\"1,100.00\",1.50,\"1,098.50\"",
            ),
            "line 2",
            "thousands separators are not allowed",
        ),
        (
            "stripe missing column",
            Format::Stripe,
            edit("stripe.csv", "automatic_payout_id,", "payout,"),
            "line 1",
            "the batch id",
        ),
        (
            "year 9999",
            Format::Stripe,
            edit(
                "stripe.csv",
                "2026-12-01 00:00:00,txn_1",
                "9999-12-01 00:00:00,txn_1",
            ),
            "line 2",
            "outside the plausible range",
        ),
        (
            "February 30",
            Format::Camt053,
            edit(
                "camt053.xml",
                "<ValDt><Dt>2026-12-01",
                "<ValDt><Dt>2026-02-30",
            ),
            "Stmt[1]/Ntry[1]/Dt",
            "is not a valid date",
        ),
        (
            "mt940 February 30",
            Format::Mt940,
            edit("mt940.sta", ":61:261201", ":61:260230"),
            "line 6",
            "not a valid date",
        ),
    ];
    for (what, format, bytes, location, reason) in cases {
        let r = rejected(bytes, format);
        assert!(
            r.location.contains(location) && r.reason.contains(reason),
            "{what}: expected {location:?} / {reason:?}, got {r}"
        );
    }
}

#[test]
fn entries_never_reach_the_sink_of_a_file_that_fails_its_check() {
    let bytes = edit("camt053.xml", "1920.50", "1920.51");
    assert!(check(&bytes, Format::Camt053, &options()).is_err());
    // The import only calls `entries` with a `Checked`, which a failing file never yields.
}

#[test]
fn a_file_changed_between_the_two_passes_is_refused() {
    let checked = check(&fixture("mt940.sta"), Format::Mt940, &options()).unwrap();
    let other = edit(
        "mt940.sta",
        "Chargeback taken back",
        "Chargeback taken back.",
    );
    let r = entries(&other, &checked, &options(), &mut |_| Ok(())).unwrap_err();
    assert_reason(&r, "file", "changed while it was imported");
}

// ---- hostile files ------------------------------------------------------------------------

/// A source whose reader yields `prefix` and then `fill` without end (a 1 GB line without
/// writing 1 GB anywhere).
struct Endless {
    prefix: Vec<u8>,
    fill: u8,
}

impl Source for Endless {
    fn open(&self) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(
            io::Cursor::new(self.prefix.clone()).chain(io::repeat(self.fill).take(1 << 30)),
        ))
    }
}

#[test]
fn a_gigabyte_line_is_refused_after_the_line_limit_in_every_format() {
    let cases = [
        (Format::Mt940, b":20:STMT\n:86:".to_vec(), b'x'),
        (
            Format::Bai2,
            b"01,A,B,261201,1800,1,,,2/\n16,".to_vec(),
            b'1',
        ),
        (Format::Stripe, fixture("stripe.csv"), b'x'),
        (
            Format::Camt053,
            b"<Document><BkToCstmrStmt><Stmt><Id>".to_vec(),
            b'x',
        ),
        (
            Format::Camt053,
            b"<Document><BkToCstmrStmt><Stmt attr=\"".to_vec(),
            b'x',
        ),
    ];
    for (format, prefix, fill) in cases {
        let source = Endless { prefix, fill };
        let r = check(&source, format, &options()).expect_err("refused");
        assert!(
            r.reason.contains("longer than"),
            "{format}: expected a line-limit rejection, got {r}"
        );
    }
}

#[test]
fn xml_entity_expansion_and_external_entities_are_refused() {
    let laughs = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<Document><BkToCstmrStmt><Stmt><Id>&lol3;</Id></Stmt></BkToCstmrStmt></Document>"#;
    let r = rejected(laughs.as_bytes().to_vec(), Format::Camt053);
    assert_reason(&r, "document", "DOCTYPE is refused");
    let external = r#"<?xml version="1.0"?>
<!DOCTYPE d [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<Document><BkToCstmrStmt><Stmt><Id>&xxe;</Id></Stmt></BkToCstmrStmt></Document>"#;
    let r = rejected(external.as_bytes().to_vec(), Format::Camt053);
    assert_reason(&r, "document", "DOCTYPE is refused");
    // Without a DTD, an entity reference is simply undefined.
    let r = rejected(
        edit("camt053.xml", "<Id>STMT-20261201", "<Id>&xxe;STMT-20261201"),
        Format::Camt053,
    );
    assert_reason(&r, "Stmt[1]/Id", "entity &xxe; is not defined");
}

#[test]
fn deeply_nested_xml_is_refused_at_the_depth_limit() {
    let mut doc = String::from("<Document><BkToCstmrStmt><Stmt>");
    for _ in 0..100_000 {
        doc.push_str("<a>");
    }
    let r = rejected(doc.into_bytes(), Format::Camt053);
    assert_reason(&r, "Stmt[1]", "nested deeper than 32");
}

#[test]
fn invalid_utf8_is_refused_with_its_line() {
    let mut bytes = fixture("mt940.sta");
    let at = bytes.windows(10).position(|w| w == b"Chargeback").unwrap();
    bytes[at] = 0xff;
    let r = rejected(bytes, Format::Mt940);
    assert_reason(&r, "line 11", "not valid UTF-8");
    let mut bytes = fixture("camt053.xml");
    let at = bytes.windows(10).position(|w| w == b"Chargeback").unwrap();
    bytes[at] = 0xc3;
    let r = rejected(bytes, Format::Camt053);
    assert!(
        r.reason.contains("UTF-8") || r.reason.contains("malformed"),
        "{r}"
    );
}

#[test]
fn utf16_with_a_byte_order_mark_reads_like_utf8() {
    let text = String::from_utf8(fixture("camt053.xml")).unwrap();
    let mut utf16 = vec![0xff, 0xfe];
    for unit in text.encode_utf16() {
        utf16.extend_from_slice(&unit.to_le_bytes());
    }
    assert_eq!(detect(&utf16).unwrap(), Format::Camt053);
    let (_, a) = read(fixture("camt053.xml"), Format::Camt053, &options()).unwrap();
    let (_, b) = read(utf16, Format::Camt053, &options()).unwrap();
    assert_eq!(payouts(&a), payouts(&b));
}

#[test]
fn empty_and_truncated_files_are_refused() {
    for format in Format::ALL {
        let o = ParseOptions {
            csv: Some(csv::CsvMapping::stripe()),
            ..options()
        };
        let r = rejected_with(Vec::new(), format, &o);
        assert!(
            r.reason.contains("empty") || r.reason.contains("no "),
            "{format}: {r}"
        );
    }
    let cut = |name: &str, keep: f64| {
        let b = fixture(name);
        b[..(b.len() as f64 * keep) as usize].to_vec()
    };
    let r = rejected(cut("camt053.xml", 0.6), Format::Camt053);
    assert!(
        r.reason.contains("truncated") || r.reason.contains("malformed"),
        "{r}"
    );
    let r = rejected(cut("mt940.sta", 0.8), Format::Mt940);
    assert_reason(&r, "statement STMT20261201", "no closing balance");
    let bai2 = String::from_utf8(fixture("bai2.txt")).unwrap();
    let without_trailer = bai2.trim_end().rsplit_once('\n').unwrap().0.to_owned();
    let r = rejected(without_trailer.into_bytes(), Format::Bai2);
    assert_reason(&r, "file", "no file trailer (99): the file is truncated");
    let r = rejected(cut("bai2.txt", 0.9), Format::Bai2);
    assert_reason(&r, "line ", "");
    let r = rejected(cut("stripe.csv", 0.9), Format::Stripe);
    assert_reason(&r, "line 3", "truncated line");
}

#[test]
fn amounts_parse_strictly() {
    let eur = Currency::from_code("EUR").unwrap();
    let jpy = Currency::from_code("JPY").unwrap();
    assert_eq!(
        parse_amount("1.234,50", ',', Some('.'), Some(eur)),
        Ok(d("1234.5"))
    );
    assert_eq!(parse_amount("100,", ',', None, Some(eur)), Ok(d("100")));
    assert_eq!(parse_amount("-0.10", '.', None, Some(eur)), Ok(d("-0.1")));
    assert_eq!(parse_amount("1.50", '.', None, Some(eur)), Ok(d("1.5")));
    for (text, dec, thousands, c) in [
        ("1,234.50", '.', None, eur),
        ("12,34.50", '.', Some(','), eur),
        ("1.5", '.', None, jpy),
        ("1e5", '.', None, eur),
        ("", '.', None, eur),
        ("--1", '.', None, eur),
        ("NaN", '.', None, eur),
        ("1 000", '.', None, eur),
        ("99999999999999999999999999", '.', None, eur),
    ] {
        assert!(
            parse_amount(text, dec, thousands, Some(c)).is_err(),
            "{text:?}"
        );
    }
}

#[test]
fn synthetic_files_of_every_format_pass_their_checks() {
    for format in [
        Format::Stripe,
        Format::Adyen,
        Format::Camt053,
        Format::Camt054,
        Format::Mt940,
        Format::Bai2,
    ] {
        let source = synthetic::Synthetic {
            format,
            entries: 2500,
        };
        let rate = synthetic::measure(format, 2500).unwrap_or_else(|r| panic!("{format}: {r}"));
        assert_eq!(rate.entries, 2500, "{format}");
        assert_eq!(detect(&source).unwrap(), format);
    }
}

/// What the simulator writes (`files::write`) reads back as written, in every format, and
/// passes the integrity checks (balances, control totals, record counts) across chained files.
#[test]
fn written_files_read_back_as_written_in_every_format() {
    use crate::domain::Currency;
    let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    let eur = Currency::from_code("EUR").unwrap();
    let jpy = Currency::from_code("JPY").unwrap();
    let line = |id: &str, reference: &str, gross: &str, fee: &str, currency| SettlementLine {
        line_id: id.into(),
        batch_id: "batch-7-merchant-001-2026-01-03-EUR".into(),
        payment_reference: reference.into(),
        merchant_id: "merchant-001".into(),
        gross: d(gross),
        fee: d(fee),
        net: d(gross) - d(fee),
        currency,
        settlement_date: NaiveDate::from_ymd_opt(2026, 1, 3).unwrap(),
        event_time: t("2026-01-02T04:00:00.250Z"),
    };
    let written = vec![
        line("l1", "pay-1", "100.00", "1.75", eur),
        line("l2", "pay-2, \"quoted\"", "-20.50", "0.00", eur),
        line("l3", "pay-3", "1500", "23", jpy),
    ];
    for format in [Format::Stripe, Format::Adyen] {
        let bytes = write::settlement_report(format, &written).unwrap();
        assert_eq!(Format::detect(&bytes), Some(format));
        let (_, entries) = read(bytes, format, &options()).unwrap();
        let read_back = lines(&entries);
        assert_eq!(read_back.len(), written.len(), "{format}");
        for (r, w) in read_back.iter().zip(&written) {
            let mut w = w.clone();
            w.line_id = r.line_id.clone();
            assert_eq!(**r, w, "{format}");
        }
    }
    let payout =
        |id: &str, account: &str, amount: &str, currency, reference: Option<&str>, at| BankPayout {
            statement_line_id: id.into(),
            account_id: account.into(),
            value_date: t(at).date_naive(),
            amount: d(amount),
            currency,
            batch_reference: reference.map(str::to_owned),
            description: "payout <batch> & fees".into(),
            event_time: t(at),
        };
    let first = vec![
        payout(
            "s1",
            "acct-1",
            "98.25",
            eur,
            Some("B-SHORT-1"),
            "2026-01-04T06:00:00Z",
        ),
        payout("s2", "acct-1", "-3.10", eur, None, "2026-01-04T06:00:00Z"),
        payout(
            "s3",
            "acct-2",
            "1477",
            jpy,
            Some("B-SHORT-2"),
            "2026-01-04T07:30:00Z",
        ),
    ];
    let second = vec![payout(
        "s4",
        "acct-1",
        "10.00",
        eur,
        Some("B-SHORT-3"),
        "2026-01-05T06:00:00Z",
    )];
    for format in [
        Format::Camt053,
        Format::Camt054,
        Format::Mt940,
        Format::Bai2,
    ] {
        let mut writer = write::StatementWriter::default();
        for batch in [&first, &second] {
            let bytes = writer.file(format, "SIM", batch).unwrap();
            assert_eq!(Format::detect(&bytes), Some(format), "{format}");
            let (_, entries) =
                read(bytes, format, &options()).unwrap_or_else(|r| panic!("{format}: {r}"));
            let read_back = payouts(&entries);
            assert_eq!(read_back.len(), batch.len(), "{format}");
            for (r, w) in read_back.iter().zip(batch.iter()) {
                assert_eq!(r.account_id, w.account_id, "{format}");
                assert_eq!(r.amount, w.amount, "{format}");
                assert_eq!(r.currency, w.currency, "{format}");
                assert_eq!(r.value_date, w.value_date, "{format}");
                assert_eq!(r.batch_reference, w.batch_reference, "{format}");
                match format {
                    // Dates only: the event time is the value date's midnight.
                    Format::Mt940 | Format::Bai2 => {
                        assert_eq!(r.event_time.date_naive(), w.value_date, "{format}")
                    }
                    _ => {
                        assert_eq!(r.event_time, w.event_time, "{format}");
                        assert_eq!(r.description, w.description, "{format}");
                    }
                }
            }
        }
    }
}
