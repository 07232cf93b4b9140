-- Files in (issue 26): every import of a settlement report or bank statement file, and the
-- files refused whole (the quarantine). `payrecon import` writes here; the entries themselves
-- go to the input topics as ordinary records, so the engine applies them in its one offset
-- transaction and `payrecon replay` still reproduces everything from the log.

-- One row per distinct file (by content digest). A re-import of the same bytes finds its row;
-- an interrupted import (status IMPORTING) is resumed by re-producing the same records,
-- which the engine counts as exact duplicates.
CREATE TABLE file_imports (
    id            bigserial   PRIMARY KEY,
    -- SHA-256 of the file's bytes, lower-case hex: the file's identity.
    digest        text        NOT NULL UNIQUE,
    -- The file name as given (for people; never an identity).
    name          text        NOT NULL,
    format        text        NOT NULL,
    -- The statement the file says it is (camt Stmt/Id, MT940 :20:, BAI2 sender/receiver/date,
    -- Stripe payout id, Adyen batch number), its sequence number, account and currency.
    statement_id  text,
    sequence      text,
    account       text,
    currency      text,
    -- The prefix of every entry id of this statement (entry ids are `<prefix>-<index>`).
    id_prefix     text,
    -- Who ran the import (OS user or --by) and when.
    imported_by   text        NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    -- Entries in the file; new ones handed to the engine; ones already stored before this
    -- import; ones payrecon's rules refuse (the engine dead-letters them as usual).
    entries       bigint      NOT NULL DEFAULT 0,
    applied       bigint      NOT NULL DEFAULT 0,
    duplicates    bigint      NOT NULL DEFAULT 0,
    rejected      bigint      NOT NULL DEFAULT 0,
    status        text        NOT NULL
                  CHECK (status IN ('IMPORTING', 'IMPORTED', 'REJECTED', 'CONFLICT')),
    -- Why a file was rejected or is in conflict; empty otherwise.
    report        text        NOT NULL DEFAULT '',
    -- A statement sequence gap on the account ("40 missing before 41"), for operators.
    sequence_gap  text
);

-- At most one file per statement (format, account, id, sequence) may be imported: a second
-- file claiming it is a CONFLICT, never merged. The index also settles two concurrent
-- importers of different files of the same statement.
CREATE UNIQUE INDEX file_imports_one_file_per_statement
    ON file_imports (format, coalesce(account, ''), statement_id, coalesce(sequence, ''))
    WHERE statement_id IS NOT NULL AND status IN ('IMPORTING', 'IMPORTED');

CREATE INDEX file_imports_recent ON file_imports (started_at DESC);

-- Files refused whole, kept with the report naming the line or element and the reason.
-- The bytes are kept up to 16 MiB (bytes_kept says whether they are); larger files are
-- recorded by digest and size only.
CREATE TABLE rejected_files (
    id           bigserial   PRIMARY KEY,
    digest       text        NOT NULL,
    name         text        NOT NULL,
    size         bigint      NOT NULL,
    bytes        bytea,
    bytes_kept   boolean     NOT NULL,
    reason       text        NOT NULL,
    rejected_by  text        NOT NULL,
    rejected_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX rejected_files_recent ON rejected_files (rejected_at DESC);
