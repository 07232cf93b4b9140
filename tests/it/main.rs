//! payrecon's integration tests: one binary, real PostgreSQL, real Kafka protocol peers
//! (librdkafka's mock cluster in this process; tansu as a separate broker process), and the
//! real `payrecon` binary as child processes where crashes are part of the scenario.

mod helpers;
#[path = "../support/registry_gate.rs"]
mod registry_gate;

mod bad_input;
mod cooperative;
mod crash;
mod demo;
mod failover;
mod fencing;
mod files;
mod frozen;
mod growth;
mod hostile;
mod idleness;
mod observability;
mod outage;
mod payouts;
mod pgcluster;
mod property;
mod rebalance;
mod reconciliation;
mod reference;
mod replay;
mod report;
mod secrets;
mod startup;
mod tansu;
