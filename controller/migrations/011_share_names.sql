-- A share's variable lands in the other members' apps and jobs, so since the probe of
-- 2026-11-27 (issue 11) its name must be <NAME>_URL: a member could name one PATH,
-- LD_PRELOAD or NODE_OPTIONS and change how the other members' programs ran. Shares
-- stored under another name before are removed, not renamed (a new name could collide
-- with a member's own variable); the owner shares the add-on again under a name of its
-- choice. The constraint keeps any later code path from storing one.
DELETE FROM group_shares WHERE env_name NOT LIKE '%\_URL';
ALTER TABLE group_shares
    ADD CONSTRAINT group_shares_env_name_url CHECK (env_name LIKE '%\_URL');
