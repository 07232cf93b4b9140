-- Indexes for the per-report statements, so a report costs the day it shows, not the years
-- of history beside it (plans at size in docs/growth.md).
--
-- `payrecon report` reads a day of merchant_daily_report (whose item sums group
-- reconciliation_items by merchant, day and currency), of open_exceptions and of
-- payout_status_summary. Without these, each report read every item: a parallel sequential
-- scan of reconciliation_items (147 ms at 2.2M items; linear in the history).
--
-- business_date never changes once an item exists (except when an earlier record moves its
-- bucket), so the new index keeps the items' updates HOT-eligible; its cost is one index
-- entry per item inserted. The exception index is partial: only items in an exception
-- status are in it.
--
-- CREATE INDEX (not CONCURRENTLY: migrations run in a transaction, at startup, before the
-- service consumes) takes a lock that blocks writes to the table while it is built: on a
-- large existing database, build them beforehand with CREATE INDEX CONCURRENTLY under the
-- same names, and this migration finds them (IF NOT EXISTS).
CREATE INDEX IF NOT EXISTS reconciliation_items_business_date_idx
    ON reconciliation_items (business_date, merchant_id);
CREATE INDEX IF NOT EXISTS reconciliation_items_exceptions_day_idx
    ON reconciliation_items (business_date)
    WHERE status NOT IN ('MATCHED', 'EXPECTED');
CREATE INDEX IF NOT EXISTS payout_items_business_date_idx ON payout_items (business_date);
-- The report's default day: the latest day of the per-shard totals bounds the view's.
CREATE INDEX IF NOT EXISTS merchant_daily_totals_by_shard_date_idx
    ON merchant_daily_totals_by_shard (business_date);
