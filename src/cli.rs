//! The command line. Each subcommand's doc comment is its `--help`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// Exactly-once payment reconciliation: Kafka (Avro) to PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "payrecon", version, about)]
pub struct Cli {
    /// Configuration file layered over the embedded defaults (env overrides still apply).
    #[arg(long, global = true, env = "PAYRECON_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: consume both input topics and commit batches exactly once.
    Run,
    /// Apply database migrations and exit.
    Migrate,
    /// Serve a Confluent-compatible Schema Registry (for local runs and tests only;
    /// production uses a real Confluent Schema Registry).
    Registry {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: std::net::SocketAddr,
        /// File keeping schemas and ids across restarts (in memory when absent).
        #[arg(long)]
        storage: Option<PathBuf>,
    },
    /// Produce simulated payments and settlement lines to the configured brokers.
    Simulate {
        #[command(flatten)]
        options: crate::simulate::SimulationOptions,
        /// Create the input topics with this many partitions if missing (and the exceptions
        /// topic with one).
        #[arg(long, visible_alias = "partitions")]
        create_topics: Option<i32>,
        /// Load the simulation's reference data (merchants, FX rates) into the configured
        /// database first, so the records can be priced.
        #[arg(long)]
        load_reference: bool,
    },
    /// Run the whole job on embedded defaults: mock Kafka, embedded registry, PostgreSQL,
    /// simulator and service; check the result against the simulator's expected totals.
    Demo(crate::demo::DemoOptions),
    /// Measure the store-only ceiling, end-to-end throughput and latency at a fixed rate
    /// (embedded Kafka and registry; PostgreSQL from DATABASE_URL or the local server).
    Bench(crate::bench::BenchOptions),
    /// Print the reconciliation report of one business day: open exceptions and per-merchant
    /// totals, from the reporting views (read only; never migrates).
    #[command(after_help = crate::report::EXIT_CODES)]
    Report(crate::report::ReportOptions),
    /// Audit: re-read a range of the input topics through the service's own code into a
    /// shadow schema and compare with the live tables (never joins the service's group,
    /// never writes a live table except `audit_runs`).
    #[command(after_help = crate::replay::EXIT_CODES)]
    Replay(crate::replay::ReplayOptions),
    /// Import settlement reports (Stripe, Adyen, mapped CSV) and bank statements (camt.053,
    /// camt.054, MT940, BAI2): each file is checked whole, then its entries are produced to
    /// the input topics exactly once per entry (see docs/files.md).
    Import(crate::files::inbox::ImportOptions),
    /// Manage reference data (merchants, FX rates).
    Reference {
        #[command(subcommand)]
        action: ReferenceAction,
    },
    /// Inspect and re-drive dead letters.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReferenceAction {
    /// Load CSV files of merchant versions or FX rate versions (the header says which; see
    /// docs/operations.md). All the files load in one transaction, whole or not at all.
    ///
    /// Reference data is an append-only history: a version identical to the stored one with
    /// the same key and start is left alone (counted as unchanged); a different one refuses
    /// the whole load, naming the file, row, key and the fields that differ, unless
    /// --correct is given.
    Load {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Correct stored versions that differ from the files' instead of refusing the load.
        /// Each correction is recorded (who, when, why, values before and after, in
        /// `reference_corrections`), and the running service re-evaluates the payment
        /// references whose pricing it changes.
        #[arg(long, requires = "reason")]
        correct: bool,
        /// Why the stored values are wrong (required with --correct).
        #[arg(long, requires = "correct")]
        reason: Option<String>,
        /// Who corrects (default: the OS user).
        #[arg(long, requires = "correct")]
        by: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// List dead letters, newest first.
    List {
        /// Include those already replayed.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Decode open dead letters again and apply those that now succeed (after a fix).
    Replay {
        /// Only these ids (default: every open dead letter).
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    // Before the runtime starts a thread: an arena cap only binds arenas not yet created.
    let malloc = crate::malloc::tune();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli, malloc)) {
        Ok(code) => code,
        Err(e) => {
            // The last stop before a person reads it: whatever error got here unscrubbed (a
            // driver or client quoting a URL) loses its credentials now.
            let message = crate::config::redact_text(&format!("{e:#}"));
            // Once: a JSON log line for log collectors, a plain last line for a person.
            if crate::telemetry::json() {
                tracing::error!("{message}");
            } else {
                eprintln!("error: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli, malloc: Vec<String>) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    // The demo and the benchmark print their own progress; service logs would drown it.
    if matches!(cli.command, Command::Demo(_) | Command::Bench(_))
        && std::env::var_os("PAYRECON_LOG__FILTER").is_none()
    {
        settings.log.filter = "warn".into();
    }
    crate::telemetry::init(&settings.log);
    tracing::debug!(set = ?malloc, "glibc malloc parameters (the others as the environment sets them)");
    match cli.command {
        Command::Run => {
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                crate::app::termination_signal().await;
                signal.cancel();
            });
            crate::app::run(settings, shutdown, None).await?;
            tracing::info!("stopped cleanly");
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let store = crate::app::connect_store(
                &settings,
                &CancellationToken::new(),
                crate::app::Patience::Bounded,
            )
            .await?;
            store
                .migrate_within(settings.database.startup_timeout)
                .await
                .context("applying migrations")?;
            println!("migrations applied to {}", settings.database.redacted_url());
            Ok(ExitCode::SUCCESS)
        }
        Command::Registry { listen, storage } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let storage = match storage {
                Some(p) => crate::registry::Storage::File(p),
                None => crate::registry::Storage::Memory,
            };
            println!(
                "schema registry listening on http://{}",
                listener.local_addr()?
            );
            crate::registry::serve(
                listener,
                crate::registry::RegistryConfig { storage },
                crate::app::termination_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate {
            options,
            create_topics,
            load_reference,
        } => {
            simulate(&settings, &options, create_topics, load_reference).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(options) => crate::demo::run(settings, options).await,
        Command::DeadLetters { action } => dead_letters(&settings, action).await,
        Command::Replay(options) => crate::replay::command(settings, options).await,
        Command::Report(options) => crate::report::run(&settings, options).await,
        Command::Import(options) => crate::files::inbox::run(&settings, options).await,
        Command::Reference {
            action:
                ReferenceAction::Load {
                    files,
                    correct,
                    reason,
                    by,
                },
        } => {
            let correction = if correct {
                let reason = reason.unwrap_or_default();
                anyhow::ensure!(
                    !reason.trim().is_empty(),
                    "a correction needs a --reason: it is what an auditor reads"
                );
                Some(crate::store::Correction {
                    reason,
                    by: by.unwrap_or_else(|| {
                        whoami::fallible::username().unwrap_or_else(|_| "unknown".into())
                    }),
                    source: None,
                })
            } else {
                None
            };
            load_reference(&settings, &files, correction).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(options) => {
            crate::bench::run(settings, cli.config.as_deref(), options).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `payrecon simulate`: generate, produce, and write the expected totals.
pub async fn simulate(
    settings: &Settings,
    options: &crate::simulate::SimulationOptions,
    create_topics: Option<i32>,
    load_reference: bool,
) -> anyhow::Result<crate::domain::Totals> {
    let k = &settings.kafka;
    let mut options = options.clone().with_rules(&settings.reconciliation);
    // No payouts topic configured: the payout leg is off, so there is nowhere to send them.
    options.payouts &= !k.payouts_topic.is_empty();
    let options = &options;
    if load_reference {
        let (merchants, rates) = crate::simulate::reference_data(options)?;
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
    let (records, expected) = crate::simulate::generate(options, encoder.payment_schema_id())?;
    if let Some(path) = &options.expected_out {
        std::fs::write(path, serde_json::to_vec_pretty(&expected)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let producer: rdkafka::producer::FutureProducer = k.producer_config().create()?;
    let total = records.len();
    crate::simulate::produce_stamped(
        &producer,
        &encoder,
        &k.input_topic_names()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &records,
        options.rate,
        options.broker_time,
        |n| {
            tracing::info!(produced = n, total, "simulating");
        },
    )
    .await?;
    println!(
        "produced {total} records: {} payment events, {} settlement lines, {} bank statement lines, {} malformed",
        expected.payment_events,
        expected.settlement_lines,
        expected.statement_lines,
        expected.dead_letters
    );
    Ok(expected)
}

/// `payrecon reference load`: validates every file first, then loads them all in one
/// transaction.
async fn load_reference(
    settings: &Settings,
    files: &[PathBuf],
    correction: Option<crate::store::Correction>,
) -> anyhow::Result<()> {
    use crate::reference::csv::{ReferenceFile, parse};
    let mut parsed = Vec::new();
    for path in files {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = parse(file).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        parsed.push(content);
    }
    let store = crate::app::connect_store(
        settings,
        &CancellationToken::new(),
        crate::app::Patience::Bounded,
    )
    .await?;
    store.migrate().await?;
    let contents: Vec<&ReferenceFile> = parsed.iter().map(|p| &p.content).collect();
    let correction = correction.map(|c| crate::store::Correction {
        source: Some(
            (files.iter())
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ..c
    });
    let summaries = match store
        .load_reference_files(&contents, correction.as_ref())
        .await
    {
        Ok(s) => s,
        Err(crate::store::LoadError::Conflicts(conflicts)) => {
            let lines: Vec<String> = conflicts
                .iter()
                .map(|c| {
                    let changes: Vec<String> = c.changes.iter().map(ToString::to_string).collect();
                    format!(
                        "  {}: row {}: {}: {}",
                        files[c.file].display(),
                        parsed[c.file].rows[c.index],
                        c.key,
                        changes.join("; ")
                    )
                })
                .collect();
            anyhow::bail!(
                "nothing was loaded: {} version(s) differ from the stored version with the same \
                 key; reference data is an append-only history (payments were priced with the \
                 stored values), so change it only with --correct --reason \"...\":\n{}",
                conflicts.len(),
                lines.join("\n")
            );
        }
        Err(e) => return Err(e.into()),
    };
    for ((path, content), summary) in files.iter().zip(&contents).zip(summaries) {
        let kind = match content {
            ReferenceFile::Merchants(_) => "merchant versions",
            ReferenceFile::Rates(_) => "FX rate versions",
        };
        print!(
            "{}: loaded {} {kind}, {} unchanged",
            path.display(),
            summary.inserted,
            summary.unchanged
        );
        if summary.corrected > 0 {
            print!(
                ", corrected {} (re-evaluating {} payment references)",
                summary.corrected, summary.queued
            );
        }
        println!();
    }
    Ok(())
}

async fn dead_letters(settings: &Settings, action: DeadLetterAction) -> anyhow::Result<ExitCode> {
    let store = crate::app::connect_store(
        settings,
        &CancellationToken::new(),
        crate::app::Patience::Bounded,
    )
    .await?;
    // Inspecting must never create or change a schema (a wrong database.url would be
    // migrated silently otherwise).
    store.require_schema().await?;
    match action {
        DeadLetterAction::List { all, limit, json } => {
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
        DeadLetterAction::Replay { ids } => {
            let sr = settings.registry.client()?;
            let codec = crate::inputs::Decoder::new(sr).with_limits(settings.validation.limits());
            let cache = std::sync::Arc::new(crate::reference::ReferenceCache::default());
            cache.reload(&store).await?;
            let reconciler = crate::engine::Reconciler::new(&settings.reconciliation, cache, None)
                .with_payout_leg(!settings.kafka.payouts_topic.is_empty());
            let (mut applied, mut failing) = (0, 0);
            for (id, topic, partition, offset, payload, broker_time) in
                store.open_dead_letters(&ids).await?
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
    }
}
