"""Tiny offline models: real VLM architectures at toy size, built from configs (each family's
``build_tiny``), with the offline tokenizers and processors they share.

Nothing is downloaded. Each builder writes a complete checkpoint (config, weights, a tokenizer built
from a byte-level alphabet, the image processor and the processor with its chat template) with
``save_pretrained``; the rest of tokbench loads it back through the same ``from_pretrained`` path as a
hub model. ``tiny-qwen2.5-vl`` / ``tiny-llava`` carry the trained canary weights shipped in
``tokbench/assets/canary`` (``tokbench train-canary``; docs/canary.md) when present; ``<name>-random`` is
the same architecture from its seeded random init.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


ASSETS = Path(__file__).resolve().parent.parent / "assets" / "canary"

_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def cache_root() -> Path:
    """Where built tiny checkpoints live: ``$TOKBENCH_CACHE`` or ``~/.cache/tokbench``."""
    return Path(os.environ.get("TOKBENCH_CACHE", Path.home() / ".cache" / "tokbench"))


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    from tokenizers import pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    return vocab


def qwen_tokenizer():
    """The offline byte-level tokenizer with the Qwen-VL special tokens; returns (tokenizer, special ids)."""
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(vocab=_byte_vocab(_QWEN_SPECIALS), merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIALS[1:]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer, {tok: tokenizer.convert_tokens_to_ids(tok) for tok in _QWEN_SPECIALS}


def qwen_processor(min_pixels: int = 56 * 56, max_pixels: int = 448 * 448):
    """A Qwen2.5-VL processor over an offline byte-level tokenizer; returns (processor, special ids)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer, ids = qwen_tokenizer()
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return processor, ids


def qwen_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """Config fields that name special tokens, for a Qwen2.5-VL config over this tokenizer."""
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def llava_processor(image_size: int, patch: int):
    """A LLaVA-1.5 processor over an offline byte-level tokenizer (with BOS); returns (processor, ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = _byte_vocab(specials)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_CHAT_TEMPLATE,
    )
    return processor, {tok: vocab[tok] for tok in specials}


def llava_token_ids(ids: dict[str, int]) -> dict[str, int]:
    return dict(image_token_id=ids["<image>"], pad_token_id=ids["<pad>"])


def sincos_positions(grid: int, width: int):
    """A 2-D sin-cos position table for a ``grid`` x ``grid`` patch grid, row-major: (grid*grid, width).

    The first half of the channels encodes the column, the second the row, each as sines then cosines at
    ``width // 4`` frequencies ``100 ** (-i / (width // 4))`` (rad per patch).
    """
    import torch

    quarter = width // 4
    omega = 100.0 ** (-torch.arange(quarter) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = [axis.reshape(-1, 1).float() * omega for axis in (cols, rows)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


def with_weights(model, weights: Path | None):
    """``model`` with the state dict in ``weights`` (a safetensors file) loaded strictly, if given."""
    if weights is not None:
        from safetensors.torch import load_model

        load_model(model, str(weights))
    return model


BUILD_VERSION = 4  # part of the cache directory's name: bump whenever a builder's config or tokenizer changes


def tiny_families() -> dict[str, tuple[type, dict]]:
    """Every tiny model name -> (its family's adapter class, `build_tiny` keyword arguments)."""
    from tokbench.models import adapter_class, family_names

    out = {}
    for family in family_names():
        cls = adapter_class(family)
        out.update({name: (cls, kwargs) for name, kwargs in cls.tiny_models.items()})
    return out


def canary_weights(name: str) -> Path | None:
    """The shipped trained weights of tiny model ``name``, if any."""
    path = ASSETS / f"{name}.safetensors"
    return path if path.is_file() else None


def glimpse_weights_dir(name: str) -> Path:
    """Where the canary's trained GlimpsePrune modules ship (``tokbench train-glimpse``; official layout)."""
    return ASSETS / f"glimpseprune-{name}"


def ensure_tiny(name: str, seed: int = 0) -> Path:
    """Build tiny model ``name`` into the cache once and return its checkpoint directory.

    ``name`` is one of `tiny_families` (the trained canary when its weights ship, else random) or
    ``<name>-random`` (always the seeded random init). The cache directory names the weights' digest
    and ``BUILD_VERSION``, so new shipped weights or configs never reuse an old build.
    """
    base = name.removesuffix("-random")
    builders = tiny_families()
    if base not in builders:
        raise KeyError(f"no tiny model {name!r}; known: {', '.join(sorted(builders))} (and <name>-random)")
    weights = None if name.endswith("-random") else canary_weights(base)
    tag = "canary-" + hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights else f"seed{seed}"
    path = cache_root() / "models" / f"{base}-{tag}-v{BUILD_VERSION}"
    if not (path / "config.json").exists():
        cls, kwargs = builders[base]
        cls.build_tiny(path, seed=seed, weights=weights, **kwargs)
    return path


def save_checkpoint(path: Path, model, processor) -> Path:
    """Write ``model`` and ``processor`` to ``path`` atomically (a temporary sibling, then a rename); greedy
    generation stops at the text config's eos and pads with its pad id."""
    text = model.config.get_text_config()
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
