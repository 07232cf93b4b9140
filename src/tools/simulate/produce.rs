//! Producing the generated records, and `payrecon simulate` itself.

use super::*;

/// Produces `records` to the two topics with an idempotent producer, at `rate` records/s
/// (0 = unthrottled). Returns when every record is acknowledged.
///
/// `topics` are the input topics in topic-index order: payments, settlements and, when the
/// records hold payouts, the payouts topic.
pub async fn produce(
    producer: &FutureProducer,
    encoder: &Encoder,
    topics: &[&str],
    records: &[Generated],
    rate: u64,
    progress: impl FnMut(usize),
) -> anyhow::Result<()> {
    produce_stamped(
        producer,
        encoder,
        topics,
        records,
        rate,
        BrokerTime::Now,
        progress,
    )
    .await
}

/// [`produce`] with the records' broker timestamps chosen by `broker_time`.
#[allow(clippy::too_many_arguments)]
pub async fn produce_stamped(
    producer: &FutureProducer,
    encoder: &Encoder,
    topics: &[&str],
    records: &[Generated],
    rate: u64,
    broker_time: BrokerTime,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<()> {
    anyhow::ensure!(
        topics.len() >= 2,
        "payments and settlements topics are required"
    );
    let (payments_topic, settlements_topic) = (topics[0], topics[1]);
    let payouts_topic = topics.get(2).copied();
    let mut sender = Sender::new(producer);
    let mut stamp: Option<i64> = None;
    let started = tokio::time::Instant::now();
    for (n, r) in records.iter().enumerate() {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
        let (topic, bytes) = match r {
            Generated::Payment(p) => (payments_topic, encoder.encode_payment(p)?),
            Generated::Settlement(s) => (settlements_topic, encoder.encode_settlement(s)?),
            Generated::Payout(b) => (
                payouts_topic.context("payout records need a payouts topic")?,
                encoder.encode_payout(b)?,
            ),
            Generated::Malformed {
                payments_topic: true,
                bytes,
                ..
            } => (payments_topic, bytes.clone()),
            Generated::Malformed { bytes, .. } => (settlements_topic, bytes.clone()),
        };
        let key = r.key().to_owned();
        // A malformed record has no event time: it takes the previous record's.
        stamp = match (broker_time, r) {
            (BrokerTime::Now, _) => None,
            (BrokerTime::Event, Generated::Payment(p)) => Some(p.event_time.timestamp_millis()),
            (BrokerTime::Event, Generated::Settlement(l)) => Some(l.event_time.timestamp_millis()),
            (BrokerTime::Event, Generated::Payout(b)) => Some(b.event_time.timestamp_millis()),
            (BrokerTime::Event, Generated::Malformed { .. }) => stamp,
        };
        sender.send(topic, &key, &bytes, stamp).await?;
        if n % 10_000 == 0 {
            progress(n);
        }
    }
    sender.finish().await?;
    progress(records.len());
    Ok(())
}

/// `payrecon simulate`: generate, produce, and write the expected totals.
pub async fn command(
    settings: &Settings,
    options: &SimulationOptions,
    create_topics: Option<i32>,
    load_reference: bool,
) -> anyhow::Result<crate::domain::Totals> {
    let k = &settings.kafka;
    let mut options = options.clone().with_rules(&settings.reconciliation);
    // No payouts topic configured: the payout leg is off, so there is nowhere to send them.
    options.payouts &= !k.payouts_topic.is_empty();
    let options = &options;
    if load_reference {
        let (merchants, rates) = reference_data(options)?;
        let store = crate::app::connect_store(
            settings,
            &tokio_util::sync::CancellationToken::new(),
            crate::app::Patience::Bounded,
        )
        .await?;
        store.migrate().await?;
        let m = store.load_merchants(&merchants, None).await?;
        let r = store.load_rates(&rates, None).await?;
        println!(
            "loaded reference data: {} merchant versions, {} FX rate versions ({} unchanged)",
            m.inserted,
            r.inserted,
            m.unchanged + r.unchanged
        );
        store.pool().close().await;
    }
    if let Some(partitions) = create_topics {
        let inputs = k.input_topic_names();
        crate::kafka::ensure_topics(
            &k.client_config(),
            &inputs.iter().map(String::as_str).collect::<Vec<_>>(),
            partitions,
        )
        .await?;
        // The relay publishes there; a broker without auto-creation would refuse it.
        crate::kafka::ensure_topics(&k.client_config(), &[&settings.exceptions.topic], 1).await?;
    }
    let sr = settings.registry.client()?;
    let mut encoder =
        crate::inputs::Encoder::register(&sr, &k.payments_topic, &k.settlements_topic).await?;
    if !k.payouts_topic.is_empty() {
        encoder = encoder.with_payouts(&sr, &k.payouts_topic).await?;
    }
    let (records, expected) = generate(options, encoder.payment_schema_id())?;
    let producer = crate::kafka::producer::idempotent(k)?;
    let topic_names = k.input_topic_names();
    let topics: Vec<&str> = topic_names.iter().map(String::as_str).collect();
    let mut expected = expected;
    let total = records.len();
    match &options.files {
        None => {
            produce_stamped(
                &producer,
                &encoder,
                &topics,
                &records,
                options.rate,
                options.broker_time,
                |n| {
                    tracing::info!(produced = n, total, "simulating");
                },
            )
            .await?
        }
        Some(dir) => {
            let exact = options.file_formats == FileFormats::Exact;
            let (steps, written) = files::plan(records, dir, options.seed, exact)?;
            // The log records the service applies: the topics' records and each file
            // entry once (a file imported again produces nothing).
            let produced: usize = steps
                .iter()
                .map(|s| match s {
                    files::Step::Produce(r) => r.len(),
                    files::Step::Import(..) => 0,
                })
                .sum();
            expected.records = (produced as u64 + written.entries) as i64;
            let to = files::Producing {
                producer: &producer,
                encoder: &encoder,
                topics: &topics,
                rate: options.rate,
                broker_time: options.broker_time,
            };
            files::run(settings, &steps, &written, to).await?;
        }
    }
    if let Some(path) = &options.expected_out {
        std::fs::write(path, serde_json::to_vec_pretty(&expected)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "produced {total} records: {} payment events, {} settlement lines, {} bank statement lines, {} malformed",
        expected.payment_events,
        expected.settlement_lines,
        expected.statement_lines,
        expected.dead_letters
    );
    Ok(expected)
}
