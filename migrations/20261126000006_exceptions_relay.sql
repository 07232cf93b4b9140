-- The active exceptions relay's current round: set before a round is sent, cleared once the
-- round is acknowledged and marked published. A relay that takes the advisory lock and finds
-- a round still set knows the previous relay stopped mid-round (crashed, or is cut off from
-- PostgreSQL but maybe still running) and waits until that round's messages can no longer
-- land (round_started_at + the producer's message timeout) before it reads the topic's tail.
CREATE TABLE exceptions_relay (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    instance         text NOT NULL,
    round_started_at timestamptz
);
