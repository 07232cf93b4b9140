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
        options: crate::tools::simulate::SimulationOptions,
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
    Demo(crate::tools::demo::DemoOptions),
    /// Measure the store-only ceiling, end-to-end throughput and latency at a fixed rate
    /// (embedded Kafka and registry; PostgreSQL from DATABASE_URL or the local server).
    Bench(crate::tools::bench::BenchOptions),
    /// Print the reconciliation report of one business day: open exceptions and per-merchant
    /// totals, from the reporting views (read only; never migrates).
    #[command(after_help = crate::tools::report::EXIT_CODES)]
    Report(crate::tools::report::ReportOptions),
    /// Audit: re-read a range of the input topics through the service's own code into a
    /// shadow schema and compare with the live tables (never joins the service's group,
    /// never writes a live table except `audit_runs`).
    #[command(after_help = crate::tools::replay::EXIT_CODES)]
    Replay(crate::tools::replay::ReplayOptions),
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
            let message = crate::redact::redact_text(&format!("{e:#}"));
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
    // The demo and the benchmark print their own progress; service logs would drown it: the
    // demo's go to a file (named in its first lines), the benchmark's are warnings only.
    let quiet = std::env::var_os("PAYRECON_LOG__FILTER").is_none();
    let mut cli = cli;
    match &mut cli.command {
        Command::Demo(o) if quiet => {
            let path = o
                .log_file
                .get_or_insert_with(crate::tools::demo::default_log_file);
            crate::telemetry::init_to_file(&settings.log, path)
                .with_context(|| format!("creating the demo's log file {}", path.display()))?;
            println!("service log:              {}", path.display());
        }
        Command::Bench(_) if quiet => {
            settings.log.filter = "warn".into();
            crate::telemetry::init(&settings.log);
        }
        _ => crate::telemetry::init(&settings.log),
    }
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
            crate::tools::simulate::command(&settings, &options, create_topics, load_reference)
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(options) => crate::tools::demo::run(settings, options).await,
        Command::DeadLetters {
            action: DeadLetterAction::List { all, limit, json },
        } => crate::tools::dead_letters::list(&settings, all, limit, json).await,
        Command::DeadLetters {
            action: DeadLetterAction::Replay { ids },
        } => crate::tools::dead_letters::replay(&settings, &ids).await,
        Command::Replay(options) => crate::tools::replay::command(settings, options).await,
        Command::Report(options) => crate::tools::report::run(&settings, options).await,
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
            crate::tools::reference::load(&settings, &files, correction).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(options) => {
            crate::tools::bench::run(settings, cli.config.as_deref(), options).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
