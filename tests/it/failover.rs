//! The three database drills of docs/failover.md, each on throwaway PostgreSQL clusters
//! ([`crate::pgcluster`]) under a loaded run of the service (a child process on the embedded
//! Kafka), each ending with the independent counts exact: every record applied once (totals,
//! statuses, records_applied = next_offset = high watermark), every exception on the topic
//! once, and nothing published under a seq that names two different exceptions.
//!
//! 1. A synchronous standby, the primary's postmaster SIGKILLed mid-run, `pg_ctl promote`:
//!    payrecon finds the writable server in its host list and goes on; nothing is lost.
//! 2. An asynchronous standby that fell behind (its link to the primary cut), the primary killed
//!    and the standby promoted: acknowledged transactions are lost, with their offsets, so
//!    payrecon reads those records again; exceptions already published from them are
//!    recorded as lost and superseded, never silently replaced.
//! 3. A base backup and WAL archive, a named restore point during the run, the primary lost,
//!    a restore to that point: payrecon resumes from the restored offsets; `report --verify`'s
//!    checks and an audit replay agree with the topics.
//!
//! The service is SIGKILLed once in each drill as well.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use payrecon::store::Store;
use payrecon::tools::simulate::SimulationOptions;

use crate::helpers::{
    Fixture, Service, TestDb, TestKafka, metric_value, simulation, unique, wait_for,
};
use crate::pgcluster::{PgCluster, PgDir, PrimaryOptions};

/// A database for payrecon on `cluster`: created, migrated, the simulation's reference data
/// loaded. `url` is what the service is given.
async fn database_on(cluster: &PgCluster, url: impl Fn(&str) -> String) -> TestDb {
    let name = unique("payrecon_drill");
    cluster.execute(&format!("CREATE DATABASE {name}")).await;
    let store = Store::new(cluster.pool(&name).await);
    store.migrate().await.expect("migrating the drill database");
    let (merchants, rates) =
        payrecon::tools::simulate::reference_data(&SimulationOptions::default())
            .expect("the simulation's reference data");
    store.load_merchants(&merchants, None).await.unwrap();
    store.load_rates(&rates, None).await.unwrap();
    TestDb {
        url: url(&name),
        name,
        store,
    }
}

/// A fixture (embedded Kafka, registry, group) around a drill's database.
async fn fixture(db: TestDb) -> Fixture {
    let (registry_url, registry) =
        payrecon::registry::spawn_local(payrecon::registry::RegistryConfig {
            storage: payrecon::registry::Storage::Memory,
        })
        .await
        .unwrap();
    Fixture {
        db,
        kafka: TestKafka::new(4),
        registry_url,
        registry,
        group: unique("group"),
        logs: tempfile::tempdir().unwrap(),
    }
}

/// Sum of the stored next_offsets on `store` (0 when it does not answer).
async fn progress(store: &Store, group: &str) -> i64 {
    store
        .group_offsets(group)
        .await
        .map(|o| o.values().sum())
        .unwrap_or(0)
}

async fn wait_progress(fx: &Fixture, at_least: i64) {
    wait_for(
        Duration::from_secs(120),
        &format!("{at_least} records committed"),
        || async { progress(&fx.db.store, &fx.group).await >= at_least },
    )
    .await;
}

/// Time from the primary's death to the first commit on the new primary: polls the new
/// primary's stored offsets from `killed` on.
async fn first_commit_after(fx: &Fixture, killed: Instant, before: i64) -> Duration {
    wait_for(
        Duration::from_secs(120),
        "the first commit on the new primary",
        || async { progress(&fx.db.store, &fx.group).await > before },
    )
    .await;
    killed.elapsed()
}

/// The service's readiness text.
async fn readiness(service: &Service) -> String {
    let url = format!("http://127.0.0.1:{}/health/ready", service.metrics_port);
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => e.to_string(),
    }
}

/// Waits until the service reports the switch to `server` in its metrics and readiness.
async fn assert_switch_reported(service: &Service, server: &str) {
    wait_for(
        Duration::from_secs(60),
        "the switch in /metrics",
        || async {
            let body = service.metrics().await.unwrap_or_default();
            metric_value(&body, payrecon::metrics::DATABASE_SWITCHES, &[]) == 1.0
                && metric_value(
                    &body,
                    payrecon::metrics::DATABASE_SERVER,
                    &[&format!("server=\"{server}\"")],
                ) == 1.0
        },
    )
    .await;
    wait_for(
        Duration::from_secs(60),
        "the switch in /health/ready",
        || async {
            let text = readiness(service).await;
            text.contains(&format!("server {server}, switches 1, last switch 20"))
        },
    )
    .await;
}

/// The exceptions topic's messages, checked against the database: every seq once; the seqs
/// on the topic are the outbox's plus those recorded lost; every `payrecon-supersedes`
/// names a lost seq, each at most once. Returns (lost, superseded).
async fn assert_supersedes_consistent(fx: &Fixture) -> (usize, usize) {
    let messages = payrecon::outbox::topic_messages(&fx.settings())
        .await
        .unwrap();
    let lost: BTreeSet<i64> = sqlx::query_scalar("SELECT seq FROM exceptions_lost")
        .fetch_all(fx.db.store.pool())
        .await
        .unwrap()
        .into_iter()
        .collect();
    let mut superseded = BTreeMap::new();
    for m in &messages {
        assert!(m.digest.is_some(), "a message without its digest: {m:?}");
        if let Some(s) = m.supersedes {
            assert!(lost.contains(&s), "supersedes {s}, which is not a lost seq");
            *superseded.entry(s).or_insert(0) += 1;
        }
    }
    assert!(
        superseded.values().all(|n| *n == 1),
        "a lost exception superseded twice: {superseded:?}"
    );
    let held: Vec<i64> = fx.db.store.outbox_seqs().await.unwrap();
    assert!(
        held.iter().all(|s| !lost.contains(s)),
        "a lost seq still names an outbox row"
    );
    (lost.len(), superseded.len())
}

/// The URL of a database on a list of servers, asking for the writable one.
fn host_list(servers: &[&PgCluster], database: &str) -> String {
    let hosts: Vec<String> = servers.iter().map(|c| c.address()).collect();
    format!(
        "postgres://postgres@{}/{database}?target_session_attrs=read-write",
        hosts.join(",")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_to_a_synchronous_standby_loses_nothing_and_doubles_nothing() {
    let mut primary = PgCluster::primary("sync-a", &PrimaryOptions::default());
    let standby = PgCluster::replica("sync_b", &primary, true).await;
    let db = database_on(&primary, |name| host_list(&[&primary, &standby], name)).await;
    let mut fx = fixture(db).await;
    let encoder = fx.encoder().await;
    let sim =
        payrecon::tools::simulate::simulate(&simulation(4_000, 281), encoder.payment_schema_id())
            .unwrap();
    let total = sim.records.len() as i64;
    let producing = fx.produce_in_background(sim.records.clone(), encoder, 1_000);
    let service = fx.spawn_service("sync-1", &[]);
    wait_progress(&fx, total / 3).await;

    primary.kill_postmaster();
    let killed = Instant::now();
    standby.promote().await;
    let promoted = killed.elapsed();
    fx.db.store = Store::new(standby.pool(&fx.db.name).await);
    let before = progress(&fx.db.store, &fx.group).await;
    let first = first_commit_after(&fx, killed, before).await;
    println!(
        "synchronous failover: primary SIGKILLed, standby promoted after {promoted:?}, first commit on the new primary {first:?} after the kill"
    );
    assert_switch_reported(&service, &standby.address()).await;

    // The service dies too; its successor finds the writable server although the first one
    // listed is gone.
    service.sigkill();
    let service = fx.spawn_service("sync-2", &[]);
    producing.await.unwrap();
    fx.wait_drained(Duration::from_secs(180)).await;
    fx.assert_exact(&sim.totals).await;
    fx.assert_statuses(&sim.statuses).await;
    fx.assert_payout_statuses(&sim.payout_statuses).await;
    let (lost, _) = assert_supersedes_consistent(&fx).await;
    assert_eq!(
        lost, 0,
        "a synchronous standby loses no published exception"
    );
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_to_an_asynchronous_standby_rereads_what_it_lost_and_supersedes_lost_exceptions() {
    let mut primary = PgCluster::primary("async-a", &PrimaryOptions::default());
    let standby = PgCluster::replica("async_b", &primary, false).await;
    let db = database_on(&primary, |name| host_list(&[&primary, &standby], name)).await;
    let mut fx = fixture(db).await;
    let encoder = fx.encoder().await;
    let sim =
        payrecon::tools::simulate::simulate(&simulation(4_000, 282), encoder.payment_schema_id())
            .unwrap();
    let total = sim.records.len() as i64;
    let producing = fx.produce_in_background(sim.records.clone(), encoder, 1_000);
    let service = fx.spawn_service("async-1", &[]);
    wait_progress(&fx, total / 4).await;
    wait_for(
        Duration::from_secs(120),
        "a published exception",
        || async { fx.db.store.outbox_seqs().await.is_ok_and(|s| !s.is_empty()) },
    )
    .await;

    // The standby falls behind: its link to the primary is cut (primary_conninfo pointed at
    // a closed port, so the WAL receiver stops and cannot come back) while the primary goes
    // on acknowledging commits and the relay publishing their exceptions.
    standby.detach_from_primary().await;
    let at_stop = progress(&fx.db.store, &fx.group).await;
    let published = |store: &Store| {
        let store = store.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM exceptions_outbox WHERE published_at IS NOT NULL",
            )
            .fetch_one(store.pool())
            .await
            .unwrap_or(0)
        }
    };
    let published_at_stop = published(&fx.db.store).await;
    wait_for(
        Duration::from_secs(120),
        "commits and published exceptions the standby does not have",
        || async {
            progress(&fx.db.store, &fx.group).await >= at_stop + total / 5
                && published(&fx.db.store).await > published_at_stop
        },
    )
    .await;
    let acknowledged = progress(&fx.db.store, &fx.group).await;

    primary.kill_postmaster();
    let killed = Instant::now();
    standby.promote().await;
    fx.db.store = Store::new(standby.pool(&fx.db.name).await);
    let kept = progress(&fx.db.store, &fx.group).await;
    println!(
        "asynchronous failover: {} acknowledged records lost with their offsets ({acknowledged} committed on the old primary, {kept} on the promoted standby)",
        acknowledged - kept
    );
    assert!(
        kept < acknowledged,
        "the drill must lose acknowledged commits"
    );
    let first = first_commit_after(&fx, killed, kept).await;
    println!("asynchronous failover: first commit on the new primary {first:?} after the kill");
    assert_switch_reported(&service, &standby.address()).await;
    service.sigkill();
    let service = fx.spawn_service("async-2", &[]);
    producing.await.unwrap();
    fx.wait_drained(Duration::from_secs(180)).await;
    fx.assert_exact(&sim.totals).await;
    fx.assert_statuses(&sim.statuses).await;
    fx.assert_payout_statuses(&sim.payout_statuses).await;
    let (lost, superseded) = assert_supersedes_consistent(&fx).await;
    println!(
        "asynchronous failover: {lost} published exceptions lost with the database, {superseded} of them superseded by a re-derived one"
    );
    assert!(lost > 0, "the drill must lose published exceptions");
    assert!(
        service.log_text().contains("supersedes") || superseded == 0,
        "the relay says what it supersedes"
    );
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_point_in_time_restore_resumes_from_the_restored_offsets_and_agrees_with_the_topics() {
    let archive = PgDir::new("archive");
    let backups = PgDir::new("backup");
    let mut primary = PgCluster::primary(
        "pitr-a",
        &PrimaryOptions {
            archive: Some(archive.path().display().to_string()),
        },
    );
    let db = database_on(&primary, |name| primary.url(name)).await;
    let backup = primary.base_backup(&backups);
    let mut fx = fixture(db).await;
    let encoder = fx.encoder().await;
    let sim =
        payrecon::tools::simulate::simulate(&simulation(4_000, 283), encoder.payment_schema_id())
            .unwrap();
    let total = sim.records.len() as i64;
    let producing = fx.produce_in_background(sim.records.clone(), encoder, 1_000);
    let service = fx.spawn_service("pitr-1", &[]);
    wait_progress(&fx, total / 2).await;
    // Read before the point is created: the restored offsets are at least these.
    let at_point = progress(&fx.db.store, &fx.group).await;
    primary
        .execute("SELECT pg_create_restore_point('payrecon-drill')")
        .await;
    // The old primary finishes the run: the topics now hold exceptions published after the
    // restore point.
    producing.await.unwrap();
    fx.wait_drained(Duration::from_secs(180)).await;
    service.sigkill();
    let segment: String = primary
        .query_scalar("SELECT pg_walfile_name(pg_switch_wal())")
        .await
        .unwrap();
    wait_for(Duration::from_secs(60), "the WAL archived", || async {
        archive.path().join(&segment).exists()
    })
    .await;
    primary.kill_postmaster();

    let restored = PgCluster::restore(
        "pitr-b",
        &backup,
        &archive.path().display().to_string(),
        "payrecon-drill",
    )
    .await;
    fx.db.store = Store::new(restored.pool(&fx.db.name).await);
    fx.db.url = restored.url(&fx.db.name);
    let resumed_from = progress(&fx.db.store, &fx.group).await;
    println!(
        "restore: {resumed_from} records applied at the restore point (at least {at_point}, read just before it was created), {total} on the topics"
    );
    assert!(resumed_from >= at_point && resumed_from < total);

    // The service on the restored database, killed once on the way.
    let service = fx.spawn_service("pitr-2", &[]);
    wait_progress(&fx, resumed_from + 1).await;
    service.sigkill();
    let service = fx.spawn_service("pitr-3", &[]);
    fx.wait_drained(Duration::from_secs(180)).await;
    fx.assert_exact(&sim.totals).await;
    fx.assert_statuses(&sim.statuses).await;
    fx.assert_payout_statuses(&sim.payout_statuses).await;
    let (lost, superseded) = assert_supersedes_consistent(&fx).await;
    println!(
        "restore: {lost} exceptions published after the restore point recorded lost, {superseded} superseded"
    );
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));

    // report --verify's checks and an audit replay of the whole topics agree.
    let rules = payrecon::store::Rules::from_settings(&fx.settings().reconciliation);
    let verification = payrecon::tools::report::verify(&fx.db.store, &rules)
        .await
        .unwrap();
    let failed: Vec<String> = (verification.checks.iter())
        .filter(|c| !c.passed())
        .map(|c| {
            format!(
                "{}: {:?}",
                c.name,
                &c.differences[..c.differences.len().min(5)]
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "report --verify failed:\n{}",
        failed.join("\n")
    );
    let dir = tempfile::tempdir().unwrap();
    let options = payrecon::tools::replay::ReplayOptions {
        report: Some(dir.path().join("audit.json")),
        differences_csv: Some(dir.path().join("audit.csv")),
        quiet: true,
        ..payrecon::tools::replay::ReplayOptions::default()
    };
    let audit = payrecon::tools::replay::run(
        &fx.settings(),
        &options,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("the replay runs");
    println!(
        "restore: the audit replay read {} records",
        audit.records_read
    );
    assert_eq!(
        (audit.result.as_str(), audit.differences),
        ("MATCH", 0),
        "the audit replay of the topics against the restored database"
    );
}
