//! PostgreSQL's own statistics for a benchmark stage, as the benchmark prints them (read by
//! `store::pgstats`).

pub use crate::store::pgstats::{StatementTime, TableWrites, reset, table_writes, top_statements};

/// `payment_events 1.00 ins; reconciliation_items 0.45 ins + 0.40 upd (HOT 10%)...` per
/// record.
pub fn describe_writes(writes: &[TableWrites], records: usize) -> String {
    let per = |n: i64| n as f64 / records.max(1) as f64;
    writes
        .iter()
        .map(|w| {
            let mut parts = Vec::new();
            if w.inserted > 0 {
                parts.push(format!("{:.2} ins", per(w.inserted)));
            }
            if w.updated > 0 {
                let hot = 100.0 * w.hot_updated as f64 / w.updated as f64;
                parts.push(format!("{:.2} upd (HOT {hot:.0}%)", per(w.updated)));
            }
            if w.deleted > 0 {
                parts.push(format!("{:.2} del", per(w.deleted)));
            }
            format!("{} {}", w.table, parts.join(" + "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Prints each statement's share of the time of the statements shown.
pub fn print_statements(top: &[StatementTime]) {
    let total_ms: f64 = top.iter().map(|t| t.total_ms).sum();
    for t in top {
        println!(
            "  {:>5.1}% {:>8.1} ms/call {:>6} calls  {}",
            100.0 * t.total_ms / total_ms.max(f64::MIN_POSITIVE),
            t.total_ms / t.calls.max(1) as f64,
            t.calls,
            t.query
        );
    }
}
