-- Reference data is an append-only history. `payrecon reference load` inserts new versions,
-- treats a re-load of an identical version as a no-op and refuses a *different* version with
-- the key of a stored one: payments were priced with the stored one, and a silent overwrite
-- would make a later replay disagree with what was live without anyone knowing why.
--
-- A deliberate correction (`reference load --correct --reason ...`) does update the version in
-- place (the temporal lookup has one version per key and start, see 20261126000002), and
-- leaves a row here saying who changed what, when and why, with the values before and after.

CREATE TABLE reference_corrections (
    id              bigserial    PRIMARY KEY,
    -- The table of the corrected version.
    table_name      text         NOT NULL CHECK (table_name IN ('merchants', 'fx_rates')),
    -- The version's primary key as a JSON object ({"merchant_id", "valid_from"} or
    -- {"base_currency", "quote_currency", "valid_from"}); jsonb rather than one column per
    -- table's key so both tables share one history, queried by table_name.
    version_key     jsonb        NOT NULL,
    -- Every other column before and after, as text (decimals normalized, durations in
    -- humantime form): what an auditor compares, not what the service reads.
    previous        jsonb        NOT NULL,
    corrected       jsonb        NOT NULL,
    -- The validity window whose pricing the correction changed: from the version's start to
    -- the next version's start when it was made (NULL: the version was the current one).
    -- Which payment references it affected follows from it (see reference_reevaluations).
    valid_from      timestamptz  NOT NULL,
    valid_until     timestamptz,
    reason          text         NOT NULL CHECK (btrim(reason) <> ''),
    corrected_by    text         NOT NULL CHECK (btrim(corrected_by) <> ''),
    corrected_at    timestamptz  NOT NULL DEFAULT now(),
    -- The file the corrected version came from (NULL when loaded by a program).
    source          text
);

-- Append-only: history that can be edited proves nothing. Dropping the table (or the schema,
-- as the replay's shadow schemas are dropped) is still possible for the owner.
CREATE FUNCTION payrecon_refuse_history_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
END
$$;
CREATE TRIGGER reference_corrections_append_only BEFORE UPDATE OR DELETE ON reference_corrections
    FOR EACH ROW EXECUTE FUNCTION payrecon_refuse_history_change();
CREATE TRIGGER reference_corrections_no_truncate BEFORE TRUNCATE ON reference_corrections
    FOR EACH STATEMENT EXECUTE FUNCTION payrecon_refuse_history_change();

-- Payment references a correction affects, queued in the correction's own transaction and
-- re-evaluated (history cause REFERENCE_DATA) by the running service after its reference
-- cache reloads. A queue rather than a flag on reconciliation_items: the batch transactions
-- write that table on the hot path, and a correction touches a few references, rarely.
CREATE TABLE reference_reevaluations (
    payment_reference  text         PRIMARY KEY,
    -- The latest correction that queued it (a second correction re-queues, see queued_by).
    correction_id      bigint       NOT NULL REFERENCES reference_corrections (id),
    -- The queuing transaction. The service dequeues an entry only when the cache snapshot it
    -- evaluates with was read after that transaction committed (pg_visible_in_snapshot):
    -- otherwise an entry could be taken, and evaluated with the terms from before the
    -- correction, by a sweep that raced the correction's commit.
    queued_by          xid8         NOT NULL DEFAULT pg_current_xact_id(),
    queued_at          timestamptz  NOT NULL DEFAULT now()
);
