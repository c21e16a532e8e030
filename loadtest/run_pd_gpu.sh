#!/usr/bin/env bash
# What one GPU-machine call runs for the PD pair on one GPU (issue 23's GPU item, issue 24's floor metric), from
# the repository root with the wheelhouse in .whl (deploy/offline_gpu_env.sh), results into OUT_DIR:
#
#     bash loadtest/run_pd_gpu.sh OUT_DIR pd,transfer,tests   # greedy vs one engine + TTFT split, hand-over
#                                                             # efficiency, the engine's GPU tests
#     bash loadtest/run_pd_gpu.sh OUT_DIR floor               # the agentic floor sweep against the pair
#
# Each step has its own time limit so that one that hangs leaves the rest of the 10-minute call to the others, and
# every step's output goes to OUT_DIR/STAGE.log. Model: 20 layers of Qwen3.5-35B-A3B dims (two pods of 40 layers
# would need 2 x 67 GiB of weights on one 140 GiB GPU, leaving no room for KV, activations and graphs).
set -u
out=${1:?usage: run_pd_gpu.sh OUT_DIR STEP[,STEP...]  (pd transfer tests floor)}
stage=${2:-pd,transfer,tests}
model=${MODEL:-qwen3.5-35b-a3b:20}
work=/tmp/pd_work
mkdir -p "$out" "$work"
exec > >(tee -a "$out/run.log") 2>&1
source deploy/offline_gpu_env.sh
python3 -c "import mooncake.engine as m; print('mooncake CUDA support:', m.SUPPORT_CUDA)" \
    || ldd /tmp/site/mooncake/engine.so | grep -i "not found"
python3 -c "import grpc, google.protobuf, redis, torch; print('grpc', grpc.__version__, 'protobuf',
google.protobuf.__version__, 'torch', torch.__version__)"
left() { echo $(( ${BUDGET_S:-575} - SECONDS )); }

for step in ${stage//,/ }; do
    echo "=== $step ($(left) s left)"
    case $step in
    pd)  # greedy vs one engine, TTFT split
        timeout "${PD_S:-300}" python3 -m loadtest.bench_pd_gpu --model "$model" --lengths 8192,32768 --reps 3 \
            --checkpoint-slots "${PD_SLOTS:-300}" --out "$work/pd_gpu_h200.json"
        cp "$work"/pd_gpu_h200.json "$work"/pd_gpu_h200.png "$out"/ 2>/dev/null ;;
    transfer)  # hand-over efficiency against a raw Mooncake write, GPU memory
        timeout 100 python3 -m loadtest.bench_transfer --device cuda --contexts 4096,16384,32768 \
            --out "$work/transfer_tcp_cuda_h200_35b-a3b.json"
        cp "$work"/transfer_tcp_cuda_h200_35b-a3b.* "$out"/ 2>/dev/null ;;
    tests)
        timeout "$(left)" python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_gpu_engine.py ;;
    floor)  # the agentic floor sweep against the pair
        timeout "$(( $(left) - 15 ))" python3 -m loadtest.bench_pd_gpu --model "$model" --floor-only \
            --decode-max-seqs "${FLOOR_SEQS:-192}" --cuda-graph-max-batch "${FLOOR_SEQS:-192}" \
            --decode-cache-mb "${FLOOR_DECODE_MB:-53248}" --prefill-cache-mb "${FLOOR_PREFILL_MB:-8192}" \
            --checkpoint-slots "${FLOOR_PREFILL_SLOTS:-0}" --threshold "${FLOOR_THRESHOLD:-512}" \
            --decode-step-tokens "${FLOOR_STEP_TOKENS:-0}" \
            --max-model-len 65536 --floor-concurrency "${FLOOR_LEVELS:-32,64,128,192}" \
            --floor-duration-s "${FLOOR_S:-60}" --floor-ramp-s "${FLOOR_RAMP_S:-0}" \
            --floor-first-turn 8192 --floor-turn-tokens 800 \
            --floor-output-tokens 256 --floor-think-s 5 --out "$work/pd_floor_h200.json"
        cp "$work"/pd_floor_h200.json "$work"/pd_floor_h200.png "$out"/ 2>/dev/null
        gzip -c "$work"/pd_floor_h200_loadtest.json > "$out"/pd_floor_h200_loadtest.json.gz ;;
    esac
done
# flashinfer's JIT cache as it now is (kernels compiled in this call included), for the next machine's .whl/jit.txz
# (its build files name absolute paths: run from the same directory next time, or ninja rebuilds), and Triton's
XZ_OPT=-T0 tar cJf "$out/jit.txz" .jitcache/.cache 2>/dev/null
XZ_OPT=-T0 tar cJf "$out/triton.txz" .jitcache/triton 2>/dev/null
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv,noheader
echo "stage $stage done in ${SECONDS}s"
