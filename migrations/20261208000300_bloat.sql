-- Fill factors and autovacuum thresholds of the tables the service updates, from their
-- measured updates (docs/growth.md, "Bloat": `payrecon bench --prefill`, 400,005 records
-- through the service on an empty database, pg_stat_user_tables afterwards).
--
-- Measured per table: updates, share of HOT updates, dead tuples left, live rows.
--   merchant_daily_totals_by_shard       101,867 upd, 91% HOT, 12,088 dead / 2,098 live
--   merchant_payment_totals_by_shard      78,874 upd, 95% HOT,  6,131 dead /   514 live
--   merchant_settlement_totals_by_shard   25,730 upd, 99% HOT,    875 dead /   143 live
--   payout_items                          54,140 upd, 52% HOT, 27,016 dead /   708 live
--   reconciliation_items                  29,954 upd,  0% HOT, 29,954 dead / 181,654 live
--   exceptions_outbox                     20,390 upd,  0% HOT, 20,390 dead /  20,390 live
--
-- 1. The running totals: few rows, each updated every batch; almost every update is HOT, so
--    room on the page is what keeps them HOT and the table small. Half-empty pages cost
--    nothing at this size. Autovacuum's default trigger (50 + 20% of the rows dead) is
--    reached within seconds on such tables anyway; a fixed threshold keeps it so as the
--    tables grow with days and merchants.
ALTER TABLE merchant_daily_totals_by_shard SET (fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000);
ALTER TABLE merchant_payment_totals_by_shard SET (fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000);
ALTER TABLE merchant_settlement_totals_by_shard SET (fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000);
ALTER TABLE payout_daily_totals_by_shard SET (fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000);

-- 2. Payout items: one row per settlement batch, updated by every line of the batch (38 dead
--    versions per live row in the run); half of the updates are not HOT (they move the
--    deadline or the status, both indexed). Vacuum after a fixed number of dead versions, not after 20% of a table that only
--    grows.
ALTER TABLE payout_items SET (fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);

-- 3. Reconciliation items: an update moves the status (EXPECTED -> MATCHED ...) or the
--    deadline, both in partial index predicates, so it is never HOT (1 of 29,954 was): the
--    15% of every page left free by 20261201000003 for HOT updates only made the table larger
--    (it is the largest table with a state). Full pages from now on (existing pages keep
--    their layout). With 20% of the rows as the trigger, a table of 25M items waits for 5M
--    dead versions before a vacuum; 100,000 bounds it at any size. A vacuum on it costs the
--    pages changed since the last one (visibility map), and PostgreSQL skips the index pass
--    when under 2% of the pages hold dead tuples.
ALTER TABLE reconciliation_items SET (fillfactor = 100,
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 100000);

-- 4. The outbox: every row is updated once, when published, and never HOT (published_at is
--    in the pending index's predicate): one dead version per row. Bound it like the items.
ALTER TABLE exceptions_outbox SET (autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000);
