"""Token sampling for a batch of requests with per-request parameters.

Order, as in vLLM: penalties on raw logits, then greedy argmax, or temperature, top-k, top-p and min-p
filtering and a draw. Draws use exponential-race sampling (argmax of p / Exp(1) noise), which lets a
seeded request take its noise from its own generator: its output does not depend on what else is in the
batch. Reported logprobs are those of the chosen token under the model's raw distribution.

Sampling never waits for the device: tokens stay on the GPU (the next decode step can read them there)
and their copy to the host runs behind the step; ``SampledTokens.result()`` is where the host waits.
"""

from __future__ import annotations

import torch

from .request import Request


class SampledTokens:
    """One step's chosen tokens (and logprobs) on the device, with their copy to the host under way."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor | None, want_logprobs: list[bool]) -> None:
        self.tokens = tokens  # [S] int64 on the device: the next decode step's input ids
        self._want_logprobs = want_logprobs
        self._tokens_host = _to_host_async(tokens)
        self._logprobs_host = None if logprobs is None else _to_host_async(logprobs)
        self._copied = None
        if tokens.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def wait(self) -> None:
        """Block until the step that produced these tokens has finished on the device."""
        if self._copied is not None:
            self._copied.synchronize()

    def result(self) -> tuple[list[int], list[float | None]]:
        """Chosen token ids and their logprobs (None where not asked for), once the step is done."""
        self.wait()
        tokens = self._tokens_host.tolist()
        if self._logprobs_host is None:
            return tokens, [None] * len(tokens)
        chosen = self._logprobs_host.tolist()
        return tokens, [lp if want else None for lp, want in zip(chosen, self._want_logprobs, strict=True)]


def _to_host_async(values: torch.Tensor) -> torch.Tensor:
    if not values.is_cuda:
        return values
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    return host


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without a synchronisation (a plain ``torch.tensor(..., device=)``
    waits for the stream, which would stall the step queued behind this one)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def skip_draw(self, request: Request, vocab_size: int) -> None:
        """Advance a seeded request's generator past one draw that happened elsewhere (a prefill pod)."""
        if request.params.seed is not None and not request.params.greedy:
            torch.empty(vocab_size, device=self.device).exponential_(generator=self._generator_for(request))

    def forget(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def _generator_for(self, request: Request) -> torch.Generator:
        gen = self._request_generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(request.params.seed)
            self._request_generators[request.request_id] = gen
        return gen

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampledTokens:
        """``logits [S, V]`` fp32, one row per request; the chosen tokens, still on the device."""
        want_logprobs = [r.params.logprobs for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        if any(r.params.needs_penalties for r in requests):
            logits = logits.clone()  # the raw logits stay intact for the logprobs
            for row, request in enumerate(requests):
                if request.params.needs_penalties:
                    self._apply_penalties(logits[row], request)

        # Decided on the host: a device-side test would cost a synchronisation per step.
        greedy = [r.params.greedy for r in requests]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            greedy_mask = _to_device(greedy, torch.bool, logits.device)
            tokens = torch.where(greedy_mask, logits.argmax(dim=-1), self._draw(logits, requests))
        chosen = None if raw_logprobs is None else raw_logprobs.gather(1, tokens[:, None])[:, 0]
        return SampledTokens(tokens, chosen, want_logprobs)

    def _apply_penalties(self, row: torch.Tensor, request: Request) -> None:
        p = request.params
        if p.repetition_penalty != 1.0:
            seen = _to_device(sorted(set(request.all_token_ids)), torch.long, row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
            out = _to_device(request.output_token_ids, torch.long, row.device)
            counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    def _draw(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        temps = _to_device([r.params.temperature or 1.0 for r in requests], logits.dtype, logits.device)
        logits = logits / temps[:, None]
        top_k = [r.params.top_k for r in requests]
        top_p = [r.params.top_p for r in requests]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        if any(r.params.min_p > 0 for r in requests):  # decided on the host: no synchronisation
            min_p = _to_device([r.params.min_p for r in requests], probs.dtype, probs.device)
            threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs).exponential_(generator=self._generator)
        for row, request in enumerate(requests):
            if request.params.seed is not None:
                noise[row].exponential_(generator=self._generator_for(request))
        return (probs / noise).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = _to_device([kk if kk > 0 else vocab for kk in top_k], torch.long, logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token once the tokens ranked above it already cover top_p; the top token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    p = _to_device(top_p, probs.dtype, logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(mass_before > p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
