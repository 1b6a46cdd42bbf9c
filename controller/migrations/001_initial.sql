-- The controller's state: hosts reported by agents, projects placed on them, their
-- add-ons (tombstoned until the host confirms removal) and one-off jobs.

-- Every published DesiredState takes the next value, so generations only ever rise.
CREATE SEQUENCE desired_generation AS bigint MINVALUE 1;

CREATE TABLE hosts (
    name                text PRIMARY KEY,
    -- The agent's own word (presence, last will); see last_seen for liveness.
    online              boolean NOT NULL DEFAULT false,
    capacity_cpus       double precision NOT NULL DEFAULT 0,
    capacity_memory_mb  integer NOT NULL DEFAULT 0,
    last_seen           timestamptz,
    applied_generation  bigint NOT NULL DEFAULT 0,
    -- Host-level part of the last HostStatus: sent_at and conditions.
    status              jsonb,
    status_sent_at      timestamptz
);

CREATE TABLE projects (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    plan        text NOT NULL,
    host        text NOT NULL REFERENCES hosts (name),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX projects_host_idx ON projects (host);

CREATE TABLE addons (
    id                   uuid PRIMARY KEY,
    project_id           uuid NOT NULL REFERENCES projects (id),
    name                 text NOT NULL,
    kind                 text NOT NULL CHECK (kind IN ('postgres', 'redis')),
    database             text NOT NULL,
    "user"               text NOT NULL,
    password             text NOT NULL,
    secret_version       integer NOT NULL DEFAULT 1,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- A tombstone: the agent deletes container and data, then lists the id in `removed`.
    deleted_at           timestamptz,
    -- The last AddonStatus the host reported for this add-on.
    status               jsonb,
    observed_generation  bigint
);
-- Names are DNS names on the project network: unique among live add-ons only, so a
-- name can be reused while the old add-on is still being removed.
CREATE UNIQUE INDEX addons_live_name_idx ON addons (project_id, name) WHERE deleted_at IS NULL;
CREATE INDEX addons_project_idx ON addons (project_id, created_at);

CREATE TABLE jobs (
    id           uuid PRIMARY KEY,
    project_id   uuid NOT NULL REFERENCES projects (id),
    image        text NOT NULL,
    command      text[] NOT NULL,
    timeout_s    double precision NOT NULL,
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'succeeded', 'failed')),
    exit_code    integer,
    output       text,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at   timestamptz,
    finished_at  timestamptz
);
CREATE INDEX jobs_pending_idx ON jobs (project_id, created_at) WHERE state = 'pending';
