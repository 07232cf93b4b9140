//! End to end against a real, separate Kafka-compatible broker process (tansu, sqlite
//! storage): `payrecon run` is SIGKILLed mid-stream, a fresh instance takes over, and the
//! totals in PostgreSQL are exact, with every offset applied once.
//!
//! CI installs the broker with `cargo install tansu --locked --features libsql`; set
//! `PAYRECON_SKIP_TANSU=1` to skip this test where it is not installed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use payrecon::codec::{Encoder, registry_settings};
use payrecon::domain::Totals;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;

use crate::helpers::{Service, TestDb, free_port, simulation, unique, wait_for, watermarks};

const PARTITIONS: i32 = 4;
const INSTALL_HINT: &str = "cargo install tansu --locked --features libsql";

/// The `tansu` binary: on PATH, else in `$CARGO_HOME/bin` or `~/.cargo/bin`.
fn tansu_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    let cargo_bins = [
        std::env::var_os("CARGO_HOME").map(|h| PathBuf::from(h).join("bin")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").join("bin")),
    ];
    on_path
        .chain(cargo_bins.into_iter().flatten())
        .map(|dir| dir.join("tansu"))
        .find(|p| p.is_file())
}

/// A tansu broker child process with sqlite storage in its own tempdir; SIGKILLed on drop.
struct TansuBroker {
    child: Child,
    bootstrap: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl TansuBroker {
    fn start(binary: &Path) -> TansuBroker {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("tansu.log");
        let file = std::fs::File::create(&log).unwrap();
        let url = format!("tcp://127.0.0.1:{}", free_port());
        // tansu 0.6 resolves `sqlite://<path>` against its working directory, even when the
        // path starts with '/' (`sqlite:///tmp/x.db` opens `$PWD/tmp/x.db`): run it in the
        // tempdir with a relative path.
        let child = Command::new(binary)
            .arg("broker")
            .args(["--cluster-id", &unique("payrecon")])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", binary.display()));
        let broker = TansuBroker {
            child,
            bootstrap: url.trim_start_matches("tcp://").to_owned(),
            log,
            dir,
        };
        broker.wait_ready(Duration::from_secs(30));
        broker
    }

    /// Waits until a metadata request is answered.
    fn wait_ready(&self, timeout: Duration) {
        let client: BaseConsumer = self.client_config().create().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            match client.fetch_metadata(None, Duration::from_millis(500)) {
                Ok(m) if !m.brokers().is_empty() => return,
                result => {
                    assert!(
                        Instant::now() < deadline,
                        "tansu did not answer metadata requests within {timeout:?} ({:?})\n{}",
                        result.err(),
                        self.log_tail()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    fn log_tail(&self) -> String {
        tail("tansu", &self.log)
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

/// The last lines of a log file, headed by `name`.
fn tail(name: &str, path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = format!("--- {name}: {} ---\n", path.display());
    for l in &lines[lines.len().saturating_sub(20)..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// What `helpers::Fixture` provides, around a tansu broker instead of the mock cluster.
struct TansuFixture {
    db: TestDb,
    registry_url: String,
    _registry: payrecon::registry::RegistryHandle,
    payments_topic: String,
    settlements_topic: String,
    group: String,
    // Dropped last: services first (declared in the test), then the broker.
    broker: TansuBroker,
}

impl TansuFixture {
    async fn new(broker: TansuBroker) -> TansuFixture {
        let payments_topic = unique("payments");
        let settlements_topic = unique("settlements");
        payrecon::kafka::ensure_topics(
            &broker.client_config(),
            &[&payments_topic, &settlements_topic],
            PARTITIONS,
        )
        .await
        .unwrap_or_else(|e| panic!("CreateTopics on tansu: {e:#}\n{}", broker.log_tail()));
        let (registry_url, registry) =
            payrecon::registry::spawn_local(payrecon::registry::RegistryConfig {
                storage: payrecon::registry::Storage::Memory,
            })
            .await
            .unwrap();
        TansuFixture {
            db: TestDb::new().await,
            registry_url,
            _registry: registry,
            payments_topic,
            settlements_topic,
            group: unique("group"),
            broker,
        }
    }

    fn topics(&self) -> [&str; 2] {
        [&self.payments_topic, &self.settlements_topic]
    }

    fn watermarks(&self) -> HashMap<(String, i32), (i64, i64)> {
        watermarks(&self.broker.bootstrap, &self.topics(), PARTITIONS)
    }

    /// Same as `Fixture::service_env`, pointed at tansu.
    fn spawn_service(&self, name: &str) -> Service {
        let env: Vec<(String, String)> = [
            ("PAYRECON_DATABASE__URL", self.db.url.as_str()),
            (
                "PAYRECON_KAFKA__BOOTSTRAP_SERVERS",
                self.broker.bootstrap.as_str(),
            ),
            ("PAYRECON_KAFKA__GROUP_ID", self.group.as_str()),
            (
                "PAYRECON_KAFKA__PAYMENTS_TOPIC",
                self.payments_topic.as_str(),
            ),
            (
                "PAYRECON_KAFKA__SETTLEMENTS_TOPIC",
                self.settlements_topic.as_str(),
            ),
            ("PAYRECON_KAFKA__SESSION_TIMEOUT", "6s"),
            ("PAYRECON_KAFKA__MAX_POLL_INTERVAL", "10s"),
            ("PAYRECON_REGISTRY__URL", self.registry_url.as_str()),
            ("PAYRECON_PIPELINE__RETRY_MAX_BACKOFF", "1s"),
            ("PAYRECON_PIPELINE__LAG_REFRESH_INTERVAL", "1s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Service::spawn(name, &env, self.broker.dir.path())
    }

    async fn encoder(&self) -> Encoder {
        let sr = registry_settings(&self.registry_url, Duration::from_secs(5)).unwrap();
        Encoder::register(&sr, &self.payments_topic, &self.settlements_topic)
            .await
            .unwrap()
    }

    fn producer(&self) -> FutureProducer {
        self.broker
            .client_config()
            .set("enable.idempotence", "true")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .create()
            .unwrap()
    }

    /// Sum of the stored next_offsets of the group.
    async fn applied(&self) -> i64 {
        self.db.offsets(&self.group).await.values().sum()
    }

    /// Waits until every partition's stored next_offset equals its high watermark.
    async fn wait_drained(&self, timeout: Duration, services: &[&Service]) {
        let deadline = Instant::now() + timeout;
        loop {
            let marks = self.watermarks();
            let offsets = self.db.offsets(&self.group).await;
            let behind = marks
                .iter()
                .any(|(tp, (_, high))| *high > 0 && offsets.get(tp).copied().unwrap_or(0) != *high);
            if !behind {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not drained after {timeout:?}: watermarks {marks:?}, stored {offsets:?}\n{}",
                self.log_tails(services)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `Fixture::assert_exact` against the broker's watermarks.
    async fn assert_exact(&self, expected: &Totals) {
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
        let marks = self.watermarks();
        let offsets = self.db.offsets(&self.group).await;
        let applied = self.db.records_applied(&self.group).await;
        assert_eq!(marks.len(), 2 * PARTITIONS as usize);
        for (tp, (low, high)) in &marks {
            assert_eq!(*low, 0, "{tp:?}: log start offset {low} on tansu");
            assert!(*high > 0, "{tp:?}: no records produced to this partition");
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

    fn log_tails(&self, services: &[&Service]) -> String {
        let mut out = self.broker.log_tail();
        for s in services {
            out.push_str(&tail("payrecon", &s.log));
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn simulate_run_and_a_sigkill_give_exact_totals_against_a_real_broker_process() {
    let Some(binary) = tansu_binary() else {
        if std::env::var("PAYRECON_SKIP_TANSU").as_deref() == Ok("1") {
            println!("skipped: tansu is not installed ({INSTALL_HINT}) and PAYRECON_SKIP_TANSU=1");
            return;
        }
        panic!(
            "the tansu broker is not installed (not on PATH nor in ~/.cargo/bin): run `{INSTALL_HINT}`, or set PAYRECON_SKIP_TANSU=1 to skip this test"
        );
    };
    let started = Instant::now();
    let fx = TansuFixture::new(TansuBroker::start(&binary)).await;
    let encoder = fx.encoder().await;
    let (records, expected) =
        payrecon::simulate::generate(&simulation(20_000, 2026), encoder.payment_schema_id())
            .unwrap();
    let total = records.len() as i64;
    assert_eq!(total, expected.records);

    let first = fx.spawn_service("tansu-first");
    let producing = {
        let producer = fx.producer();
        let encoder = Arc::new(encoder);
        let (payments, settlements) = (fx.payments_topic.clone(), fx.settlements_topic.clone());
        tokio::spawn(async move {
            payrecon::simulate::produce(
                &producer,
                &encoder,
                &payments,
                &settlements,
                &records,
                0,
                |_| {},
            )
            .await
        })
    };

    // SIGKILL the first instance mid-stream, once a quarter of the records are applied (a
    // few batches of 5000 committed, the next one being collected or committed).
    wait_for(
        Duration::from_secs(45),
        "the first instance to apply a quarter of the records",
        || async { fx.applied().await >= total / 4 },
    )
    .await;
    first.sigkill();
    let at_kill = fx.applied().await;
    assert!(
        at_kill < total,
        "the first instance applied all {total} records before it could be killed; the kill must land mid-stream"
    );
    println!(
        "tansu: first instance SIGKILLed after {at_kill}/{total} records applied ({:?})",
        started.elapsed()
    );

    let second = fx.spawn_service("tansu-second");
    producing
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("producing to tansu: {e:#}\n{}", fx.broker.log_tail()));
    println!("tansu: {total} records produced ({:?})", started.elapsed());
    fx.wait_drained(Duration::from_secs(60), &[&second]).await;
    println!("tansu: drained ({:?})", started.elapsed());
    fx.assert_exact(&expected).await;
    assert!(
        second
            .log_text()
            .contains("assigned partition at its stored offset"),
        "the second instance never got an assignment\n{}",
        tail("payrecon", &second.log)
    );
    assert_eq!(
        second.terminate(Duration::from_secs(20)).await,
        Some(0),
        "SIGTERM must exit 0"
    );
    println!("tansu: done in {:?}", started.elapsed());
}
