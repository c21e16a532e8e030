"""``make run``: the cluster the product is, on the tiny random-weight model. ``baton up`` with 1 prefill and 2
decode pods (embedded Redis and Ray), a chat turn and its follow-up through the OpenAI API with the official
``openai`` client, the answers and the cached-token count of the follow-up printed, then the cluster stopped and
every one of its processes checked gone.

The weights are random, so the answers are noise; what the run shows is the path (HTTP gateway, chat template,
router placement, decode pod, prefix cache) and that a follow-up turn is served from the first turn's cache.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from services.engine.config import EngineConfig
from services.launch.config import UpConfig
from services.launch.up import Cluster, up

SYSTEM = ("You are the demo assistant of Baton, a prefill/decode disaggregated server for hybrid linear-attention "
          "models. The weights are random, so your answers are noise; what this run shows is the path a request "
          "takes: the OpenAI HTTP gateway, the chat template, the cache-aware router, a decode pod, and the prefix "
          "cache that serves the next turn of the conversation.")


def _chat(cluster: Cluster, model: str) -> None:
    import openai

    router = cluster.endpoints(tls=False)["routers"][0]
    client = openai.OpenAI(base_url=router["http"], api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hand the baton over, please."}]
    for turn, follow_up in ((1, "And once more, from the cache?"), (2, None)):
        started = time.monotonic()
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=24,
                                                               temperature=0)
        out = raw.parse()
        answer = out.choices[0].message.content
        cached = out.usage.prompt_tokens_details.cached_tokens
        print(f"turn {turn}: POST {router['http']}/chat/completions -> decode pod "
              f"{raw.headers.get('x-baton-decode-pod')} in {(time.monotonic() - started) * 1e3:.0f} ms", flush=True)
        print(f"  answer ({out.usage.completion_tokens} tokens, finish {out.choices[0].finish_reason}): {answer!r}")
        print(f"  prompt {out.usage.prompt_tokens} tokens, {cached} of them served from the prefix cache", flush=True)
        if follow_up:
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    config = UpConfig(engine=EngineConfig(model="tiny-qwen3.5-moe", load_format="dummy"), num_prefill=1,
                      num_decode=2)
    started = time.monotonic()
    up(config, run=lambda cluster: _chat(cluster, config.model_name))
    print(f"make run: done in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
