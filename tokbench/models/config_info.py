"""A model's `ModelInfo` from its configuration alone, so runs are checked before any weights load.

The fields equal what the family adapter's ``info()`` gives for the loaded model (``tests/test_preflight.py``
checks both tiny families and the shipped real-size configs). The configuration comes from:

- ``--random-weights``: the shipped real-size config (``models/configs/*.json``);
- tiny aliases (``tiny:NAME``): the tiny checkpoint's ``config.json`` (built into the cache on first use);
- a local directory: its ``config.json`` (the directory must also hold weights);
- a hub id: ``config.json`` from the local HF cache; when it is not cached and the hub is reachable,
  only ``config.json`` is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokbench.models import ModelError, check_checkpoint_dir, resolve_model
from tokbench.pruner import ModelInfo

FAMILIES = ("qwen2_5_vl", "llava")


def model_config(name: str, aliases: dict[str, str], random_weights: bool = False):
    """The transformers config (``PretrainedConfig``) of model ``name``, without weights; ModelError if none."""
    target = resolve_model(name, aliases)
    if random_weights:
        return _shipped_config(name, target)
    if target.startswith("tiny:"):
        from tokbench.models.tiny import ensure_tiny

        target = str(ensure_tiny(target.removeprefix("tiny:")))
    if Path(target).is_dir():
        check_checkpoint_dir(Path(target))
    return _auto_config(target)


def _auto_config(target: str):
    from huggingface_hub import constants
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(target, local_files_only=True)
    except OSError:
        if constants.HF_HUB_OFFLINE:
            reason = "the network is off (HF_HUB_OFFLINE)"
        else:
            try:
                return AutoConfig.from_pretrained(target)
            except OSError as err:
                reason = err.__class__.__name__
    except ValueError as err:  # a config.json transformers cannot read (unknown model_type, bad JSON)
        raise ModelError(f"cannot read the config of model {target!r}: {_first_line(err)}") from None
    raise ModelError(
        f"cannot load model {target!r}: not a local checkpoint and not in the HF cache ({reason}); "
        f"download it first (hf download {target}) or pass a local path"
    )


def _shipped_config(name: str, target: str):
    from transformers import LlavaConfig, Qwen2_5_VLConfig

    from tokbench.models.random_weights import CONFIG_DIR, config_name

    try:
        key = config_name(name, target)
    except ValueError as err:
        raise ModelError(str(err)) from None
    spec = json.loads((CONFIG_DIR / f"{key}.json").read_text())
    spec.pop("_source", None)
    family = spec.pop("model_type")
    return Qwen2_5_VLConfig(**spec) if family == "qwen2_5_vl" else LlavaConfig(**spec)


def info_from_config(config, name: str) -> ModelInfo:
    """The `ModelInfo` the family adapter would report for a model with ``config``, named ``name``."""
    family = config.model_type
    if family not in FAMILIES:
        raise ModelError(f"model {name!r} is a {family!r}; supported: {', '.join(FAMILIES)}")
    text, vision = config.get_text_config(), config.vision_config
    if family == "qwen2_5_vl":
        depth = vision.depth
        full_attention = tuple(vision.fullatt_block_indexes)
        feature_layer, per_token = -1, vision.spatial_merge_size**2
    else:
        depth = vision.num_hidden_layers
        full_attention = tuple(range(depth))
        feature_layer, per_token = config.vision_feature_layer, 1
    return ModelInfo(
        family=family,
        name=name,
        n_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        n_heads=text.num_attention_heads,
        vision_depth=depth,
        vision_feature_layer=feature_layer,
        vision_full_attention=full_attention,
        patches_per_token=per_token,
        vision_hidden_size=vision.hidden_size,
    )


def config_info(name: str, aliases: dict[str, str], random_weights: bool = False) -> ModelInfo:
    """`ModelInfo` of model ``name`` (alias, hub id or path) from its configuration alone."""
    return info_from_config(model_config(name, aliases, random_weights), name)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
