//! Synthetic files of any size, generated while they are read (nothing is written to disk or
//! held in memory): for the import stage of `payrecon bench` (entries per second, peak memory
//! flat in file size) and for tests that need a large valid file.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use super::{Format, ParseOptions, Source};

/// A valid file of `entries` entries in `format`, every entry 1.00 EUR, dated 2026-12-01.
#[derive(Debug, Clone, Copy)]
pub struct Synthetic {
    pub format: Format,
    pub entries: u64,
}

impl Source for Synthetic {
    fn open(&self) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(Generator {
            format: self.format,
            entries: self.entries,
            next: 0,
            stage: 0,
            buf: Vec::new(),
            pos: 0,
        }))
    }
}

struct Generator {
    format: Format,
    entries: u64,
    next: u64,
    stage: u8,
    buf: Vec<u8>,
    pos: usize,
}

impl Generator {
    /// Fills `buf` with the next piece; false at the end.
    fn refill(&mut self) -> bool {
        use std::fmt::Write;
        let mut s = String::new();
        let n = self.entries;
        match self.stage {
            0 => {
                s.push_str(&header(self.format, n));
                self.stage = 1;
            }
            1 => {
                let end = (self.next + 1000).min(n);
                for i in self.next..end {
                    let _ = match self.format {
                        Format::Mt940 => {
                            write!(s, ":61:261201C1,00NTRFNONREF//{i}\r\n:86:entry {i}\r\n")
                        }
                        Format::Bai2 => {
                            writeln!(s, "16,165,100,0,B{i},batch-{},entry {i}/", i % 1000)
                        }
                        Format::Camt053 | Format::Camt054 => writeln!(
                            s,
                            "<Ntry><Amt Ccy=\"EUR\">1.00</Amt><CdtDbtInd>CRDT</CdtDbtInd><Sts>BOOK</Sts>\
                             <BookgDt><Dt>2026-12-01</Dt></BookgDt><ValDt><Dt>2026-12-01</Dt></ValDt>\
                             <AcctSvcrRef>R{i}</AcctSvcrRef><NtryDtls><TxDtls><Refs><EndToEndId>batch-{}</EndToEndId></Refs>\
                             </TxDtls></NtryDtls></Ntry>",
                            i % 1000
                        ),
                        Format::Stripe => writeln!(
                            s,
                            "po_{},2026-12-01 00:00:00,txn_{i},2026-11-30 10:00:00,2026-12-01 00:00:00,eur,1.02,0.02,1.00,charge,pay-{i},entry {i},m001",
                            i % 1000
                        ),
                        Format::Adyen | Format::Csv => writeln!(
                            s,
                            "Acme,m001,{i},pay-{i},visa,2026-12-01 10:00:00,CET,Settled,{i},EUR,,1.02,1,EUR,,1.00,0.02,,,,visa,,{}",
                            i % 1000
                        ),
                    };
                }
                self.next = end;
                if end == n {
                    self.stage = 2;
                }
            }
            2 => {
                s.push_str(&trailer(self.format, n));
                self.stage = 3;
            }
            _ => return false,
        }
        self.buf = s.into_bytes();
        self.pos = 0;
        true
    }
}

fn header(format: Format, n: u64) -> String {
    match format {
        Format::Mt940 => ":20:SYNTH\r\n:25:NL91ABNA0417164300\r\n:28C:1/1\r\n:60F:C261130EUR0,\r\n".into(),
        Format::Bai2 => format!(
            "01,SENDER,RECEIVER,261201,1800,{n},,,2/\n02,RECEIVER,SENDER,1,261201,1800,EUR,2/\n03,NL91ABNA0417164300,EUR,010,0,,,015,{},,/\n",
            n * 100
        ),
        Format::Camt053 | Format::Camt054 => {
            let (root, stmt) = if format == Format::Camt053 {
                ("BkToCstmrStmt", "Stmt")
            } else {
                ("BkToCstmrDbtCdtNtfctn", "Ntfctn")
            };
            let balances = if format == Format::Camt053 {
                format!(
                    "<Bal><Tp><CdOrPrtry><Cd>OPBD</Cd></CdOrPrtry></Tp><Amt Ccy=\"EUR\">0.00</Amt><CdtDbtInd>CRDT</CdtDbtInd><Dt><Dt>2026-12-01</Dt></Dt></Bal>\
                     <Bal><Tp><CdOrPrtry><Cd>CLBD</Cd></CdOrPrtry></Tp><Amt Ccy=\"EUR\">{n}.00</Amt><CdtDbtInd>CRDT</CdtDbtInd><Dt><Dt>2026-12-01</Dt></Dt></Bal>\n"
                )
            } else {
                String::new()
            };
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Document xmlns=\"urn:iso:std:iso:20022:tech:xsd:{}.001.08\"><{root}>\
                 <GrpHdr><MsgId>SYNTH</MsgId><CreDtTm>2026-12-01T18:00:00Z</CreDtTm></GrpHdr>\
                 <{stmt}><Id>SYNTH-1</Id><ElctrncSeqNb>1</ElctrncSeqNb><CreDtTm>2026-12-01T18:00:00Z</CreDtTm>\
                 <Acct><Id><IBAN>NL91ABNA0417164300</IBAN></Id><Ccy>EUR</Ccy></Acct>{balances}",
                if format == Format::Camt053 { "camt.053" } else { "camt.054" }
            )
        }
        Format::Stripe => "automatic_payout_id,automatic_payout_effective_at,balance_transaction_id,created_utc,available_on_utc,currency,gross,fee,net,reporting_category,source_id,description,connected_account\n".into(),
        Format::Adyen | Format::Csv => "Company Account,Merchant Account,Psp Reference,Merchant Reference,Payment Method,Creation Date,TimeZone,Type,Modification Reference,Gross Currency,Gross Debit (GC),Gross Credit (GC),Exchange Rate,Net Currency,Net Debit (NC),Net Credit (NC),Commission (NC),Markup (NC),Scheme Fees (NC),Interchange (NC),Payment Method Variant,Modification Merchant Reference,Batch Number\n".into(),
    }
}

fn trailer(format: Format, n: u64) -> String {
    match format {
        Format::Mt940 => format!(":62F:C261201EUR{n},00\r\n-\r\n"),
        Format::Bai2 => {
            let total = n * 100 * 2;
            format!(
                "49,{total},{}/\n98,{total},1,{}/\n99,{total},1,{}/\n",
                n + 2,
                n + 4,
                n + 6
            )
        }
        Format::Camt053 => "</Stmt></BkToCstmrStmt></Document>\n".into(),
        Format::Camt054 => "</Ntfctn></BkToCstmrDbtCdtNtfctn></Document>\n".into(),
        _ => String::new(),
    }
}

impl Read for Generator {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            if !self.refill() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One parse measurement: both passes over a synthetic file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParseRate {
    pub format: &'static str,
    pub entries: u64,
    pub bytes: u64,
    /// Both passes (integrity, then entries with ids).
    pub elapsed: Duration,
    /// Peak resident memory of the process during the parse (VmHWM after a reset), KiB;
    /// `None` where /proc does not allow the reset.
    pub peak_rss_kib: Option<u64>,
}

impl ParseRate {
    /// Entries per second over both passes.
    pub fn per_second(&self) -> f64 {
        self.entries as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Parses a synthetic file of `entries` entries in `format` (both passes) and measures it.
pub fn measure(format: Format, entries: u64) -> Result<ParseRate, super::Rejection> {
    let source = Synthetic { format, entries };
    let options = ParseOptions {
        csv: Some(super::csv::CsvMapping::adyen()),
        ..ParseOptions::default()
    };
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let started = Instant::now();
    let checked = super::check(&source, format, &options)?;
    let mut count = 0u64;
    super::entries(&source, &checked, &options, &mut |e| {
        count += 1;
        std::hint::black_box(e);
        Ok(())
    })?;
    let elapsed = started.elapsed();
    let peak = reset.then(peak_rss_kib).flatten();
    Ok(ParseRate {
        format: format.as_str(),
        entries: count,
        bytes: checked.bytes,
        elapsed,
        peak_rss_kib: peak,
    })
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The import stage of `payrecon bench`: every format at `entries` and at a tenth of it,
/// printed as it goes. The tenth runs first, so the larger file's peak shows any growth.
pub fn stage(entries: u64) -> anyhow::Result<Vec<ParseRate>> {
    let formats = [
        Format::Stripe,
        Format::Adyen,
        Format::Camt053,
        Format::Camt054,
        Format::Mt940,
        Format::Bai2,
    ];
    println!("import parsers (both passes over a synthetic file, generated while read):");
    let mut out = Vec::new();
    for format in formats {
        for n in [(entries / 10).max(1), entries] {
            let r = measure(format, n).map_err(|e| anyhow::anyhow!("{format}: {e}"))?;
            println!(
                "  {:<8} {:>9} entries {:>8.1} MiB  {:>9.0} entries/s  peak RSS {}",
                format.as_str(),
                r.entries,
                r.bytes as f64 / (1024.0 * 1024.0),
                r.per_second(),
                r.peak_rss_kib
                    .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                    .unwrap_or_else(|| "unknown".into())
            );
            out.push(r);
        }
    }
    Ok(out)
}
