"""`glimpseprune`: GlimpsePrune (Zeng et al., arXiv 2508.01548, "A Glimpse to Compress"), Sec. 3.

Notation: ``n`` visual tokens, ``d`` LLM hidden size, ``h`` LLM heads, ``K`` the glimpse layer.

Stage `glimpse` (Sec. 3.2, official ``_glimpse_forward`` / ``_get_remain_masks`` / ``_reduce_tokens``):
- a learnable glimpse token is appended after the prompt (official id = eos, position last + 1); its
  input embedding is ``le_norm(le_proj(E[0]))`` and before every layer ``l`` in ``le_layers`` (all
  layers in the shipped configs) ``le_norm(le_proj(E[l]))`` is added to its hidden state;
- at layer K (``selected_layers = reduce_layer = K``) its attention row to the image tokens is taken
  per head: raw ``q.k / sqrt(hd)`` (``use_attention_logits=True``, the Qwen2.5-VL port) or log-softmax
  over all keys (``False``, the LLaVA port);
- the VIP (Sec. 3.3, `methods/glimpse_vip.py`) turns these features, vision-tower states (Qwen: ViT
  blocks 31, 23, 15, 7, each 2x2 unit averaged; LLaVA: CLIP ``hidden_states[23, 17, 11, 5]`` = block
  outputs 22, 16, 10, 4) and 2-D RoPE over each tile's token grid into one logit per visual token;
  tokens attend within their tile (``StageInputs.token_tile``; the official code: within the image);
- dynamic keep (Eq. in Sec. 3.3, ``_get_remain_masks``): ``sigmoid(logit) > reduce_threshold`` (0.5);
  if the kept share exceeds ``max_remain_ratio`` keep exactly the top ``int(ratio n)``; if fewer than
  ``min_remain_num`` (1) survive, add the top ones. The engine then drops the rest from the hidden
  states and from the KV cache of layers 0..K, removes the glimpse token and runs layers K+1.. on the
  kept tokens (``headline_retention = "final"``).
K (official configs, by model name): Qwen2.5-VL-7B 18 of 28, 3B 23 of 36, LLaVA-1.5-7B 21 of 32, 13B 26 of
40; a checkpoint's ``config.json`` decides; untrained on other models ``min(round(2 L / 3), L - 2)``.
Untrained settings come from the model's capabilities (`default_config`), never its family: a tower with
a CLS token (``has_cls``) gets the LLaVA port's log-softmax features and ``hidden_states`` layer indices;
a windowed tower (``vision_windowed``) the Qwen port's full-attention blocks.

Budgets: no budget (``None``) = the official dynamic default, capped by
``max_remain_ratio`` (method arg, else the checkpoint's, ``None`` = no cap: the README's "no retention
rate limit"); ``Budget.dynamic(c)`` = dynamic capped at ``c`` (the README's ``MAX_REMAIN_RATIO=0.111``);
``--ratio r`` / ``--budget k`` = the fixed-ratio efficiency mode: exactly the top ``k`` by VIP logit
(``--ratio 1`` keeps every token).
Every top-k here ranks by the float32 logit with exact ties to the lower token index (`top_tokens`); the
official code ranks bf16 sigmoid probabilities, whose ties it breaks arbitrarily (a documented deviation).
Weights: ``weights=DIR|hub id`` with ``config.json`` + ``new_modules_gp.pt`` (official layout); default per
base model (``ashun989/GlimpsePrune_*``); ``allow_untrained=true`` uses a seeded random init (tests).
One instance serves one model at a time: `stages` loads the weights for the model it is given.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from methods.glimpse_vip import VIP, GlimpseConfig, GlimpseModules, init_official
from methods.tiles import token_tiles
from tokbench.method_weights import check_weights_dir
from tokbench.models.tiny import glimpse_weights_dir
from tokbench.pruner import (
    Budget,
    GlimpseProbe,
    KeepDecision,
    ModelInfo,
    Stage,
    StageInputs,
    StageSpec,
    is_dynamic,
    register_method,
)

DEFAULT_WEIGHTS = (  # (pattern in ModelInfo.name, hub ids to try), from the official README
    (r"qwen2\.5-vl-3b", ("ashun989/GlimpsePrune_Qwen2.5-VL-3B-Instruct",)),
    (r"qwen2\.5-vl-7b", ("ashun989/GlimpsePrune_Qwen2.5-VL-7B-Instruct",)),
    # the README links "_LLaVA"; the hub pages seen are "-LLaVA": try both
    (r"llava-v?1\.5-7b", ("ashun989/GlimpsePrune_LLaVA-1.5-7B", "ashun989/GlimpsePrune-LLaVA-1.5-7B")),
    (r"llava-v?1\.5-13b", ("ashun989/GlimpsePrune_LLaVA-1.5-13B", "ashun989/GlimpsePrune-LLaVA-1.5-13B")),
    # the trained Qwen canaries (tokbench train-glimpse; docs/canary.md), shipped in the package
    (r"^tiny-qwen2\.5-vl$", (str(glimpse_weights_dir("tiny-qwen2.5-vl")),)),
    (r"^tiny-qwen2\.5-vl-deep$", (str(glimpse_weights_dir("tiny-qwen2.5-vl-deep")),)),
)
OFFICIAL_LAYER = (  # (pattern in ModelInfo.name, K), from the official train configs
    (r"qwen2\.5-vl-3b", 23),
    (r"qwen2\.5-vl-7b", 18),
    (r"llava-v?1\.5-7b", 21),
    (r"llava-v?1\.5-13b", 26),
)


def top_tokens(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best tokens of ``logits`` (n,): highest float32 VIP logit first, exact ties to the lower index.

    The official code takes ``topk`` of the sigmoid probabilities in the model's dtype; in bf16 the sigmoid
    is 1.0 from a logit of ~6.24, so its choice among saturated tokens is arbitrary (docs/methods/glimpseprune.md).
    ``[1, 3, 3, 2, 3], k = 2 -> [1, 2]``.
    """
    return torch.sort(logits.float(), descending=True, stable=True).indices[:k]


def keep_dynamic(logits: torch.Tensor, threshold: float, max_ratio: float | None, min_num: int | None) -> torch.Tensor:
    """Official ``_get_remain_masks`` on one sample's logits (n,) -> sorted kept indices (ties: `top_tokens`)."""
    keep = logits.sigmoid() > threshold
    n = logits.numel()
    if max_ratio is not None and int(keep.sum()) / n > max_ratio:
        keep = torch.zeros_like(keep)
        keep[top_tokens(logits, int(max_ratio * n))] = True
    if min_num is not None and int(keep.sum()) < min_num:
        keep[top_tokens(logits, min(min_num, n))] = True
    return keep.nonzero()[:, 0]


def glimpse_layer(model: ModelInfo) -> int:
    """K: the official train config's for the model's name, else ``min(round(2 L / 3), L - 2)``."""
    name = model.name.lower()
    official = next((k for pattern, k in OFFICIAL_LAYER if re.search(pattern, name)), None)
    return official if official is not None else min(round(2 * model.n_layers / 3), model.n_layers - 2)


def default_vision_blocks(model: ModelInfo) -> tuple[int, ...]:
    """The VIP's vision blocks, deepest first. Windowed tower: its full-attention blocks (Qwen port: 31, 23,
    15, 7). Otherwise four spaced ``depth / 4`` apart down from the feature block, counted as the LLaVA
    port counts CLIP ``hidden_states`` (``max(1, round(f + 1 - j depth / 4)) - 1``, f the feature block;
    CLIP 24 blocks, f = 22: 22, 16, 10, 4)."""
    if model.vision_windowed:
        return tuple(sorted(model.vision_full_attention, reverse=True))
    depth = model.vision_depth
    top = model.vision_feature_layer % depth + 1  # the feature block as a hidden_states index
    return tuple(dict.fromkeys(max(1, round(top - j * depth / 4)) - 1 for j in range(4)))


def default_config(model: ModelInfo) -> GlimpseConfig:
    """The shipped train configs' settings scaled to ``model`` (for untrained runs).

    Which official port's settings apply follows the model's capabilities: with a CLS token (``has_cls``) the
    LLaVA port's log-softmax features and ``hidden_states`` indices, else the Qwen port's raw logits and
    block indices; the vision blocks by `default_vision_blocks`.
    """
    k = glimpse_layer(model)
    blocks = default_vision_blocks(model)
    return GlimpseConfig(
        hidden_size=model.hidden_size, num_attention_heads=model.n_heads, num_hidden_layers=model.n_layers,
        vision_hidden_size=model.vision_hidden_size or model.hidden_size,  # unknown: resized on first use (`_vip`)
        reduce_layer=k, selected_layers=(k,), le_layers=tuple(range(model.n_layers)),
        selected_visual_layers=tuple(b + 1 for b in blocks) if model.has_cls else blocks,
        has_cls=model.has_cls, patches_per_token=model.patches_per_token, vision_windowed=model.vision_windowed,
        use_attention_logits=not model.has_cls,
    )


@register_method("glimpseprune")
@dataclass
class GlimpsePrune:
    """A learnable glimpse token + VIP pick the question-relevant visual tokens at layer K."""

    budget: Budget | None
    weights: str = ""  # DIR or hub id with config.json + new_modules_gp.pt; "": the base model's default
    allow_untrained: bool = False  # seeded random glimpse token and VIP (tests only)
    threshold: float | None = None  # None: the checkpoint's reduce_threshold (0.5)
    max_remain_ratio: float | None = None  # None: the checkpoint's (no cap in the official default)
    min_remain_num: int | None = None  # None: the checkpoint's (1)
    seed: int = 0
    version = "2"
    headline_retention = "final"
    position_policy = "keep"  # the official LLaVA and Qwen code keep original position ids after the drop

    # --- weights ----------------------------------------------------------------------------------
    def modules_for(self, model: ModelInfo) -> GlimpseModules:
        """Load (or, untrained, build) the glimpse modules for ``model``; cached on the instance."""
        cached = getattr(self, "_modules", None)
        if cached is not None and getattr(self, "_model", None) == model:
            return cached
        if self.allow_untrained and not self.weights:
            modules = GlimpseModules(default_config(model)).init_untrained(self.seed).eval()
        else:
            directory = self._weights_dir(model)
            check_weights_dir(directory, "glimpseprune", "new_modules_gp.pt", ("attn_fuser", "learnable_embeddings"))
            modules = GlimpseModules.load(directory)
        self._check(modules.cfg, model)
        self._modules, self._model, self._vips = modules, model, {}
        return modules

    def _weights_dir(self, model: ModelInfo) -> Path:
        name = model.name.lower()
        sources = (self.weights,) if self.weights else next((h for p, h in DEFAULT_WEIGHTS if re.search(p, name)), ())
        hint = "pass --method-arg weights=PATH (a directory with config.json and new_modules_gp.pt, or a hub id)"
        if not sources:
            raise ValueError(f"glimpseprune has no default weights for {model.name!r}; {hint}")
        if Path(sources[0]).expanduser().is_dir():
            return Path(sources[0]).expanduser()
        reason = ""
        for source in sources:
            try:
                from huggingface_hub import hf_hub_download

                hf_hub_download(source, "config.json")
                return Path(hf_hub_download(source, "new_modules_gp.pt")).parent
            except (OSError, ValueError, ImportError) as err:  # offline, not cached, bad id, no such repo
                reason = err.__class__.__name__
        raise ValueError(f"glimpseprune cannot fetch weights {sources[0]!r} ({reason}); {hint}")

    @staticmethod
    def _check(cfg: GlimpseConfig, model: ModelInfo) -> None:
        got = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.has_cls, cfg.patches_per_token,
               cfg.vision_windowed)  # fmt: skip
        want = (model.n_layers, model.hidden_size, model.n_heads, model.has_cls, model.patches_per_token,
                model.vision_windowed)  # fmt: skip
        if got != want:
            raise ValueError(
                "glimpseprune weights are for (layers, hidden, heads, has_cls, patches_per_token, vision_windowed) = "
                f"{got}; the model: {want}"
            )
        if not max(cfg.selected_layers) <= cfg.reduce_layer <= model.n_layers - 1:
            raise ValueError(f"glimpseprune: selected_layers {cfg.selected_layers} / reduce_layer {cfg.reduce_layer}")
        if cfg.anchor_positions:
            raise ValueError("glimpseprune: anchor_positions are not supported")

    def save_weights(self, path: str | Path, model_type: str | None = None) -> None:
        """Write the current glimpse modules as ``config.json`` + ``new_modules_gp.pt`` (official layout).

        ``model_type``: the base model's ``config.model_type`` (`GlimpseModules.save`; None: as loaded/set)."""
        if getattr(self, "_modules", None) is None:
            raise ValueError("glimpseprune: no weights yet; call stages(model) first")
        self._modules.save(path, model_type)

    # --- the Pruner contract ------------------------------------------------------------------------
    def stages(self, model: ModelInfo) -> list[StageSpec]:
        cfg = self.modules_for(model).cfg
        blocks = cfg.vision_blocks()
        if not all(0 <= b < model.vision_depth for b in blocks):
            layers, depth = cfg.selected_visual_layers, model.vision_depth
            raise ValueError(f"glimpseprune: vision layers {layers} outside the {depth}-block tower")
        return [StageSpec(Stage.GLIMPSE, layer=cfg.reduce_layer, vision_layers=tuple(blocks))]

    def probe(self, model: ModelInfo) -> GlimpseProbe:
        modules = self.modules_for(model)
        vectors = modules.layer_vectors()  # (max(le_layers) + 1, d)
        layer_embeds = vectors[: modules.cfg.reduce_layer + 1].clone()
        layer_embeds[0] = 0  # layer 0's vector is the token's input embedding itself (official _append_le)
        return GlimpseProbe(vectors[0], layer_embeds, tuple(modules.cfg.selected_layers))

    def dynamic_cap(self) -> float | None:
        """The ``max_remain_ratio`` of the dynamic mode (None: uncapped)."""
        if is_dynamic(self.budget) and self.budget.value is not None:
            return self.budget.value
        return self.max_remain_ratio if self.max_remain_ratio is not None else self._modules.cfg.max_remain_ratio

    def is_dynamic(self) -> bool:
        return self.budget is None or is_dynamic(self.budget)

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return None if self.is_dynamic() else inputs.budget_count

    def vip_logits(self, spec: StageSpec, inputs: StageInputs, vip: VIP | None = None) -> torch.Tensor:
        """(n,) VIP logits from ``extras["probe_logits"]`` (layers, h, n) and the vision states.

        ``vip``: the module being trained (differentiable); None: a frozen float32 copy, no gradients.
        """
        cfg = self._modules.cfg
        attn = inputs.extras["probe_logits"].float()
        if not cfg.use_attention_logits:  # the LLaVA port: log-softmax over every key
            attn = attn - inputs.extras["probe_logsumexp"].float()[..., None]  # log-softmax over all keys
        n = attn.shape[-1]
        features = attn.permute(2, 0, 1).reshape(n, -1)  # (n, layers * h), official layer-major order
        conds = [inputs.vision_hidden[b].float().mean(dim=1) for b in spec.vision_layers]  # (n, d_v) each
        rc = inputs.token_rc.to(attn.device)
        tile = token_tiles(inputs).to(attn.device)
        if vip is not None:
            return vip(features, conds, rc, tile)
        with torch.no_grad():
            return self._vip(conds[0].shape[-1], attn.device)(features, conds, rc, tile)

    def _vip(self, vision_hidden_size: int, device: torch.device) -> VIP:
        key = (vision_hidden_size, str(device))
        if key not in self._vips:
            modules = self._modules
            if modules.cfg.vision_hidden_size != vision_hidden_size:
                if not (self.allow_untrained and not self.weights):
                    raise ValueError(
                        f"glimpseprune weights expect {modules.cfg.vision_hidden_size}-d vision states, "
                        f"got {vision_hidden_size}"
                    )
                modules.cfg = replace(modules.cfg, vision_hidden_size=vision_hidden_size)  # untrained: size it now
                modules.attn_fuser = init_official(VIP(modules.cfg), torch.Generator().manual_seed(self.seed + 1))
            self._vips[key] = copy.deepcopy(modules.attn_fuser).to(device).float().eval()
        return self._vips[key]

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        logits = self.vip_logits(spec, inputs)
        if self.is_dynamic():
            cfg = self._modules.cfg
            threshold = self.threshold if self.threshold is not None else cfg.reduce_threshold
            min_num = self.min_remain_num if self.min_remain_num is not None else cfg.min_remain_num
            index = keep_dynamic(logits, threshold, self.dynamic_cap(), min_num)
        else:
            index = top_tokens(logits, inputs.budget_count).sort().values
        return KeepDecision(index, scores=logits)
