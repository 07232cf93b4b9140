//! Records the database refuses.
//!
//! Records are validated before they get here (`domain::Limits`), but PostgreSQL may still
//! refuse one (a value no check foresaw). Refusals that lie in a record
//! ([`Disposition::RecordRefused`]: SQLSTATE classes 22, 23, 54) must neither stop the
//! stream nor cost a good record, so the records are applied under a savepoint: when the
//! whole batch is refused, the transaction rolls back to it and bisects the records, each
//! half under a savepoint of its own, until every refused record stands alone. A lone refused
//! record is then tried once more as a sanitized *twin* ([`crate::inputs::Input::twin`]: same
//! kind, currency and event time; harmless ids and amount), rolled back whatever happens: if
//! the twin is refused too, the refusal lies in the system (schema, permissions) and the batch
//! fails with [`CommitError::Permanent`]; otherwise the record is dead-lettered
//! (`database_refused`, with the SQLSTATE and PostgreSQL's message, its bytes kept) and the
//! rest of the batch and the offsets commit together. The clean path costs one SAVEPOINT and
//! one RELEASE.

use sqlx::{Postgres, Transaction};

use super::apply::{Applied, Apply, Records};
use crate::domain::{BankPayout, PaymentEvent, SettlementLine};
use crate::inputs::Input;
use crate::store::records::{Savepoint, savepoint};
use crate::store::{CommitError, DeadLetter, Disposition, Source, describe, disposition};

impl Apply<'_> {
    /// Applies the records; a refusal that lies in records is isolated (module doc).
    pub async fn isolating(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        records: Records<'_>,
    ) -> Result<Applied, CommitError> {
        match self.attempt(tx, records).await? {
            Ok(applied) => Ok(applied),
            Err(first) => {
                crate::metrics::batch_isolating();
                tracing::warn!(error = %describe(&first), records = records.len(), "PostgreSQL refused the batch; isolating the refused records");
                self.bisect(tx, records).await
            }
        }
    }

    /// One try under a savepoint: `Ok(Err(e))` when PostgreSQL refused it for a reason that
    /// may lie in the records (rolled back to the savepoint), `Err` for every other failure.
    async fn attempt(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        records: Records<'_>,
    ) -> Result<Result<Applied, sqlx::Error>, CommitError> {
        savepoint(tx, Savepoint::Set).await?;
        match self.apply(tx, records).await {
            Ok(applied) => {
                savepoint(tx, Savepoint::Release).await?;
                Ok(Ok(applied))
            }
            Err(e) if disposition(&e) == Disposition::RecordRefused => {
                savepoint(tx, Savepoint::Rollback).await?;
                savepoint(tx, Savepoint::Release).await?;
                Ok(Err(e))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Splits the refused records in halves until each refused one stands alone.
    async fn bisect(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        records: Records<'_>,
    ) -> Result<Applied, CommitError> {
        let mut out = Applied::default();
        // Ranges over the records still to try, in log order.
        let mut todo = vec![(0, records.len())];
        while let Some((a, b)) = todo.pop() {
            if b - a > 1 {
                let mid = a + (b - a) / 2;
                for half in [(mid, b), (a, mid)] {
                    match self.attempt(tx, records.slice(half.0, half.1)).await? {
                        Ok(applied) => out.merge(applied),
                        Err(_) => todo.push(half),
                    }
                }
                continue;
            }
            match self.refused(tx, records.slice(a, b)).await? {
                Ok(applied) => out.merge(applied),
                Err(dead_letter) => out.refused.push(dead_letter),
            }
        }
        Ok(out)
    }

    /// A record refused on its own: dead-lettered (`Ok(Err)`) if its twin goes through, else
    /// the refusal lies in the system (`Err`). `Ok(Ok)`: accepted on this second try (its
    /// refusal depended on the records tried with it, which are applied by now).
    async fn refused(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        records: Records<'_>,
    ) -> Result<Result<Applied, DeadLetter>, CommitError> {
        let refusal = match self.attempt(tx, records).await? {
            Err(e) => e,
            Ok(applied) => return Ok(Ok(applied)),
        };
        let twin_p: Vec<(PaymentEvent, Source)> = (records.payments.iter())
            .map(|(e, s)| (e.twin(), *s))
            .collect();
        let twin_s: Vec<(SettlementLine, Source)> = (records.settlements.iter())
            .map(|(l, s)| (l.twin(), *s))
            .collect();
        let twin_b: Vec<(BankPayout, Source)> = (records.payouts.iter())
            .map(|(b, s)| (b.twin(), *s))
            .collect();
        let (twin_p, twin_s, twin_b) = (
            twin_p.iter().collect::<Vec<_>>(),
            twin_s.iter().collect::<Vec<_>>(),
            twin_b.iter().collect::<Vec<_>>(),
        );
        savepoint(tx, Savepoint::Set).await?;
        let twin = self
            .apply(
                tx,
                Records {
                    payments: &twin_p,
                    settlements: &twin_s,
                    payouts: &twin_b,
                },
            )
            .await;
        savepoint(tx, Savepoint::Rollback).await?;
        savepoint(tx, Savepoint::Release).await?;
        match twin {
            Ok(_) => {}
            // The connection, not the twin, failed: retry the whole batch.
            Err(e) if disposition(&e) == Disposition::Retry => {
                return Err(CommitError::Transient(e));
            }
            Err(e) => {
                tracing::error!(record = %describe(&refusal), twin = %describe(&e), "PostgreSQL refuses a harmless twin of the refused record too: the schema or the database is wrong, not the record");
                return Err(CommitError::Permanent(e));
            }
        }
        let source = records.first_source().expect("one record");
        let raw = self.raw.get(&source).cloned().unwrap_or_default();
        tracing::warn!(topic = %self.topics[source.topic], partition = source.partition, offset = source.offset, error = %describe(&refusal), "dead-lettering a record PostgreSQL refuses");
        Ok(Err(DeadLetter {
            source,
            key: raw.key,
            payload: raw.payload,
            error_kind: crate::codec::PoisonKind::DatabaseRefused.as_str(),
            error_message: describe(&refusal),
            broker_timestamp: raw.broker_timestamp,
        }))
    }
}
