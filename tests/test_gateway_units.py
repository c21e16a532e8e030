"""The gateway's parts without processes: tokenizer loading (no silent byte fallback, EOS from
generation_config.json), chat templates against transformers, streamed text with stop strings (a property: how the
tokens are split into responses never changes the text), OpenAI request checks, API keys."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.protos import inference_pb2
from services.engine.chat_template import ChatTemplate, ChatTemplateError
from services.engine.tokenizer import (
    ByteTokenizer,
    JsonTokenizer,
    TextStream,
    TokenizerNotFoundError,
    find_stop,
    load_tokenizer,
)
from services.gateway.auth import ApiKeys
from services.gateway.openai_protocol import ApiError, parse_chat, parse_completion
from tests.chat_model import CHAT_TEMPLATE, make_chat_model_dir


@pytest.fixture(scope="module")
def chat_model(tiny_checkpoint, tmp_path_factory):
    return make_chat_model_dir(tiny_checkpoint, tmp_path_factory.mktemp("chat_units"))


# ---- loading ----------------------------------------------------------------------------------------------
def test_a_model_directory_without_a_tokenizer_is_a_clear_error(tiny_checkpoint, chat_model, tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="has no tokenizer.json.*--tokenizer byte"):
        load_tokenizer("", tiny_checkpoint, 512, ())
    assert isinstance(load_tokenizer("byte", tiny_checkpoint, 512, ()), ByteTokenizer), "only when asked by name"
    assert isinstance(load_tokenizer("", "tiny-qwen3.5-moe", 512, (257,)), ByteTokenizer), "a preset names it"
    # A tokenizer from another directory; EOS still from the model's generation_config.json.
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(chat_model / name, tokenizer_dir / name)
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    tok = load_tokenizer(str(tokenizer_dir), str(model_dir), 512, (3,))
    assert isinstance(tok, JsonTokenizer) and tok.eos_token_ids == (5, 7)
    assert load_tokenizer(str(tokenizer_dir), tiny_checkpoint, 512, (3,)).eos_token_ids == (3,), "config.json's"
    with pytest.raises(TokenizerNotFoundError, match="tokenizer directory"):
        load_tokenizer(str(tmp_path), tiny_checkpoint, 512, ())


def test_eos_ids_and_special_tokens_come_from_the_model_files(chat_model):
    tok = load_tokenizer("", str(chat_model), 512, ())
    im_end, eot = tok._tok.token_to_id("<|im_end|>"), tok._tok.token_to_id("<|endoftext|>")
    assert tok.eos_token_ids == (im_end, eot), "generation_config.json lists both"
    assert tok.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert tok.encode("<|im_start|>user")[0] == tok._tok.token_to_id("<|im_start|>"), "one special id"
    assert tok.decode(tok.encode("<|im_start|>hybrid<|im_end|>")) == "hybrid", "special tokens skipped"
    long = "hybrid models carry state. " * 400
    assert tok.encode(long) == tok._tok.encode(long, add_special_tokens=False).ids, "the GIL-releasing path agrees"


def test_chat_template_renders_exactly_as_transformers(chat_model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(chat_model))
    ours = load_tokenizer("", str(chat_model), 512, ()).chat_template
    conversations = [
        [{"role": "user", "content": "héllo ✓"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "  what?  "},
         {"role": "assistant", "content": "this."}, {"role": "user", "content": "and?"}],
        [{"role": "user", "content": None}],
    ]
    tools = [{"type": "function", "function": {"name": "f", "description": "<b>&</b>", "parameters": {}}}]
    for messages in conversations:
        for kwargs in ({}, {"tools": tools}, {"enable_thinking": False}, {"add_generation_prompt": False}):
            add = kwargs.pop("add_generation_prompt", True)
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add, **kwargs)
            assert ours.render(messages, add_generation_prompt=add, **kwargs) == expected
    with pytest.raises(ChatTemplateError, match="unknown role: robot"):
        ours.render([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="must not be empty"):
        ours.render([])


def test_chat_templates_run_sandboxed():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "x"}])
    assert CHAT_TEMPLATE  # the test model's template is the one rendered above


# ---- streamed text with stop strings ----------------------------------------------------------------------
TEXTS = st.text(alphabet=st.sampled_from(list("ab✓ \n")), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(text=TEXTS, stops=st.lists(st.text(alphabet=st.sampled_from(list("ab✓ ")), min_size=1, max_size=3),
                                  max_size=2),
       cuts=st.lists(st.integers(min_value=1, max_value=5), max_size=40))
def test_text_stream_is_the_same_however_tokens_are_grouped(text, stops, cuts):
    """Byte tokens (a ✓ is three: partial characters are held back) arriving in any grouping give the text cut
    before the stop string completed first (generation ends there, as in peers: with stops 'b' and 'aba', 'aba'
    is cut to 'a'; among matches completed by the same character, the one starting earliest), exactly, and the
    tokens up to the one that completed it."""
    tokenizer = ByteTokenizer(512, ())
    tokens = tokenizer.encode(text)
    stream = TextStream(tokenizer, [], tuple(stops))
    pieces, i = [], 0
    for size in [*cuts, len(tokens)]:
        if i >= len(tokens) or stream.stopped:
            break
        pieces.append(stream.add(tokens[i:i + size]))
        i += size
    if not stream.stopped:
        pieces.append(stream.finish())
    cut = next((c for end in range(1, len(text) + 1) if (c := find_stop(text[:end], tuple(stops), 0)) is not None),
               None)  # one character at a time: the first prefix that contains a stop string
    assert "".join(pieces) == (text if cut is None else text[:cut])
    if stream.stopped:  # the tokens kept end with the one that completed the stop string
        assert find_stop(tokenizer.decode(tokens[:stream.num_tokens]), tuple(stops), 0) == cut
        assert find_stop(tokenizer.decode(tokens[:stream.num_tokens - 1]), tuple(stops), 0) is None


# ---- OpenAI request checks --------------------------------------------------------------------------------
def test_sampling_fields_map_to_baton_settings():
    parsed = parse_completion({"model": "m", "prompt": [1, 2], "max_tokens": 9, "temperature": 0.5, "top_p": 0.9,
                               "top_k": -1, "min_p": 0.1, "seed": 3, "stop": "x", "presence_penalty": 0.5,
                               "frequency_penalty": -0.5, "logprobs": 0, "stream": True,
                               "stream_options": {"include_usage": True}, "user": "alice"}, "m")
    expected = inference_pb2.SamplingParams(max_tokens=9, temperature=0.5, top_p=0.9, top_k=0, min_p=0.1, seed=3,
                                            stop=["x"], presence_penalty=0.5, frequency_penalty=-0.5, logprobs=True)
    assert parsed.sampling == expected
    assert parsed.prompt_ids == [1, 2] and parsed.stream and parsed.include_usage and parsed.session_id == "alice"
    chat = parse_chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                               {"type": "text", "text": "b"}]}],
                       "max_completion_tokens": 4, "max_tokens": 99}, "m")
    assert chat.sampling.max_tokens == 4 and chat.messages[0]["content"] == "a\nb"
    assert not parse_completion({"prompt": "x"}, "m").sampling.HasField("temperature")
    assert parse_completion({"prompt": "x"}, "m").sampling.max_tokens == 16, "OpenAI's default"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "other", "prompt": "x"}, 404, "model"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
        ({"prompt": "x", "n": 3}, 400, "n"),
        ({"prompt": "x", "echo": True}, 400, "echo"),
        ({"prompt": "x", "logprobs": 3}, 400, "logprobs"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"prompt": ["a", "b"]}, 400, "prompt"),
        ({"prompt": [1, -2]}, 400, "prompt"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format"),
        ([1, 2], 400, None),
    ],
)
def test_bad_requests_name_the_field(body, status, param):
    with pytest.raises(ApiError) as err:
        parse_completion(body, "m")
    assert err.value.status == status and err.value.param == param
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_api_keys_compare_whole_bearer_keys():
    keys = ApiKeys(frozenset({"k-one", "k-two"}))
    assert keys.allows("Bearer k-two") and keys.allows("bearer k-one")
    for bad in (None, "", "k-one", "Bearer", "Bearer k-on", "Bearer k-one2", "Basic k-one"):
        assert not keys.allows(bad)
    assert ApiKeys(frozenset()).allows(None), "no keys configured: open"


def test_an_engine_asked_for_ids_only_makes_no_text_and_the_same_tokens(chat_model):
    from services.engine.request import InvalidRequestError, SamplingParams
    from tests.helpers import assert_no_leaks, cpu_engine

    engine = cpu_engine(str(chat_model), tokenizer="")
    prompt = engine.tokenizer.encode("the baton passes from prefill to decode")
    with_text, ids_only = engine.generate([prompt, prompt], [
        SamplingParams(max_tokens=10, temperature=0),
        SamplingParams(max_tokens=10, temperature=0, detokenize=False)])
    assert ids_only.token_ids == with_text.token_ids and ids_only.text == "" and with_text.text
    with pytest.raises(InvalidRequestError, match="stop strings need detokenization"):
        SamplingParams(stop=("x",), detokenize=False)
    assert_no_leaks(engine)
