"""A model directory as HF ships one, for the gateway tests: the tiny random checkpoint plus a real tokenizer made
here (a byte-level BPE trained with ``tokenizers``, ChatML special tokens), a ``tokenizer_config.json`` with a Jinja
chat template and named special tokens, and a ``generation_config.json`` listing the EOS ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the baton passes from prefill to decode, and the decode pod streams the answer",
    "hybrid models carry a fixed-size state: gated delta net layers and full attention layers",
    "you are a helpful assistant. what is the capital of france? paris is the capital.",
    "héllo wörld ✓ done; tool calls, json {\"name\": \"search\", \"arguments\": {}}",
] * 30

# ChatML with the things real templates do: a default system message, a loop with a namespace, a check that raises,
# tools rendered as JSON, and a template variable (enable_thinking) passed through chat_template_kwargs.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(has_system=false) -%}"
    "{%- for message in messages -%}{%- if message.role == 'system' -%}{%- set ns.has_system = true -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if not ns.has_system -%}{{ '<|im_start|>system\\nYou are a helpful assistant.' }}"
    "{%- if tools -%}{{ '\\nTools: ' }}{{ tools | tojson }}{%- endif -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('unknown role: ' + message.role) }}{%- endif -%}"
    "{{ '<|im_start|>' + message.role + '\\n' + (message.content or '') | trim + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)


def train_tokenizer(vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def make_chat_model_dir(checkpoint: str | Path, out: Path) -> Path:
    """``out``: a copy of ``checkpoint`` (config and weights) with the tokenizer files beside them."""
    out.mkdir(parents=True, exist_ok=True)
    for item in Path(checkpoint).iterdir():
        if item.is_file():
            shutil.copy(item, out / item.name)
    tok = train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": CHAT_TEMPLATE,
              "model_max_length": 4096}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return out
