//! Shared test fixtures: a fresh database per test, an embedded Kafka (mock cluster) that
//! outlives the service processes, the embedded registry, service child processes that can be
//! killed, stopped and resumed, and a producer of simulated traffic.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use payrecon::codec::registry_settings;
use payrecon::domain::Totals;
use payrecon::inputs::Encoder;
use payrecon::store::Store;
use payrecon::tools::simulate::{Generated, SimulationOptions};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The PostgreSQL server tests run against.
pub fn admin_url() -> String {
    std::env::var("PAYRECON_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A short random suffix for database, topic and group names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
    )
}

/// A freshly created database, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub store: Store,
}

impl TestDb {
    /// Runs `payrecon reference load FILE` against this database.
    pub fn load_reference_file(&self, file: &std::path::Path) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_payrecon"))
            .args(["reference", "load"])
            .arg(file)
            .env("PAYRECON_DATABASE__URL", &self.url)
            .output()
            .unwrap()
    }

    pub async fn new() -> TestDb {
        let name = unique("payrecon_test");
        let admin: PgConnectOptions = admin_url().parse().unwrap();
        payrecon::store::create_database(&admin, &name)
            .await
            .expect("creating the test database");
        let options = admin.clone().database(&name);
        let url = payrecon::store::database_url(&admin, &name);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .unwrap();
        let store = Store::new(pool);
        store.migrate().await.expect("migrating the test database");
        // The simulator's reference data, so simulated traffic is priced like in production.
        let (merchants, rates) =
            payrecon::tools::simulate::reference_data(&SimulationOptions::default())
                .expect("the simulation's reference data");
        store.load_merchants(&merchants, None).await.unwrap();
        store.load_rates(&rates, None).await.unwrap();
        TestDb { name, url, store }
    }

    /// A reconciler on the default rules with the reference cache loaded from this database
    /// (store-level tests; the watermark counts the partitions committed so far).
    pub async fn reconciler(&self) -> payrecon::engine::Reconciler {
        let cache = std::sync::Arc::new(payrecon::reference::ReferenceCache::default());
        cache.reload(&self.store).await.unwrap();
        let settings = payrecon::config::Settings::load(None).unwrap();
        payrecon::engine::Reconciler::new(&settings.reconciliation, cache, None)
    }

    /// Stored next_offset per (topic, partition) for `group`.
    pub async fn offsets(&self, group: &str) -> HashMap<(String, i32), i64> {
        self.store.group_offsets(group).await.unwrap()
    }

    /// records_applied per (topic, partition) for `group`.
    pub async fn records_applied(&self, group: &str) -> HashMap<(String, i32), i64> {
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT topic, partition, records_applied FROM consumer_offsets WHERE consumer_group = $1",
        )
        .bind(group)
        .fetch_all(self.store.pool())
        .await
        .unwrap();
        rows.into_iter().map(|(t, p, n)| ((t, p), n)).collect()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Async drop is not a thing: drop the database from a helper thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let admin: PgConnectOptions = admin_url().parse().unwrap();
            let _ = rt.block_on(payrecon::store::drop_database(&admin, &name));
        })
        .join();
    }
}

/// A Kafka protocol peer with a pair of uniquely named input topics: the embedded mock
/// cluster (in this process, so it outlives every service process) or an external broker.
pub struct TestKafka {
    /// Keeps the embedded broker alive and gives fault injection; `None` for an external one.
    pub cluster: Option<MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
    pub bootstrap: String,
    pub payments_topic: String,
    pub settlements_topic: String,
    /// Bank statement lines (the payout leg).
    pub payouts_topic: String,
    /// Where the service's relay publishes exceptions (one partition).
    pub exceptions_topic: String,
    pub partitions: i32,
}

impl TestKafka {
    /// The embedded mock cluster.
    pub fn new(partitions: i32) -> TestKafka {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let bootstrap = cluster.bootstrap_servers();
        let payments_topic = unique("payments");
        let settlements_topic = unique("settlements");
        let payouts_topic = unique("payouts");
        let exceptions_topic = unique("exceptions");
        for topic in [&payments_topic, &settlements_topic, &payouts_topic] {
            cluster.create_topic(topic, partitions, 1).unwrap();
        }
        cluster.create_topic(&exceptions_topic, 1, 1).unwrap();
        TestKafka {
            cluster: Some(cluster),
            bootstrap,
            payments_topic,
            settlements_topic,
            payouts_topic,
            exceptions_topic,
            partitions,
        }
    }

    /// A broker running elsewhere (e.g. tansu); the topics are created with CreateTopics.
    pub async fn external(bootstrap: &str, partitions: i32) -> TestKafka {
        let payments_topic = unique("payments");
        let settlements_topic = unique("settlements");
        let payouts_topic = unique("payouts");
        let exceptions_topic = unique("exceptions");
        let config = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .clone();
        let inputs = [&payments_topic, &settlements_topic, &payouts_topic];
        payrecon::kafka::ensure_topics(&config, &inputs.map(String::as_str), partitions)
            .await
            .expect("creating the input topics");
        payrecon::kafka::ensure_topics(&config, &[&exceptions_topic], 1)
            .await
            .expect("creating the exceptions topic");
        TestKafka {
            cluster: None,
            bootstrap: bootstrap.to_owned(),
            payments_topic,
            settlements_topic,
            payouts_topic,
            exceptions_topic,
            partitions,
        }
    }

    /// The embedded cluster, for fault injection.
    pub fn mock(&self) -> &MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        self.cluster
            .as_ref()
            .expect("this test needs the embedded mock cluster")
    }

    /// The input topics in topic-index order.
    pub fn topics(&self) -> [&str; 3] {
        [
            &self.payments_topic,
            &self.settlements_topic,
            &self.payouts_topic,
        ]
    }

    /// (low, high) watermarks of every partition of both topics.
    pub fn watermarks(&self) -> HashMap<(String, i32), (i64, i64)> {
        watermarks(&self.bootstrap, &self.topics(), self.partitions)
    }
}

/// (low, high) watermarks of `partitions` partitions of each topic.
pub fn watermarks(
    bootstrap: &str,
    topics: &[&str],
    partitions: i32,
) -> HashMap<(String, i32), (i64, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let mut out = HashMap::new();
    for t in topics {
        for p in 0..partitions {
            let w = consumer
                .fetch_watermarks(t, p, Duration::from_secs(10))
                .unwrap();
            out.insert((t.to_string(), p), w);
        }
    }
    out
}

/// Everything one scenario needs: database, Kafka, registry, a group name.
pub struct Fixture {
    pub db: TestDb,
    pub kafka: TestKafka,
    pub registry_url: String,
    pub registry: payrecon::registry::RegistryHandle,
    pub group: String,
    pub logs: tempfile::TempDir,
}

impl Fixture {
    /// A fixture on the embedded mock cluster.
    pub async fn new(partitions: i32) -> Fixture {
        Fixture::with_kafka(TestKafka::new(partitions)).await
    }

    /// A fixture on the given broker.
    pub async fn with_kafka(kafka: TestKafka) -> Fixture {
        let db = TestDb::new().await;
        let (registry_url, registry) =
            payrecon::registry::spawn_local(payrecon::registry::RegistryConfig {
                storage: payrecon::registry::Storage::Memory,
            })
            .await
            .unwrap();
        Fixture {
            db,
            kafka,
            registry_url,
            registry,
            group: unique("group"),
            logs: tempfile::tempdir().unwrap(),
        }
    }

    /// Environment that points a `payrecon run` child at this fixture.
    pub fn service_env(&self) -> Vec<(String, String)> {
        vec![
            ("PAYRECON_DATABASE__URL".into(), self.db.url.clone()),
            (
                "PAYRECON_KAFKA__BOOTSTRAP_SERVERS".into(),
                self.kafka.bootstrap.clone(),
            ),
            ("PAYRECON_KAFKA__GROUP_ID".into(), self.group.clone()),
            (
                "PAYRECON_KAFKA__PAYMENTS_TOPIC".into(),
                self.kafka.payments_topic.clone(),
            ),
            (
                "PAYRECON_KAFKA__SETTLEMENTS_TOPIC".into(),
                self.kafka.settlements_topic.clone(),
            ),
            (
                "PAYRECON_KAFKA__PAYOUTS_TOPIC".into(),
                self.kafka.payouts_topic.clone(),
            ),
            (
                "PAYRECON_EXCEPTIONS__TOPIC".into(),
                self.kafka.exceptions_topic.clone(),
            ),
            ("PAYRECON_KAFKA__SESSION_TIMEOUT".into(), "6s".into()),
            ("PAYRECON_KAFKA__MAX_POLL_INTERVAL".into(), "10s".into()),
            ("PAYRECON_REGISTRY__URL".into(), self.registry_url.clone()),
            ("PAYRECON_PIPELINE__RETRY_MAX_BACKOFF".into(), "1s".into()),
            (
                "PAYRECON_PIPELINE__LAG_REFRESH_INTERVAL".into(),
                "1s".into(),
            ),
        ]
    }

    /// Starts `payrecon run` as a child process.
    pub fn spawn_service(&self, name: &str, extra: &[(&str, &str)]) -> Service {
        let mut env = self.service_env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Service::spawn(name, &env, self.logs.path())
    }

    /// The service's settings for this fixture (as `payrecon run` gets them from
    /// [`Fixture::service_env`]).
    pub fn settings(&self) -> payrecon::config::Settings {
        let mut s = payrecon::config::Settings::load(None).unwrap();
        s.database.url = self.db.url.clone().into();
        s.kafka.bootstrap_servers = self.kafka.bootstrap.clone();
        s.kafka.group_id = self.group.clone();
        s.kafka.payments_topic = self.kafka.payments_topic.clone();
        s.kafka.settlements_topic = self.kafka.settlements_topic.clone();
        s.kafka.payouts_topic = self.kafka.payouts_topic.clone();
        s.exceptions.topic = self.kafka.exceptions_topic.clone();
        s.registry.url = self.registry_url.clone();
        s
    }

    /// Waits until reconciliation has judged every due item and the relay published every
    /// outbox row, then checks the exceptions topic holds each outbox row exactly once and
    /// the daily totals equal the rows; returns the outbox seqs.
    pub async fn assert_exceptions_exact(&self) -> Vec<i64> {
        let lateness = chrono::Duration::hours(1);
        let store = &self.db.store;
        wait_for(
            Duration::from_secs(60),
            "reconciliation and the relay to catch up",
            || async {
                let b = payrecon::engine::reconciliation_backlog(store, &self.group, lateness)
                    .await
                    .unwrap();
                b.due == 0 && b.unpublished == 0
            },
        )
        .await;
        let outbox = store.outbox_seqs().await.unwrap();
        let mut on_topic = payrecon::outbox::topic_seqs(&self.settings())
            .await
            .unwrap();
        on_topic.sort_unstable();
        // Exceptions a failover or restore lost stay on the topic, recorded and superseded.
        let lost: Vec<i64> = sqlx::query_scalar("SELECT seq FROM exceptions_lost")
            .fetch_all(store.pool())
            .await
            .unwrap();
        let mut expected = outbox.clone();
        expected.extend(lost);
        expected.sort_unstable();
        assert_eq!(
            on_topic, expected,
            "the exceptions topic must hold every outbox row (and every lost one) exactly once"
        );
        // The history is one unbroken chain per reference ending in its current status, and
        // every change into or out of an exception has exactly one outbox row.
        let (broken, wrong_end, outbox_mismatch): (i64, i64, i64) = sqlx::query_as(
            "WITH h AS (
                SELECT *, lag(to_status) OVER (PARTITION BY payment_reference ORDER BY id) AS prev
                  FROM reconciliation_history)
             SELECT
               (SELECT count(*) FROM h
                 WHERE from_status IS DISTINCT FROM prev OR from_status = to_status),
               (SELECT count(*) FROM reconciliation_items i
                 WHERE status IS DISTINCT FROM (
                    SELECT to_status FROM reconciliation_history x
                     WHERE x.payment_reference = i.payment_reference ORDER BY id DESC LIMIT 1)),
               (SELECT count(*) FROM h
                 WHERE (to_status NOT IN ('MATCHED', 'EXPECTED'))
                       <> coalesce(from_status NOT IN ('MATCHED', 'EXPECTED'), false)
                   AND (SELECT count(*) FROM exceptions_outbox o WHERE o.history_id = h.id) <> 1)",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(
            (broken, wrong_end, outbox_mismatch),
            (0, 0, 0),
            "history rows out of chain, items whose status is not their last history row, \
             exception changes without exactly one outbox row"
        );
        let daily = store.daily_totals_differences().await.unwrap();
        assert!(
            daily.is_empty(),
            "merchant_daily_totals differ from the rows:\n{}",
            daily.join("\n")
        );
        // The payout leg: items against their records, history chains, outbox, totals.
        let rules = payrecon::store::Rules::from_settings(&self.settings().reconciliation);
        let verification = payrecon::tools::report::verify(store, &rules)
            .await
            .unwrap();
        let failed: Vec<String> = (verification.checks.iter())
            .filter(|c| c.name.starts_with("payout") && !c.passed())
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
            "payout checks failed:\n{}",
            failed.join("\n")
        );
        outbox
    }

    /// An encoder registered for this fixture's topics.
    pub async fn encoder(&self) -> Encoder {
        let sr = registry_settings(&self.registry_url, Duration::from_secs(5)).unwrap();
        Encoder::register(
            &sr,
            &self.kafka.payments_topic,
            &self.kafka.settlements_topic,
        )
        .await
        .unwrap()
        .with_payouts(&sr, &self.kafka.payouts_topic)
        .await
        .unwrap()
    }

    /// Generates and produces simulated traffic; returns the expected totals.
    pub async fn produce(&self, options: &SimulationOptions) -> Totals {
        let encoder = self.encoder().await;
        let (records, expected) =
            payrecon::tools::simulate::generate(options, encoder.payment_schema_id()).unwrap();
        self.produce_records(&encoder, &records, options.rate).await;
        expected
    }

    pub async fn produce_records(&self, encoder: &Encoder, records: &[Generated], rate: u64) {
        let producer = self.producer();
        payrecon::tools::simulate::produce(
            &producer,
            encoder,
            &self.kafka.topics(),
            records,
            rate,
            |_| {},
        )
        .await
        .unwrap();
    }

    /// Produces `records` in a background task at `rate` records/s (0 = unthrottled); the
    /// task panics if any record is not acknowledged.
    pub fn produce_in_background(
        &self,
        records: Vec<Generated>,
        encoder: Encoder,
        rate: u64,
    ) -> tokio::task::JoinHandle<()> {
        let producer = self.producer();
        let (p, s, b) = (
            self.kafka.payments_topic.clone(),
            self.kafka.settlements_topic.clone(),
            self.kafka.payouts_topic.clone(),
        );
        tokio::spawn(async move {
            payrecon::tools::simulate::produce(
                &producer,
                &encoder,
                &[&p, &s, &b],
                &records,
                rate,
                |_| {},
            )
            .await
            .expect("producing the simulated records");
        })
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.kafka.bootstrap)
            .set("enable.idempotence", "true")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .create()
            .unwrap()
    }

    /// Waits until every partition's stored next_offset equals its high watermark.
    pub async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let marks = self.kafka.watermarks();
            let offsets = self.db.offsets(&self.group).await;
            let behind: Vec<_> = marks
                .iter()
                .filter(|(tp, (_, high))| {
                    *high > 0 && offsets.get(*tp).copied().unwrap_or(0) != *high
                })
                .collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not drained after {timeout:?}: watermarks {marks:?}, stored {offsets:?}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Asserts the exactly-once outcome: reconciliation caught up and the exceptions topic
    /// holds every outbox row once ([`Fixture::assert_exceptions_exact`]), totals and statuses
    /// equal the expected ones, running totals equal the totals recomputed from rows,
    /// next_offset = high watermark and records_applied = next_offset (no offset applied
    /// twice) on every partition; log start offsets are 0.
    pub async fn assert_exact(&self, expected: &Totals) {
        self.assert_exceptions_exact().await;
        let running = self.db.store.running_totals(&self.group).await.unwrap();
        let diffs = expected.differences(&running);
        assert!(
            diffs.is_empty(),
            "totals differ from expected:\n{}",
            diffs.join("\n")
        );
        let recomputed = self.db.store.recomputed_totals(&self.group).await.unwrap();
        let diffs = running.differences(&recomputed);
        assert!(
            diffs.is_empty(),
            "running totals differ from the rows:\n{}",
            diffs.join("\n")
        );
        let marks = self.kafka.watermarks();
        let offsets = self.db.offsets(&self.group).await;
        let applied = self.db.records_applied(&self.group).await;
        for (tp, (low, high)) in &marks {
            assert_eq!(
                *low, 0,
                "{tp:?}: the mock cluster deleted records (log start offset {low}); the test produced too far ahead"
            );
            if *high == 0 {
                continue;
            }
            assert_eq!(
                offsets.get(tp),
                Some(high),
                "{tp:?}: next_offset != high watermark"
            );
            assert_eq!(
                applied.get(tp),
                Some(high),
                "{tp:?}: records_applied != next_offset: some offset was applied twice or skipped"
            );
        }
    }

    /// Every payment reference is in exactly the status the simulator predicts: not only the
    /// counts per status, the status of each reference.
    pub async fn assert_statuses(
        &self,
        expected: &std::collections::BTreeMap<String, payrecon::reconcile::Status>,
    ) {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT payment_reference, status FROM reconciliation_items ORDER BY payment_reference",
        )
        .fetch_all(self.db.store.pool())
        .await
        .unwrap();
        let actual: std::collections::BTreeMap<String, String> = rows.into_iter().collect();
        let mut wrong = Vec::new();
        for (reference, status) in expected {
            match actual.get(reference) {
                Some(s) if s == status.as_str() => {}
                found => wrong.push(format!("{reference}: expected {status:?}, found {found:?}")),
            }
        }
        wrong.extend(
            (actual.keys())
                .filter(|r| !expected.contains_key(*r))
                .map(|r| format!("{r}: an item the simulation did not create")),
        );
        assert!(
            wrong.is_empty(),
            "{} references in the wrong status, e.g.:\n{}",
            wrong.len(),
            wrong[..wrong.len().min(20)].join("\n")
        );
    }

    /// Every payout item (settlement batch, unexplained credit) is in exactly the status the
    /// simulator predicts, and there is no other.
    pub async fn assert_payout_statuses(
        &self,
        expected: &std::collections::BTreeMap<
            payrecon::reconcile::PayoutKey,
            payrecon::reconcile::PayoutStatus,
        >,
    ) {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT kind, key, status FROM payout_items")
                .fetch_all(self.db.store.pool())
                .await
                .unwrap();
        let actual: std::collections::BTreeMap<(String, String), String> = rows
            .into_iter()
            .map(|(kind, key, status)| ((kind, key), status))
            .collect();
        let mut wrong = Vec::new();
        for (k, status) in expected {
            match actual.get(&(k.kind().to_owned(), k.key().to_owned())) {
                Some(s) if s == status.as_str() => {}
                found => wrong.push(format!("{k:?}: expected {status}, found {found:?}")),
            }
        }
        let known: std::collections::BTreeSet<(String, String)> = (expected.keys())
            .map(|k| (k.kind().to_owned(), k.key().to_owned()))
            .collect();
        wrong.extend(
            (actual.keys())
                .filter(|k| !known.contains(*k))
                .map(|k| format!("{k:?}: a payout item the simulation did not create")),
        );
        assert!(
            wrong.is_empty(),
            "{} payout items in the wrong status, e.g.:\n{}",
            wrong.len(),
            wrong[..wrong.len().min(20)].join("\n")
        );
    }

    /// The last lines of every service log (for assertion messages).
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.logs.path()) {
            for e in entries.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!("--- {} ---\n", e.path().display()));
                for l in &lines[lines.len().saturating_sub(15)..] {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// A `payrecon run` child process.
pub struct Service {
    pub child: Child,
    pub log: PathBuf,
    pub metrics_port: u16,
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Service {
    pub fn spawn(name: &str, env: &[(String, String)], log_dir: &std::path::Path) -> Service {
        let metrics_port = free_port();
        let log = log_dir.join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_payrecon"))
            .arg("run")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("PAYRECON_HTTP__LISTEN", format!("127.0.0.1:{metrics_port}"))
            .env("RUST_LOG", "info,payrecon=info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawning payrecon run");
        Service {
            child,
            log,
            metrics_port,
        }
    }

    fn signal(&self, s: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), s);
    }

    pub fn sigkill(mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn sigstop(&self) {
        self.signal(Signal::SIGSTOP);
    }

    pub fn sigcont(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// SIGTERM and wait; returns the exit code.
    pub async fn terminate(mut self, timeout: Duration) -> Option<i32> {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                self.signal(Signal::SIGKILL);
                let _ = self.child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The body of GET /metrics, if the endpoint answers.
    pub async fn metrics(&self) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        reqwest::get(url).await.ok()?.text().await.ok()
    }

    /// Sum of every sample of `name` whose labels contain all of `labels`.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let body = self.metrics().await?;
        Some(metric_value(&body, name, labels))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Sums the samples of `name` (exact metric name, any labels containing `labels`).
pub fn metric_value(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether a `/metrics` body says its instance owns partition `partition` of `topic`.
pub fn owns_partition(body: &str, topic: &str, partition: i32) -> bool {
    metric_value(
        body,
        payrecon::metrics::PARTITION_ASSIGNED,
        &[
            &format!("topic=\"{topic}\""),
            &format!("partition=\"{partition}\""),
        ],
    ) == 1.0
}

/// Which of partitions `0..partitions` of `topic` a `/metrics` body says its instance owns.
pub fn owned_partitions(body: &str, topic: &str, partitions: i32) -> Vec<i32> {
    (0..partitions)
        .filter(|p| owns_partition(body, topic, *p))
        .collect()
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: its output shows what the service was doing last.
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "---- last {} log lines of {} ----\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
        if let Ok(None) = self.child.try_wait() {
            self.signal(Signal::SIGCONT);
            self.signal(Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Default simulation for scenario tests: no malformed records, a few duplicates.
pub fn simulation(payments: u64, seed: u64) -> SimulationOptions {
    SimulationOptions {
        payments,
        seed,
        malformed: 0,
        ..SimulationOptions::default()
    }
}
