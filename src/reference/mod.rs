//! Reference data (merchants, FX rates) and the in-memory cache that serves every lookup on
//! the hot path.
//!
//! Owns: the temporal "as of" lookup (the version valid at an event's own time), the cache
//! and how it refreshes (PostgreSQL LISTEN/NOTIFY on every change plus a periodic full reload
//! as a safety net), and parsing of operator CSV files. A refresh builds a complete new
//! [`Snapshot`] off the hot path and swaps it in; a batch takes one `Arc<Snapshot>` and uses
//! it throughout, so what a batch sees is consistent within that batch.
//!
//! It does not decide what a missing reference means for reconciliation.

pub mod csv;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;

use crate::domain::Currency;
use crate::store::Store;

/// PostgreSQL channel the reference tables' triggers notify.
pub const CHANNEL: &str = "payrecon_reference";

/// Whether a merchant may be paid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MerchantStatus {
    Active,
    Suspended,
}

impl MerchantStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            MerchantStatus::Active => "ACTIVE",
            MerchantStatus::Suspended => "SUSPENDED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ACTIVE" => Some(MerchantStatus::Active),
            "SUSPENDED" => Some(MerchantStatus::Suspended),
            _ => None,
        }
    }
}

/// One version of a merchant's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct MerchantVersion {
    pub merchant_id: String,
    /// Start of validity; the version ends where the next one starts.
    pub valid_from: DateTime<Utc>,
    pub name: String,
    /// Currency the acquirer pays the merchant in; payments are converted into it.
    pub settlement_currency: Currency,
    /// Expected fee per capture: amount * fee_bps / 10000 + fee_fixed.
    pub fee_bps: Decimal,
    pub fee_fixed: Decimal,
    pub status: MerchantStatus,
    /// Overrides of the global tolerances and deadlines (`None`: use the default).
    pub tolerance_abs: Option<Decimal>,
    pub tolerance_rel: Option<Decimal>,
    pub settlement_deadline: Option<Duration>,
    pub payment_deadline: Option<Duration>,
}

/// One version of an exchange rate: 1 `base` = `rate` `quote`.
#[derive(Debug, Clone, PartialEq)]
pub struct FxRate {
    pub base: Currency,
    pub quote: Currency,
    pub valid_from: DateTime<Utc>,
    pub rate: Decimal,
}

/// A rate and the time it starts to be valid.
type RateVersion = (DateTime<Utc>, Decimal);

/// An immutable, complete copy of the reference tables, indexed for as-of lookups.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Versions per merchant, sorted by `valid_from`.
    merchants: HashMap<String, Vec<MerchantVersion>>,
    /// Rate versions per (base, quote), sorted by `valid_from`.
    rates: HashMap<(Currency, Currency), Vec<RateVersion>>,
    /// Monotonic load counter: which refresh produced this snapshot.
    pub generation: u64,
    /// When it was loaded (cache age metric).
    pub loaded_at: Option<DateTime<Utc>>,
}

/// The element valid at `at`: the last one whose start is not after `at`.
fn as_of<T>(versions: &[T], at: DateTime<Utc>, start: impl Fn(&T) -> DateTime<Utc>) -> Option<&T> {
    let idx = versions.partition_point(|v| start(v) <= at);
    idx.checked_sub(1).map(|i| &versions[i])
}

impl Snapshot {
    /// Builds a snapshot from loaded rows (any order).
    pub fn new(merchants: Vec<MerchantVersion>, rates: Vec<FxRate>, generation: u64) -> Snapshot {
        let mut by_merchant: HashMap<String, Vec<MerchantVersion>> = HashMap::new();
        for m in merchants {
            by_merchant
                .entry(m.merchant_id.clone())
                .or_default()
                .push(m);
        }
        for versions in by_merchant.values_mut() {
            versions.sort_by_key(|v| v.valid_from);
        }
        let mut by_pair: HashMap<(Currency, Currency), Vec<RateVersion>> = HashMap::new();
        for r in rates {
            by_pair
                .entry((r.base, r.quote))
                .or_default()
                .push((r.valid_from, r.rate));
        }
        for versions in by_pair.values_mut() {
            versions.sort_by_key(|v| v.0);
        }
        Snapshot {
            merchants: by_merchant,
            rates: by_pair,
            generation,
            loaded_at: Some(Utc::now()),
        }
    }

    /// The merchant's terms valid at `at`, if any version had started by then.
    pub fn merchant_at(&self, merchant_id: &str, at: DateTime<Utc>) -> Option<&MerchantVersion> {
        as_of(self.merchants.get(merchant_id)?, at, |v| v.valid_from)
    }

    /// Units of `quote` for one `base` at `at`: 1 for the same currency, the direct rate, or
    /// the inverse of the reverse rate.
    pub fn rate_at(&self, base: Currency, quote: Currency, at: DateTime<Utc>) -> Option<Decimal> {
        if base == quote {
            return Some(Decimal::ONE);
        }
        if let Some((_, r)) = self
            .rates
            .get(&(base, quote))
            .and_then(|v| as_of(v, at, |x| x.0))
        {
            return Some(*r);
        }
        let (_, r) = as_of(self.rates.get(&(quote, base))?, at, |x| x.0)?;
        Decimal::ONE.checked_div(*r)
    }

    /// Merchant versions and rate versions held.
    pub fn len(&self) -> (usize, usize) {
        (
            self.merchants.values().map(Vec::len).sum(),
            self.rates.values().map(Vec::len).sum(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.merchants.is_empty() && self.rates.is_empty()
    }
}

/// The shared cache: the current snapshot behind a lock that is only held to clone or swap
/// an `Arc`, never while loading.
#[derive(Debug)]
pub struct ReferenceCache {
    current: RwLock<Arc<Snapshot>>,
    /// The generation of the current snapshot, for tasks that act on every reload.
    loaded: tokio::sync::watch::Sender<u64>,
}

impl Default for ReferenceCache {
    fn default() -> Self {
        ReferenceCache {
            current: RwLock::default(),
            loaded: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl ReferenceCache {
    /// Notified with the new generation after every reload.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.loaded.subscribe()
    }

    /// The snapshot a batch should use from start to end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().expect("reference cache lock").clone()
    }

    /// Loads the tables into a new snapshot and swaps it in.
    pub async fn reload(&self, store: &Store) -> Result<Arc<Snapshot>, sqlx::Error> {
        let (merchants, rates) = store.load_reference().await?;
        let generation = self.snapshot().generation + 1;
        let snapshot = Arc::new(Snapshot::new(merchants, rates, generation));
        *self.current.write().expect("reference cache lock") = snapshot.clone();
        self.loaded.send_replace(generation);
        crate::metrics::reference_loaded(Utc::now().timestamp_millis() as f64 / 1000.0);
        let (m, r) = snapshot.len();
        tracing::info!(
            merchant_versions = m,
            rate_versions = r,
            generation,
            "reference cache loaded"
        );
        Ok(snapshot)
    }

    /// Keeps the cache fresh until `shutdown`: reloads on every notification from the
    /// reference tables' triggers, and every `full_reload` regardless (a missed notification
    /// during a reconnect cannot leave it stale for longer). Never blocks readers.
    pub async fn refresh_forever(
        self: Arc<Self>,
        store: Store,
        full_reload: Duration,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(store.pool()).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "reference listener cannot connect; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %e, "LISTEN failed; retrying");
                continue;
            }
            backoff = Duration::from_millis(200);
            // Anything may have changed while we were not listening.
            if let Err(e) = self.reload(&store).await {
                tracing::warn!(error = %e, "reference reload failed");
            }
            let mut ticker = tokio::time::interval(full_reload);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                    n = listener.try_recv() => match n {
                        Ok(Some(_)) => {}
                        // Connection lost: reconnect (and reload) in the outer loop.
                        Ok(None) | Err(_) => break,
                    },
                }
                if let Err(e) = self.reload(&store).await {
                    tracing::warn!(error = %e, "reference reload failed; keeping the previous snapshot");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn merchant(valid_from: &str, fee_bps: i64) -> MerchantVersion {
        MerchantVersion {
            merchant_id: "m1".into(),
            valid_from: t(valid_from),
            name: "Shop".into(),
            settlement_currency: Currency::from_code("EUR").unwrap(),
            fee_bps: Decimal::new(fee_bps, 0),
            fee_fixed: Decimal::ZERO,
            status: MerchantStatus::Active,
            tolerance_abs: None,
            tolerance_rel: None,
            settlement_deadline: None,
            payment_deadline: None,
        }
    }

    #[test]
    fn lookups_use_the_version_valid_at_the_event_time() {
        let s = Snapshot::new(
            vec![
                merchant("2026-03-01T00:00:00Z", 200),
                merchant("2026-01-01T00:00:00Z", 150),
            ],
            vec![],
            1,
        );
        assert!(s.merchant_at("m1", t("2025-12-31T23:59:59Z")).is_none());
        assert_eq!(
            s.merchant_at("m1", t("2026-01-01T00:00:00Z"))
                .unwrap()
                .fee_bps,
            Decimal::new(150, 0)
        );
        assert_eq!(
            s.merchant_at("m1", t("2026-02-28T23:59:59Z"))
                .unwrap()
                .fee_bps,
            Decimal::new(150, 0)
        );
        assert_eq!(
            s.merchant_at("m1", t("2026-03-01T00:00:00Z"))
                .unwrap()
                .fee_bps,
            Decimal::new(200, 0)
        );
        assert!(
            s.merchant_at("unknown", t("2026-03-01T00:00:00Z"))
                .is_none()
        );
    }

    #[test]
    fn rates_are_direct_inverse_or_one() {
        let usd = Currency::from_code("USD").unwrap();
        let eur = Currency::from_code("EUR").unwrap();
        let s = Snapshot::new(
            vec![],
            vec![FxRate {
                base: usd,
                quote: eur,
                valid_from: t("2026-01-01T00:00:00Z"),
                rate: Decimal::new(8, 1),
            }],
            1,
        );
        let at = t("2026-06-01T00:00:00Z");
        assert_eq!(s.rate_at(usd, eur, at), Some(Decimal::new(8, 1)));
        assert_eq!(s.rate_at(eur, usd, at), Some(Decimal::new(125, 2)));
        assert_eq!(s.rate_at(eur, eur, at), Some(Decimal::ONE));
        assert_eq!(s.rate_at(usd, eur, t("2025-06-01T00:00:00Z")), None);
        assert_eq!(
            s.rate_at(usd, Currency::from_code("GBP").unwrap(), at),
            None
        );
    }
}
