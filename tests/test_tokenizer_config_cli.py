"""Tokenizers, incremental detokenization, config precedence, and the ``baton`` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from services.common.config import config_from
from services.engine.config import EngineConfig
from services.engine.request import SamplingParams
from services.engine.tokenizer import ByteTokenizer, IncrementalDetokenizer, JsonTokenizer
from tests.helpers import assert_no_leaks, cpu_engine
from tests.hf_models import build_hf_model, save_checkpoint

CORPUS = ["the baton passes from prefill to decode", "hybrid models carry state", "héllo wörld ✓ done"] * 20


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory):
    path = save_checkpoint(build_hf_model("qwen3_5", seed=31), tmp_path_factory.mktemp("tok"))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    return path


def test_json_tokenizer_is_used_when_present(checkpoint_with_tokenizer):
    engine = cpu_engine(str(checkpoint_with_tokenizer), tokenizer="")  # the model directory's own
    assert isinstance(engine.tokenizer, JsonTokenizer)
    eos = engine.tokenizer._tok.token_to_id("<|endoftext|>")
    assert engine.tokenizer.eos_token_ids == (eos,), "eos comes from tokenizer_config.json when config.json has none"
    text = "the baton passes ✓"
    ids = engine.tokenizer.encode(text)
    assert engine.tokenizer.decode(ids) == text
    [out] = engine.generate([text], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert out.prompt_token_ids == ids
    assert out.text == engine.tokenizer.decode(out.token_ids)
    assert_no_leaks(engine)


def test_incremental_detokenizer_streams_multibyte_text_exactly(checkpoint_with_tokenizer):
    tok = JsonTokenizer(checkpoint_with_tokenizer, ())
    for text in ["héllo wörld ✓ done", "state ✓✓ passes"]:
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok, [])
        pieces = [detok.add(t) for t in ids]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_byte_tokenizer_holds_back_split_characters():
    tok = ByteTokenizer(512, eos_token_ids=(257,))
    ids = tok.encode("a✓b")  # ✓ is three bytes
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.add(t) for t in ids]
    assert pieces == ["a", "", "", "✓", "b"]
    assert tok.decode([*ids, 300, 257]) == "a✓b", "special ids decode to nothing"


def test_config_precedence_flags_over_env_over_yaml(tmp_path):
    yaml_path = tmp_path / "engine.yaml"
    yaml_path.write_text("page_size: 32\nmax_num_seqs: 8\nseed: 5\n")
    env = {"BATON_MAX_NUM_SEQS": "12", "BATON_SEED": "6"}
    config = config_from(EngineConfig, {"seed": 7}, env=env, yaml_path=str(yaml_path))
    assert (config.page_size, config.max_num_seqs, config.seed) == (32, 12, 7)


def test_config_rejects_unknown_yaml_fields_and_bad_values(tmp_path):
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text("page_sise: 32\n")
    with pytest.raises(ValueError, match="unknown config fields"):
        config_from(EngineConfig, {}, env={}, yaml_path=str(yaml_path))
    with pytest.raises(ValueError, match="page_size must be positive"):
        config_from(EngineConfig, {"page_size": 0}, env={})


def test_baton_demo_prints_a_completion():
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--max-tokens", "8", "--prompt", "hi"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert "completion:" in result.stdout
    assert "finish: length, 8 tokens" in result.stdout
    assert "EngineConfig:" in result.stderr, "the resolved config is printed at start"


def test_start_up_log_of_a_config_hides_secrets():
    """The settings printed at start-up keep API keys and URL passwords out of the logs, and everything else in."""
    from services.common.config import format_config
    from services.router.config import RouterConfig

    config = config_from(RouterConfig, {"model": "/m", "redis_url": "redis://admin:hunter2@redis:6379/0",
                                        "api_keys": "k-one,k-two"}, env={})
    text = format_config(config)
    assert "hunter2" not in text and "k-one" not in text
    assert "redis://admin:***@redis:6379/0" in text and "api_keys = <redacted>" in text
    assert "model = '/m'" in text
