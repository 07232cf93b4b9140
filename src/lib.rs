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
//! - [`store`]: the only PostgreSQL code, typed functions by table family.
//! - [`files`]: settlement reports and bank statements as files (CSV, camt, MT940, BAI2):
//!   streaming parsers, integrity checks, and the import that produces their entries.
//! - [`kafka`]: the consumer loop, rebalance positioning, commit lag.
//! - [`registry`]: a small Confluent-compatible Schema Registry for local runs and tests.
//! - [`simulate`]: the load generator and its expected totals.
//! - [`demo`]: the whole job on embedded defaults (mock Kafka, embedded registry).
//! - [`bench`]: throughput and latency figures.
//! - [`report`]: the reconciliation report of a business day (`payrecon report`), read from
//!   the reporting views.
//! - [`replay`]: audit replay of a topic range into a shadow schema, compared with the live
//!   tables (`payrecon replay`).
//! - [`config`], [`app`], [`http`], [`metrics`], [`telemetry`], [`malloc`], [`cli`]: plumbing.

pub mod app;
pub mod bench;

pub mod cli;
pub mod codec;
pub mod config;
pub mod demo;
pub mod domain;
pub mod engine;
pub mod files;
pub mod http;
pub mod inputs;
pub mod kafka;
pub mod malloc;
pub mod metrics;
pub mod outbox;
pub mod reconcile;
pub mod reference;
pub mod registry;
pub mod replay;
pub mod report;
pub mod simulate;
pub mod store;
pub mod telemetry;
