//! A benchmark stage: its own topics, group and database, the backlog it produces, and the
//! stages measured on the service in this process (hostile records, ingestion only, the
//! store-only ceiling's pre-decoded batches).

use super::*;

/// The hostile records of the hostile stage, in turn: one for each class validation catches,
/// and one that only PostgreSQL refuses (found by bisection under savepoints).
pub(super) const HOSTILE_CLASSES: [&str; 4] = [
    "invalid_text",
    "field_too_long",
    "implausible_event_time",
    "database_refused",
];

/// `records` with one hostile payment event after every `every` of them (a spoilt copy of
/// the payment before it; bytes as the codec would see them). Returns the log and the number
/// of hostile records.
pub(super) fn with_hostile_records(
    records: &[Generated],
    every: u64,
    encoder: &crate::inputs::Encoder,
) -> anyhow::Result<(Vec<Generated>, u64)> {
    let mut out = Vec::with_capacity(records.len() + records.len() / every as usize + 1);
    let mut last_payment = None;
    let mut n = 0u64;
    for (i, r) in records.iter().enumerate() {
        out.push(r.clone());
        if let Generated::Payment(p) = r {
            last_payment = Some(p);
        }
        let Some(p) = last_payment else { continue };
        if !(i as u64 + 1).is_multiple_of(every) {
            continue;
        }
        let mut h = p.clone();
        h.event_id = format!("hostile-{n}-{}", p.event_id);
        match HOSTILE_CLASSES[n as usize % HOSTILE_CLASSES.len()] {
            "invalid_text" => h.merchant_id.push('\0'),
            "field_too_long" => h.payment_reference = "r".repeat(100_000),
            "implausible_event_time" => {
                h.event_time = chrono::Utc::now() + chrono::Duration::days(30)
            }
            _ => h.psp_reference = Some(REFUSED_PSP.into()),
        }
        out.push(Generated::Malformed {
            payments_topic: true,
            key: p.payment_reference.clone(),
            bytes: encoder.encode_payment(&h)?,
        });
        n += 1;
    }
    Ok((out, n))
}

/// The psp_reference the hostile stage's database refuses (a CHECK the service knows nothing
/// of), so its bisection path is measured too.
pub(super) const REFUSED_PSP: &str = "bench-refused-by-the-database";

/// An end-to-end stage's topics, database and consumer group.
pub(super) struct Stage {
    pub(super) tag: &'static str,
    pub(super) group: &'static str,
    pub(super) topics: (&'static str, &'static str),
    /// Adds a CHECK that refuses [`REFUSED_PSP`] (the hostile stage).
    pub(super) refuse_psp: bool,
}

impl Stage {
    /// Creates the topics and a database with the simulation's reference data, points
    /// `settings` at them and registers the schemas; returns the database name and the
    /// encoder.
    pub(super) async fn prepare(
        &self,
        settings: &mut Settings,
        admin: &PgConnectOptions,
        cluster: &EmbeddedKafka,
        sim: &SimulationOptions,
        partitions: i32,
    ) -> anyhow::Result<(String, crate::inputs::Encoder)> {
        let (payments_topic, settlements_topic) = self.topics;
        cluster.create_topic(payments_topic, partitions)?;
        cluster.create_topic(settlements_topic, partitions)?;
        // The payout leg is on, as in production: its items follow the settlement batches
        // (the bench produces no statement lines, so they stay pending).
        let payouts_topic = format!("{payments_topic}.payouts");
        cluster.create_topic(&payouts_topic, partitions)?;
        // Each stage's database publishes to an exceptions topic of its own: a fresh database
        // facing the topic an earlier stage filled would (rightly) take those exceptions for
        // ones it lost (a restore) and supersede each of them, which is not what is measured.
        let exceptions_topic = format!("{payments_topic}.exceptions");
        cluster.create_topic(&exceptions_topic, 1)?;
        let (db, url, store) = fresh_store(admin, self.tag).await?;
        load_reference(&store, sim, settings).await?;
        if self.refuse_psp {
            crate::store::bench::refuse_psp_reference(store.pool(), REFUSED_PSP).await?;
        }
        store.pool().close().await;
        settings.database.url = SecretString::from(url);
        settings.kafka.payments_topic = payments_topic.into();
        settings.kafka.settlements_topic = settlements_topic.into();
        settings.kafka.payouts_topic = payouts_topic;
        settings.exceptions.topic = exceptions_topic;
        settings.kafka.group_id = self.group.into();
        let sr = crate::codec::registry_settings(
            &settings.registry.url,
            settings.registry.request_timeout,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let encoder =
            crate::inputs::Encoder::register(&sr, payments_topic, settlements_topic).await?;
        Ok((db, encoder))
    }
}

/// A stage's backlog consumed by the real service, which keeps running.
pub(super) struct Backlog {
    /// The producer that wrote the backlog (the latency run goes on with it).
    pub(super) producer: crate::kafka::producer::FutureProducer,
    pub(super) shutdown: CancellationToken,
    pub(super) service: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub(super) events: mpsc::UnboundedReceiver<LoopEvent>,
    /// Records/s from the first commit on.
    pub(super) rate: f64,
}

impl Stage {
    /// Produces `records` to the stage's topics as fast as they go; returns the producer.
    pub(super) async fn produce(
        &self,
        settings: &Settings,
        encoder: &crate::inputs::Encoder,
        records: &[Generated],
    ) -> anyhow::Result<crate::kafka::producer::FutureProducer> {
        let producer = crate::kafka::producer::idempotent(&settings.kafka)?;
        let (payments, settlements) = self.topics;
        crate::tools::simulate::produce(
            &producer,
            encoder,
            &[payments, settlements],
            records,
            0,
            |_| {},
        )
        .await?;
        Ok(producer)
    }

    /// Produces `records` to the stage's topics, starts the service on `settings` and
    /// measures how fast it applies them.
    pub(super) async fn consume_backlog(
        &self,
        settings: &Settings,
        encoder: &crate::inputs::Encoder,
        records: &[Generated],
    ) -> anyhow::Result<Backlog> {
        let producer = self.produce(settings, encoder, records).await?;
        let shutdown = CancellationToken::new();
        let (tx, mut events) = mpsc::unbounded_channel();
        let service = tokio::spawn(crate::app::run(
            settings.clone(),
            shutdown.clone(),
            Some(tx),
        ));
        let rate = backlog_rate(&mut events, records.len() as u64).await?;
        Ok(Backlog {
            producer,
            shutdown,
            service,
            events,
            rate,
        })
    }
}

/// Stage 5: end-to-end again, on the same backlog with hostile records in it, into a database
/// of its own: records/s through the same service loop.
pub(super) async fn hostile_stage(
    mut settings: Settings,
    admin: &PgConnectOptions,
    cluster: &EmbeddedKafka,
    sim: &SimulationOptions,
    records: &[Generated],
    o: &BenchOptions,
) -> anyhow::Result<(f64, u64)> {
    let stage = Stage {
        tag: "hostile",
        group: "bench-hostile",
        topics: ("bench.hostile.payments", "bench.hostile.settlements"),
        refuse_psp: true,
    };
    let (db, encoder) = stage
        .prepare(&mut settings, admin, cluster, sim, o.partitions)
        .await?;
    let (log, hostile) = with_hostile_records(records, o.hostile_every, &encoder)?;
    let Backlog {
        shutdown,
        service,
        rate,
        ..
    } = stage.consume_backlog(&settings, &encoder, &log).await?;
    shutdown.cancel();
    service.await??;
    let store = Store::new(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&crate::store::database_url(admin, &db))
            .await?,
    );
    let kept = store.list_dead_letters(false, i64::MAX).await?.len() as u64;
    store.pool().close().await;
    let _ = crate::store::drop_database(admin, &db).await;
    anyhow::ensure!(
        kept == hostile,
        "{hostile} hostile records produced, {kept} dead-lettered"
    );
    Ok((rate, hostile))
}

/// The ingestion path alone: the end-to-end run on the same backlog with reconciliation
/// switched off, into a database of its own; records/s.
pub(super) async fn ingestion_stage(
    mut settings: Settings,
    admin: &PgConnectOptions,
    cluster: &EmbeddedKafka,
    sim: &SimulationOptions,
    records: &[Generated],
    o: &BenchOptions,
) -> anyhow::Result<f64> {
    let stage = Stage {
        tag: "ingest",
        group: "bench-ingest",
        topics: ("bench.ingest.payments", "bench.ingest.settlements"),
        refuse_psp: false,
    };
    settings.reconciliation.enabled = false;
    let (db, encoder) = stage
        .prepare(&mut settings, admin, cluster, sim, o.partitions)
        .await?;
    let Backlog {
        shutdown,
        service,
        rate,
        ..
    } = stage.consume_backlog(&settings, &encoder, records).await?;
    shutdown.cancel();
    service.await??;
    let _ = crate::store::drop_database(admin, &db).await;
    Ok(rate)
}

/// The store-only stage's batches, per commit lane: each record on the partition its payment
/// reference hashes to (the producer keys records by it, so a reference's records share a
/// partition number), a lane holding the partitions `p` with `p mod lanes == lane`, each lane's
/// records in log order cut into batches of at most `max`.
pub(super) fn pre_decoded_batches(
    records: &[Generated],
    max: usize,
    partitions: i32,
    lanes: usize,
) -> Vec<Vec<Batch>> {
    use std::hash::{Hash, Hasher};
    let topics = vec![
        "bench.payments".to_string(),
        "bench.settlements".to_string(),
    ];
    let mut per_lane: Vec<Vec<(&Generated, usize, i32)>> = vec![Vec::new(); lanes];
    for r in records {
        let (topic, key) = match r {
            Generated::Payment(e) => (0, e.payment_reference.as_str()),
            Generated::Settlement(l) => (1, l.payment_reference.as_str()),
            Generated::Payout(_) | Generated::Malformed { .. } => continue,
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let partition = (h.finish() % partitions as u64) as i32;
        per_lane[partition as usize % lanes].push((r, topic, partition));
    }
    let mut next = vec![[0i64; 2]; partitions as usize];
    let mut started: Vec<[bool; 2]> = vec![[false; 2]; partitions as usize];
    let mut batch = |chunk: &[(&Generated, usize, i32)]| {
        let mut b = Batch {
            topics: topics.clone(),
            ..Batch::default()
        };
        let mut progress: std::collections::BTreeMap<(usize, i32), PartitionProgress> =
            Default::default();
        for &(r, topic, partition) in chunk {
            let offset = next[partition as usize][topic];
            next[partition as usize][topic] += 1;
            let expected = started[partition as usize][topic].then_some(offset);
            let p = progress
                .entry((topic, partition))
                .or_insert_with(|| PartitionProgress {
                    topic: topics[topic].clone(),
                    partition,
                    expected,
                    next_offset: offset,
                    records: 0,
                    last_record_time: None,
                });
            p.next_offset = offset + 1;
            p.records += 1;
            let source = Source {
                topic,
                partition,
                offset,
            };
            match r {
                Generated::Payment(e) => b.payments.push((e.clone(), source)),
                Generated::Settlement(l) => b.settlements.push((l.clone(), source)),
                Generated::Payout(_) | Generated::Malformed { .. } => {}
            }
        }
        for (topic, partition) in progress.keys() {
            started[*partition as usize][*topic] = true;
        }
        b.progress = progress.into_values().collect();
        b
    };
    per_lane
        .iter()
        .map(|records| records.chunks(max.max(1)).map(&mut batch).collect())
        .collect()
}

/// Peak resident set size of this process (VmHWM), in MiB; 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// A kB field of this process's /proc status (`VmRSS:`, `VmHWM:`), in MiB; 0 where /proc is
/// unavailable.
pub(super) fn status_mib(field: &str) -> f64 {
    proc_status_mib("self", field).unwrap_or(0.0)
}

/// A kB field (`VmRSS:`, `VmHWM:`, `RssAnon:`) of `/proc/<process>/status`, in MiB.
pub(super) fn proc_status_mib(process: &str, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}
