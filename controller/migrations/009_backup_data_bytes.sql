-- The data a backup holds, as the add-on's storage quota counts it (Postgres:
-- pg_database_size, Redis: used_memory), taken at dump time. A restore is refused when it
-- would not fit the add-on's current plan (the black-box probe of issue 9 restored a
-- backup bigger than the plan's storage). NULL for backups made before: the API then
-- falls back to the dump's size, a lower bound (pg_dump -Fc and RDB files are compressed).
ALTER TABLE backups ADD COLUMN data_bytes bigint CHECK (data_bytes >= 0);
