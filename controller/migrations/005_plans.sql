-- Plans that hold: deletion protection per add-on, credential rotation with a grace
-- period, and projects being deleted (their add-ons tombstoned, the rows kept until the
-- host confirms the add-ons are gone).

ALTER TABLE addons ADD COLUMN deletion_protection boolean NOT NULL DEFAULT false;
-- The password before the last rotation keeps working until rotated_at + the
-- controller's secrets.rotation_grace_s.
ALTER TABLE addons ADD COLUMN rotated_at timestamptz;

ALTER TABLE projects ADD COLUMN deleted_at timestamptz;
