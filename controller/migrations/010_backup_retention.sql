-- The retention a backup was taken under (its plan's backup_retention_days then). A move
-- to a plan keeping backups for less time, or none (Starter), used to prune them at the
-- next tick, silently (the black-box probe of issue 9); each is now kept as long as the
-- longer of this and its plan's current window. NULL for backups made before: the
-- current plan's window, as until now.
ALTER TABLE backups ADD COLUMN retention_days integer CHECK (retention_days >= 0);
