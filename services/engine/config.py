"""The engine's configuration: one dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# KV cache storage other than the model dtype ("auto"). Only the full-attention layers' pages change; GDN conv
# and SSM states keep their dtypes.
_KV_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn}


@dataclass(frozen=True)
class EngineConfig:
    model: str = field(
        default="tiny-qwen3.5-moe",
        metadata={"help": "HF model directory, or a preset name (tiny-qwen3.5-moe, qwen3.5-35b-a3b[:layers])"},
    )
    tokenizer: str = field(
        default="",
        metadata={"help": "empty: the model directory's tokenizer.json (a preset's byte tokenizer); 'byte'; or a "
                          "directory with tokenizer.json"},
    )
    load_format: str = field(default="auto", metadata={"help": "auto (read safetensors) or dummy (random)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"})
    kv_cache_dtype: str = field(
        default="auto",
        metadata={"help": "full-attention KV pages: auto (the model dtype) or fp8_e4m3 (half the bytes, twice the "
                          "pages; per-layer k/v scales from the checkpoint, else 1.0). Prefill and decode pods must "
                          "agree"},
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    kernels: str = field(
        default="auto",
        metadata={"help": "auto (gpu on CUDA, else torch), torch (reference ops), gpu (Triton + flashinfer)"},
    )
    decode_attention: str = field(
        default="auto",
        metadata={"help": "auto (the kernel set's attention: flashinfer on the GPU) or triton (decode steps run the "
                          "attention layer's QK-norm/RoPE, K/V store, attention and gate as one Triton launch)"},
    )
    seed: int = field(default=0, metadata={"help": "seed for dummy weights and unseeded sampling"})
    page_size: int = field(default=16, metadata={"help": "tokens per KV page"})
    max_num_seqs: int = field(default=64, metadata={"help": "requests running at once"})
    # 8192: on the H200 (35B-A3B, one prompt, warm) 8K / 32K / 50K / 128K prompts took 0.15 / 0.76 / 1.37 / 5.5 s
    # at 8192, against 0.45 / 2.5 / 2.8 / 11.2 at 2048 and 0.15 / 0.68 / 1.34 / 5.1 at 16384 (twice the activations
    # and the step time for 2-11%): loadtest/results/prefill_h200.json.
    max_num_batched_tokens: int = field(default=8192, metadata={"help": "token budget per forward pass"})
    max_waiting_requests: int = field(
        default=256,
        metadata={"help": "requests queued beyond max_num_seqs; more are refused at once (overload)"},
    )
    prefill_chunk_size: int = field(default=8192, metadata={"help": "most prompt tokens of one request per step"})
    max_model_len: int = field(default=0, metadata={"help": "prompt + output limit (0: what memory allows)"})
    cache_memory_mb: int = field(
        default=0,
        metadata={"help": "MiB for KV pages + GDN states (0: auto from gpu_memory_utilization; 256 on CPU)"},
    )
    gpu_memory_utilization: float = field(default=0.90, metadata={"help": "fraction of GPU memory Baton may use"})
    num_pages: int = field(default=0, metadata={"help": "override the KV page count (tests)"})
    cuda_graph_max_batch: int = field(
        default=64, metadata={"help": "capture decode steps as CUDA graphs up to this batch size (0: off)"}
    )
    overlap_schedule: bool = field(
        default=True,
        metadata={"help": "launch the next decode step before processing the last one's tokens (hides host time)"},
    )
    enable_prefix_cache: bool = field(
        default=True, metadata={"help": "hybrid prefix cache (KV pages + GDN checkpoints)"}
    )
    num_checkpoint_slots: int = field(
        default=0, metadata={"help": "GDN checkpoint slots for the cache (0: 2 x max_num_seqs, memory permitting)"}
    )
    remote_prefill_threshold: int = field(
        default=512,
        metadata={"help": "decode pods with prefill pods: prefill there when the uncached prompt is this long"},
    )
    handover_resume_checkpoint: bool = field(
        default=True,
        metadata={"help": "decode pods: prefill pods also send the state at the prompt's last page boundary, so the "
                          "same prompt again is served from this pod's cache (one more state slot per hand-over)"},
    )
    checkpoint_interval: int = field(
        default=128, metadata={"help": "tokens between state checkpoints in a long prefill (multiple of page_size)"}
    )

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", *_KV_CACHE_DTYPES):
            raise ValueError(f"kv_cache_dtype must be auto (the model dtype) or one of {sorted(_KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens", "prefill_chunk_size",
                     "max_waiting_requests"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.checkpoint_interval <= 0 or self.checkpoint_interval % self.page_size:
            raise ValueError("checkpoint_interval must be a positive multiple of page_size")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        """What the KV pages hold: the model dtype, or float8_e4m3fn."""
        if self.kv_cache_dtype == "auto":
            return self.torch_dtype
        return _KV_CACHE_DTYPES[self.kv_cache_dtype]
