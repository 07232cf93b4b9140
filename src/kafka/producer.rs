//! Producers: the idempotent one the simulator, the benchmark and the tests feed the input
//! topics with ([`Sender`] keeps it busy and waits for every acknowledgement), and the
//! exceptions relay's ([`RelayProducer`]: idempotent, transactional where configured).

use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer};

pub use rdkafka::producer::FutureProducer;

use crate::config::kafka::KafkaSettings;

/// Bound of the blocking transaction calls (init, commit).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// An idempotent producer with `[kafka]`'s settings.
pub fn idempotent(kafka: &KafkaSettings) -> anyhow::Result<FutureProducer> {
    kafka
        .producer_config()
        .create()
        .context("creating the producer")
}

/// Sends records through a producer, keeping up to 20,000 in flight (waiting for
/// acknowledgements when the local queue is full), and [`Sender::finish`] waits for every
/// acknowledgement: a record not acknowledged is an error, never a silent loss.
pub struct Sender<'a> {
    producer: &'a FutureProducer,
    in_flight: FuturesUnordered<DeliveryFuture>,
}

impl<'a> Sender<'a> {
    pub fn new(producer: &'a FutureProducer) -> Self {
        Self {
            producer,
            in_flight: FuturesUnordered::new(),
        }
    }

    /// Queues one record; `timestamp_ms`: its broker timestamp (the producer's clock when
    /// `None`).
    pub async fn send(
        &mut self,
        topic: &str,
        key: &str,
        payload: &[u8],
        timestamp_ms: Option<i64>,
    ) -> anyhow::Result<()> {
        loop {
            let mut record = FutureRecord::to(topic).key(key).payload(payload);
            if let Some(ms) = timestamp_ms {
                record = record.timestamp(ms);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.in_flight.push(delivery);
                    break;
                }
                Err((e, _)) => {
                    // Local queue full: wait for some acknowledgements, then retry.
                    if self.in_flight.is_empty() {
                        return Err(anyhow::Error::new(e).context("producing"));
                    }
                    self.drain(1).await?;
                }
            }
        }
        if self.in_flight.len() >= 20_000 {
            self.drain(10_000).await?;
        }
        Ok(())
    }

    /// Waits for every acknowledgement, then flushes the producer.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        self.drain(usize::MAX).await?;
        self.producer
            .flush(Duration::from_secs(30))
            .context("flushing the producer")
    }

    async fn drain(&mut self, count: usize) -> anyhow::Result<()> {
        let mut n = 0;
        while n < count {
            match self.in_flight.next().await {
                None => return Ok(()),
                Some(Ok(Ok(_))) => n += 1,
                Some(Ok(Err((e, _)))) => {
                    return Err(anyhow::Error::new(e).context("a record was not acknowledged"));
                }
                Some(Err(_)) => anyhow::bail!("the producer was dropped before acknowledging"),
            }
        }
        Ok(())
    }
}

/// One message of a relay round: key, Avro payload and headers (name, text).
pub struct RelayMessage {
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

/// The exceptions relay's producer: idempotent (retries never duplicate within a session),
/// each message delivered or failed within `message_timeout`; with a `transactional_id`,
/// each round is one Kafka transaction and creating it fences every earlier producer with
/// that id (their open transaction aborted, their writes rejected).
pub struct RelayProducer {
    producer: FutureProducer<super::Quiet>,
    transactional: bool,
}

impl RelayProducer {
    pub async fn new(
        kafka: &KafkaSettings,
        message_timeout: Duration,
        transactional_id: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut config = kafka.producer_config();
        config.set(
            "message.timeout.ms",
            message_timeout.as_millis().max(1).to_string(),
        );
        if let Some(id) = transactional_id {
            config.set("transactional.id", id);
        }
        let producer: FutureProducer<super::Quiet> = config
            .create_with_context(super::Quiet::default())
            .context("creating the relay producer")?;
        if let Some(id) = transactional_id {
            let p = producer.clone();
            tokio::task::spawn_blocking(move || p.init_transactions(TRANSACTION_TIMEOUT))
                .await?
                .with_context(|| format!("initialising transactions for transactional.id {id}"))?;
        }
        Ok(Self {
            producer,
            transactional: transactional_id.is_some(),
        })
    }

    /// Sends one round to `topic` and returns once every message is acknowledged (and, when
    /// transactional, the round's transaction is committed). A failure leaves the round
    /// undecided: the caller ends its session, and the next relay finds what landed.
    pub async fn publish(&self, topic: &str, messages: &[RelayMessage]) -> anyhow::Result<()> {
        if self.transactional {
            self.producer
                .begin_transaction()
                .context("beginning a relay transaction")?;
        }
        let mut acks = FuturesOrdered::new();
        for m in messages {
            let headers = m
                .headers
                .iter()
                .fold(OwnedHeaders::new(), |all, (key, value)| {
                    all.insert(Header {
                        key,
                        value: Some(value.as_bytes()),
                    })
                });
            let record = FutureRecord::to(topic)
                .key(&m.key)
                .payload(&m.payload)
                .headers(headers);
            let ack = (self.producer)
                .send_result(record)
                .map_err(|(e, _)| anyhow::Error::new(e).context("queueing an exception"))?;
            acks.push_back(ack);
        }
        while let Some(ack) = acks.next().await {
            ack.context("the relay producer went away")?
                .map_err(|(e, _)| anyhow::Error::new(e).context("publishing an exception"))?;
        }
        if self.transactional {
            let p = self.producer.clone();
            tokio::task::spawn_blocking(move || p.commit_transaction(TRANSACTION_TIMEOUT))
                .await?
                .context("committing a relay transaction")?;
        }
        Ok(())
    }
}
