"""The backup alerts of deploy/prometheus/alerts.yml fire on synthetic series (promtool)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.test_deploy_monitoring import ALERTS, needs_promtool, promtool

# Minute steps. Instance a: a verification fails at minute 10; b: a backup fails at 20;
# add-on x's newest verified backup is 30 hours old from the start, y's is fresh.
RULE_TESTS = """\
rule_files:
  - alerts.yml
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'orkestr_agent_backup_verifications_total{job="orkestr-agent", instance="a", kind="postgres", result="failed"}'
        values: '0x10 1x30'
      - series: 'orkestr_agent_backup_verifications_total{job="orkestr-agent", instance="a", kind="postgres", result="verified"}'
        values: '0+1x40'
      - series: 'orkestr_agent_backup_operations_total{job="orkestr-agent", instance="b", op="backup", kind="redis", result="failed"}'
        values: '0x20 1x20'
      - series: 'orkestr_controller_backup_last_verified_timestamp_seconds{job="orkestr-controller", instance="c", addon="x", project="p"}'
        values: '-108000x40'
      - series: 'orkestr_controller_backup_last_verified_timestamp_seconds{job="orkestr-controller", instance="c", addon="y", project="p"}'
        values: '0+60x40'
    promql_expr_test:
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing", alertname=~"OrkestrBackup.*"})
        eval_time: 5m
        exp_samples: []
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing", alertname=~"OrkestrBackup.*"})
        eval_time: 15m
        exp_samples:
          - labels: '{alertname="OrkestrBackupVerificationFailed", instance="a"}'
            value: 1
      - expr: count by (alertname, addon) (ALERTS{alertstate="firing", alertname=~"OrkestrBackup.*"})
        eval_time: 35m
        exp_samples:
          - labels: '{alertname="OrkestrBackupVerificationFailed"}'
            value: 1
          - labels: '{alertname="OrkestrBackupOperationsFailing"}'
            value: 1
          - labels: '{alertname="OrkestrBackupStale", addon="x"}'
            value: 1
"""


@needs_promtool
def test_backup_alerts_fire(tmp_path: Path) -> None:
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    promtool("test", "rules", "tests.yml", cwd=tmp_path)
