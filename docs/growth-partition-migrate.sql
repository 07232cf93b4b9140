-- docs/growth.md, "Migrating an existing database": the time to copy 10M rows of payment_events
-- into monthly partitions with an unpartitioned id table for dedup. Run with `psql -f` on a
-- scratch database migrated to payrecon's schema; it leaves the tables behind (drop the database).
\timing on
-- 10M rows of payment_events as the service writes them (the prefill's capture rows).
CREATE TABLE payment_events_old (LIKE payment_events INCLUDING ALL);
INSERT INTO payment_events_old (event_id, payment_reference, merchant_id, kind, amount, currency, event_time, psp_reference, source_topic, source_partition, source_offset, ingested_at)
SELECT 'pf-e-' || lpad(i::text, 10, '0'), 'pf-p-' || lpad(i::text, 10, '0'), 'merchant-' || lpad((i % 20)::text, 3, '0'), 'CAPTURE', 10 + (i * 7919) % 100000 / 100.0, 'EUR',
       timestamptz '2026-01-01' - (10000000 - i) * interval '3.1536 seconds', 'psp-' || i, 'payments.transactions', (i % 12)::int, i / 12, timestamptz '2026-01-01' - (10000000 - i) * interval '3.1536 seconds'
  FROM generate_series(0::bigint, 9999999) AS i;
VACUUM ANALYZE payment_events_old;
-- The migration: an unpartitioned id table (dedup) and the rows partitioned by month of event_time.
BEGIN;
CREATE TABLE payment_event_ids (event_id text PRIMARY KEY, event_time timestamptz NOT NULL);
CREATE TABLE payment_events_new (LIKE payment_events_old INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY RANGE (event_time);
DO $$
DECLARE m date;
BEGIN
  FOR m IN SELECT generate_series(date '2024-12-01', date '2026-03-01', interval '1 month')::date LOOP
    EXECUTE format('CREATE TABLE %I PARTITION OF payment_events_new FOR VALUES FROM (%L) TO (%L)',
                   'payment_events_' || to_char(m, 'YYYYMM'), m, (m + interval '1 month')::date);
  END LOOP;
END $$;
INSERT INTO payment_event_ids SELECT event_id, event_time FROM payment_events_old ORDER BY event_id;
INSERT INTO payment_events_new SELECT * FROM payment_events_old;
ALTER TABLE payment_events_new ADD PRIMARY KEY (event_id, event_time);
CREATE INDEX ON payment_events_new (payment_reference);
SELECT (SELECT count(*) FROM payment_events_old) AS old_rows, (SELECT count(*) FROM payment_events_new) AS new_rows, (SELECT count(*) FROM payment_event_ids) AS ids;
COMMIT;
