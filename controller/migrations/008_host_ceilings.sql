-- The operator's ceiling on what a host may claim (security probe: placement trusted the
-- capacity a host reports, so a compromised host could attract new projects). Placement
-- uses the least of the reported capacity and this; NULL: no ceiling on that dimension.
-- Apart from `hosts` (whose rows the hosts' statuses write) so it can be set before a
-- host first reports, and no status can touch it.
CREATE TABLE host_ceilings (
    name        text PRIMARY KEY,
    cpus        double precision CHECK (cpus >= 0),
    memory_mb   integer CHECK (memory_mb >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (cpus IS NOT NULL OR memory_mb IS NOT NULL)
);
