//! Wires the service together: database, migrations, codec, consumer loop, lag reporter and
//! the operations endpoint; runs until the shutdown token is cancelled or a part fails.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Settings, redact_text, redact_url};
use crate::engine::{LogEnds, Reconciler};
use crate::http::Stage;
use crate::inputs::Decoder;
use crate::instance::instance_id;
use crate::kafka::{ConsumerLoop, LoopEvent};
use crate::reference::ReferenceCache;
use crate::store::Store;

/// How long a start-up waits for a database that does not answer.
#[derive(Debug, Clone, Copy)]
pub enum Patience {
    /// Until shutdown (the service: the database may start after it).
    Forever,
    /// `database.startup_timeout` (commands: a cron job or an init container must end).
    Bounded,
}

/// Connects to PostgreSQL. A refusal retrying cannot fix (authentication failed, database or
/// role missing, TLS refused) fails at once, naming the cause; anything else (connection
/// refused, timeouts, the server starting up) is retried with backoff, forever or up to
/// `database.startup_timeout` depending on `patience`, until `shutdown`.
pub async fn connect_store(
    settings: &Settings,
    shutdown: &CancellationToken,
    patience: Patience,
) -> anyhow::Result<Store> {
    connect_store_reporting(settings, shutdown, patience, None).await
}

/// [`connect_store`], telling `stage` (readiness) what it waits for while it retries.
async fn connect_store_reporting(
    settings: &Settings,
    shutdown: &CancellationToken,
    patience: Patience,
    stage: Option<&Stage>,
) -> anyhow::Result<Store> {
    let options = settings.database.connect_options()?;
    let mut backoff = settings.pipeline.retry_initial_backoff;
    let started = std::time::Instant::now();
    let database = settings.database.redacted_url();
    loop {
        // One server, or the writable one of a list (store::targets).
        match crate::store::targets::connect(&settings.database, options.clone()).await {
            Ok(store) => return Ok(store),
            Err(e) => {
                let cause = redact_text(&crate::store::describe(&e));
                if let Some(why) = crate::store::refused_connection(&e) {
                    anyhow::bail!("cannot connect to PostgreSQL at {database}: {why} ({cause})");
                }
                let limit = settings.database.startup_timeout;
                if matches!(patience, Patience::Bounded) && started.elapsed() + backoff > limit {
                    anyhow::bail!(
                        "PostgreSQL at {database} did not answer within database.startup_timeout ({}): {cause}",
                        humantime::format_duration(limit)
                    );
                }
                if let Some(stage) = stage {
                    stage.waiting(format!("waiting for PostgreSQL at {database}: {cause}"));
                }
                tracing::warn!(%database, error = %cause, retry_in = ?backoff, "cannot connect to PostgreSQL; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(StoppedDuringStartup("PostgreSQL answered").into()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(settings.pipeline.retry_max_backoff);
            }
        }
    }
}

/// Shutdown was requested while start-up waited for a dependency: not a failure.
#[derive(Debug, thiserror::Error)]
#[error("shutdown before {0}")]
pub struct StoppedDuringStartup(pub &'static str);

/// Why the schema registry cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RegistryProblem {
    /// Retrying cannot help: credentials refused, access denied, TLS refused.
    #[error("{0}")]
    Refused(String),
    /// Unreachable, timing out or answering 5xx: worth waiting for.
    #[error("{0}")]
    Unavailable(String),
}

/// Asks the registry for the versions of the payments subject, with the configured
/// credentials and TLS, so a wrong credential, a missing permission or a refused certificate
/// ends start-up at once (while a registry that is down is waited for). The subject need not
/// exist: a 404 is an answer from a registry that accepted the request.
///
/// Over TLS a reset connection is asked again (up to [`RESET_REASKS`] times, 100 ms apart)
/// before it counts as unavailable: a TLS 1.3 server checks the client's certificate only
/// after the client has finished its side of the handshake and sent its request, so a refused
/// certificate reaches the client either as the server's alert or, when the server's close
/// overtakes the alert, as a connection reset by the peer.
pub async fn probe_registry(settings: &Settings) -> Result<(), RegistryProblem> {
    let tls = settings
        .registry
        .url
        .trim_start()
        .get(..6)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https:"));
    let mut reasked = 0;
    loop {
        let result = probe_registry_once(settings).await;
        match &result {
            Err(RegistryProblem::Unavailable(why))
                if tls && reasked < RESET_REASKS && reset_by_peer(why) =>
            {
                reasked += 1;
                tracing::debug!(error = %why, reasked, "the schema registry reset a TLS connection; asking again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => return result,
        }
    }
}

/// How often [`probe_registry`] asks again after a reset TLS connection.
const RESET_REASKS: u32 = 3;

/// Whether a registry error says the peer dropped the connection mid-request.
fn reset_by_peer(detail: &str) -> bool {
    let lower = detail.to_lowercase();
    [
        "connection reset",
        "broken pipe",
        "connection closed before message completed",
        "unexpected eof",
    ]
    .iter()
    .any(|s| lower.contains(s))
}

async fn probe_registry_once(settings: &Settings) -> Result<(), RegistryProblem> {
    let url = redact_url(&settings.registry.url);
    let sr = settings
        .registry
        .client()
        .map_err(|e| RegistryProblem::Refused(format!("{e:#}")))?;
    let subject = format!("{}-value", settings.kafka.payments_topic);
    let Err(e) =
        schema_registry_converter::async_impl::schema_registry::get_all_versions(&sr, subject)
            .await
    else {
        return Ok(());
    };
    let detail = redact_text(&crate::config::error_chain(&e));
    let status = |code: &str| e.error.contains(&format!("failed with status {code}"));
    if status("404") {
        return Ok(());
    }
    if status("401") {
        return Err(RegistryProblem::Refused(format!(
            "the schema registry at {url} refused the credentials (HTTP 401): check registry.username and \
             registry.password, or registry.token ({detail})"
        )));
    }
    if status("403") {
        return Err(RegistryProblem::Refused(format!(
            "the schema registry at {url} denied access (HTTP 403): the credentials lack read access to \
             subject {}-value ({detail})",
            settings.kafka.payments_topic
        )));
    }
    let lower = detail.to_lowercase();
    if [
        "certificate",
        "alert",
        "wrong version number",
        "unknown ca",
        "self signed",
    ]
    .iter()
    .any(|s| lower.contains(s))
    {
        return Err(RegistryProblem::Refused(format!(
            "TLS with the schema registry at {url} failed (check registry.ca_location, \
             registry.certificate_location and registry.key_location): {detail}"
        )));
    }
    Err(RegistryProblem::Unavailable(format!(
        "the schema registry at {url} does not answer: {detail}"
    )))
}

/// Runs the service until `shutdown` is cancelled; returns an error if a part fails
/// permanently. `observer` receives a [`LoopEvent`] per batch (benchmarks, demo).
///
/// The operations endpoint is served first, before any dependency is contacted: `/metrics`
/// and `/health/live` answer from the start, and `/health/ready` says what start-up waits
/// for until the consumer runs.
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
    observer: Option<mpsc::UnboundedSender<LoopEvent>>,
) -> anyhow::Result<()> {
    tracing::info!(database = %settings.database.redacted_url(), brokers = %redact_url(&settings.kafka.bootstrap_servers), group = %settings.kafka.group_id, registry = %redact_url(&settings.registry.url), group_instance_id = ?settings.kafka.group_instance_id, "starting payrecon");
    // Install the recorder first: series registered before it exists would go nowhere.
    crate::metrics::handle();
    let input_topics = settings.kafka.input_topic_names();
    crate::telemetry::register_zeroes(
        &input_topics.iter().map(String::as_str).collect::<Vec<_>>(),
        &crate::codec::PoisonKind::ALL.map(|k| k.as_str()),
    );
    let listener = tokio::net::TcpListener::bind(settings.http.listen)
        .await
        .with_context(|| format!("binding the HTTP endpoint on {}", settings.http.listen))?;
    tracing::info!(address = %listener.local_addr()?, "serving /metrics and /health");
    let stage = Arc::new(Stage::default());
    let tracker = TaskTracker::new();
    // A failing part cancels the others through this child token.
    let stop = shutdown.child_token();
    let ops = crate::http::OpsState {
        metrics: crate::metrics::handle(),
        stage: stage.clone(),
    };
    let http_stop = stop.clone();
    tracker.spawn(async move {
        if let Err(e) =
            crate::http::serve(listener, ops, async move { http_stop.cancelled().await }).await
        {
            tracing::error!(error = %e, "HTTP endpoint failed");
        }
    });
    let result = start_and_consume(&settings, &stage, &tracker, &stop, observer).await;
    // Start-up may have ended early (shutdown, a refusal): stop the endpoint too.
    stop.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    match result {
        // SIGTERM while waiting for a dependency is a clean stop (a pod deleted while its
        // database is down must not count as a crash).
        Err(e) if e.downcast_ref::<StoppedDuringStartup>().is_some() => {
            tracing::info!("{e}: stopped during start-up");
            Ok(())
        }
        other => other,
    }
}

/// Sleeps `backoff` (then doubles it up to the maximum) unless `stop` comes first.
async fn pause(
    backoff: &mut Duration,
    settings: &Settings,
    stop: &CancellationToken,
    what: &'static str,
) -> anyhow::Result<()> {
    tokio::select! {
        _ = stop.cancelled() => return Err(StoppedDuringStartup(what).into()),
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(settings.pipeline.retry_max_backoff);
    Ok(())
}

/// Start-up (each wait told to `stage`), then the service's tasks until the consumer ends.
async fn start_and_consume(
    settings: &Settings,
    stage: &Stage,
    tracker: &TaskTracker,
    stop: &CancellationToken,
    observer: Option<mpsc::UnboundedSender<LoopEvent>>,
) -> anyhow::Result<()> {
    let store = connect_store_reporting(settings, stop, Patience::Forever, Some(stage)).await?;
    stage.waiting("applying migrations");
    store.migrate().await.context("applying migrations")?;
    let mut backoff = settings.pipeline.retry_initial_backoff;
    loop {
        match probe_registry(settings).await {
            Ok(()) => break,
            Err(RegistryProblem::Refused(why)) => anyhow::bail!("{why}"),
            Err(RegistryProblem::Unavailable(why)) => {
                crate::metrics::transient_error("registry");
                stage.waiting(format!("waiting for the schema registry: {why}"));
                tracing::warn!(error = %why, retry_in = ?backoff, "schema registry unavailable at start-up; retrying");
                pause(&mut backoff, settings, stop, "the schema registry answered").await?;
            }
        }
    }
    let sr = settings.registry.client()?;
    let codec = Arc::new(Decoder::new(sr).with_limits(settings.validation.limits()));
    // Reference data is loaded before the first batch, so no batch judges with an empty
    // cache; afterwards it refreshes in the background.
    let cache = Arc::new(ReferenceCache::default());
    let mut backoff = settings.pipeline.retry_initial_backoff;
    while let Err(e) = cache.reload(&store).await {
        stage.waiting(format!(
            "loading reference data: {}",
            redact_text(&format!("{e:#}"))
        ));
        tracing::warn!(error = %e, retry_in = ?backoff, "cannot load reference data; retrying");
        pause(&mut backoff, settings, stop, "reference data loaded").await?;
    }
    let input_partitions = loop {
        let topics = settings.kafka.input_topic_names();
        match crate::kafka::partition_count(
            &settings.kafka.client_config(),
            &topics.iter().map(String::as_str).collect::<Vec<_>>(),
        ) {
            Ok(n) => break n,
            Err(e) => {
                let why = redact_text(&format!("{e:#}"));
                stage.waiting(format!("waiting for the broker: {why}"));
                tracing::warn!(error = %why, retry_in = ?backoff, "cannot read the input topics' partitions; retrying");
                pause(&mut backoff, settings, stop, "the broker answered").await?;
            }
        }
    };
    // The lag reporter fills in the partitions' log ends; a log end older than three of its
    // rounds is unknown, so no partition is judged idle on a stale answer.
    let log_ends = Arc::new(LogEnds::live(
        settings.pipeline.lag_refresh_interval * 3 + Duration::from_secs(5),
    ));
    let reconciler = Reconciler::new(
        &settings.reconciliation,
        cache.clone(),
        Some(input_partitions),
    )
    .with_log_ends(log_ends.clone())
    .with_payout_leg(!settings.kafka.payouts_topic.is_empty());
    let consumer = ConsumerLoop::new(
        settings,
        store.clone(),
        codec,
        reconciler.clone(),
        stop.clone(),
        observer,
    )?;
    tracker.spawn(cache.clone().refresh_forever(
        store.clone(),
        settings.reconciliation.reference_full_reload,
        stop.clone(),
    ));
    tracker.spawn(reevaluate_in_background(
        store.clone(),
        reconciler.clone(),
        settings.kafka.group_id.clone(),
        settings.pipeline.retry_max_backoff,
        stop.clone(),
    ));
    // Follows the primary when database.url lists several servers.
    tracker.spawn(crate::store::targets::watch(store.clone(), stop.clone()));
    if settings.exceptions.relay_enabled {
        tracker.spawn(crate::outbox::run_relay(
            settings.clone(),
            store.clone(),
            stop.clone(),
        ));
    }
    let broker_seen = Arc::new(AtomicI64::new(0));
    stage.running(crate::http::Checks {
        store: store.clone(),
        assignment: consumer.assignment(),
        progress: consumer.progress(),
        broker_seen: broker_seen.clone(),
        broker_max_silence: (settings.pipeline.lag_refresh_interval * 3)
            .max(Duration::from_secs(15)),
    });
    let lag = tracker.spawn(crate::kafka::lag::run(
        settings.kafka.clone(),
        store.clone(),
        settings.pipeline.lag_refresh_interval,
        broker_seen,
        crate::kafka::lag::StallWatch {
            progress: consumer.progress(),
            assignment: consumer.assignment(),
            timeout: settings.pipeline.stall_timeout,
        },
        Some(crate::kafka::lag::WatermarkWatch {
            reconciler: reconciler.clone(),
            log_ends,
        }),
        stop.clone(),
    ));
    let consumer_stop = stop.clone();
    let consumer_task = tracker.spawn(async move {
        let result = consumer.run(consumer_stop.clone()).await;
        consumer_stop.cancel();
        result
    });
    let result = consumer_task.await.context("consumer task panicked")?;
    stop.cancel();
    if let Ok(Err(e)) = lag.await {
        tracing::warn!(error = %e, "lag reporter stopped with an error");
    }
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within 10 s");
    }
    store.pool().close().await;
    result
}

/// Re-evaluates items without waiting for new records: at start and after every
/// reference-data reload the items that waited for reference data (an unknown merchant or FX
/// rate that has now arrived) and those a correction queued, and every second the items the
/// watermark made due beyond what the batches swept themselves.
pub async fn reevaluate_in_background(
    store: Store,
    reconciler: Reconciler,
    group: String,
    max_backoff: Duration,
    stop: CancellationToken,
) {
    if !reconciler.enabled {
        return; // ingestion only: nothing to re-evaluate
    }
    let mut reloads = reconciler.cache.subscribe();
    // Once at start as after a reload: reference data may have been loaded or corrected while
    // no instance ran.
    reloads.mark_changed();
    let instance = instance_id();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::from_millis(100);
    loop {
        let reference_changed = tokio::select! {
            _ = stop.cancelled() => return,
            changed = reloads.changed() => {
                if changed.is_err() { return }
                true
            }
            _ = tick.tick() => false,
        };
        let result = if reference_changed {
            match crate::engine::sweeps::reevaluate_missing_reference(
                &store,
                &group,
                &instance,
                &reconciler,
                1000,
            )
            .await
            {
                Ok(mut outcome) => crate::engine::sweeps::reevaluate_corrected(
                    &store,
                    &group,
                    &instance,
                    &reconciler,
                    1000,
                )
                .await
                .map(|corrected| {
                    outcome.merge(corrected);
                    outcome
                }),
                Err(e) => Err(e),
            }
        } else {
            crate::engine::sweeps::reevaluate_due(&store, &group, &instance, &reconciler, 1000)
                .await
        };
        match result {
            Ok(outcome) => {
                backoff = Duration::from_millis(100);
                crate::telemetry::reconciled(&outcome);
                if outcome.evaluated > 0 {
                    tracing::info!(
                        evaluated = outcome.evaluated,
                        opened = outcome.exceptions_opened,
                        resolved = outcome.exceptions_resolved,
                        reference_changed,
                        "re-evaluated waiting items"
                    );
                }
            }
            Err(e) => {
                crate::metrics::transient_error("database");
                tracing::warn!(error = %e, retry_in = ?backoff, "background re-evaluation failed; retrying");
                if reference_changed {
                    // Do not lose the reload: evaluate the waiting items again after the pause.
                    reloads.mark_changed();
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::reset_by_peer;

    #[test]
    fn a_dropped_connection_is_told_from_other_registry_errors() {
        // What the CI run of 2026-12-03 got for a refused client certificate (TLS 1.3).
        assert!(reset_by_peer(
            "client error (SendRequest): error writing a body to connection: Connection reset by peer (os error 104)"
        ));
        assert!(reset_by_peer("Broken pipe (os error 32)"));
        assert!(reset_by_peer("connection closed before message completed"));
        assert!(!reset_by_peer(
            "error:0A00045C:SSL routines::tlsv13 alert certificate required"
        ));
        assert!(!reset_by_peer("Connection refused (os error 111)"));
        assert!(!reset_by_peer("operation timed out"));
    }
}
