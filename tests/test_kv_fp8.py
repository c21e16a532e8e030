"""The FP8 KV cache (``--kv-cache-dtype fp8_e4m3``): quantization, scales from checkpoints, memory sizing, the
hand-over layout, and accuracy against the model-dtype KV cache on the HF-parity tiny models (CPU, fp32 model).

Accuracy bounds (measured on CPU, see README "FP8 KV cache"): the fp8 engine and the fp32-KV engine read the same
token sequences (prompt + the fp32-KV engine's greedy continuation), teacher-forced, so one early divergence does
not decide every later comparison. e4m3 keeps 3 mantissa bits (relative rounding error up to 2^-4, against bf16's
2^-8), and these tiny random models have near-tied logits (MoE routing flips under bf16 noise already), so token
agreement is far from 1 even when nothing is wrong. Measured over 3 prompt seeds (4 prompts of 40-300 tokens, 24
greedy tokens each; ``loadtest.bench_kv_fp8.compare_kv_dtypes``), teacher-forced argmax agreement / mean |delta
log-prob| of the reference's argmax token: qwen3_5_moe 0.925-0.953 / 0.019-0.033, qwen3_5 0.982-0.984 /
0.0055-0.0060, qwen3_next 0.963-0.966 / 0.009-0.012 (a bf16 KV cache on the same yardstick: 0.988-0.999 /
0.001-0.006, 0.998-1.000 / 0.0004, 0.997-0.999 / 0.0012); max |delta log-prob| of the chosen tokens before the first
free-running divergence up to 0.22; the first divergence at token 3 at the earliest. The bounds below sit a little
beyond the worst seed; K and V written with a scale 25% off what attention reads them with already break them
(qwen3_5: agreement 0.82, mean 0.060).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kernels.attention import (
    FP8_E4M3_MAX,
    FP8_KV_DTYPE,
    dequantize_fp8,
    paged_attention,
    quantize_fp8,
    write_kv,
)
from loadtest.bench_kv_fp8 import compare_kv_dtypes
from services.common.protos import pd_pb2
from services.engine.config import EngineConfig
from services.engine.loader import WeightLoadError
from services.engine.request import SamplingParams
from services.transfer.handover import layout_mismatches, local_regions, remote_regions, state_layout
from tests.helpers import DirectSequence, assert_no_leaks, cpu_engine, rel_err
from tests.hf_models import FAMILIES, build_hf_model, kv_scales, save_checkpoint, with_tensors

# The bounds above (justified in the module docstring): teacher-forced argmax agreement at least, mean |delta
# log-prob| of the reference's argmax token at most, per family; and for every family the greedy chosen tokens'
# |delta log-prob| before the first divergence at most 0.5, the first generated token equal.
BOUNDS = {"qwen3_5_moe": (0.90, 0.05), "qwen3_5": (0.96, 0.015), "qwen3_next": (0.94, 0.025)}
MAX_LOGPROB_DIFF_BEFORE_DIVERGENCE = 0.5


# ------------------------------------------------------------------------------------ quantize / dequantize


def test_quantize_saturates_instead_of_producing_nan():
    x = torch.tensor([float("inf"), float("-inf"), 1e9, -1e9, 448.0, 449.0, 500.0, -470.0, 0.0])
    for scale in (1.0, 0.05, 3.0):
        q = quantize_fp8(x * scale, scale)
        assert q.dtype == FP8_KV_DTYPE
        back = dequantize_fp8(q, scale)
        assert not torch.isnan(back).any(), back
        expected = x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX) * scale
        # 449 and 470 round to 448 (the largest e4m3 value; 480 does not exist in e4m3fn).
        torch.testing.assert_close(back, expected, rtol=1e-6, atol=0)
    # A NaN going in stays NaN: a bug upstream is not hidden as a plausible value.
    assert torch.isnan(dequantize_fp8(quantize_fp8(torch.tensor([float("nan")]), 1.0), 1.0)).all()


def test_quantize_applies_the_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * 3
    # A power-of-two scale only shifts the exponent: the same codes as the pre-divided values.
    assert torch.equal(quantize_fp8(x, 0.25).view(torch.uint8), quantize_fp8(x * 4, 1.0).view(torch.uint8))
    # The stored values are x / scale (within e4m3 rounding), not x.
    scale = 0.037
    stored = quantize_fp8(x, scale).float()
    assert ((stored - x / scale).abs() <= (x / scale).abs() * 2**-4 + 2**-10).all()


@pytest.mark.parametrize("scale", [1.0, 0.0123, 7.5])
def test_round_trip_error_bound(scale):
    """e4m3 with round-to-nearest-even: relative error <= 2^-4 (half of the 3-bit mantissa's ulp) in the normal
    range (2^-6 <= |x| / scale <= 448), absolute error <= 2^-10 x scale (half the subnormal step 2^-9) below it,
    +-448 x scale above it."""
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(20000, generator=gen) * m for m in (1e-4, 1e-2, 1.0, 30.0, 300.0)]) * scale
    back = dequantize_fp8(quantize_fp8(x, scale), scale)
    error = (back - x).abs()
    magnitude = (x / scale).abs()
    normal, small, large = (magnitude >= 2**-6) & (magnitude <= 448), magnitude < 2**-6, magnitude > 448
    assert normal.sum() > 50000 and small.sum() > 10000 and large.sum() > 1000
    assert (error[normal] <= x[normal].abs() * 2**-4 * (1 + 1e-6)).all()
    assert (error[small] <= 2**-10 * scale * (1 + 1e-6)).all()
    torch.testing.assert_close(back[large], x[large].sign() * 448 * scale, rtol=1e-6, atol=0)
    assert error[normal].div(x[normal].abs()).mean() < 0.03  # typical error well below the bound


def test_paged_attention_over_an_fp8_cache_equals_attention_over_its_dequantized_values():
    """The scales are folded in as flashinfer folds them (k_scale into the softmax scale, v_scale on the output):
    the same result as attention over the dequantized K and V."""
    gen = torch.Generator().manual_seed(2)
    page, heads, kv_heads, dim, num_pages = 4, 4, 2, 8, 12
    k_scale, v_scale = 0.02, 0.3
    cache = torch.zeros(num_pages, 2, page, kv_heads, dim, dtype=FP8_KV_DTYPE)
    tokens = 30
    k = torch.randn(tokens, kv_heads, dim, generator=gen) * 2
    v = torch.randn(tokens, kv_heads, dim, generator=gen)
    slots = torch.arange(tokens) + 2 * page  # pages 2.. onwards
    write_kv(cache, k, v, slots, k_scale, v_scale)
    dequantized = cache.float()
    dequantized[:, 0] *= k_scale
    dequantized[:, 1] *= v_scale
    table = [torch.arange(2, 2 + -(-tokens // page))]
    q = torch.randn(5, heads, dim, generator=gen)
    got = paged_attention(q, cache, table, [5], [tokens], dim**-0.5, k_scale, v_scale)
    want = paged_attention(q, dequantized, table, [5], [tokens], dim**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # And close to the exact K and V (only e4m3 rounding apart), so the scales went the right way.
    exact = torch.zeros(num_pages, 2, page, kv_heads, dim)
    write_kv(exact, k, v, slots)
    assert rel_err(got, paged_attention(q, exact, table, [5], [tokens], dim**-0.5)) < 0.05


# --------------------------------------------------------------------------------------- config and memory


def test_config_validates_the_kv_cache_dtype():
    assert EngineConfig(kv_cache_dtype="fp8_e4m3").kv_torch_dtype == torch.float8_e4m3fn
    assert EngineConfig(device="cpu", dtype="float32").kv_torch_dtype == torch.float32
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be auto .*'fp8_e4m3'.*got 'fp8'"):
        EngineConfig(kv_cache_dtype="fp8")


def test_baton_up_passes_the_kv_cache_dtype_to_every_pod():
    from services.launch.config import UpConfig

    flags = UpConfig(engine=EngineConfig(kv_cache_dtype="fp8_e4m3")).engine_flags()
    assert flags[flags.index("--kv-cache-dtype") + 1] == "fp8_e4m3"
    assert "--kv-cache-dtype" not in UpConfig().engine_flags()


def test_fp8_cache_gets_twice_the_pages_of_bf16_from_the_same_memory(caplog):
    settings = dict(model="tiny-qwen3.5-moe", load_format="dummy", device="cpu", dtype="bfloat16", cache_memory_mb=32,
                    max_num_seqs=4, num_checkpoint_slots=4, tokenizer="byte", num_pages=0)  # 0: sized from memory
    bf16 = cpu_engine(**settings)
    with caplog.at_level(logging.INFO, logger="services.engine.model_runner"):
        fp8 = cpu_engine(**settings, kv_cache_dtype="fp8_e4m3")
    assert bf16.runner.kv_cache.buffer.dtype == torch.bfloat16
    assert fp8.runner.kv_cache.buffer.dtype == torch.float8_e4m3fn
    assert fp8.runner.num_pages in (2 * bf16.runner.num_pages, 2 * bf16.runner.num_pages + 1)
    # GDN states keep the model dtype (conv) and fp32 (SSM).
    assert fp8.runner.state_cache.conv.dtype == torch.bfloat16 and fp8.runner.state_cache.ssm.dtype == torch.float32
    assert any("float8_e4m3fn KV" in r.getMessage() for r in caplog.records), "the cache log line names the dtype"
    assert any("no k/v scales" in r.getMessage() for r in caplog.records)


def cpu_engine_fp8(checkpoint: str, **overrides):
    return cpu_engine(checkpoint, kv_cache_dtype="fp8_e4m3", **overrides)


# ---------------------------------------------------------------------------- scales from the checkpoint


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(build_hf_model("qwen3_5_moe", seed=3), tmp_path_factory.mktemp("moe") / "ckpt")


ATTENTION_LAYERS = (3, 7)  # of the tiny models (tests/hf_models.py)


@pytest.mark.parametrize("names", [
    ("self_attn.k_scale", "self_attn.v_scale"),  # llm-compressor / compressed-tensors
    ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),  # ModelOpt
    ("self_attn.attn.k_scale", "self_attn.attn.v_scale"),  # vLLM's own parameter names
])
def test_scales_are_loaded_under_vllms_names(moe_checkpoint, tmp_path, names):
    k_name, v_name = names
    scales = {3: (0.5, 0.25), 7: (0.125, 2.0)}
    tensors = {}
    for layer, (k, v) in scales.items():
        tensors[f"model.layers.{layer}.{k_name}"] = torch.tensor(k)
        tensors[f"model.layers.{layer}.{v_name}"] = torch.tensor([v])  # [1] or [] shaped: both are scalars
    path = with_tensors(moe_checkpoint, tmp_path / "scaled", tensors)
    engine = cpu_engine_fp8(path)
    assert engine.runner.kv_cache.k_scales == [0.5, 0.125]
    assert engine.runner.kv_cache.v_scales == [0.25, 2.0]
    # The model-dtype cache ignores them (the checkpoint still loads: they are not unexpected tensors).
    plain = cpu_engine(path)
    assert plain.runner.kv_cache.k_scales == [1.0, 1.0]
    # The layout both pods compare carries them (fp8 only).
    assert list(state_layout(engine).kv_scales) == [0.5, 0.25, 0.125, 2.0]
    assert list(state_layout(plain).kv_scales) == []


def test_deprecated_single_kv_scale_sets_both(moe_checkpoint, tmp_path):
    path = with_tensors(moe_checkpoint, tmp_path / "kv", {f"model.layers.{layer}.self_attn.kv_scale": torch.tensor(0.5)
                                                           for layer in ATTENTION_LAYERS})
    cache = cpu_engine_fp8(path).runner.kv_cache
    assert cache.k_scales == cache.v_scales == [0.5, 0.5]


@pytest.mark.parametrize("tensors,message", [
    ({"model.layers.3.self_attn.k_scale": torch.tensor(0.5)}, "lacks .*v_scale of layer 3"),
    ({"model.layers.1.self_attn.k_scale": torch.tensor(0.5)}, "layer 1 is not a full-attention layer"),
    ({"model.layers.3.self_attn.kv_scale": torch.tensor([0.5, 0.5]),
      "model.layers.7.self_attn.kv_scale": torch.tensor(0.5)}, "only one scale per layer"),
    ({"model.layers.3.self_attn.kv_scale": torch.tensor(0.0),
      "model.layers.7.self_attn.kv_scale": torch.tensor(0.5)}, "must be positive"),
])
def test_bad_scales_are_refused_by_name(moe_checkpoint, tmp_path, tensors, message):
    path = with_tensors(moe_checkpoint, tmp_path / "bad", tensors)
    with pytest.raises(WeightLoadError, match=message):
        cpu_engine_fp8(path)


def test_scales_are_applied_on_write_and_read(moe_checkpoint, tmp_path):
    """With scales, the pages hold K / k_scale and V / v_scale, and attention reads them back scaled: logits
    stay as close to the fp32-KV engine's as with scales 1.0 (a scale applied on one side only would put K or V
    off by 4-8x)."""
    path = with_tensors(moe_checkpoint, tmp_path / "scaled", kv_scales({3: (0.25, 0.125), 7: (4.0, 0.5)}))
    prompt = torch.randint(0, 512, (90,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = {}
    for name, engine in (("fp32", cpu_engine(path)), ("fp8", cpu_engine_fp8(str(moe_checkpoint))),
                         ("fp8 scaled", cpu_engine_fp8(path))):
        seq = DirectSequence(engine)
        logits[name] = torch.cat([seq.forward(prompt[:50]), seq.forward(prompt[50:]), seq.forward([5])])
        if name == "fp8 scaled":
            # The first K and V of layer 3 (page 0, offset 0): stored / scale, recovered * scale.
            page = seq.request.page_ids[0]
            stored = engine.runner.kv_cache.layer(0)[page, :, 0].float()
            reference = cpu_engine(path)
            ref_seq = DirectSequence(reference)
            ref_seq.forward(prompt[:1])
            exact = reference.runner.kv_cache.layer(0)[ref_seq.request.page_ids[0], :, 0]
            ref_seq.close()
            torch.testing.assert_close(stored[0] * 0.25, exact[0], rtol=2**-4, atol=2**-10 * 0.25)
            torch.testing.assert_close(stored[1] * 0.125, exact[1], rtol=2**-4, atol=2**-10 * 0.125)
        seq.close()
    err_unscaled, err_scaled = rel_err(logits["fp8"], logits["fp32"]), rel_err(logits["fp8 scaled"], logits["fp32"])
    print(f"\nlogits rel err vs fp32 KV: fp8 scales 1.0 {err_unscaled:.4f}, fp8 with scales {err_scaled:.4f}")
    assert err_scaled < 2 * err_unscaled + 0.01


# ------------------------------------------------------------------------------------- hand-over layout


def test_layouts_of_different_kv_dtypes_do_not_match(moe_checkpoint):
    fp8 = cpu_engine_fp8(str(moe_checkpoint), num_pages=8)
    plain = cpu_engine(str(moe_checkpoint), num_pages=8)
    ours, theirs = state_layout(fp8), state_layout(plain)
    assert ours.kv_dtype == "float8_e4m3fn" and theirs.kv_dtype == "float32"
    problems = layout_mismatches(ours, theirs)
    assert problems == ["kv_dtype: ours float8_e4m3fn, theirs float32 (prefill and decode pods need the same "
                        "--kv-cache-dtype)", "kv_scales: ours [1.0, 1.0, 1.0, 1.0], theirs []"]
    assert layout_mismatches(ours, state_layout(cpu_engine_fp8(str(moe_checkpoint), num_pages=8))) == []
    # Page bytes from the handshake: one byte per element, as the fp8 pod's own pool.
    local = local_regions(fp8)
    memory = pd_pb2.MemoryRegions(kv_num_pages=8, num_slots=1)
    assert remote_regions(memory, ours).kv_page_bytes == local.kv_page_bytes == 2 * 4 * 2 * 32


def test_layouts_with_different_scales_do_not_match(moe_checkpoint, tmp_path):
    path = with_tensors(moe_checkpoint, tmp_path / "scaled", {f"model.layers.{layer}.self_attn.kv_scale":
                                                               torch.tensor(0.5) for layer in ATTENTION_LAYERS})
    problems = layout_mismatches(state_layout(cpu_engine_fp8(path, num_pages=8)),
                                 state_layout(cpu_engine_fp8(str(moe_checkpoint), num_pages=8)))
    assert len(problems) == 1 and problems[0].startswith("kv_scales: ours [0.5, 0.5, 0.5, 0.5], theirs [1.0, 1.0")


# ------------------------------------------------------------------- accuracy on the HF-parity tiny models


@pytest.fixture(scope="module", params=FAMILIES)
def family_checkpoint(request, tmp_path_factory):
    family = request.param
    return family, str(save_checkpoint(build_hf_model(family, seed=3), tmp_path_factory.mktemp(family)))


def test_fp8_kv_accuracy_against_model_dtype_kv(family_checkpoint):
    family, path = family_checkpoint
    reference = cpu_engine(path, num_pages=2048)
    fp8 = cpu_engine_fp8(path, num_pages=2048)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (150, 300, 40, 90)]
    report = compare_kv_dtypes(reference, fp8, prompts, max_tokens=24)  # every position scored
    greedy, forced = report["greedy"], report["teacher_forced"]
    print(f"\n{family} fp8 KV vs fp32 KV: greedy first divergence {greedy['first_divergence']} of 24, max |dlogprob| "
          f"before it {greedy['max_abs_logprob_diff_before_divergence']:.4f}; teacher-forced argmax agreement "
          f"{forced['argmax_agreement']:.4f} over {forced['positions']} positions, |dlogprob| of the argmax token "
          f"mean {forced['mean_abs_logprob_diff']:.4f} max {forced['max_abs_logprob_diff']:.4f}, mean KL "
          f"{forced['mean_kl']:.2e}")
    assert min(greedy["first_divergence"]) >= 1, greedy
    assert greedy["max_abs_logprob_diff_before_divergence"] <= MAX_LOGPROB_DIFF_BEFORE_DIVERGENCE
    min_agreement, max_mean_diff = BOUNDS[family]
    assert forced["argmax_agreement"] >= min_agreement
    assert forced["mean_abs_logprob_diff"] <= max_mean_diff
    for engine in (reference, fp8):
        assert_no_leaks(engine)


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> str:
    """The dense family: the fastest on CPU, for what one family shows for all."""
    return str(save_checkpoint(build_hf_model("qwen3_5", seed=3), tmp_path_factory.mktemp("dense")))


def test_prefix_cache_hits_read_the_same_fp8_pages(dense_checkpoint):
    """A follow-up turn served from the prefix cache gives the tokens the same prompt gives computed from
    scratch: cached fp8 pages are the bytes a fresh prefill writes."""
    path = dense_checkpoint
    params = SamplingParams(max_tokens=8, temperature=0)
    prompt = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(4)).tolist()
    cached = cpu_engine_fp8(path, checkpoint_interval=16)
    [first] = cached.generate([prompt], params)
    follow_up = prompt + first.token_ids + [9, 8, 7]
    [hit] = cached.generate([follow_up], params)
    [fresh] = cpu_engine_fp8(path, checkpoint_interval=16, enable_prefix_cache=False).generate([follow_up], params)
    assert hit.num_cached_tokens >= 96
    assert hit.token_ids == fresh.token_ids
    assert_no_leaks(cached)


def test_bench_accuracy_report_is_json(dense_checkpoint, tmp_path):
    """loadtest.bench_kv_fp8 as the GPU run calls it, on CPU: its JSON report."""
    from loadtest.bench_kv_fp8 import main

    out = tmp_path / "kv_fp8.json"
    main(["--model", dense_checkpoint, "--device", "cpu", "--dtype", "float32", "--prompts", "2", "--prompt-len", "40",
          "--max-tokens", "6", "--page-size", "4", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["kv_cache_dtype"] == "fp8_e4m3" and report["baseline_kv_cache_dtype"] == "auto"
    assert len(report["sequences"]) == 2
    assert 0.5 <= report["teacher_forced"]["argmax_agreement"] <= 1.0
