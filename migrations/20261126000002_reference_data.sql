-- Reference data for enrichment: merchants (fee schedule, settlement currency, tolerances,
-- deadlines) and FX rates. Both are TEMPORAL: a row is a version valid from `valid_from` until
-- the next version's `valid_from` of the same key. Enrichment looks up the version valid at the
-- event's own time, so replaying old events gives the same result today as it did then.
-- There is no valid_to column on purpose: deriving it from the next version makes gaps and
-- overlaps impossible.

CREATE TABLE merchants (
    merchant_id          text          NOT NULL,
    valid_from           timestamptz   NOT NULL,
    name                 text          NOT NULL,
    settlement_currency  char(3)       NOT NULL,
    -- Expected fee per capture: amount * fee_bps / 10000 + fee_fixed (settlement currency).
    fee_bps              numeric(10,4) NOT NULL CHECK (fee_bps >= 0),
    fee_fixed            numeric(20,4) NOT NULL CHECK (fee_fixed >= 0),
    status               text          NOT NULL CHECK (status IN ('ACTIVE', 'SUSPENDED')),
    -- Per-merchant overrides; NULL means the global default from the configuration.
    tolerance_abs        numeric(20,4) CHECK (tolerance_abs >= 0),
    tolerance_rel        numeric(12,8) CHECK (tolerance_rel >= 0),
    settlement_deadline  interval,
    payment_deadline     interval,
    loaded_at            timestamptz   NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, valid_from)
);

CREATE TABLE fx_rates (
    base_currency   char(3)        NOT NULL,
    quote_currency  char(3)        NOT NULL,
    valid_from      timestamptz    NOT NULL,
    -- 1 base = rate quote.
    rate            numeric(24,12) NOT NULL CHECK (rate > 0),
    loaded_at       timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (base_currency, quote_currency, valid_from),
    CHECK (base_currency <> quote_currency)
);

-- Every change is announced on channel payrecon_reference, so each instance's in-memory cache
-- reloads without a restart (statement-level: one notification per load, not per row).
CREATE FUNCTION payrecon_notify_reference_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('payrecon_reference', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER merchants_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON merchants
    FOR EACH STATEMENT EXECUTE FUNCTION payrecon_notify_reference_change();
CREATE TRIGGER fx_rates_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON fx_rates
    FOR EACH STATEMENT EXECUTE FUNCTION payrecon_notify_reference_change();
