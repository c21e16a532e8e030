# Source on a GPU node without a package index, from the repository root, after copying the wheelhouse
# built by `python deploy/gpu_wheelhouse.py --out .whl` there:
#     source deploy/offline_gpu_env.sh
# Installs the wheels into /tmp/site next to the image's torch/triton (no dependency resolution: the image
# has the rest), points flashinfer's and Triton's JIT caches into .jitcache/, and unpacks a flashinfer JIT
# cache saved from an earlier run (.whl/jit.txz: `tar cJf jit.txz .jitcache/.cache`, or a gzip .tgz) and a
# Triton one (.whl/triton.txz: `tar cJf triton.txz .jitcache/triton`, 3-9 MB in xz after the benchmarks) so
# their kernels are not compiled again (the first decode request on a fresh machine otherwise compiles for
# ~100 s; Triton keys each kernel by its source, so an edited kernel is compiled again and the rest are reused).
#
# Also, for a wheelhouse that must fit a small transfer limit (the benchmark machines take 64 MiB):
# - .whl/site-*.txz: installed package trees packed with xz, unpacked into /tmp/site (flashinfer's wheel is
#   mostly CUDA/C++ sources: 33 MB as zip wheels with tvm-ffi, 15 MB as one xz tarball; Mooncake's CUDA wheel is
#   98 MB, of which the transfer engine and the libraries it loads are 6 MB xz);
# - .whl/syslibs.txz: system libraries a package links against (Mooncake: libcudart.so.12, libibverbs,
#   libmlx5, libnuma, libcurl and its closure), linked into /tmp/syslibs only where the image lacks them, so
#   the image's own copies win (LD_LIBRARY_PATH is searched before the system's cache).
shopt -s nullglob
wheels=(.whl/*.whl)
[ ${#wheels[@]} -gt 0 ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}"
mkdir -p /tmp/site
for tree in .whl/site-*.txz; do tar xJf "$tree" -C /tmp/site; done
if [ -f .whl/syslibs.txz ]; then
    mkdir -p /tmp/syslibs.all /tmp/syslibs
    tar xJf .whl/syslibs.txz -C /tmp/syslibs.all
    for lib in /tmp/syslibs.all/*.so*; do
        name=$(basename "$lib")
        ldconfig -p | awk '{print $1}' | grep -qxF "$name" || ln -sf "$lib" "/tmp/syslibs/$name"
    done
    echo "[offline_gpu_env] system libraries taken from the wheelhouse: $(ls /tmp/syslibs | tr '\n' ' ')"
    export LD_LIBRARY_PATH=/tmp/syslibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
shopt -u nullglob
# flashinfer's JIT runs ninja on every first use, and ninja rebuilds an object older than its sources: the
# headers it includes (flashinfer's, tvm_ffi's) were just installed, so date them back, or the restored
# cache below is rebuilt (~100 s of the first request).
find /tmp/site -exec touch -h -d 2000-01-01 {} +
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=$PWD/.jitcache TRITON_CACHE_DIR=$PWD/.jitcache/triton
mkdir -p .jitcache
if [ ! -f .jitcache/.restored ]; then
    # (gzip .tgz or xz .txz: tar detects which; xz packs Triton's cache 2-5x smaller than gzip)
    for cache in .whl/jit.t?z .whl/triton.t?z; do [ -f "$cache" ] && tar xf "$cache"; done
    touch .jitcache/.restored
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
