"""Build a wheelhouse for a GPU node with no package index (air-gapped clusters, the benchmark machines).

    python deploy/gpu_wheelhouse.py --out .whl
    # on the node:  pip install --no-index --no-deps --target /tmp/site .whl/*.whl

The node's image brings torch and triton; this fetches what Baton adds on a GPU (flashinfer and its
tvm-ffi runtime, and fla, the GDN peer the kernel benchmarks compare against) for CPython 3.12 x86-64.
flashinfer's wheel is mostly CUDA sources for kernels it JIT-compiles on demand (62 MB zipped); the
copy written here drops the source trees of kernels Baton never builds (sampling, MoE, GDN/KDA,
Blackwell-only kernels, CUTLASS examples), which brings it to about 28 MB, under a transfer limit of 64 MB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = ["flashinfer-python==0.7.2.post1", "apache-tvm-ffi==0.1.15.post2", "flash-linear-attention==0.6.0",
          "fla-core==0.6.0"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "any"]
# Source trees under flashinfer/data that no kernel Baton uses (paged decode/prefill attention) includes.
UNUSED_SOURCES = (
    "flashinfer/data/csrc/cake_", "flashinfer/data/csrc/kda", "flashinfer/data/csrc/fused_moe",
    "flashinfer/data/csrc/gdn", "flashinfer/data/csrc/experimental", "flashinfer/data/csrc/blackwell",
    "flashinfer/data/csrc/alphamoe", "flashinfer/data/cutlass/examples", "flashinfer/data/cutlass/python",
    "flashinfer/data/cccl/python",
)


def download(out: Path) -> None:
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platform_args, "-d", str(out), *WHEELS],
                   check=True)


def slim_flashinfer(out: Path) -> None:
    [wheel] = out.glob("flashinfer_python-*.whl")
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not info.filename.startswith(UNUSED_SOURCES):
                dst.writestr(info, src.read(info))
    slim.replace(wheel)  # pip installs with --no-deps and no RECORD check, so the trimmed RECORD is harmless
    print(f"[wheelhouse] {wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB after trimming")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    download(args.out)
    slim_flashinfer(args.out)
    total = sum(p.stat().st_size for p in args.out.glob("*.whl"))
    print(f"[wheelhouse] {len(list(args.out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
