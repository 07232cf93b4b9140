//! Audit replay (`payrecon replay`): the log re-read into a shadow schema through the
//! service's own code and compared with the live tables.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use payrecon::tools::replay::{AuditResult, PartitionRange, ReplayOptions};
use payrecon::tools::simulate::SimulationOptions;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Fixture, simulation, wait_for};

/// Runs the `payrecon replay` binary against the fixture; returns the exit code, the report
/// and the CSV text.
fn replay_binary(f: &Fixture, dir: &Path, name: &str, args: &[&str]) -> (i32, Value, String) {
    let report = dir.join(format!("{name}.json"));
    let csv = dir.join(format!("{name}.csv"));
    let output = Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .arg("replay")
        .args(["--report", report.to_str().unwrap()])
        .args(["--differences-csv", csv.to_str().unwrap()])
        .args(args)
        .envs(f.service_env())
        .env("PAYRECON_LOG__FILTER", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("running payrecon replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let code = output.status.code().expect("exited");
    let text = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("no report ({e}); exit {code}\n{stdout}\n{stderr}"));
    let json: Value = serde_json::from_str(&text).expect("the report is JSON");
    (code, json, std::fs::read_to_string(&csv).unwrap())
}

/// Runs a replay in this process.
async fn replay_lib(
    f: &Fixture,
    dir: &Path,
    name: &str,
    options: ReplayOptions,
) -> payrecon::tools::replay::ReplayOutcome {
    let options = ReplayOptions {
        report: Some(dir.join(format!("{name}.json"))),
        differences_csv: Some(dir.join(format!("{name}.csv"))),
        quiet: true,
        ..options
    };
    payrecon::tools::replay::run(&f.settings(), &options, CancellationToken::new())
        .await
        .expect("the replay runs")
}

/// Exit 0 and a MATCH, or the differences in the failure message.
fn assert_match(code: i32, report: &Value) {
    assert_eq!(
        (code, report["audit"]["summary"]["result"].as_str()),
        (0, Some("MATCH")),
        "differences: {}",
        serde_json::to_string_pretty(differences(report)).unwrap()
    );
}

fn differences(report: &Value) -> &Vec<Value> {
    report["audit"]["differences"].as_array().unwrap()
}

/// The report without its `run` object (what must be identical between two replays).
fn without_run(text: &str) -> &str {
    &text[..text.find("\n\"run\": ").expect("a run object")]
}

/// (topic, partition, offset) of a JSON position.
fn position(v: &Value) -> (String, i64, i64) {
    (
        v["topic"].as_str().unwrap().to_owned(),
        v["partition"].as_i64().unwrap(),
        v["offset"].as_i64().unwrap(),
    )
}

/// Schemas left behind by replays.
async fn shadow_schemas(f: &Fixture) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'audit\\_%' ORDER BY 1",
    )
    .fetch_all(f.db.store.pool())
    .await
    .unwrap()
}

/// The replay's consumer group has no committed offset on any partition.
fn assert_no_kafka_commits(f: &Fixture, run_id: &str) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &f.kafka.bootstrap)
        .set("group.id", format!("payrecon-replay-{run_id}"))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in f.kafka.topics() {
        for p in 0..f.kafka.partitions {
            tpl.add_partition(t, p);
        }
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    for e in committed.elements() {
        assert_eq!(
            e.offset(),
            Offset::Invalid,
            "the replay committed {}[{}] to Kafka",
            e.topic(),
            e.partition()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_after_a_normal_run_matches_then_reports_exactly_the_tampered_rows() {
    let f = Fixture::new(4).await;
    let service = f.spawn_service("svc", &[]);
    // Mismatches, refunds, late lines, duplicates and malformed records (simulator defaults
    // plus 12 malformed records).
    let options = SimulationOptions {
        payments: 3000,
        seed: 11,
        malformed: 12,
        ..SimulationOptions::default()
    };
    let expected = f.produce(&options).await;
    f.wait_drained(Duration::from_secs(120)).await;
    f.assert_exact(&expected).await;
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
    let dir = tempfile::tempdir().unwrap();

    // (a) A normal run: the log implies exactly what is stored.
    let (code, report, csv) = replay_binary(&f, dir.path(), "clean", &[]);
    let audit = &report["audit"];
    assert_eq!(
        code,
        0,
        "differences: {}",
        serde_json::to_string_pretty(differences(&report)).unwrap()
    );
    assert_eq!(audit["summary"]["result"], "MATCH");
    assert_eq!(audit["records_read"].as_i64(), Some(expected.records));
    assert_eq!(audit["range"]["complete"], true);
    assert_eq!(audit["summary"]["references_not_comparable"], 0);
    assert_eq!(
        audit["summary"]["replay_rows"]["dead_letters"].as_i64(),
        Some(12)
    );
    assert_eq!(csv.lines().count(), 1, "only the header: {csv}");
    assert!(report["digest"].as_str().unwrap().starts_with("sha256:"));
    let merchants = audit["merchant_totals"].as_array().unwrap();
    assert!(!merchants.is_empty());
    assert!(merchants.iter().all(|m| m["live"] == m["replay"]));

    // A database that kept the states as jsonb (before migration 20261202000001) holds them
    // in jsonb's own spelling: the same states, still a match.
    let pool = f.db.store.pool();
    let before: String =
        sqlx::query_scalar("SELECT state FROM payout_items ORDER BY kind, key LIMIT 1")
            .fetch_one(pool)
            .await
            .unwrap();
    for table in ["reconciliation_items", "payout_items"] {
        sqlx::query(&format!("UPDATE {table} SET state = state::jsonb::text"))
            .execute(pool)
            .await
            .unwrap();
    }
    let after: String =
        sqlx::query_scalar("SELECT state FROM payout_items ORDER BY kind, key LIMIT 1")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_ne!(before, after, "the spelling did not change");
    let (code, report, _) = replay_binary(&f, dir.path(), "respelled", &[]);
    assert_match(code, &report);
    // The state kept as text can hold what is not JSON: one difference, not a failed cast.
    let key: String = sqlx::query_scalar(
        "UPDATE payout_items SET state = 'not json'
          WHERE (kind, key) = (SELECT kind, key FROM payout_items ORDER BY kind, key LIMIT 1)
         RETURNING key",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let (code, report, _) = replay_binary(&f, dir.path(), "not-json", &[]);
    let diffs = differences(&report);
    assert_eq!(code, 3, "{}", serde_json::to_string_pretty(diffs).unwrap());
    assert_eq!(
        diffs.len(),
        1,
        "{}",
        serde_json::to_string_pretty(diffs).unwrap()
    );
    assert_eq!(diffs[0]["kind"], "payout_item");
    assert!(
        diffs[0]["key"].as_str().unwrap().contains(&key),
        "{}",
        diffs[0]
    );
    let values = diffs[0]["values"].as_array().unwrap();
    assert_eq!(values.len(), 1, "{values:?}");
    assert_eq!(
        (values[0]["column"].as_str(), values[0]["live"].as_str()),
        (Some("state"), Some("not json"))
    );
    sqlx::query("UPDATE payout_items SET state = $2 WHERE key = $1")
        .bind(&key)
        .bind(&after)
        .execute(pool)
        .await
        .unwrap();

    // A service stopped before its sweep judged the items its watermark had made due leaves
    // them EXPECTED (and counted as expected in their daily buckets); the replay judges them.
    // Judged at different watermarks: not a difference, in the items nor in the counts.
    let unswept: Vec<(String, String, chrono::NaiveDate, String)> = sqlx::query_as(
        "UPDATE reconciliation_items
            SET status = 'EXPECTED', deadline = watermark - interval '1 hour',
                watermark = watermark - interval '2 hours'
          WHERE payment_reference IN (
            SELECT payment_reference FROM reconciliation_items
             WHERE status = 'MISSING_SETTLEMENT' ORDER BY payment_reference LIMIT 3)
         RETURNING payment_reference, merchant_id, business_date, currency",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(unswept.len(), 3, "the run has missing settlements");
    let shift_counts = |by: i64| {
        let unswept = unswept.clone();
        async move {
            for (_, merchant, date, currency) in &unswept {
                sqlx::query(
                    "UPDATE merchant_daily_totals_by_shard
                        SET expected_count = expected_count + $4, exception_count = exception_count - $4
                      WHERE ctid = (SELECT ctid FROM merchant_daily_totals_by_shard
                                     WHERE (merchant_id, business_date, currency) = ($1, $2, $3)
                                     ORDER BY shard LIMIT 1)",
                )
                .bind(merchant)
                .bind(date)
                .bind(currency)
                .bind(by)
                .execute(pool)
                .await
                .unwrap();
            }
        }
    };
    shift_counts(1).await;
    let (code, report, _) = replay_binary(&f, dir.path(), "unswept", &[]);
    assert_match(code, &report);
    assert_eq!(
        report["audit"]["summary"]["references_judged_at_different_watermarks"],
        3
    );
    // The counts moved without their items are differences: only items judged at
    // different watermarks excuse them.
    let refs: Vec<&str> = unswept.iter().map(|u| u.0.as_str()).collect();
    sqlx::query(
        "UPDATE reconciliation_items
            SET status = 'MISSING_SETTLEMENT', deadline = NULL,
                watermark = watermark + interval '2 hours'
          WHERE payment_reference = ANY($1)",
    )
    .bind(&refs)
    .execute(pool)
    .await
    .unwrap();
    let buckets: BTreeSet<String> = unswept
        .iter()
        .map(|(_, m, d, c)| format!("{m}/{d}/{}", c.trim()))
        .collect();
    let (code, report, _) = replay_binary(&f, dir.path(), "shifted", &[]);
    let diffs = differences(&report);
    assert_eq!(code, 3, "{}", serde_json::to_string_pretty(diffs).unwrap());
    let found: BTreeSet<String> = diffs
        .iter()
        .map(|d| {
            assert_eq!(d["kind"], "merchant_daily_total", "{d}");
            let columns: BTreeSet<&str> = (d["values"].as_array().unwrap().iter())
                .map(|v| v["column"].as_str().unwrap())
                .collect();
            assert_eq!(
                columns,
                BTreeSet::from(["exception_count", "expected_count"]),
                "{d}"
            );
            d["key"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(found, buckets);
    shift_counts(-1).await;

    // A group without stored offsets here (a typo, the default) is an operational error that
    // names the groups present, not a report of every live row as "extra".
    let wrong = Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .arg("replay")
        .arg("--quiet")
        .current_dir(dir.path())
        .envs(f.service_env())
        .env("PAYRECON_KAFKA__GROUP_ID", "no-such-group")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("consumer group `no-such-group` has no stored offsets")
            && stderr.contains(&f.group),
        "{stderr}"
    );

    // (b) Tamper with the live tables in four places.
    let (event_id, et, ep, eo): (String, String, i32, i64) = sqlx::query_as(
        "DELETE FROM payment_events WHERE event_id = (
            SELECT event_id FROM payment_events WHERE kind = 'CAPTURE' ORDER BY event_id LIMIT 1)
         RETURNING event_id, source_topic, source_partition, source_offset",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let (line_id, lt, lp, lo, gross): (String, String, i32, i64, String) = sqlx::query_as(
        "UPDATE settlement_lines SET gross = gross + 1, net = net + 1 WHERE line_id = (
            SELECT line_id FROM settlement_lines ORDER BY line_id DESC LIMIT 1)
         RETURNING line_id, source_topic, source_partition, source_offset, (gross - 1)::text",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let reference: String = sqlx::query_scalar(
        "UPDATE reconciliation_items SET status = 'AMOUNT_MISMATCH' WHERE payment_reference = (
            SELECT payment_reference FROM reconciliation_items WHERE status = 'MATCHED'
             ORDER BY payment_reference DESC LIMIT 1)
         RETURNING payment_reference",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let reference_positions: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT t, p, o FROM (
            SELECT source_topic AS t, source_partition AS p, source_offset AS o
              FROM payment_events WHERE payment_reference = $1
            UNION ALL
            SELECT source_topic, source_partition, source_offset FROM settlement_lines
             WHERE payment_reference = $1) x
          ORDER BY t COLLATE \"C\", p, o",
    )
    .bind(&reference)
    .fetch_all(pool)
    .await
    .unwrap();
    let bucket: String = sqlx::query_scalar(
        "UPDATE merchant_daily_totals_by_shard SET captured = captured + 10
          WHERE ctid = (
            SELECT ctid FROM merchant_daily_totals_by_shard
             WHERE captured_count > 0 ORDER BY merchant_id, business_date, currency, shard
             LIMIT 1)
         RETURNING merchant_id || '/' || business_date::text || '/' || trim(currency)",
    )
    .fetch_one(pool)
    .await
    .unwrap();

    let (code, report, csv) = replay_binary(&f, dir.path(), "tampered", &[]);
    let diffs = differences(&report);
    assert_eq!(
        code,
        3,
        "exit code; differences: {}",
        serde_json::to_string_pretty(diffs).unwrap()
    );
    assert_eq!(
        diffs.len(),
        4,
        "exactly the four tampered rows: {}",
        serde_json::to_string_pretty(diffs).unwrap()
    );
    assert_eq!(report["audit"]["summary"]["differences"], 4);
    assert_eq!(csv.lines().count(), 5, "header + 4 differences:\n{csv}");
    for kind in [
        "payment_event",
        "settlement_line",
        "reconciliation_item",
        "merchant_daily_total",
    ] {
        assert_eq!(report["audit"]["summary"]["by_kind"][kind], 1, "{kind}");
    }
    let find = |kind: &str| diffs.iter().find(|d| d["kind"] == kind).unwrap();

    let d = find("payment_event");
    assert_eq!(d["key"], event_id.as_str());
    assert_eq!(d["problem"], "missing_in_live");
    assert_eq!(position(&d["source"]), (et, ep as i64, eo));

    let d = find("settlement_line");
    assert_eq!(d["key"], line_id.as_str());
    assert_eq!(d["problem"], "different");
    assert_eq!(position(&d["source"]), (lt, lp as i64, lo));
    let columns: BTreeSet<&str> = d["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["column"].as_str().unwrap())
        .collect();
    assert_eq!(columns, BTreeSet::from(["gross", "net"]));
    let g = d["values"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["column"] == "gross")
        .unwrap();
    assert_eq!(g["replay"], gross.as_str());

    let d = find("reconciliation_item");
    assert_eq!(d["key"], reference.as_str());
    assert_eq!(d["problem"], "different");
    assert_eq!(
        d["values"],
        serde_json::json!([{"column": "status", "live": "AMOUNT_MISMATCH", "replay": "MATCHED"}])
    );
    let positions: Vec<(String, i64, i64)> = d["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(position)
        .collect();
    let expected_positions: Vec<(String, i64, i64)> = reference_positions
        .into_iter()
        .map(|(t, p, o)| (t, p as i64, o))
        .collect();
    assert_eq!(positions, expected_positions, "the reference's records");

    let d = find("merchant_daily_total");
    assert_eq!(d["key"], bucket.as_str());
    let values = d["values"].as_array().unwrap();
    assert_eq!(values.len(), 1);
    assert_eq!(values[0]["column"], "captured");
    assert!(!d["positions"].as_array().unwrap().is_empty());

    // Both audits are recorded; no shadow schema is left; Kafka never saw a commit.
    let runs: Vec<(String, String, Option<i64>, Option<String>)> = sqlx::query_as(
        "SELECT id, result, differences, report_digest FROM audit_runs ORDER BY started_at",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(runs.len(), 7);
    // The clean run, the one over the states in jsonb's spelling, the one with a state that
    // is not JSON, the unswept items, the counts moved without them.
    assert_eq!((runs[0].1.as_str(), runs[0].2), ("MATCH", Some(0)));
    assert_eq!((runs[1].1.as_str(), runs[1].2), ("MATCH", Some(0)));
    assert_eq!((runs[2].1.as_str(), runs[2].2), ("DIFFERENCES", Some(1)));
    assert_eq!((runs[3].1.as_str(), runs[3].2), ("MATCH", Some(0)));
    assert_eq!(runs[4].1.as_str(), "DIFFERENCES");
    // The wrong-group attempt is on record too, as an error.
    assert_eq!((runs[5].1.as_str(), runs[5].2), ("ERROR", None));
    assert_eq!((runs[6].1.as_str(), runs[6].2), ("DIFFERENCES", Some(4)));
    assert_eq!(runs[6].3.as_deref(), report["digest"].as_str());
    assert_eq!(report["run"]["id"], runs[6].0.as_str());
    assert!(shadow_schemas(&f).await.is_empty());
    assert_no_kafka_commits(&f, &runs[0].0);
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_of_an_offset_or_time_range_covers_exactly_its_records_and_is_reproducible() {
    let f = Fixture::new(4).await;
    let service = f.spawn_service("svc", &[]);
    let first = SimulationOptions {
        malformed: 6,
        ..simulation(1500, 21)
    };
    f.produce(&first).await;
    f.wait_drained(Duration::from_secs(120)).await;
    let after_first = f.kafka.watermarks();
    // Broker timestamps are the producer's clock: everything after `boundary` is phase two.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let boundary = Utc::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = f.produce(&simulation(1000, 22)).await;
    f.wait_drained(Duration::from_secs(120)).await;
    f.assert_exceptions_exact().await;
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
    let dir = tempfile::tempdir().unwrap();
    let (payments, settlements) = (&f.kafka.payments_topic, &f.kafka.settlements_topic);

    // An offset range on two partitions covers exactly those offsets.
    let range = ReplayOptions {
        from_offsets: Some(format!("{payments}:0=5,{settlements}:0=3")),
        to_offsets: Some(format!("{payments}:0=60,{settlements}:0=40")),
        keep_shadow: true,
        ..ReplayOptions::default()
    };
    let one = replay_lib(&f, dir.path(), "one", range.clone()).await;
    assert_eq!(
        one.ranges,
        vec![
            PartitionRange {
                topic: payments.clone(),
                partition: 0,
                from: 5,
                to: 60,
                records: 55
            },
            PartitionRange {
                topic: settlements.clone(),
                partition: 0,
                from: 3,
                to: 40,
                records: 37
            },
        ]
    );
    assert_eq!(one.records_read, 92);
    // The shadow applied exactly those offsets, each once.
    let applied: Vec<(String, i32, i64, i64)> = sqlx::query_as(&format!(
        "SELECT topic, partition, next_offset, records_applied FROM {}.consumer_offsets
          WHERE records_applied > 0 ORDER BY topic COLLATE \"C\", partition",
        one.shadow_schema
    ))
    .fetch_all(f.db.store.pool())
    .await
    .unwrap();
    let mut expected_applied = vec![
        (payments.clone(), 0, 60, 55),
        (settlements.clone(), 0, 40, 37),
    ];
    expected_applied.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(applied, expected_applied);
    let outside: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (
            SELECT source_topic AS t, source_partition AS p, source_offset AS o
              FROM {s}.payment_events
            UNION ALL SELECT source_topic, source_partition, source_offset FROM {s}.settlement_lines
            UNION ALL SELECT topic, partition, \"offset\" FROM {s}.dead_letters) x
          WHERE NOT ((t = $1 AND p = 0 AND o >= 5 AND o < 60) OR (t = $2 AND p = 0 AND o >= 3 AND o < 40))",
        s = one.shadow_schema
    ))
    .bind(payments)
    .bind(settlements)
    .fetch_one(f.db.store.pool())
    .await
    .unwrap();
    assert_eq!(outside, 0, "rows from outside the range in the shadow");
    sqlx::query(&format!("DROP SCHEMA {} CASCADE", one.shadow_schema))
        .execute(f.db.store.pool())
        .await
        .unwrap();
    assert_eq!(
        one.result,
        AuditResult::Match,
        "{}",
        std::fs::read_to_string(&one.report).unwrap()
    );

    // The same range again: the same report apart from the run object.
    let two = replay_lib(
        &f,
        dir.path(),
        "two",
        ReplayOptions {
            keep_shadow: false,
            ..range
        },
    )
    .await;
    assert_eq!(one.digest, two.digest);
    let (a, b) = (
        std::fs::read_to_string(&one.report).unwrap(),
        std::fs::read_to_string(&two.report).unwrap(),
    );
    assert_eq!(without_run(&a), without_run(&b));
    assert_ne!(a, b, "the run objects differ");
    assert_eq!(
        std::fs::read(&one.differences_csv).unwrap(),
        std::fs::read(&two.differences_csv).unwrap()
    );

    // A time range covers exactly the records produced after the boundary.
    let timed = replay_lib(
        &f,
        dir.path(),
        "timed",
        ReplayOptions {
            from_time: Some(boundary),
            ..ReplayOptions::default()
        },
    )
    .await;
    let end = f.kafka.watermarks();
    for r in &timed.ranges {
        let tp = (r.topic.clone(), r.partition);
        assert_eq!(r.from, after_first[&tp].1, "{tp:?} starts after phase one");
        assert_eq!(r.to, end[&tp].1, "{tp:?} ends at the stored offset");
        assert_eq!(r.records as i64, r.to - r.from);
    }
    assert_eq!(timed.ranges.len(), 3 * f.kafka.partitions as usize);
    assert_eq!(timed.records_read as i64, second.records);
    assert_eq!(
        timed.result,
        AuditResult::Match,
        "{}",
        std::fs::read_to_string(&timed.report).unwrap()
    );
    let again = replay_lib(
        &f,
        dir.path(),
        "timed-again",
        ReplayOptions {
            from_time: Some(boundary),
            ..ReplayOptions::default()
        },
    )
    .await;
    assert_eq!(timed.digest, again.digest);
    assert!(shadow_schemas(&f).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_while_the_service_consumes_does_not_disturb_it() {
    let f = Fixture::new(4).await;
    let service = f.spawn_service("svc", &[]);
    let encoder = f.encoder().await;
    let sim = simulation(6000, 31);
    let (records, expected) =
        payrecon::tools::simulate::generate(&sim, encoder.payment_schema_id()).unwrap();
    let producing = f.produce_in_background(records, encoder, 2000);
    wait_for(
        Duration::from_secs(60),
        "the service to apply records",
        || async { f.db.offsets(&f.group).await.values().sum::<i64>() > 3000 },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let outcome = replay_lib(&f, dir.path(), "busy", ReplayOptions::default()).await;
    assert!(outcome.records_read >= 3000);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&outcome.report).unwrap()).unwrap();
    assert_eq!(
        outcome.result,
        AuditResult::Match,
        "{}",
        serde_json::to_string_pretty(differences(&report)).unwrap()
    );
    producing.await.unwrap();
    f.wait_drained(Duration::from_secs(120)).await;
    // The service's offsets and totals are exact; nothing else wrote its tables.
    f.assert_exact(&expected).await;
    let groups: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT consumer_group FROM consumer_offsets")
            .fetch_all(f.db.store.pool())
            .await
            .unwrap();
    assert_eq!(groups, vec![f.group.clone()]);
    assert_no_kafka_commits(&f, &outcome.run_id);
    assert!(shadow_schemas(&f).await.is_empty());
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
}
