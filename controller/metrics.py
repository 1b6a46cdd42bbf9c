"""Prometheus metrics of one controller process, in their own registry.

Served at GET /metrics (metrics or operator token). Names follow controller-runtime's habit:
a `_total` counter per outcome, a duration histogram per HTTP route.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from schemas.messages import BackupOp

P = "orkestr_controller"
# The *_created gauges double the output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Known label values, created at zero (see `start_at_zero`).
# controller.ingest.Kind, and "unknown" for a topic that is none of them.
MESSAGE_KINDS = ("status", "presence", "job_result", "job_output", "backup_result", "unknown")
MESSAGE_RESULTS = ("accepted", "stale", "rejected", "error")
PUBLISH_RESULTS = ("published", "failed", "too_large")
ADDON_KINDS = ("postgres", "redis")
BACKUP_OPS = get_args(BackupOp)
BACKUP_RESULTS = ("ok", "failed")
BACKUP_VERIFICATIONS = ("", "verified", "failed")
BACKUP_REQUESTS = (("manual", "accepted"), ("manual", "refused"), ("restore", "accepted"))
SCHEDULER_RESULTS = ("ok", "error")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # process_* (memory, CPU, open files) and python_* (GC, version), as the agent has.
        ProcessCollector(registry=r)
        r.register(PLATFORM_COLLECTOR)
        r.register(GC_COLLECTOR)
        self.http_requests = Counter(
            f"{P}_http_requests_total",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            f"{P}_http_request_duration_seconds",
            "HTTP request duration",
            ["route"],
            registry=r,
        )
        self.mqtt_messages = Counter(
            f"{P}_mqtt_messages_total",
            "Agent messages by kind and result (accepted, rejected, stale, error)",
            ["kind", "result"],
            registry=r,
        )
        self.job_output_gaps = Counter(
            f"{P}_job_output_gaps_total",
            "Live job output chunks seen missing when a later one of the job arrived",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            f"{P}_mqtt_connected", "1 while connected to the broker", registry=r
        )
        self.mqtt_connects = Counter(
            f"{P}_mqtt_connects_total", "Successful broker connections", registry=r
        )
        self.desired_published = Counter(
            f"{P}_desired_published_total",
            "Desired-state publishes by result (published, failed, too_large)",
            ["result"],
            registry=r,
        )
        self.last_generation = Gauge(
            f"{P}_desired_generation", "Last published desired-state generation", registry=r
        )
        # Per host, both from the controller (one label to match on): generations come from
        # one sequence for all hosts, so only a host's own pair says whether it lags.
        self.host_desired_generation = Gauge(
            f"{P}_host_desired_generation",
            "Generation of the last desired state published to the host",
            ["host"],
            registry=r,
        )
        self.host_applied_generation = Gauge(
            f"{P}_host_applied_generation",
            "Generation the host last reported applying",
            ["host"],
            registry=r,
        )
        self.addons_created = Counter(
            f"{P}_addons_created_total", "Add-ons created", ["kind"], registry=r
        )
        self.plan_limit_rejections = Counter(
            f"{P}_plan_limit_rejections_total",
            "Add-on creations refused by the plan limit",
            ["plan"],
            registry=r,
        )

        self.backup_results = Counter(
            f"{P}_backup_results_total",
            "Backup-store operations reported by agents: op, result, verification",
            ["op", "result", "verification"],
            registry=r,
        )
        self.backup_requests = Counter(
            f"{P}_backup_requests_total",
            "Backup API requests by kind and outcome (accepted, refused)",
            ["kind", "outcome"],
            registry=r,
        )
        self.backup_last_verified = Gauge(
            f"{P}_backup_last_verified_timestamp_seconds",
            "Newest verified backup of each add-on with automatic backups (0: none yet)",
            ["addon", "project"],
            registry=r,
        )
        self.backup_scheduler_runs = Counter(
            f"{P}_backup_scheduler_runs_total",
            "Scheduler ticks by result (ok, error)",
            ["result"],
            registry=r,
        )
        self.start_at_zero()

    def start_at_zero(self) -> None:
        """Create the known labelled series at 0, so increase() sees their first event."""
        for kind in MESSAGE_KINDS:
            for result in MESSAGE_RESULTS:
                self.mqtt_messages.labels(kind, result)
        for result in PUBLISH_RESULTS:
            self.desired_published.labels(result)
        for kind in ADDON_KINDS:
            self.addons_created.labels(kind)
        for op in BACKUP_OPS:
            for result in BACKUP_RESULTS:
                for verification in BACKUP_VERIFICATIONS:
                    self.backup_results.labels(op, result, verification)
        for kind, outcome in BACKUP_REQUESTS:
            self.backup_requests.labels(kind, outcome)
        for result in SCHEDULER_RESULTS:
            self.backup_scheduler_runs.labels(result)

    def start_plans(self, plans: Iterable[str]) -> None:
        """Plan-limit refusals at 0 for each plan of the plans file (known only at start)."""
        for plan in plans:
            self.plan_limit_rejections.labels(plan)

    def start_routes(self, routes: Iterable[tuple[str, str]], statuses: Iterable[str]) -> None:
        """HTTP request counters at 0 for each (method, route) and the statuses alerted on."""
        codes = tuple(statuses)
        for method, route in routes:
            for status in codes:
                self.http_requests.labels(method, route, status)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
