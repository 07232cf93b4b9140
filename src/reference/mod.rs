//! Reference data (merchants, FX rates) and the in-memory cache that serves every lookup on
//! the hot path.
//!
//! Owns: the temporal "as of" lookup (the version valid at an event's own time), the cache
//! and how it refreshes (PostgreSQL LISTEN/NOTIFY on every change plus a periodic full reload
//! as a safety net), parsing of operator CSV files, and what tells two versions of one key
//! apart ([`differences`]: the store refuses to overwrite a stored version with a different
//! one unless it is a recorded correction, see `store::reference`). A refresh builds a
//! complete new [`Snapshot`] off the hot path and swaps it in; a batch takes one
//! `Arc<Snapshot>` and uses it throughout, so what a batch sees is consistent within that
//! batch.
//!
//! It does not decide what a missing reference means for reconciliation.

pub mod csv;

use std::collections::HashMap;
use std::hash::BuildHasher;
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

/// One version of a merchant's terms with its strings borrowed: what a [`Snapshot`] lookup
/// returns (the snapshot stores versions packed, not as [`MerchantVersion`]s) and what a load
/// feeds a [`SnapshotBuilder`] straight from a database row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MerchantVersionRef<'a> {
    pub merchant_id: &'a str,
    /// Start of validity; the version ends where the next one starts.
    pub valid_from: DateTime<Utc>,
    pub name: &'a str,
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

impl MerchantVersion {
    /// This version, borrowed.
    pub fn view(&self) -> MerchantVersionRef<'_> {
        MerchantVersionRef {
            merchant_id: &self.merchant_id,
            valid_from: self.valid_from,
            name: &self.name,
            settlement_currency: self.settlement_currency,
            fee_bps: self.fee_bps,
            fee_fixed: self.fee_fixed,
            status: self.status,
            tolerance_abs: self.tolerance_abs,
            tolerance_rel: self.tolerance_rel,
            settlement_deadline: self.settlement_deadline,
            payment_deadline: self.payment_deadline,
        }
    }
}

/// A version's fields other than its key, by column name, as text (`None`: not set), so a
/// loaded version can be compared with the stored one and a correction can record both.
/// Decimals are normalized (`150` and `150.0000` are the same fee) and durations counted in
/// whole microseconds (what PostgreSQL keeps), so only a real change of value differs.
pub type VersionFields = Vec<(&'static str, Option<String>)>;

/// One field in which a loaded version differs from the stored version with the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    /// Column name, as in the CSV header.
    pub field: &'static str,
    pub stored: Option<String>,
    pub loaded: Option<String>,
}

impl std::fmt::Display for FieldChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(not set)".into());
        write!(
            f,
            "{} stored {}, file {}",
            self.field,
            show(&self.stored),
            show(&self.loaded)
        )
    }
}

/// The fields of two versions of one key that differ, in column order.
pub fn differences(stored: &VersionFields, loaded: &VersionFields) -> Vec<FieldChange> {
    stored
        .iter()
        .zip(loaded)
        .filter(|((_, a), (_, b))| a != b)
        .map(|((field, a), (_, b))| FieldChange {
            field,
            stored: a.clone(),
            loaded: b.clone(),
        })
        .collect()
}

fn decimal_text(d: Decimal) -> String {
    d.normalize().to_string()
}

fn duration_text(d: Duration) -> String {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_micros(micros)).to_string()
}

impl MerchantVersion {
    /// The key as an operator names it: `merchant m1 valid from 2026-01-01T00:00:00Z`.
    pub fn describe_key(&self) -> String {
        format!(
            "merchant {} valid from {}",
            self.merchant_id,
            self.valid_from
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        )
    }

    /// Every field but the key (`merchant_id`, `valid_from`); see [`VersionFields`].
    pub fn fields(&self) -> VersionFields {
        vec![
            ("name", Some(self.name.clone())),
            (
                "settlement_currency",
                Some(self.settlement_currency.code().to_owned()),
            ),
            ("fee_bps", Some(decimal_text(self.fee_bps))),
            ("fee_fixed", Some(decimal_text(self.fee_fixed))),
            ("status", Some(self.status.as_str().to_owned())),
            ("tolerance_abs", self.tolerance_abs.map(decimal_text)),
            ("tolerance_rel", self.tolerance_rel.map(decimal_text)),
            (
                "settlement_deadline",
                self.settlement_deadline.map(duration_text),
            ),
            ("payment_deadline", self.payment_deadline.map(duration_text)),
        ]
    }
}

impl FxRate {
    /// The key as an operator names it: `FX rate USD/EUR valid from 2026-01-01T00:00:00Z`.
    pub fn describe_key(&self) -> String {
        format!(
            "FX rate {}/{} valid from {}",
            self.base,
            self.quote,
            self.valid_from
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        )
    }

    /// Every field but the key (`base_currency`, `quote_currency`, `valid_from`).
    pub fn fields(&self) -> VersionFields {
        vec![("rate", Some(decimal_text(self.rate)))]
    }
}

impl MerchantVersionRef<'_> {
    /// An owned copy.
    pub fn to_version(&self) -> MerchantVersion {
        MerchantVersion {
            merchant_id: self.merchant_id.to_owned(),
            valid_from: self.valid_from,
            name: self.name.to_owned(),
            settlement_currency: self.settlement_currency,
            fee_bps: self.fee_bps,
            fee_fixed: self.fee_fixed,
            status: self.status,
            tolerance_abs: self.tolerance_abs,
            tolerance_rel: self.tolerance_rel,
            settlement_deadline: self.settlement_deadline,
            payment_deadline: self.payment_deadline,
        }
    }

    fn has_overrides(&self) -> bool {
        self.tolerance_abs.is_some()
            || self.tolerance_rel.is_some()
            || self.settlement_deadline.is_some()
            || self.payment_deadline.is_some()
    }
}

/// A rate and the time it starts to be valid.
/// A rate version: valid from, rate, and the fingerprint of its pair's versions up to and
/// including it ([`Snapshot::rate_fingerprint`]).
type RateVersion = (DateTime<Utc>, Decimal, u64);

/// "No entry" in the `u32` indices below.
const NONE: u32 = u32::MAX;

/// Strings packed end to end in one buffer: no allocation and no 24-byte header per string.
/// String `i` is `text[ends[i - 1]..ends[i]]`.
#[derive(Debug, Default)]
struct Strings {
    text: String,
    ends: Vec<u32>,
}

impl Strings {
    fn push(&mut self, s: &str) -> u32 {
        self.text.push_str(s);
        let end = u32::try_from(self.text.len()).expect("reference strings exceed 4 GiB");
        self.ends.push(end);
        u32::try_from(self.ends.len() - 1).expect("fewer than 2^32 reference strings")
    }

    fn get(&self, i: u32) -> &str {
        let i = i as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn shrink_to_fit(&mut self) {
        self.text.shrink_to_fit();
        self.ends.shrink_to_fit();
    }

    fn heap_bytes(&self) -> usize {
        self.text.capacity() + 4 * self.ends.capacity()
    }
}

/// Open-addressing hash table from a merchant id to its number (its position in a
/// [`Strings`]): four bytes per slot where a `HashMap<String, _>` would hold a `String` and
/// its allocation per key. Linear probing, at most half full.
#[derive(Debug, Default)]
struct IdIndex {
    /// Merchant numbers; `NONE` marks a free slot. Empty or a power of two long.
    slots: Vec<u32>,
    hasher: std::hash::RandomState,
}

impl IdIndex {
    fn slot_of(&self, id: &str) -> usize {
        self.hasher.hash_one(id) as usize & (self.slots.len() - 1)
    }

    fn find(&self, ids: &Strings, id: &str) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mut i = self.slot_of(id);
        loop {
            match self.slots[i] {
                NONE => return None,
                n if ids.get(n) == id => return Some(n),
                _ => i = (i + 1) & (self.slots.len() - 1),
            }
        }
    }

    /// Indexes merchant `n`, the last one pushed to `ids` (and not indexed yet).
    fn insert(&mut self, ids: &Strings, n: u32) {
        if 2 * ids.len() > self.slots.len() {
            // Rebuilding indexes every id pushed so far, `n` included.
            self.slots = vec![NONE; (2 * ids.len()).next_power_of_two().max(16)];
            for m in 0..ids.len() as u32 {
                self.place(ids.get(m), m);
            }
        } else {
            self.place(ids.get(n), n);
        }
    }

    fn place(&mut self, id: &str, n: u32) {
        let mut i = self.slot_of(id);
        while self.slots[i] != NONE {
            i = (i + 1) & (self.slots.len() - 1);
        }
        self.slots[i] = n;
    }
}

/// A decimal as an `i32` mantissa and a scale, when that represents it exactly (at the
/// columns' scale of 4, any `fee_bps` or `fee_fixed` up to 214,748.3647): 5 bytes instead
/// of 16. Wider values go to the side table.
fn pack_decimal(d: Decimal) -> Option<(i32, u8)> {
    let mantissa = i32::try_from(d.mantissa()).ok()?;
    let scale = u8::try_from(d.scale()).ok()?;
    // Compared bit for bit, so even the sign of a zero survives.
    (Decimal::new(mantissa.into(), d.scale()).serialize() == d.serialize())
        .then_some((mantissa, scale))
}

/// One merchant version as a snapshot stores it: 40 bytes, where a [`MerchantVersion`] takes
/// 192 plus two string allocations. Strings are numbers into the snapshot's [`Strings`],
/// the currency a number into its currency table, and what few versions carry (overrides,
/// a fee too wide to pack) sits in a side table.
#[derive(Debug, Clone, Copy)]
struct PackedVersion {
    /// Mantissas of the fees (`extra == NONE` only; otherwise the fees are in the extra).
    fee_bps: i32,
    fee_fixed: i32,
    valid_from: DateTime<Utc>,
    /// Merchant number: the versions are sorted by it, then by `valid_from`.
    merchant: u32,
    name: u32,
    /// Index into `Snapshot::extras`, or `NONE`.
    extra: u32,
    currency: u16,
    fee_bps_scale: u8,
    fee_fixed_scale: u8,
    status: MerchantStatus,
}

// The point of the packing: every byte here is a megabyte per million versions.
const _: () = assert!(std::mem::size_of::<PackedVersion>() <= 40);

/// The rarely present part of a version: overrides are the exception, not the rule.
#[derive(Debug, Clone, Copy)]
struct Extra {
    fee_bps: Decimal,
    fee_fixed: Decimal,
    tolerance_abs: Option<Decimal>,
    tolerance_rel: Option<Decimal>,
    settlement_deadline: Option<Duration>,
    payment_deadline: Option<Duration>,
}

/// An immutable, complete copy of the reference tables, indexed for as-of lookups.
///
/// Merchant versions are packed ([`PackedVersion`]) in one vector sorted by merchant, then
/// start; a lookup hashes the id to its merchant number and binary-searches that merchant's
/// run. A million versions take about 60 MB of heap (`payrecon bench --reference-versions`)
/// where a map of [`MerchantVersion`]s took over 250.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Merchant ids by merchant number.
    merchant_ids: Strings,
    merchant_index: IdIndex,
    /// The versions of merchant `n` are `versions[first_version[n]..first_version[n + 1]]`.
    first_version: Vec<u32>,
    versions: Vec<PackedVersion>,
    /// Merchant names; consecutive versions of a merchant with the same name share one.
    names: Strings,
    /// Settlement currencies by number (a few dozen at most).
    currencies: Vec<Currency>,
    extras: Vec<Extra>,
    /// Rate versions per (base, quote), sorted by `valid_from`.
    rates: HashMap<(Currency, Currency), Vec<RateVersion>>,
    /// Monotonic load counter: which refresh produced this snapshot.
    pub generation: u64,
    /// When it was loaded (cache age metric).
    pub loaded_at: Option<DateTime<Utc>>,
    /// The PostgreSQL snapshot (`pg_snapshot` text) the tables were read in: which
    /// transactions' changes this copy includes. The re-evaluation of corrected references
    /// takes only the corrections it includes. `None`: not read from PostgreSQL.
    pub database_snapshot: Option<String>,
}

/// What a snapshot holds, for logs and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotStats {
    pub merchants: usize,
    pub merchant_versions: usize,
    /// Distinct names stored (a name is stored once per run of versions that share it).
    pub names: usize,
    /// Versions with overrides (or a fee too wide to pack).
    pub extras: usize,
    pub rate_versions: usize,
    /// Heap memory the snapshot owns, from its buffers' capacities.
    pub heap_bytes: usize,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: a fingerprint that is the same in every process and release (it is stored).
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The element valid at `at`: the last one whose start is not after `at`.
fn as_of<T>(versions: &[T], at: DateTime<Utc>, start: impl Fn(&T) -> DateTime<Utc>) -> Option<&T> {
    let idx = versions.partition_point(|v| start(v) <= at);
    idx.checked_sub(1).map(|i| &versions[i])
}

/// Builds a [`Snapshot`] from versions pushed one at a time in any order, so a load can
/// stream rows into it without holding them all first.
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    snapshot: Snapshot,
    /// Each merchant's last pushed name: a merchant's consecutive versions usually share
    /// their name, which is then stored once.
    last_name: Vec<u32>,
}

impl SnapshotBuilder {
    pub fn new() -> SnapshotBuilder {
        SnapshotBuilder::default()
    }

    pub fn push_merchant(&mut self, m: MerchantVersionRef<'_>) {
        let s = &mut self.snapshot;
        let merchant = match s.merchant_index.find(&s.merchant_ids, m.merchant_id) {
            Some(n) => n,
            None => {
                let n = s.merchant_ids.push(m.merchant_id);
                s.merchant_index.insert(&s.merchant_ids, n);
                self.last_name.push(NONE);
                n
            }
        };
        let last = self.last_name[merchant as usize];
        let name = if last != NONE && s.names.get(last) == m.name {
            last
        } else {
            let n = s.names.push(m.name);
            self.last_name[merchant as usize] = n;
            n
        };
        let currency = match s
            .currencies
            .iter()
            .position(|c| *c == m.settlement_currency)
        {
            Some(i) => i,
            None => {
                s.currencies.push(m.settlement_currency);
                s.currencies.len() - 1
            }
        };
        let packed = match (pack_decimal(m.fee_bps), pack_decimal(m.fee_fixed)) {
            (Some(bps), Some(fixed)) if !m.has_overrides() => Some((bps, fixed)),
            _ => None,
        };
        let ((fee_bps, fee_bps_scale), (fee_fixed, fee_fixed_scale)) =
            packed.unwrap_or(((0, 0), (0, 0)));
        let extra = if packed.is_some() {
            NONE
        } else {
            s.extras.push(Extra {
                fee_bps: m.fee_bps,
                fee_fixed: m.fee_fixed,
                tolerance_abs: m.tolerance_abs,
                tolerance_rel: m.tolerance_rel,
                settlement_deadline: m.settlement_deadline,
                payment_deadline: m.payment_deadline,
            });
            u32::try_from(s.extras.len() - 1).expect("fewer than 2^32 merchant versions")
        };
        s.versions.push(PackedVersion {
            fee_bps,
            fee_fixed,
            valid_from: m.valid_from,
            merchant,
            name,
            extra,
            currency: u16::try_from(currency).expect("fewer than 2^16 currencies"),
            fee_bps_scale,
            fee_fixed_scale,
            status: m.status,
        });
    }

    pub fn push_rate(&mut self, r: FxRate) {
        self.snapshot
            .rates
            .entry((r.base, r.quote))
            .or_default()
            .push((r.valid_from, r.rate, 0));
    }

    /// The snapshot. Two versions of one merchant with the same start (the tables' primary
    /// keys rule that out) leave it unspecified which one a lookup sees.
    pub fn build(self, generation: u64) -> Snapshot {
        let mut s = self.snapshot;
        // In place: a stable sort would take a scratch buffer of half the versions.
        s.versions
            .sort_unstable_by_key(|v| (v.merchant, v.valid_from));
        let merchants = s.merchant_ids.len();
        let mut first_version = vec![0u32; merchants + 1];
        for v in &s.versions {
            first_version[v.merchant as usize + 1] += 1;
        }
        for n in 0..merchants {
            first_version[n + 1] += first_version[n];
        }
        s.first_version = first_version;
        s.versions.shrink_to_fit();
        s.extras.shrink_to_fit();
        s.merchant_ids.shrink_to_fit();
        s.names.shrink_to_fit();
        for versions in s.rates.values_mut() {
            versions.sort_by_key(|v| v.0);
            let mut h = FNV_OFFSET;
            for v in versions.iter_mut() {
                h = fnv(h, &v.0.timestamp_micros().to_le_bytes());
                h = fnv(h, &v.1.mantissa().to_le_bytes());
                h = fnv(h, &v.1.scale().to_le_bytes());
                v.2 = h;
            }
        }
        s.generation = generation;
        s.loaded_at = Some(Utc::now());
        s
    }
}

impl Snapshot {
    /// Builds a snapshot from loaded rows (any order).
    pub fn new(merchants: Vec<MerchantVersion>, rates: Vec<FxRate>, generation: u64) -> Snapshot {
        let mut builder = SnapshotBuilder::new();
        for m in &merchants {
            builder.push_merchant(m.view());
        }
        drop(merchants);
        for r in rates {
            builder.push_rate(r);
        }
        builder.build(generation)
    }

    /// The merchant's terms valid at `at`, if any version had started by then.
    pub fn merchant_at(
        &self,
        merchant_id: &str,
        at: DateTime<Utc>,
    ) -> Option<MerchantVersionRef<'_>> {
        let n = self.merchant_index.find(&self.merchant_ids, merchant_id)? as usize;
        let versions =
            &self.versions[self.first_version[n] as usize..self.first_version[n + 1] as usize];
        as_of(versions, at, |v| v.valid_from).map(|v| self.unpack(v))
    }

    fn unpack(&self, v: &PackedVersion) -> MerchantVersionRef<'_> {
        let mut m = MerchantVersionRef {
            merchant_id: self.merchant_ids.get(v.merchant),
            valid_from: v.valid_from,
            name: self.names.get(v.name),
            settlement_currency: self.currencies[usize::from(v.currency)],
            fee_bps: Decimal::new(v.fee_bps.into(), v.fee_bps_scale.into()),
            fee_fixed: Decimal::new(v.fee_fixed.into(), v.fee_fixed_scale.into()),
            status: v.status,
            tolerance_abs: None,
            tolerance_rel: None,
            settlement_deadline: None,
            payment_deadline: None,
        };
        if v.extra != NONE {
            let e = &self.extras[v.extra as usize];
            m.fee_bps = e.fee_bps;
            m.fee_fixed = e.fee_fixed;
            m.tolerance_abs = e.tolerance_abs;
            m.tolerance_rel = e.tolerance_rel;
            m.settlement_deadline = e.settlement_deadline;
            m.payment_deadline = e.payment_deadline;
        }
        m
    }

    /// Units of `quote` for one `base` at `at`: 1 for the same currency, the direct rate, or
    /// the inverse of the reverse rate.
    pub fn rate_at(&self, base: Currency, quote: Currency, at: DateTime<Utc>) -> Option<Decimal> {
        if base == quote {
            return Some(Decimal::ONE);
        }
        if let Some((_, r, _)) = self
            .rates
            .get(&(base, quote))
            .and_then(|v| as_of(v, at, |x| x.0))
        {
            return Some(*r);
        }
        let (_, r, _) = as_of(self.rates.get(&(quote, base))?, at, |x| x.0)?;
        Decimal::ONE.checked_div(*r)
    }

    /// A fingerprint of every rate version of `base`/`quote`, in either direction, that
    /// starts at or before `up_to`: every conversion [`Self::rate_at`] can give between them
    /// at or before `up_to` depends on those versions only, so an equal fingerprint means no
    /// such conversion changed (a reconciliation item's sums stay valid).
    pub fn rate_fingerprint(&self, base: Currency, quote: Currency, up_to: DateTime<Utc>) -> u64 {
        let prefix = |pair| {
            (self.rates.get(&pair))
                .and_then(|v| as_of(v, up_to, |x| x.0))
                .map_or(0, |x| x.2)
        };
        let h = fnv(FNV_OFFSET, &prefix((base, quote)).to_le_bytes());
        fnv(h, &prefix((quote, base)).to_le_bytes())
    }

    /// Merchant versions and rate versions held.
    pub fn len(&self) -> (usize, usize) {
        (self.versions.len(), self.rates.values().map(Vec::len).sum())
    }

    pub fn is_empty(&self) -> bool {
        self.versions.is_empty() && self.rates.is_empty()
    }

    pub fn stats(&self) -> SnapshotStats {
        let (merchant_versions, rate_versions) = self.len();
        let rates_heap: usize = (self.rates.values())
            .map(|v| v.capacity() * std::mem::size_of::<RateVersion>())
            .sum::<usize>()
            + self.rates.capacity()
                * std::mem::size_of::<((Currency, Currency), Vec<RateVersion>)>();
        SnapshotStats {
            merchants: self.merchant_ids.len(),
            merchant_versions,
            names: self.names.len(),
            extras: self.extras.len(),
            rate_versions,
            heap_bytes: self.merchant_ids.heap_bytes()
                + 4 * self.merchant_index.slots.capacity()
                + 4 * self.first_version.capacity()
                + self.versions.capacity() * std::mem::size_of::<PackedVersion>()
                + self.names.heap_bytes()
                + self.currencies.capacity() * std::mem::size_of::<Currency>()
                + self.extras.capacity() * std::mem::size_of::<Extra>()
                + rates_heap,
        }
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

    /// Loads the tables into a new snapshot and swaps it in. The rows stream into the new
    /// snapshot as they arrive; the previous snapshot stays in use until the swap.
    pub async fn reload(&self, store: &Store) -> Result<Arc<Snapshot>, sqlx::Error> {
        let mut builder = SnapshotBuilder::new();
        let seen = store.load_reference_into(&mut builder).await?;
        let generation = self.snapshot().generation + 1;
        let mut snapshot = builder.build(generation);
        snapshot.database_snapshot = Some(seen);
        let snapshot = Arc::new(snapshot);
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
mod tests;
