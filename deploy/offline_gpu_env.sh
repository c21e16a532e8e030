# Source on a GPU node without a package index, from the repository root, after copying the wheelhouse
# built by `python deploy/gpu_wheelhouse.py --out .whl` there:
#     source deploy/offline_gpu_env.sh
# Installs the wheels into /tmp/site next to the image's torch/triton (no dependency resolution: the image
# has the rest), points flashinfer's and Triton's JIT caches into .jitcache/, and unpacks a flashinfer JIT
# cache saved from an earlier run (.whl/jit.tgz: `tar czf jit.tgz .jitcache/.cache`) so its kernels are not
# compiled again (about 100 s on first use of the decode attention kernels).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=$PWD/.jitcache TRITON_CACHE_DIR=$PWD/.jitcache/triton
mkdir -p .jitcache
if [ -f .whl/jit.tgz ] && [ ! -f .jitcache/.restored ]; then tar xzf .whl/jit.tgz && touch .jitcache/.restored; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
