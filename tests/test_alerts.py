"""The alert rules load in Prometheus (`promtool check rules`) and fire when they should
(`promtool test rules` on made-up series). promtool comes with Debian's `prometheus` package
(`make test` installs it); the tests skip with the reason when it is absent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dermanet.paths import PROJECT_ROOT

ALERTS = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)

REQ = "ray_dermanet_requests_total"
REFUSED = "ray_dermanet_gate_refusals_total"
ACCEPTED = "ray_dermanet_predictions_total"
BUCKET = "ray_dermanet_request_seconds_bucket"
HEALTHY = "ray_serve_deployment_replica_healthy"
APP = 'application="dermanet"'
# one sample a minute for 2 h; the series' counts per minute set each rule's ratio
SERIES = [
    # 10 % of answers are 503s: DermaNetServerErrors
    {"series": f'{REQ}{{route="/v1/classify",status="200"}}', "values": "0+90x120"},
    {"series": f'{REQ}{{route="/v1/classify",status="503"}}', "values": "0+10x120"},
    # 2 % refused for an hour, then 50 %: DermaNetRefusalSpike
    {"series": f'{REFUSED}{{reason="ood"}}', "values": "0+2x60 120+50x60"},
    {"series": f'{ACCEPTED}{{label="NV"}}', "values": "0+98x60 5880+50x60"},
    # every classify request takes 2.5-5 s: DermaNetSlowClassify
    {"series": f'{BUCKET}{{route="/v1/classify",le="2.5"}}', "values": "0x120"},
    {"series": f'{BUCKET}{{route="/v1/classify",le="5.0"}}', "values": "0+100x120"},
    {"series": f'{BUCKET}{{route="/v1/classify",le="+Inf"}}', "values": "0+100x120"},
    # the Classifier's two replicas go unhealthy at 60 min; the Ingress stays healthy
    {"series": f'{HEALTHY}{{{APP},deployment="Classifier"}}', "values": "2x60 0x60"},
    {"series": f'{HEALTHY}{{{APP},deployment="Ingress"}}', "values": "1x120"},
]  # fmt: skip


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def test_alert_rules_load():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_alerts_fire_on_made_up_series(tmp_path: Path):
    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }

    def firing(alert: str, at: str, summary: str, **labels: str) -> dict:
        expected = {
            "exp_labels": rules[alert]["labels"] | labels,
            "exp_annotations": {
                "summary": summary,
                "description": rules[alert]["annotations"]["description"],
            },
        }
        return {"eval_time": at, "alertname": alert, "exp_alerts": [expected]}

    def quiet(alert: str, at: str) -> dict:
        return {"eval_time": at, "alertname": alert, "exp_alerts": []}

    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": SERIES,
                "alert_rule_test": [
                    quiet("DermaNetServerErrors", "3m"),
                    firing(
                        "DermaNetServerErrors", "20m", "DermaNet answers 10% of requests with 5xx"
                    ),
                    quiet("DermaNetRefusalSpike", "55m"),
                    firing("DermaNetRefusalSpike", "115m", "The trust gate refuses 50% of images"),
                    firing(
                        "DermaNetSlowClassify", "30m", "DermaNet /v1/classify p95 latency is 4.875s"
                    ),
                    quiet("DermaNetNoHealthyReplica", "59m"),
                    firing(
                        "DermaNetNoHealthyReplica",
                        "70m",
                        "No healthy Classifier replica in dermanet",
                        application="dermanet",
                        deployment="Classifier",
                    ),
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
