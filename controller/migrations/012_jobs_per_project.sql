-- The pruner keeps each project's newest `jobs.keep_per_project` finished jobs: it ranks
-- them by project and finish time, which this index serves.
CREATE INDEX jobs_project_finished_idx ON jobs (project_id, finished_at DESC)
    WHERE state <> 'pending';
