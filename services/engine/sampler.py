"""Token sampling for a batch of requests with per-request parameters.

Order, as in vLLM: penalties on raw logits, then greedy argmax, or temperature, top-k, top-p and min-p
filtering and a draw. Draws use exponential-race sampling (argmax of p / Exp(1) noise), which lets a
seeded request take its noise from its own generator: its output does not depend on what else is in the
batch. Reported logprobs are those of the chosen token under the model's raw distribution.
"""

from __future__ import annotations

import torch

from .request import Request


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
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[float | None]]:
        """``logits [S, V]`` fp32, one row per request; returns chosen token ids and their logprobs."""
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
            greedy_mask = torch.tensor(greedy, device=logits.device)
            tokens = torch.where(greedy_mask, logits.argmax(dim=-1), self._draw(logits, requests))

        token_list = tokens.tolist()
        if raw_logprobs is None:
            return token_list, [None] * len(requests)
        chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        return token_list, [lp if want else None for lp, want in zip(chosen, want_logprobs, strict=True)]

    def _apply_penalties(self, row: torch.Tensor, request: Request) -> None:
        p = request.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long, device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
            out = torch.tensor(request.output_token_ids, dtype=torch.long, device=row.device)
            counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    def _draw(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        temps = torch.tensor([r.params.temperature or 1.0 for r in requests], device=logits.device)
        logits = logits / temps[:, None]
        top_k = [r.params.top_k for r in requests]
        top_p = [r.params.top_p for r in requests]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        min_p = torch.tensor([r.params.min_p for r in requests], device=logits.device)
        probs = torch.softmax(logits, dim=-1)
        if bool((min_p > 0).any()):
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
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token once the tokens ranked above it already cover top_p; the top token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.tensor(top_p, device=logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(mass_before > p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
