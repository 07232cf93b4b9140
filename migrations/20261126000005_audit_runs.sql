-- Audit replays (`payrecon replay`): who replayed which range of the log, when, and what the
-- comparison with the live tables found, so the audit itself is auditable.
--
-- A replay writes nothing else in the live schema: it recomputes into a shadow schema
-- (`shadow_schema`, dropped at the end unless kept) and only reads the live tables. The row
-- is inserted as RUNNING before the replay reads anything and updated once at the end; a row
-- left RUNNING belongs to a replay that was killed (its shadow schema may still exist).

CREATE TABLE audit_runs (
    -- The run id (also in the report's `run` object and the shadow schema's name).
    id              text        PRIMARY KEY,
    -- user@host of the process that ran it.
    requested_by    text        NOT NULL,
    -- The live consumer group whose stored state was audited.
    consumer_group  text        NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    -- The range as requested, then as resolved: topic, partition, from (inclusive) and to
    -- (exclusive) offsets of every partition replayed.
    range           jsonb       NOT NULL,
    records_read    bigint      NOT NULL DEFAULT 0,
    differences     bigint,
    result          text        NOT NULL DEFAULT 'RUNNING'
                    CHECK (result IN ('RUNNING', 'MATCH', 'DIFFERENCES', 'ERROR', 'INTERRUPTED')),
    -- SHA-256 of the report's deterministic part: equal digests, equal findings.
    report_digest   text,
    shadow_schema   text        NOT NULL,
    -- Why an ERROR run failed.
    error_message   text
);
CREATE INDEX audit_runs_started_idx ON audit_runs (started_at);
