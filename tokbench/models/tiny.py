"""Tiny offline models: real Qwen2.5-VL and LLaVA-1.5 architectures at toy size, built from configs.

Nothing is downloaded. Each builder writes a complete checkpoint (config, weights, a tokenizer built
from a byte-level alphabet, the image processor and the processor with its chat template) with
``save_pretrained``; the rest of tokbench loads it back through the same ``from_pretrained`` path as a
hub model. ``tiny-qwen2.5-vl`` / ``tiny-llava`` carry the trained canary weights shipped in
``tokbench/assets/canary`` (``tokbench train-canary``; docs/canary.md) when present; ``<name>-random`` is
the same architecture from its seeded random init.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_MODELS = ("tiny-qwen2.5-vl", "tiny-llava", "tiny-qwen2.5-vl-deep")
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


def build_tiny_qwen(path: Path, seed: int = 0, weights: Path | None = None, layers: int = 4) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint (``layers`` LLM layers, hidden 64; 4 ViT blocks) to ``path``.

    224x224 .. 448x448 pixels give 64 .. 256 merged visual tokens: enough to prune, small for CPUs.
    ``tiny-qwen2.5-vl-deep`` has 12 LLM layers, so in-LLM methods run at their papers' schedules.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor, ids = qwen_processor()
    special = qwen_token_ids(ids)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(processor.tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            # head_dim 16 leaves 8 rotary frequencies, and M-RoPE gives the width section the 3 lowest: at
            # theta 1e4 they turn < 0.05 rad across 16 columns, so left/right is invisible to attention;
            # at 10 they turn 2-4 rad and the canary learns relative positions (docs/canary.md)
            rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 3, 3]},
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=special["eos_token_id"],
            pad_token_id=special["pad_token_id"],
        ),
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1, 3],
        ),
        tie_word_embeddings=False,
        **special,
    )
    torch.manual_seed(seed)
    model = _with_weights(Qwen2_5_VLForConditionalGeneration(config), weights)
    _set_generation_ids(model, special["eos_token_id"], special["pad_token_id"])
    _save_atomically(path, model, processor)
    return path


def build_tiny_llava(path: Path, seed: int = 0, weights: Path | None = None) -> Path:
    """Write a tiny LLaVA-1.5 checkpoint (CLIP ViT 4 layers at 112 px -> 64 patches; Llama 4 layers)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    image_size, patch = 112, 14
    processor, ids = llava_processor(image_size, patch)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(processor.tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch) ** 2,
        **llava_token_ids(ids),
    )
    torch.manual_seed(seed)
    model = _with_weights(LlavaForConditionalGeneration(config), weights)
    _set_generation_ids(model, ids["</s>"], ids["<pad>"])
    _save_atomically(path, model, processor)
    return path


def _with_weights(model, weights: Path | None):
    """``model`` with the state dict in ``weights`` (a safetensors file) loaded strictly, if given."""
    if weights is not None:
        from safetensors.torch import load_model

        load_model(model, str(weights))
    return model


def _set_generation_ids(model, eos: int, pad: int) -> None:
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad


_BUILDERS = {
    "tiny-qwen2.5-vl": build_tiny_qwen,
    "tiny-llava": build_tiny_llava,
    "tiny-qwen2.5-vl-deep": functools.partial(build_tiny_qwen, layers=12),
}
BUILD_VERSION = 3  # part of the cache directory's name: bump whenever a builder's config or tokenizer changes


def canary_weights(name: str) -> Path | None:
    """The shipped trained weights of tiny model ``name``, if any."""
    path = ASSETS / f"{name}.safetensors"
    return path if path.is_file() else None


def glimpse_weights_dir(name: str) -> Path:
    """Where the canary's trained GlimpsePrune modules ship (``tokbench train-glimpse``; official layout)."""
    return ASSETS / f"glimpseprune-{name}"


def ensure_tiny(name: str, seed: int = 0) -> Path:
    """Build tiny model ``name`` into the cache once and return its checkpoint directory.

    ``name`` is one of ``TINY_MODELS`` (the trained canary when its weights ship, else random) or
    ``<name>-random`` (always the seeded random init). The cache directory names the weights' digest
    and ``BUILD_VERSION``, so new shipped weights or configs never reuse an old build.
    """
    base = name.removesuffix("-random")
    if base not in _BUILDERS:
        raise KeyError(f"no tiny model {name!r}; known: {', '.join(TINY_MODELS)} (and <name>-random)")
    weights = None if name.endswith("-random") else canary_weights(base)
    tag = "canary-" + hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights else f"seed{seed}"
    path = cache_root() / "models" / f"{base}-{tag}-v{BUILD_VERSION}"
    if not (path / "config.json").exists():
        _BUILDERS[base](path, seed=seed, weights=weights)
    return path


def _save_atomically(path: Path, model, processor) -> None:
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
