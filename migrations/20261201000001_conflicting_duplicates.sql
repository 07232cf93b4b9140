-- Conflicting duplicates: a record whose id (event_id, line_id) is already stored with
-- DIFFERENT content. For money an id collision is an integrity incident, not a re-delivery:
-- the stored row is never changed by it (insert-or-ignore keeps the first version), and the
-- incoming version is kept here whole, with both versions' business fields and both
-- positions in the log, in the same transaction that advances past it. An exact re-delivery
-- (same content) stays a silent, counted no-op and is not recorded here.
--
-- Not in dead_letters on purpose: a dead letter is a record that can be re-driven once fixed;
-- a conflicting duplicate must be decided by a person (which version is true?), and the
-- open_conflicting_duplicates view is that person's work list.
CREATE TABLE conflicting_duplicates (
    id               bigserial   PRIMARY KEY,
    -- 'payment_event' or 'settlement_line'.
    record_type      text        NOT NULL CHECK (record_type IN ('payment_event', 'settlement_line')),
    record_id        text        NOT NULL,
    -- Where the stored (first) version came from.
    stored_topic     text        NOT NULL,
    stored_partition integer     NOT NULL,
    stored_offset    bigint      NOT NULL,
    -- Where the conflicting version came from.
    topic            text        NOT NULL,
    partition        integer     NOT NULL,
    "offset"         bigint      NOT NULL,
    -- Both versions' business fields, and the names of those that differ.
    stored_fields    jsonb       NOT NULL,
    incoming_fields  jsonb       NOT NULL,
    differing_fields text[]      NOT NULL,
    -- The conflicting record as it was in the log.
    key              bytea,
    payload          bytea,
    broker_timestamp timestamptz,
    detected_at      timestamptz NOT NULL DEFAULT now(),
    -- Set by an operator once the conflict is decided (e.g. with a correcting record).
    resolved_at      timestamptz,
    resolution_note  text,
    -- A log position is recorded at most once, whatever re-reads it.
    CONSTRAINT conflicting_duplicates_position_key UNIQUE (topic, partition, "offset")
);
CREATE INDEX conflicting_duplicates_record_idx ON conflicting_duplicates (record_type, record_id);

CREATE VIEW open_conflicting_duplicates AS
SELECT id, record_type, record_id, differing_fields, stored_fields, incoming_fields,
       stored_topic, stored_partition, stored_offset, topic, partition, "offset", detected_at
  FROM conflicting_duplicates
 WHERE resolved_at IS NULL;
