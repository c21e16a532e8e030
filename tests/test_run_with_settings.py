"""``loadtest.run_with_settings``, the GPU A/B runner: it sets existing module settings, refuses typos and other
expressions, and runs the benchmark module as ``__main__`` with its arguments, in a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.run_with_settings import apply_setting, parse_value

ROOT = Path(__file__).resolve().parents[1]


def test_values_are_literals_or_ranges():
    assert parse_value("range(2, 17)") == range(2, 17)
    assert parse_value(" range(8) ") == range(8)
    assert parse_value("8") == 8 and parse_value("'x'") == "x" and parse_value("(1, 2)") == (1, 2)
    for text in ("__import__('os')", "range(n)", "len([1])", "range(1, stop=3)"):
        with pytest.raises(ValueError):
            parse_value(text)


def test_settings_must_exist(monkeypatch):
    from services.engine import ops

    monkeypatch.setattr(ops, "_GATED_NORM_DECODE_BATCHES", ops._GATED_NORM_DECODE_BATCHES)
    apply_setting("services.engine.ops._GATED_NORM_DECODE_BATCHES=range(1, 17)")
    assert list(ops._GATED_NORM_DECODE_BATCHES) == list(range(1, 17))
    with pytest.raises(SystemExit, match="has no setting"):
        apply_setting("services.engine.ops._GATED_NORM_BATCHES=range(1, 17)")
    with pytest.raises(SystemExit, match="module.NAME=VALUE"):
        apply_setting("range(1, 17)")


def test_runs_the_module_with_the_settings(tmp_path):
    """A tiny module stands in for the benchmark: it sees the setting and its own arguments."""
    (tmp_path / "fake_bench.py").write_text(
        "import sys\nfrom services.engine import ops\n"
        "print('batches', list(ops._GATED_NORM_DECODE_BATCHES), 'argv', sys.argv[1:])\n")
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.run_with_settings", "--set",
         "services.engine.ops._GATED_NORM_DECODE_BATCHES=range(2, 5)", "--", "fake_bench", "--batches", "8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "batches [2, 3, 4] argv ['--batches', '8']" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "loadtest.run_with_settings", "fake_bench"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode != 0 and "run_with_settings" in bad.stderr
