"""Operations files without a cluster: the alert rules pass ``promtool check rules`` and their unit tests (``promtool
test rules``), the committed Grafana dashboards are exactly what deploy/grafana/build.py builds and are importable
(one ``${datasource}`` variable that every panel uses), and README's metric table lists every metric the code
defines. The live side (every query returns data) is tests/test_metrics_cluster.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.grafana import build

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
METRIC_SOURCES = [ROOT / "services" / "common" / "metrics.py", ROOT / "services" / "router" / "metrics.py"]


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make setup` (the prometheus package, Makefile SYSTEM_PACKAGES)"
    return subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [("check", "rules", "baton-rules.yaml"), ("test", "rules", "baton-rules.test.yaml")])
def test_promtool(args):
    result = _promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_promtool_test_that_fires_it():
    import yaml

    rules = yaml.safe_load((PROMETHEUS_DIR / "baton-rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROMETHEUS_DIR / "baton-rules.test.yaml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert alerts == fired


def test_committed_dashboards_equal_the_build(tmp_path):
    assert build.main(["--check"]) == 0, "run python deploy/grafana/build.py"
    committed = sorted(p.name for p in (ROOT / "deploy" / "grafana").glob("*.json"))
    assert committed == sorted(build.build())


@pytest.mark.parametrize("name", sorted(build.build()))
def test_dashboards_are_importable(name):
    board = json.loads((ROOT / "deploy" / "grafana" / name).read_text())
    [variable] = board["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    assert board["uid"] == name.removesuffix(".json") and "id" not in board  # Grafana assigns the id on import
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["panels"]
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" and t["expr"]
                                        for t in panel["targets"])


def test_readme_lists_every_metric():
    defined = set()
    for source in METRIC_SOURCES:
        defined |= set(re.findall(r'"(baton_[a-z_]+)"', source.read_text()))
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(baton_[a-z_]+)`", readme, flags=re.M))
    # Counters are listed as exposed (with _total).
    listed_base = {name.removesuffix("_total") for name in listed}
    assert defined <= listed_base | listed, f"missing from README's metric table: {sorted(defined - listed_base)}"
    assert listed_base <= defined, f"in README but not defined: {sorted(listed_base - defined)}"
