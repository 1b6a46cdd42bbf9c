-- Backups of add-ons (issue 9). Files live in the agent's backup store; these rows say
-- what exists, what to do next, and how each operation ended.

CREATE TABLE backups (
    id              uuid PRIMARY KEY,
    addon_id        uuid NOT NULL REFERENCES addons (id) ON DELETE CASCADE,
    project_id      uuid NOT NULL REFERENCES projects (id),
    kind            text NOT NULL CHECK (kind IN ('manual', 'automatic')),
    -- pending: the agent is making it; succeeded / failed: finished; deleting: pruned by
    -- retention, the agent removes the file and the row goes with its confirmation.
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'succeeded', 'failed', 'deleting')),
    -- Automatic backups: the schedule slot this run is for. Unique per add-on, so two
    -- controllers, or one restarted around the slot, insert it once.
    scheduled_for   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at     timestamptz,
    size_bytes      bigint,
    sha256          text,
    -- The test restore: null until it ran.
    verified        boolean,
    verify_error    text,
    verify_seconds  double precision,
    counts          jsonb,
    error           text,
    -- A re-verification asked through the API, pending on the agent.
    verify_requested boolean NOT NULL DEFAULT false,
    UNIQUE (addon_id, scheduled_for)
);
CREATE INDEX backups_addon_idx ON backups (addon_id, created_at);
CREATE INDEX backups_open_idx ON backups (project_id) WHERE state IN ('pending', 'deleting')
    OR verify_requested;

CREATE TABLE backup_restores (
    id           uuid PRIMARY KEY,
    addon_id     uuid NOT NULL REFERENCES addons (id) ON DELETE CASCADE,
    backup_id    uuid NOT NULL REFERENCES backups (id) ON DELETE CASCADE,
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'succeeded', 'failed')),
    error        text,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz
);
CREATE INDEX backup_restores_pending_idx ON backup_restores (addon_id) WHERE state = 'pending';

-- Automatic backups per add-on: once a day at `time_of_day` (UTC).
CREATE TABLE backup_schedules (
    addon_id     uuid PRIMARY KEY REFERENCES addons (id) ON DELETE CASCADE,
    enabled      boolean NOT NULL,
    time_of_day  time NOT NULL,
    -- Slots at or before this are not owed: turning it on does not run a past slot.
    since        timestamptz NOT NULL DEFAULT now()
);
