-- Credentials and secrets at rest: per-project API tokens and per-host agent tokens,
-- stored as sha256 digests only; add-on passwords sealed with the controller's key file
-- (the controller seals rows left in plaintext by 001 at start, then clears `password`);
-- jobs that can be cancelled and pruned, and their encoded size for the host's budget.

CREATE TABLE project_tokens (
    id            uuid PRIMARY KEY,
    project_id    uuid NOT NULL REFERENCES projects (id),
    name          text NOT NULL,
    token_sha256  bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX project_tokens_project_idx ON project_tokens (project_id, created_at);

CREATE TABLE agent_tokens (
    id            uuid PRIMARY KEY,
    -- No foreign key: a token is made before its host first reports.
    host          text NOT NULL,
    name          text NOT NULL,
    token_sha256  bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX agent_tokens_host_idx ON agent_tokens (host, created_at);

ALTER TABLE addons ALTER COLUMN password DROP NOT NULL;
ALTER TABLE addons ADD COLUMN password_sealed bytea;
ALTER TABLE addons ADD CONSTRAINT addons_password_kept
    CHECK (password IS NOT NULL OR password_sealed IS NOT NULL);

ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('pending', 'succeeded', 'failed', 'cancelled'));
-- Bytes the job takes in its host's desired state (its encoded JobSpec).
ALTER TABLE jobs ADD COLUMN spec_bytes integer NOT NULL DEFAULT 0;
CREATE INDEX jobs_finished_idx ON jobs (finished_at) WHERE state <> 'pending';
