//! Topic administration: creating the topics a local run needs, counting partitions.

/// Creates `topics` with `partitions` partitions if they do not exist (tests, demo, simulate).
pub async fn ensure_topics(
    config: &rdkafka::ClientConfig,
    topics: &[&str],
    partitions: i32,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Partitions of `topics` in all, from the broker's metadata (the watermark waits for every
/// one of them). A topic that does not exist counts as 0.
pub fn partition_count(config: &rdkafka::ClientConfig, topics: &[&str]) -> anyhow::Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = config.create()?;
    let mut n = 0;
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), std::time::Duration::from_secs(10))?;
        n += metadata
            .topics()
            .iter()
            .filter(|t| t.name() == *topic && t.error().is_none())
            .map(|t| t.partitions().len() as i64)
            .sum::<i64>();
    }
    Ok(n)
}
