//! `payrecon dead-letters list | replay`: inspect dead letters, and decode and apply again
//! those that now succeed (after a fix).

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::store::Store;

/// Connects without migrating: inspecting must never create or change a schema (a wrong
/// database.url would be migrated silently otherwise).
async fn connect(settings: &Settings) -> anyhow::Result<Store> {
    let store = crate::app::connect_store(
        settings,
        &CancellationToken::new(),
        crate::app::Patience::Bounded,
    )
    .await?;
    store.require_schema().await?;
    Ok(store)
}

/// Lists dead letters, newest first (`all`: those already replayed too), as a table or as
/// JSON lines.
pub async fn list(
    settings: &Settings,
    all: bool,
    limit: i64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let store = connect(settings).await?;
    let rows = store.list_dead_letters(!all, limit).await?;
    if json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:>8}  {:<24} {:>4} {:>10}  {:<18} {:<8} message",
            "id", "topic", "part", "offset", "kind", "replayed"
        );
        for r in &rows {
            println!(
                "{:>8}  {:<24} {:>4} {:>10}  {:<18} {:<8} {}",
                r.id,
                r.topic,
                r.partition,
                r.offset,
                r.error_kind,
                if r.replayed_at.is_some() { "yes" } else { "no" },
                r.error_message
            );
        }
        println!("{} dead letter(s)", rows.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// Decodes the open dead letters `ids` (all when empty) again and applies those that now
/// succeed; exit code 3 when some still fail.
pub async fn replay(settings: &Settings, ids: &[i64]) -> anyhow::Result<ExitCode> {
    let store = connect(settings).await?;
    let sr = settings.registry.client()?;
    let codec = crate::inputs::Decoder::new(sr).with_limits(settings.validation.limits());
    let cache = std::sync::Arc::new(crate::reference::ReferenceCache::default());
    cache.reload(&store).await?;
    let reconciler = crate::engine::Reconciler::new(&settings.reconciliation, cache, None)
        .with_payout_leg(!settings.kafka.payouts_topic.is_empty());
    let (mut applied, mut failing) = (0, 0);
    for (id, topic, partition, offset, payload, broker_time) in store.open_dead_letters(ids).await?
    {
        let stream = (settings.kafka.input_topics().into_iter())
            .find(|(_, t)| *t == topic)
            .map_or(crate::codec::Stream::Payments, |(s, _)| s);
        match codec.decode(stream, payload.as_deref(), broker_time).await {
            Ok(record) => {
                let result = crate::engine::redrive::apply_replayed(
                    &store,
                    id,
                    &topic,
                    partition,
                    offset,
                    record,
                    &settings.kafka.group_id,
                    &reconciler,
                )
                .await;
                match result {
                    Ok(_) => applied += 1,
                    // Still refused by the database for a reason in the record.
                    Err(crate::store::CommitError::Permanent(e))
                        if crate::store::disposition(&e)
                            == crate::store::Disposition::RecordRefused =>
                    {
                        let reason = format!(
                            "{}: {}",
                            crate::codec::PoisonKind::DatabaseRefused.as_str(),
                            crate::store::describe(&e)
                        );
                        store.record_replay_failure(id, &reason).await?;
                        failing += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(crate::codec::DecodeError::Poison { kind, message }) => {
                store
                    .record_replay_failure(id, &format!("{}: {message}", kind.as_str()))
                    .await?;
                failing += 1;
            }
            Err(e @ crate::codec::DecodeError::Transient(_)) => {
                anyhow::bail!(
                    "stopping the replay at dead letter {id}: {e}; nothing was lost, run it again"
                );
            }
        }
    }
    println!("replayed: {applied} applied, {failing} still failing");
    Ok(if failing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
