//! `payrecon demo` end to end, as a new user runs it: the shapes that used to end in MISMATCH
//! (few payments over many partitions) and the demo from files (settlement reports and bank
//! statements written by the simulator, imported twice) must be exact.

use std::process::Command;

/// Runs the demo binary with `args` on its own database, metrics port and log file; returns
/// its exit status and standard output.
fn demo(database: &str, args: &[&str]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("demo.log");
    let out = Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .arg("demo")
        .args(["--database", database, "--log-file"])
        .arg(&log)
        .args(args)
        .env("PAYRECON_HTTP__LISTEN", "127.0.0.1:0")
        .env_remove("PAYRECON_LOG__FILTER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // The service log went to the file, not between the progress lines.
    assert!(
        !stdout.contains(" WARN ") && !String::from_utf8_lossy(&out.stderr).contains(" WARN "),
        "log lines on the terminal:\n{stdout}"
    );
    assert!(log.exists(), "the demo's log file was not written");
    (out.status, stdout)
}

fn drop_database(name: &str) {
    let _ = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-qc"])
        .arg(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .output();
}

#[test]
fn a_sparse_demo_is_exact_with_the_default_broker_time() {
    let db = "payrecon_it_demo_sparse";
    let (status, out) = demo(db, &["--payments", "40", "--partitions", "32"]);
    drop_database(db);
    assert!(status.success(), "{out}");
    assert!(out.contains("broker time of records:   Event"), "{out}");
    assert!(out.contains("RESULT: MATCH"), "{out}");
    assert!(out.contains("idle_empty"), "{out}");
}

#[test]
fn the_demo_from_files_is_exact_and_a_second_import_changes_nothing() {
    let db = "payrecon_it_demo_files";
    let (status, out) = demo(db, &["--from-files", "--payments", "600"]);
    drop_database(db);
    assert!(status.success(), "{out}");
    let files = out
        .lines()
        .find(|l| l.starts_with("files: "))
        .unwrap_or_else(|| panic!("no files line:\n{out}"));
    // "files: N written and imported (E entries, D re-deliveries folded); imported again: E
    // entries already there, nothing produced"
    let entries: Vec<u64> = files
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(entries[0] > 2, "{files}");
    assert_eq!(entries[1], entries[3], "{files}");
    assert!(files.ends_with("nothing produced"), "{files}");
    assert!(out.contains("RESULT: MATCH"), "{out}");
    // Both legs were judged from the files' entries.
    for status in ["MATCHED", "PAYOUT_MATCHED"] {
        assert!(out.contains(status), "{out}");
    }
}
