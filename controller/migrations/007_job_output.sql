-- Live job output (issue 11): the chunks agents stream while a job runs, kept up to the
-- retention cap per job (the newest), deleted with their job.

CREATE TABLE job_output (
    job_id        uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq           integer NOT NULL CHECK (seq >= 0),
    start_offset  bigint NOT NULL CHECK (start_offset >= 0),
    data          text NOT NULL,
    dropped       bigint NOT NULL DEFAULT 0,
    received_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_id, seq)
);

-- Chunks received (trimming does not lower it), the next seq expected, and the number of
-- chunks the agent says it sent (from the job's result; NULL: not streamed or not known).
ALTER TABLE jobs ADD COLUMN output_received integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN output_next_seq integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN output_chunks integer;
