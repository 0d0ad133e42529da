"""Shared fixtures: tiny offline models built once per session into a temporary cache; no network."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def tokbench_cache(tmp_path_factory):
    """Point TOKBENCH_CACHE/TOKBENCH_DATA at a session directory (unless the caller set them)."""
    root = tmp_path_factory.mktemp("tokbench-cache")
    os.environ.setdefault("TOKBENCH_CACHE", str(root / "cache"))
    os.environ.setdefault("TOKBENCH_DATA", str(root / "data"))
    return root


_ADAPTERS: dict[str, object] = {}


def tiny_family_models() -> list[str]:
    """One tiny model per supported family (each adapter's first ``tiny_models`` entry), from the registry:
    a new family file is covered by every test parametrized with this list."""
    from tokbench.models import adapter_class, family_names

    return [next(iter(adapter_class(family).tiny_models)) for family in family_names()]


TINY_FAMILY_MODELS = tiny_family_models()


def tiny_adapter(name: str, attn: str = "sdpa"):
    """A loaded tiny model (cached per session; each test must leave it unchanged)."""
    key = f"{name}:{attn}"
    if key not in _ADAPTERS:
        from tokbench.config import load_config
        from tokbench.models import load_model

        _ADAPTERS[key] = load_model(name, load_config().models, dtype="float32", attn_implementation=attn, device="cpu")
    return _ADAPTERS[key]


@pytest.fixture(params=TINY_FAMILY_MODELS)
def adapter(request):
    return tiny_adapter(request.param)


@pytest.fixture
def qwen():
    return tiny_adapter("tiny-qwen2.5-vl")


@pytest.fixture
def llava():
    return tiny_adapter("tiny-llava")


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@contextlib.contextmanager
def layer_lengths(adapter):
    """Yields a list filled with the sequence length each decoder layer processes in prefill."""
    lengths: list[int] = []
    n_layers = len(adapter.layers)

    def hook(module, args):
        if len(lengths) < n_layers:
            lengths.append(args[0].shape[1])

    handles = [layer.register_forward_pre_hook(hook) for layer in adapter.layers]
    try:
        yield lengths
    finally:
        for handle in handles:
            handle.remove()


def text_length(adapter, image: Image.Image, question: str) -> int:
    """Prompt tokens of one sample that are not image tokens."""
    batch = adapter.preprocess([[image]], [question])
    return int((batch.input_ids != adapter.image_token_id).sum())
