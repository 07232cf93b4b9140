//! The commands built on the library: the load generator, the demo, the benchmark, the day's
//! report, the audit replay, dead letters and reference loading. They use `config`, `store`,
//! `kafka`, `codec`, `reconcile` and `app`; nothing in the library uses them.

pub mod bench;
pub mod dead_letters;
pub mod demo;
pub mod reference;
pub mod replay;
pub mod report;
pub mod simulate;
