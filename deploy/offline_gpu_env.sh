# Source on a GPU node without a package index, from the repository root, after copying the wheelhouse
# built by `python deploy/gpu_wheelhouse.py --out .whl` there:
#     source deploy/offline_gpu_env.sh
# Installs the wheels into /tmp/site next to the image's torch/triton (no dependency resolution: the image
# has the rest), points flashinfer's and Triton's JIT caches into .jitcache/, and unpacks a flashinfer JIT
# cache saved from an earlier run (.whl/jit.tgz: `tar czf jit.tgz .jitcache/.cache`) and a Triton one
# (.whl/triton.tgz: `tar czf triton.tgz .jitcache/triton`, 3 MB after a bench_decode run) so their kernels are
# not compiled again (the first decode request on a fresh machine otherwise compiles for ~100 s; Triton keys
# each kernel by its source, so an edited kernel is compiled again and the rest are reused).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# flashinfer's JIT runs ninja on every first use, and ninja rebuilds an object older than its sources: the
# headers it includes (flashinfer's, tvm_ffi's) were just installed, so date them back, or the restored
# cache below is rebuilt (~100 s of the first request).
find /tmp/site -exec touch -h -d 2000-01-01 {} +
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=$PWD/.jitcache TRITON_CACHE_DIR=$PWD/.jitcache/triton
mkdir -p .jitcache
if [ ! -f .jitcache/.restored ]; then
    for cache in .whl/jit.tgz .whl/triton.tgz; do [ -f "$cache" ] && tar xzf "$cache"; done
    touch .jitcache/.restored
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
