//! # payrecon
//!
//! Exactly-once payment reconciliation: payment events and settlement lines (Avro, Confluent
//! Schema Registry wire format) are consumed from Kafka and written to PostgreSQL.
//!
//! ## The exactly-once invariant
//! For every partition of `payments.transactions` and `payments.settlements`, the row
//! `consumer_offsets(group, topic, partition).next_offset` in PostgreSQL says which records
//! have been applied: exactly those below it. A batch's rows (events, lines, totals, dead
//! letters) and the advance of `next_offset` for every partition it read commit in ONE
//! PostgreSQL transaction, and that advance is a compare-and-set against the offset the batch
//! started from; partitions are always positioned at the stored offset on assignment. So a
//! crash, restart, rebalance or paused ("zombie") consumer can neither lose an effect (rows
//! never commit without their offsets, nor offsets without their rows) nor repeat one (a stale
//! batch fails its compare-and-set and rolls back). As a second guard, events are inserted by
//! id with insert-or-ignore, and totals only count rows inserted in the same transaction.
//!
//! ## Layout
//! - [`domain`]: money, currencies, events, validation. Pure, no I/O.
//! - [`codec`]: Confluent wire format + Avro values via the registry; poison vs transient.
//! - [`inputs`]: one module per input stream (payments, settlements, payouts): schema
//!   binding, row shape, what it adds to reconciliation.
//! - [`engine`]: the batch transaction top to bottom (offsets, apply, reconcile, totals),
//!   the sweeps, dead-letter re-drive, verification.
//! - [`store`]: the only PostgreSQL code (every SQL statement), typed functions by table
//!   family.
//! - [`files`]: settlement reports and bank statements as files (CSV, camt, MT940, BAI2):
//!   streaming parsers, integrity checks, and the import that produces their entries.
//! - [`kafka`]: the only librdkafka code: the consumer loop, rebalance positioning, commit
//!   lag, client configs, producers, topic admin, the embedded cluster, readers.
//! - [`reconcile`]: the matcher, pure; [`reference`]: temporal reference data and its cache.
//! - [`outbox`]: the exceptions relay.
//! - [`registry`]: a small Confluent-compatible Schema Registry for local runs and tests.
//! - [`tools`]: the commands built on the library (simulate, demo, bench, report, replay,
//!   dead letters, reference load); nothing in the library imports them.
//! - [`config`] (one file per section), [`redact`], [`instance`], [`app`], [`http`],
//!   [`metrics`] (a leaf), [`telemetry`], [`malloc`], [`cli`] (parses and dispatches): plumbing.

pub mod app;

pub mod cli;
pub mod codec;
pub mod config;
pub mod domain;
pub mod engine;
pub mod files;
pub mod http;
pub mod inputs;
pub mod instance;
pub mod kafka;
pub mod malloc;
pub mod metrics;
pub mod outbox;
pub mod reconcile;
pub mod redact;
pub mod reference;
pub mod registry;
pub mod store;
pub mod telemetry;
pub mod tools;
