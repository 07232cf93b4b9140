//! Files in, end to end: `payrecon import` (a child process) produces a file's entries to the
//! input topics, the running service applies them. Importing every file twice, and killing
//! the importer mid-file and running it again, give the same rows, statuses and totals; a
//! second file claiming an imported statement is a conflict; a broken file is quarantined
//! with nothing applied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rust_decimal::Decimal;

use crate::helpers::{Fixture, wait_for};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/files")
        .join(name)
}

fn import(f: &Fixture, args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .arg("import")
        .args(["--by", "test"])
        .args(args)
        .envs(f.service_env())
        .env("RUST_LOG", "warn")
        .output()
        .expect("running payrecon import")
}

/// Every stored row that came from a file, with its amount, and the payout statuses.
async fn snapshot(f: &Fixture) -> (BTreeMap<String, Decimal>, BTreeMap<String, String>) {
    let pool = f.db.store.pool();
    let mut rows: BTreeMap<String, Decimal> = BTreeMap::new();
    let lines: Vec<(String, Decimal)> =
        sqlx::query_as("SELECT line_id, net FROM settlement_lines WHERE line_id LIKE 'file-%'")
            .fetch_all(pool)
            .await
            .unwrap();
    let payouts: Vec<(String, Decimal)> = sqlx::query_as(
        "SELECT statement_line_id, amount FROM bank_payouts WHERE statement_line_id LIKE 'file-%'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.extend(lines);
    rows.extend(payouts);
    let statuses: Vec<(String, String, String)> =
        sqlx::query_as("SELECT kind, key, status FROM payout_items")
            .fetch_all(pool)
            .await
            .unwrap();
    (
        rows,
        statuses
            .into_iter()
            .map(|(k, key, s)| (format!("{k}/{key}"), s))
            .collect(),
    )
}

async fn imports(f: &Fixture) -> BTreeMap<String, (String, i64)> {
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT name, status, entries FROM file_imports")
            .fetch_all(f.db.store.pool())
            .await
            .unwrap();
    rows.into_iter().map(|(n, s, e)| (n, (s, e))).collect()
}

/// An MT940 statement of `n` credits of 1.00 each (opening 0, closing n).
fn big_mt940(path: &Path, n: u64) {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(
        w,
        ":20:BIG1\n:25:NL91ABNA0417164300\n:28C:00007/001\n:60F:C261130EUR0,"
    )
    .unwrap();
    for i in 0..n {
        writeln!(w, ":61:261201C1,00NTRFNONREF//{i}\n:86:credit {i}").unwrap();
    }
    writeln!(w, ":62F:C261201EUR{n},00\n-").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_imported_twice_or_after_a_kill_give_the_same_rows_and_statuses() {
    let f = Fixture::new(2).await;
    let service = f.spawn_service("files", &[]);
    let files = [
        "camt053.xml",
        "camt054.xml",
        "mt940.sta",
        "bai2.txt",
        "stripe.csv",
        "adyen.csv",
    ];
    let args: Vec<PathBuf> = files.iter().map(|n| fixture(n)).collect();
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|p| p.as_os_str()).collect();

    let first = import(&f, &args);
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for name in files {
        assert!(out.contains(&format!("{name}: IMPORTED")), "{out}");
    }
    f.wait_drained(Duration::from_secs(60)).await;
    let expected_entries: i64 = imports(&f).await.values().map(|(_, e)| e).sum();
    assert_eq!(expected_entries, 2 + 1 + 2 + 2 + 2 + 2);
    let before = snapshot(&f).await;
    assert_eq!(before.0.len() as i64, expected_entries, "{:?}", before.0);

    // Everything again: already imported, nothing changes.
    let second = import(&f, &args);
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{out}");
    assert!(out.contains("already imported"), "{out}");
    f.wait_drained(Duration::from_secs(60)).await;
    assert_eq!(snapshot(&f).await, before);

    // A large statement, the importer killed mid-file, then run again.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.sta");
    let n = 12_000u64;
    big_mt940(&big, n);
    let child = Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .args(["import", "--by", "test", "--pause-after", "5000"])
        .arg(&big)
        .envs(f.service_env())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let payouts_topic = f.kafka.payouts_topic.clone();
    let produced = || {
        f.kafka
            .watermarks()
            .iter()
            .filter(|((t, _), _)| *t == payouts_topic)
            .map(|(_, (_, high))| *high)
            .sum::<i64>()
    };
    let already = produced();
    wait_for(
        Duration::from_secs(120),
        "the importer to produce 5000 entries",
        || {
            let p = produced() - already;
            async move { p >= 5_000 }
        },
    )
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let mut child = child;
    let _ = child.wait();
    assert_eq!(imports(&f).await["big.sta"].0, "IMPORTING");

    let resumed = import(&f, &[big.as_os_str()]);
    let out = String::from_utf8_lossy(&resumed.stdout);
    assert!(resumed.status.success(), "{out}");
    assert!(out.contains("big.sta: IMPORTED 12000 entries"), "{out}");
    f.wait_drained(Duration::from_secs(180)).await;
    let (rows, _) = snapshot(&f).await;
    let big_rows: Vec<_> = rows
        .iter()
        .filter(|(id, _)| !before.0.contains_key(*id))
        .collect();
    assert_eq!(big_rows.len() as u64, n, "each entry exactly once");
    assert_eq!(
        big_rows.iter().map(|(_, a)| **a).sum::<Decimal>(),
        Decimal::from(n)
    );
    // Once more: still the same.
    let again = import(&f, &[big.as_os_str()]);
    assert!(again.status.success());
    f.wait_drained(Duration::from_secs(60)).await;
    assert_eq!(snapshot(&f).await.0, rows);

    // Another file claiming the camt statement (same Stmt/Id and sequence): a conflict.
    let other = dir.path().join("camt053-corrected.xml");
    let text = std::fs::read_to_string(fixture("camt053.xml")).unwrap();
    std::fs::write(&other, text.replace("PSP payout &amp; fees", "corrected")).unwrap();
    let conflict = import(&f, &[other.as_os_str()]);
    let out = String::from_utf8_lossy(&conflict.stdout);
    assert_eq!(conflict.status.code(), Some(2), "{out}");
    assert!(
        out.contains("CONFLICT") && out.contains("not merged"),
        "{out}"
    );

    // A broken file: rejected whole, quarantined, nothing applied.
    let broken = dir.path().join("broken.sta");
    std::fs::write(
        &broken,
        std::fs::read_to_string(fixture("mt940.sta"))
            .unwrap()
            .replace(":20:STMT20261201", ":20:OTHER")
            .replace("1920,50", "1920,00"),
    )
    .unwrap();
    let rejected = import(&f, &[broken.as_os_str()]);
    let out = String::from_utf8_lossy(&rejected.stdout);
    assert_eq!(rejected.status.code(), Some(2), "{out}");
    assert!(
        out.contains("REJECTED") && out.contains("closing balance"),
        "{out}"
    );
    let quarantined: (i64, bool) =
        sqlx::query_as("SELECT count(*), bool_and(bytes_kept) FROM rejected_files")
            .fetch_one(f.db.store.pool())
            .await
            .unwrap();
    assert_eq!(quarantined, (1, true));
    f.wait_drained(Duration::from_secs(60)).await;
    assert_eq!(
        snapshot(&f).await.0,
        rows,
        "nothing of the rejected or conflicting file"
    );
    let statuses = imports(&f).await;
    assert_eq!(statuses["camt053-corrected.xml"].0, "CONFLICT");
    assert_eq!(statuses["broken.sta"].0, "REJECTED");

    // A statement two sequence numbers on: imported, and the gap raised as an exception.
    let next = dir.path().join("next.sta");
    std::fs::write(
        &next,
        std::fs::read_to_string(fixture("mt940.sta"))
            .unwrap()
            .replace(":20:STMT20261201", ":20:STMT20261203")
            .replace(":28C:00041/001", ":28C:00043/001"),
    )
    .unwrap();
    let gap = import(&f, &[next.as_os_str()]);
    let out = String::from_utf8_lossy(&gap.stdout);
    assert!(gap.status.success(), "{out}");
    assert!(
        out.contains("next.sta: IMPORTED") && out.contains("42 missing before 43"),
        "{out}"
    );

    // The report lists them.
    let report = Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .arg("report")
        .envs(f.service_env())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(text.contains("File imports"), "{text}");
    assert!(
        text.contains("CONFLICT") && text.contains("REJECTED"),
        "{text}"
    );
    service.terminate(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_imports_settled_files_and_files_them_away_with_a_report() {
    let f = Fixture::new(1).await;
    let inbox = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("stripe.csv"), inbox.path().join("stripe.csv")).unwrap();
    std::fs::write(inbox.path().join("empty.csv"), "").unwrap();
    std::fs::write(inbox.path().join("partial.part"), "being written").unwrap();
    let out = import(
        &f,
        &[
            "--watch".as_ref(),
            inbox.path().as_os_str(),
            "--once".as_ref(),
            "--settle".as_ref(),
            "200ms".as_ref(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let p = inbox.path();
    assert!(p.join("processed/stripe.csv").exists());
    let report = std::fs::read_to_string(p.join("processed/stripe.csv.report.txt")).unwrap();
    assert!(report.contains("IMPORTED 2 entries"), "{report}");
    assert!(p.join("rejected/empty.csv").exists());
    let report = std::fs::read_to_string(p.join("rejected/empty.csv.report.txt")).unwrap();
    assert!(
        report.contains("REJECTED") && report.contains("empty"),
        "{report}"
    );
    assert!(
        p.join("partial.part").exists(),
        "a file being written is left alone"
    );
}
