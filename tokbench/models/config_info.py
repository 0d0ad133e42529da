"""A model's `ModelInfo` from its configuration alone, so runs are checked before any weights load.

It is the family adapter's own ``info_from_config`` (``info()`` of the loaded model calls the same
function), so the two cannot differ. The configuration comes from:

- ``--random-weights``: the shipped real-size config (``models/configs/*.json``);
- tiny aliases (``tiny:NAME``): the tiny checkpoint's ``config.json`` (built into the cache on first use);
- a local directory: its ``config.json`` (the directory must also hold weights);
- a hub id: ``config.json`` from the local HF cache; when it is not cached and the hub is reachable,
  only ``config.json`` is fetched.
"""

from __future__ import annotations

from pathlib import Path

from tokbench.models import ModelError, adapter_class, check_checkpoint_dir, family_names, resolve_model
from tokbench.pruner import ModelInfo


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
    from tokbench.models.random_weights import config_name, shipped_spec

    try:
        key = config_name(name, target)
    except ValueError as err:
        raise ModelError(str(err)) from None
    model_type, spec = shipped_spec(key)
    return adapter_class(model_type).random_parts(spec, None)[0]


def info_from_config(config, name: str) -> ModelInfo:
    """The `ModelInfo` the family adapter reports for a model with ``config``, named ``name``."""
    if config.model_type not in family_names():
        raise ModelError(f"model {name!r} is a {config.model_type!r}; supported: {', '.join(family_names())}")
    return adapter_class(config.model_type).info_from_config(config, name)


def config_info(name: str, aliases: dict[str, str], random_weights: bool = False) -> ModelInfo:
    """`ModelInfo` of model ``name`` (alias, hub id or path) from its configuration alone."""
    return info_from_config(model_config(name, aliases, random_weights), name)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
