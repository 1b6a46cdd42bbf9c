"""MQTT topic names, defined once.

orkestr/v1/hosts/{host}/desired          controller -> agent, retained, QoS 1
orkestr/v1/hosts/{host}/status           agent -> controller, retained, QoS 1
orkestr/v1/hosts/{host}/presence         agent -> controller, retained; last will says offline
orkestr/v1/hosts/{host}/jobs/{job}/result agent -> controller, QoS 1
orkestr/v1/hosts/{host}/jobs/{job}/output agent -> controller, QoS 1 (live output chunks)
orkestr/v1/hosts/{host}/backups/{op}/result agent -> controller, QoS 1
"""

from __future__ import annotations

PREFIX = "orkestr/v1"


def desired(host: str) -> str:
    return f"{PREFIX}/hosts/{host}/desired"


def status(host: str) -> str:
    return f"{PREFIX}/hosts/{host}/status"


def presence(host: str) -> str:
    return f"{PREFIX}/hosts/{host}/presence"


def job_result(host: str, job_id: str) -> str:
    return f"{PREFIX}/hosts/{host}/jobs/{job_id}/result"


def job_output(host: str, job_id: str) -> str:
    return f"{PREFIX}/hosts/{host}/jobs/{job_id}/output"


def backup_result(host: str, op_id: str) -> str:
    return f"{PREFIX}/hosts/{host}/backups/{op_id}/result"


STATUS_ALL = f"{PREFIX}/hosts/+/status"
PRESENCE_ALL = f"{PREFIX}/hosts/+/presence"
JOB_RESULT_ALL = f"{PREFIX}/hosts/+/jobs/+/result"
JOB_OUTPUT_ALL = f"{PREFIX}/hosts/+/jobs/+/output"
BACKUP_RESULT_ALL = f"{PREFIX}/hosts/+/backups/+/result"


def host_of(topic: str) -> str | None:
    """The host segment of an orkestr topic, or None if the topic is not one of ours."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "orkestr" or parts[1] != "v1" or parts[2] != "hosts":
        return None
    return parts[3] or None
