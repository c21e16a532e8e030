"""The GPU kernels compile for Hopper (sm_90) and Blackwell (sm_100) with the real launch specialisation, on any
machine: the CPU interpreter never compiles them, so without this a kernel that does not compile would first fail
on a GPU (and no Blackwell GPU is at hand at all).
Runs kernels/compile_check.py in a subprocess (it needs TRITON_INTERPRET unset, which this test session sets)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kernels.compile_check import CASES

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--archs", "90,100"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    reported = {tuple(line.split()[:2]) for line in done.stdout.splitlines() if line.strip()}
    wanted = {(case, arch) for case in CASES for arch in ("sm_90", "sm_100")}
    assert reported == wanted, f"cases without a compiled kernel: {wanted - reported}"
    assert "FAILED" not in done.stdout
