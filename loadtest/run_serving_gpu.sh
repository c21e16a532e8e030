#!/usr/bin/env bash
# What one GPU-machine call runs for issue 24's single-GPU measurements, from the repository root with the
# wheelhouse in .whl (deploy/offline_gpu_env.sh), results into OUT_DIR (at most 8 files come back):
#
#     bash loadtest/run_serving_gpu.sh OUT_DIR gputests,fp8acc   # every GPU kernel/engine test, fp8 KV accuracy vs bf16
#     bash loadtest/run_serving_gpu.sh OUT_DIR decode            # single-request decode, bf16 vs fp8 KV, 1K-128K
#     bash loadtest/run_serving_gpu.sh OUT_DIR prefill,batch     # prefill by chunk size + profile, batched decode
#     bash loadtest/run_serving_gpu.sh OUT_DIR fp8prefill        # one-pass prefill, bf16 vs fp8 KV (ragged kernel)
#     bash loadtest/run_serving_gpu.sh OUT_DIR onepass,moeprefill  # one-pass prefill + 32K profile; its MoE by part
#     bash loadtest/run_serving_gpu.sh OUT_DIR floor,profile     # the decode step's kernel-chain floor, by kind; the engine's
#     bash loadtest/run_serving_gpu.sh OUT_DIR qkrope            # QK-norm + RoPE tiles at prefill sizes
#     bash loadtest/run_serving_gpu.sh OUT_DIR cputransfer       # issue 23's hand-over efficiency, host memory
#     bash loadtest/run_serving_gpu.sh OUT_DIR gdntests,gdndecode  # GDN decode: tests, then against the copy
#     bash loadtest/run_serving_gpu.sh OUT_DIR attntests,attnblock,attnab  # the fused Triton decode attention: GPU
#                                                                 # tests, its block vs the engine's, engine A/B
#     bash loadtest/run_serving_gpu.sh OUT_DIR enginetests,attnprof  # the engine's GPU tests; the fused attention
#                                                                 # block's per-kernel profile in the engine
#     bash loadtest/run_serving_gpu.sh OUT_DIR jitsave           # the JIT caches as .whl/jit.txz, .whl/triton.txz
#
# Each step has its own time limit so that one that hangs leaves the rest of the 10-minute call to the others;
# run from the same directory each time (flashinfer's JIT cache names absolute paths).
set -u
out=${1:?usage: run_serving_gpu.sh OUT_DIR STEP[,STEP...]  (gputests fp8tests fp8acc decode prefill fp8prefill onepass
moeprefill batch gdntests gdndecode floor profile qkrope cputransfer attntests attnblock attnab
enginetests attnprof jitsave)}
stage=${2:-fp8tests,fp8acc}
mkdir -p "$out"
exec > >(tee -a "$out/run.log") 2>&1
source deploy/offline_gpu_env.sh
left() { echo $(( ${BUDGET_S:-575} - SECONDS )); }

# bench_batch_decode on 35B-A3B dims, 30 steps after 5 warm-up (the profiles below).
batch_decode=(loadtest.bench_batch_decode --model qwen3.5-35b-a3b --steps 30 --warmup 5)

for step in ${stage//,/ }; do
    echo "=== $step ($(left) s left)"
    case $step in
    fp8tests)  # flashinfer over fp8 pages vs the torch reference, graphs vs eager, the Triton fp8 write
        timeout "$(( $(left) / 2 ))" python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_gpu_engine.py \
            tests/kernels/test_norm_rope_moe_kernels.py -k "fp8 or ragged" ;;
    gputests)  # every test that needs the GPU: kernels against their torch references, engines against torch
        # (188 tests in 286 s on the H200 with warm caches: give it the call)
        timeout "$(( $(left) - 20 ))" python3 -m pytest -q -p no:cacheprovider tests/kernels ;;
    fp8acc)  # greedy agreement and log-prob difference, fp8 vs bf16 KV, dummy 35B-A3B dims (4 layers)
        timeout 240 python3 -m loadtest.bench_kv_fp8 --model qwen3.5-35b-a3b:4 --prompt-lens 2048,32768 \
            --out "$out/kv_fp8_h200_35b-a3b-4L.json" ;;
    decode)  # single request, all 40 layers, bf16 KV then fp8 KV
        for kv in ${KV_DTYPES:-auto fp8_e4m3}; do
            timeout "$(( $(left) / 2 ))" python3 -m loadtest.bench_decode --model qwen3.5-35b-a3b \
                --contexts 1024,32768,131072 --kv-cache-dtype "$kv" --out "$out/decode_${kv}_h200_35b-a3b.json"
        done ;;
    prefill)  # prefill by chunk size (40 layers), then a per-kernel profile of a 32K prompt in 8K chunks (the last)
        timeout 300 python3 -m loadtest.bench_prefill --model qwen3.5-35b-a3b --lengths 8192,32768,50000 \
            --chunk-sizes 16384,32768,65536,8192 --profile-length 32768 --out "$out/prefill_profile_h200.json" ;;
    fp8prefill)  # single prompts in one pass (flashinfer's ragged kernel), bf16 KV then fp8 KV
        for kv in auto fp8_e4m3; do
            timeout 150 python3 -m loadtest.bench_prefill --model qwen3.5-35b-a3b --lengths 8192,32768,50000,131072 \
                --chunk-sizes 131072 --kv-cache-dtype "$kv" --out "$out/prefill_${kv}_h200.json"
        done ;;
    onepass)  # single prompts in one pass, then a kernel profile of a 32K prompt with the GPU's idle gaps
        timeout 200 python3 -m loadtest.bench_prefill --model qwen3.5-35b-a3b --lengths 8192,32768,50000,131072 \
            --chunk-sizes 131072 --profile-length 32768 --out "$out/prefill_onepass_h200.json" ;;
    moeprefill)  # the prefill MoE part by part: Triton vs CUTLASS grouped GEMMs vs dense cuBLAS, the alignments
        timeout 200 python3 -m kernels.bench_moe_prefill --tokens 8192,32768,65536 \
            --out "$out/moe_prefill_h200.json" ;;
    floor)  # the decode step as a chain of pure stream kernels (one per grid-wide dependency) vs its roofline,
        # next to the engine's committed fractions (40 layers)
        timeout 240 python3 -m loadtest.bench_decode_floor --model qwen3.5-35b-a3b --by-kind \
            --cases 1x1024,1x4096,1x32768,1x131072,8x4096 \
            --engine loadtest/results/decode_auto_h200_35b-a3b_gdn_tiles.json,loadtest/results/batch_decode_h200_gdn_tiles.json \
            --out "$out/decode_floor_h200.json" ;;
    profile)  # per-kernel profile of single-request decode at 1K, all 40 layers (set against the floor's kinds)
        timeout 200 python3 -m loadtest.profile_decode --model qwen3.5-35b-a3b --contexts 1024 \
            --out "$out/profile_decode_h200_35b-a3b.json" ;;
    qkrope)  # QK-norm + RoPE + KV store at prefill sizes, heads per program swept (35B-A3B)
        timeout 150 python3 -m kernels.bench_fused --models 35b-a3b --kernels qk_norm_rope \
            --tokens 8192,32768 --out "$out/qk_norm_rope_prefill_h200.json" ;;
    cputransfer)  # hand-over vs raw Mooncake write between host-memory pools (TCP), 5 fresh process pairs
        timeout "$(( $(left) - 20 ))" python3 -m loadtest.bench_transfer --device cpu --contexts 4096,16384,32768 \
            --trials 5 --out "$out/transfer_tcp_cpu_h200host_35b-a3b.json" ;;
    gdntests)  # the GDN kernels against the torch reference, then graphs vs eager and the fast path on the engine
        timeout "$(( $(left) / 2 ))" python3 -m pytest -q -p no:cacheprovider \
            tests/kernels/test_gdn_kernels.py tests/kernels/test_gpu_engine.py \
            -k "decode or graph_decode_logits or fast_path_matches_torch_path" ;;
    gdndecode)  # GDN decode against the copy of the same state bytes, tiles and L2 policy swept (35B-A3B)
        timeout 240 python3 -m kernels.bench_gdn --only decode --shapes 35b --batches 1,8,64,256 --sweep \
            --out "$out/gdn_decode_h200_35b.json" ;;
    attntests)  # the fused decode attention against the three kernels and the torch path; the engine with it
        timeout "$(( $(left) / 3 ))" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py \
            tests/kernels/test_gpu_engine.py -k "decode_attention or merge or fused_triton" ;;
    attnblock)  # the attention layer's block: QK-norm/RoPE + flashinfer + gate (the engine's) vs the fused kernel
        timeout 240 python3 -m kernels.bench_decode_attention --no-splits \
            --cases 1x1024,1x4096,8x4096,1x32768,1x131072 --out "$out/decode_attention_block_h200.json" ;;
    attnab)  # batched decode with flashinfer and with the fused Triton block, alternating on this machine
        for round in a b; do for attn in auto triton; do
            timeout "$(( $(left) / 4 ))" python3 -m loadtest.bench_batch_decode --model qwen3.5-35b-a3b \
                --batches "${BATCHES:-1,8}" --contexts 4096 --steps 30 --warmup 5 --decode-attention "$attn" \
                --out "$out/attn_ab_${attn}_${round}.json"
        done; done
        rm -f "$out"/attn_ab_*.png ;;  # (8 files come back from a call: the JSONs hold the figures)
    enginetests)  # the engine's GPU tests the other steps' time limits cut on a machine without JIT caches: the
        # fast path and graphs against the torch path (bf16 and fp8 KV), the fused attention block's kernel and
        # engine tests, with their failures' messages
        timeout "$(( $(left) - 30 ))" python3 -m pytest -q -p no:cacheprovider --tb=short -rfE \
            tests/kernels/test_decode_attention.py tests/kernels/test_gpu_engine.py \
            -k "fused_decode_attention_equals or fast_path_matches or graph_decode_logits or fused_triton" ;;
    attnprof)  # where the fused attention block's step time goes in the engine: per-kernel profiles of batch 1
        # and 8 at 4K with flashinfer and with the fused block
        for attn in auto triton; do
            timeout "$(( $(left) / 2 ))" python3 -m "${batch_decode[@]}" --batches 1,8 --contexts 4096 \
                --decode-attention "$attn" --profile-batches 1,8 --out "$out/attn_prof_${attn}.json"
        done
        rm -f "$out"/attn_prof_*.png ;;
    jitsave)  # what this machine compiled, for the next one (offline_gpu_env.sh unpacks them)
        XZ_OPT=-T0 tar cJf "$out/jit.txz" .jitcache/.cache && XZ_OPT=-T0 tar cJf "$out/triton.txz" .jitcache/triton
        ls -la "$out"/*.txz ;;
    batch)  # batched decode against its roofline (40 layers); PROFILE_BATCHES=8: per-kernel profiles of those
        timeout "$(( $(left) - 20 ))" python3 -m loadtest.bench_batch_decode --model qwen3.5-35b-a3b \
            --batches "${BATCHES:-1,8,64,256}" --contexts 4096 --steps 30 --warmup 5 --gpu-memory-utilization 0.92 \
            --profile-batches "${PROFILE_BATCHES:-}" --out "$out/batch_decode_h200.json" ;;
    esac
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv,noheader
echo "stage $stage done in ${SECONDS}s"
