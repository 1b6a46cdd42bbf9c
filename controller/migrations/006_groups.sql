-- Project groups (issue 11): member projects share a group network on their host, on
-- which the add-ons their owners chose to share are reachable, under a variable name
-- the owner picks. Members are placed on one host (the API refuses otherwise).

CREATE TABLE project_groups (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE group_members (
    group_id    uuid NOT NULL REFERENCES project_groups (id) ON DELETE CASCADE,
    project_id  uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (group_id, project_id)
);
CREATE INDEX group_members_project_idx ON group_members (project_id);

-- A share belongs to a membership: leaving the group drops the project's shares with it.
CREATE TABLE group_shares (
    group_id    uuid NOT NULL,
    project_id  uuid NOT NULL,
    addon_id    uuid NOT NULL REFERENCES addons (id) ON DELETE CASCADE,
    env_name    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (group_id, addon_id),
    UNIQUE (group_id, env_name),
    FOREIGN KEY (group_id, project_id)
        REFERENCES group_members (group_id, project_id) ON DELETE CASCADE
);
