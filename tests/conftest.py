import logging
import os

# Tests run on CPU threads shared with test servers; keep torch from oversubscribing the 2 CI cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
logging.getLogger("transformers").setLevel(logging.ERROR)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random qwen3_5_moe checkpoint on disk, shared by the engine tests."""
    from tests.hf_models import build_hf_model, save_checkpoint

    return str(save_checkpoint(build_hf_model("qwen3_5_moe", seed=21), tmp_path_factory.mktemp("tiny_moe")))
