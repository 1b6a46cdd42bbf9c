"""Prometheus metrics of the agent, named after controller-runtime's."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_TOTAL = Counter("orkestr_agent_reconcile_total", "Reconcile passes by result", ["result"])
RECONCILE_DURATION = Histogram(
    "orkestr_agent_reconcile_duration_seconds",
    "Duration of one full reconcile pass",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2.5, 5, 10, 30),  # 0.2: the target
)
ACTIONS = Counter("orkestr_agent_actions_total", "Executed plan actions", ["action", "result"])
DESIRED_REJECTED = Counter(
    "orkestr_agent_desired_rejected_total", "Desired-state messages rejected", ["reason"]
)
APPLIED_GENERATION = Gauge(
    "orkestr_agent_applied_generation", "Generation of the desired state being applied"
)
NETWORKS_UNREMOVABLE = Gauge(
    "orkestr_agent_networks_unremovable",
    "Networks Docker refused to remove several times in a row (agent/netremoval.py)",
)
MQTT_CONNECTED = Gauge("orkestr_agent_mqtt_connected", "1 while connected to the broker")
ADDON_READY = Gauge(
    "orkestr_agent_addon_ready",
    "1 when the add-on answered a real client",
    ["addon", "project", "kind"],
)
ADDON_SLEEP_STATE = Gauge(
    "orkestr_agent_addon_sleep_state",
    "0 awake, 1 light sleep (paused), 2 deep sleep (stopped)",
    ["addon", "project", "kind"],
)
ADDON_USAGE_BYTES = Gauge(
    "orkestr_agent_addon_usage_bytes",
    "Bytes of data the add-on holds, as the database counts them",
    ["addon", "project", "kind"],
)
ADDON_QUOTA_BYTES = Gauge(
    "orkestr_agent_addon_quota_bytes",
    "The add-on's storage quota: past it, writes are refused",
    ["addon", "project", "kind"],
)
SLEEP_LEVEL = {"awake": 0, "light": 1, "deep": 2}
SLEEPS = Counter("orkestr_agent_addon_sleeps_total", "Add-ons put to sleep", ["stage"])
WAKES = Counter("orkestr_agent_addon_wakes_total", "Add-ons woken by a client", ["stage"])
WAKE_DURATION = Histogram(
    "orkestr_agent_wake_duration_seconds",
    "From the first client connection to the add-on answering",
    ["kind", "stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BACKUP_OPERATIONS = Counter(
    "orkestr_agent_backup_operations_total",
    "Backup-store operations (backup, verify, restore, delete) by outcome",
    ["op", "kind", "result"],
)
BACKUP_VERIFICATIONS = Counter(
    "orkestr_agent_backup_verifications_total",
    "Test restores of backups: verified or failed",
    ["kind", "result"],
)
BACKUP_DURATION = Histogram(
    "orkestr_agent_backup_duration_seconds",
    "Duration of one backup-store operation, verification included",
    ["op", "kind"],
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
BACKUP_LAST_SIZE = Gauge(
    "orkestr_agent_backup_last_size_bytes",
    "Size of the add-on's latest backup",
    ["addon", "project", "kind"],
)
BACKUP_LAST_VERIFIED = Gauge(
    "orkestr_agent_backup_last_verified_timestamp_seconds",
    "When the add-on's latest verified backup finished (since this agent started)",
    ["addon", "project", "kind"],
)
RELAYS_ACTIVE = Gauge(
    "orkestr_agent_wake_relays", "Client connections relayed by wake listeners right now"
)
WAKE_SYNS = Counter(
    "orkestr_agent_wake_syns_total",
    "Connection attempts (SYNs) the SYN watch reported, rate-limited in the kernel per add-on",
)
WAKE_QUEUED = Counter(
    "orkestr_agent_wake_syns_queued_total",
    "Connection attempts (SYNs) held in the kernel's queue while a stopped add-on started",
)
WAKE_QUEUE_FALLBACKS = Counter(
    "orkestr_agent_wake_queue_fallbacks_total",
    "Deep sleeps that fell back to the wake listener and relay: NFQUEUE not available",
)
RELAYS_REFUSED = Counter(
    "orkestr_agent_wake_relays_refused_total",
    "Connections a wake listener closed at once: over the add-on's or the host's relay cap",
    ["reason"],
)
for _reason in ("addon_cap", "host_cap"):
    RELAYS_REFUSED.labels(_reason)


JOB_OUTPUT_CHUNKS = Counter(
    "orkestr_agent_job_output_chunks_total",
    "Live job output chunks by result (sent; unsent: the broker was away, retried)",
    ["result"],
)
JOB_OUTPUT_CHARS = Counter(
    "orkestr_agent_job_output_chars_total",
    "Characters of live job output: sent, or dropped by the stream's rate limit",
    ["kind"],
)


def start_at_zero(actions: Iterable[str], rejection_reasons: Iterable[str]) -> None:
    """Create every known labelled series at 0.

    `increase()` and `rate()` need a series' earlier sample: a counter whose first sample
    is already 1 shows no increase, and an alert on its first event would never fire.
    """
    for result in ("success", "error", "requeue"):
        RECONCILE_TOTAL.labels(result)
    for action in actions:
        for result in ("ok", "error", "permanent_error"):
            ACTIONS.labels(action, result)
    for reason in rejection_reasons:
        DESIRED_REJECTED.labels(reason)
    for result in ("sent", "unsent"):
        JOB_OUTPUT_CHUNKS.labels(result)
    for kind in ("sent", "dropped"):
        JOB_OUTPUT_CHARS.labels(kind)
    for kind in ("postgres", "redis"):
        for result in ("ok", "failed"):
            for op in ("backup", "verify", "restore", "delete"):
                BACKUP_OPERATIONS.labels(op, kind, result)
        for verdict in ("verified", "failed"):
            BACKUP_VERIFICATIONS.labels(kind, verdict)
    for stage in ("light", "deep"):
        SLEEPS.labels(stage)
        WAKES.labels(stage)
        for kind in ("postgres", "redis"):
            WAKE_DURATION.labels(kind, stage)
