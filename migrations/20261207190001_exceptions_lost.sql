-- Exceptions the topic holds but this database does not (or holds with different content):
-- published from transactions an asynchronous standby never received, or from after the
-- point a database was restored to. The relay records each one found in the topic's tail
-- when its session starts, keeps the outbox sequence above them (an unpublished row that
-- holds such a seq is renumbered before it is sent), and publishes the next exception of the
-- same payment reference with the header payrecon-supersedes naming it (superseded_by).
-- See docs/failover.md.
CREATE TABLE exceptions_lost (
    seq                bigint        PRIMARY KEY,
    payment_reference  text          NOT NULL,
    -- The digest header of the message on the topic (NULL: published without one).
    digest             text,
    found_at           timestamptz   NOT NULL DEFAULT now(),
    -- The outbox seq of the message published with payrecon-supersedes = seq.
    superseded_by      bigint
);
CREATE INDEX exceptions_lost_open_idx ON exceptions_lost (payment_reference, seq)
    WHERE superseded_by IS NULL;
