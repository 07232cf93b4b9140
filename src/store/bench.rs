//! The benchmark's own statements: synthetic reference data in bulk, and what it watches
//! while a stage runs (lock waits, a session's backend, the records applied).

use sqlx::PgPool;

/// N merchant versions in one statement: merchant `m` (`merchant-000123`) has versions
/// `v` = 0..3 starting 90 days apart; one merchant in ten is renamed from its third version,
/// one in twenty overrides the tolerances (half of those the settlement deadline too), one
/// version in fifty is suspended.
const INSERT_MERCHANTS: &str = "
    INSERT INTO merchants (merchant_id, valid_from, name, settlement_currency, fee_bps, fee_fixed,
                           status, tolerance_abs, tolerance_rel, settlement_deadline, payment_deadline)
    SELECT 'merchant-' || lpad(m::text, greatest(6, length(m::text)), '0'),
           timestamptz '2025-01-01 00:00:00+00' + v * interval '90 days' + (m % 86400) * interval '1 second',
           'Merchant ' || lpad(m::text, greatest(6, length(m::text)), '0') || ' Trading'
               || CASE WHEN v >= 2 AND m % 10 = 0 THEN ' Ltd' ELSE '' END,
           (ARRAY['EUR', 'USD', 'GBP', 'CHF', 'SEK', 'PLN'])[1 + m % 6],
           (5000 + (m * 7 + v * 13) % 25000) / 100.0,
           ((m + v) % 50) / 100.0,
           CASE WHEN (m + v) % 50 = 7 THEN 'SUSPENDED' ELSE 'ACTIVE' END,
           CASE WHEN m % 20 = 0 THEN 0.50 END,
           CASE WHEN m % 20 = 0 THEN 0.0005 END,
           CASE WHEN m % 40 = 0 THEN interval '96 hours' END,
           NULL
      FROM generate_series(0, $1 - 1) AS i, LATERAL (SELECT i / 4 AS m, i % 4 AS v) AS k";

/// Daily rates for five pairs over the same period (1,825 rows): small, but loaded too.
const INSERT_RATES: &str = "
    INSERT INTO fx_rates (base_currency, quote_currency, valid_from, rate)
    SELECT q.base, 'EUR', timestamptz '2025-01-01 00:00:00+00' + d * interval '1 day',
           round(q.rate * (1 + (d % 7 - 3) / 1000.0), 12)
      FROM generate_series(0, 364) AS d,
           (VALUES ('USD', 0.92), ('GBP', 1.17), ('CHF', 1.04), ('SEK', 0.088), ('PLN', 0.23))
               AS q(base, rate)";

/// Inserts `versions` synthetic merchant versions (see `INSERT_MERCHANTS`).
pub async fn insert_merchant_versions(pool: &PgPool, versions: i64) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT_MERCHANTS)
        .bind(versions)
        .execute(pool)
        .await?;
    Ok(())
}

/// Inserts a year of daily rates for five pairs (see `INSERT_RATES`).
pub async fn insert_rates(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT_RATES).execute(pool).await?;
    Ok(())
}

/// Lock waits going on now in `database`: (pid, wait start, milliseconds waited so far, the
/// waiting statement's first 72 characters).
pub async fn lock_waits(
    pool: &PgPool,
    database: &str,
) -> Result<Vec<(i32, String, f64, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT l.pid, l.waitstart::text,
                EXTRACT(EPOCH FROM clock_timestamp() - l.waitstart)::float8 * 1000,
                left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 72)
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE NOT l.granted AND l.waitstart IS NOT NULL AND a.datname = $1",
    )
    .bind(database)
    .fetch_all(pool)
    .await
}

/// `ALTER DATABASE database SET setting` (`setting`: `name = value`, from the benchmark's
/// own constants, never from input).
pub async fn set_database_default(
    pool: &PgPool,
    database: &str,
    setting: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("ALTER DATABASE {database} SET {setting}"))
        .execute(pool)
        .await?;
    Ok(())
}

/// The server process of one of `pool`'s sessions.
pub async fn backend_pid(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
}

/// Records `group` has applied from `topics` in all (the sum of their stored next offsets).
pub async fn applied_records(
    pool: &PgPool,
    group: &str,
    topics: &[&str],
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets
          WHERE consumer_group = $1 AND topic = ANY($2)",
    )
    .bind(group)
    .bind(topics)
    .fetch_one(pool)
    .await
}

/// Makes PostgreSQL refuse every payment event with `psp_reference` (a check constraint the
/// validation knows nothing of: the hostile stage's record that only the database refuses).
/// `psp_reference` comes from the benchmark's constants.
pub async fn refuse_psp_reference(pool: &PgPool, psp_reference: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(&format!(
        "ALTER TABLE payment_events ADD CONSTRAINT bench_refuses_one_psp_reference
             CHECK (psp_reference IS DISTINCT FROM '{psp_reference}')"
    ))
    .execute(pool)
    .await?;
    Ok(())
}
