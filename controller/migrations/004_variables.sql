-- A project's own variables (set and unset by its users; values sealed like add-on
-- passwords, since they are often secrets), and per add-on: an exact custom variable
-- name, and when it was last promoted to be its kind's primary (DATABASE_URL/REDIS_URL).

CREATE TABLE project_variables (
    project_id    uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name          text NOT NULL,
    value_sealed  bytea NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (project_id, name)
);

ALTER TABLE addons ADD COLUMN env_name text;
ALTER TABLE addons ADD COLUMN promoted_at timestamptz;

-- Releases: numbered, immutable snapshots of a project's variables (sealed, as JSON) and
-- of its apps (name, image, command). The newest is what the project's host runs; a
-- rollback is a new release copying an older one.
CREATE TABLE releases (
    project_id   uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    number       integer NOT NULL CHECK (number >= 1),
    env_sealed   bytea NOT NULL,
    apps         jsonb NOT NULL DEFAULT '[]',
    description  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (project_id, number)
);
