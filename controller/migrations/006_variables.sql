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
