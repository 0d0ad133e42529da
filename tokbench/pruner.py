"""The `Pruner` contract: methods choose which visual tokens to keep, the engine drops them.

Notation: ``n`` visual tokens of one sample at the current stage, ``d`` LLM hidden size,
``d_v`` vision-tower hidden size, ``h`` attention heads, ``u`` vision patches per LLM token
(4 for Qwen2.5-VL's 2x2 merge, 1 for LLaVA).

A method is a small, pure object: it declares the stages it acts at and, for each stage the engine
reaches, returns a `KeepDecision` for one sample from a `StageInputs`. It never touches the model.
Methods register by name with `@register_method("name")`; third parties add theirs through the
``tokbench.methods`` entry-point group (``name = "package.module:Class"``).
"""

from __future__ import annotations

import difflib
import enum
import importlib
import math
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch stays unimported for `tokbench --help` and `tokbench list`
    import torch


class Stage(str, enum.Enum):
    """Where in the forward pass a method acts (see DESIGN.md, "Stages a method can act at")."""

    INPUT = "input"  # before preprocessing: may change the image itself (downsample)
    VISION = "vision"  # after the vision tower, with its hidden states at chosen blocks
    EMBED = "embed"  # on visual tokens in LLM space, before LLM layer 0
    GLIMPSE = "glimpse"  # probe-token prefill up to layer K, drop from the KV cache of 0..K too
    LLM = "llm"  # after decoder layer k (hidden states + last-token attention)


@dataclass(frozen=True)
class StageSpec:
    """A stage plus its settings.

    layer (int): for `llm` and `glimpse`, the decoder layer (0-based) after which tokens are dropped;
        layers ``> layer`` see the reduced sequence.
    attention_from (str): for `llm`, which projections score the last prompt token's attention:
        ``"same"`` = layer ``layer``'s own (FastV), ``"next"`` = layer ``layer + 1``'s applied to layer
        ``layer``'s output (PyramidDrop), ``"none"`` = no attention row (methods that need none, and the
        benchmark's zero-cost oracles).
    attention_rope (bool): apply rotary embeddings to q/k when scoring (VScan's Qwen port does not).
    vision_layers (tuple[int, ...]): vision-tower blocks whose outputs the method reads (`vision`,
        `glimpse`), 0-based or negative from the end.
    prompt_context (bool): for `llm`, also hand the method the prompt after the image, from layer
        ``layer``'s own projections on its input (``StageInputs.extras``): ``visual_keys`` (n, h_kv, hd)
        and ``text_keys`` (m, h_kv, hd) with RoPE, ``prompt_attention`` (m, h, n) causal softmax rows
        of the m prompt tokens after the image, ``text_hidden_states`` (m, d) leaving the layer,
        ``prompt_embeds`` (m, d) and ``visual_input_embeds`` (n0, d) entering layer 0, and
        ``final_norm_weight`` (d,) (DART, SparseVLM).
    vision_attention (tuple[int, ...]): vision-tower blocks whose attention statistics the method reads
        (`StageInputs.extras["vision_attention"][block]`: ``received`` (n,), ``keys`` (n, u, h, hd),
        and for CLIP towers ``cls`` (h, n)), same indexing.
    """

    stage: Stage
    layer: int | None = None
    attention_from: str = "same"
    attention_rope: bool = True
    vision_layers: tuple[int, ...] = ()
    vision_attention: tuple[int, ...] = ()
    prompt_context: bool = False

    def __str__(self) -> str:
        return self.stage.value if self.layer is None else f"{self.stage.value}({self.layer})"


@dataclass
class GlimpseProbe:
    """The temporary query token a `glimpse` stage appends after the prompt.

    token_embed (Tensor, (d,)): its input embedding.
    layer_embeds (Tensor, (n, d) | None): added to its hidden state before each decoder layer
        ``0..n-1`` (n <= glimpse layer + 1).
    attention_layers (tuple[int, ...]): layers whose probe-to-visual attention the method reads; the
        stage's `StageInputs.extras["probe_logits"]` holds them as (len(layers), h, n) raw logits, and
        ``extras["probe_logsumexp"]`` (len(layers), h) their logsumexp over every key the probe attends to.
    """

    token_embed: torch.Tensor
    layer_embeds: torch.Tensor | None
    attention_layers: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the model a method may use to pick its stages (never the model itself, never a family name).

    name: alias, hub id or path as given; n_layers, hidden_size, n_heads: the LLM decoder's; vision_depth:
    vision-tower blocks; vision_feature_layer: the block whose output feeds the projector (-2 for
    LLaVA-1.5, -1 for Qwen2.5-VL); vision_full_attention: blocks with full (not windowed) attention;
    patches_per_token: ``u`` (4 for Qwen2.5-VL, 1 for LLaVA); vision_hidden_size: the tower's width ``d_v``
    (None where unknown); has_cls: the tower prepends a CLS token (``stats["cls"]`` (h, n) and
    ``StageInputs.extras["cls"]`` exist); tiles_per_image: the most token grids one image can produce;
    position_rows: 3 = M-RoPE (Qwen-VL), 1 = 1-D RoPE.
    """

    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    vision_depth: int
    vision_feature_layer: int
    vision_full_attention: tuple[int, ...]
    patches_per_token: int
    vision_hidden_size: int | None = None
    has_cls: bool = False
    tiles_per_image: int = 1
    position_rows: int = 1

    @property
    def vision_windowed(self) -> bool:
        """Some vision blocks use windowed attention (``vision_full_attention`` is not every block)."""
        return set(self.vision_full_attention) != set(range(self.vision_depth))


class BudgetError(ValueError):
    """A budget that cannot be applied (bad ratio, count < 1, more tokens than the image has)."""


@dataclass(frozen=True)
class Budget:
    """How many visual tokens a method may keep: a ratio in (0, 1], an absolute count, or dynamic.

    ``Budget.ratio(0.25).count(576) == 144``; ``Budget.tokens(64).count(576) == 64``;
    a dynamic budget leaves the count to the method (``count`` returns ``None``), optionally
    capped by ``value`` as a ratio.
    """

    kind: str  # "ratio" | "count" | "dynamic"
    value: float | None = None

    @classmethod
    def ratio(cls, value: float) -> Budget:
        if not (0.0 < float(value) <= 1.0) or math.isnan(float(value)):
            raise BudgetError(f"ratio {value} is outside (0, 1]; pass e.g. --ratio 0.25")
        return cls("ratio", float(value))

    @classmethod
    def tokens(cls, value: int) -> Budget:
        if int(value) != value or int(value) < 1:
            raise BudgetError(f"budget {value} must be a whole number of tokens >= 1; pass e.g. --budget 64")
        return cls("count", int(value))

    @classmethod
    def dynamic(cls, cap_ratio: float | None = None) -> Budget:
        if cap_ratio is not None:
            Budget.ratio(cap_ratio)
        return cls("dynamic", cap_ratio)

    @classmethod
    def full(cls) -> Budget:
        """Keep every visual token: an explicit ratio 1.0 (no budget given is ``None``, not this)."""
        return cls("ratio", 1.0)

    def count(self, n_visual: int) -> int | None:
        """Tokens to keep out of ``n_visual``; ``None`` for a dynamic budget."""
        if self.kind == "dynamic":
            return None
        if self.kind == "ratio":
            return max(1, min(n_visual, round(self.value * n_visual)))
        if self.value > n_visual:
            raise BudgetError(f"budget {int(self.value)} exceeds the {n_visual} visual tokens of this image")
        return int(self.value)

    def label(self) -> str:
        if self.kind == "ratio":
            return f"r{self.value:g}"
        if self.kind == "count":
            return f"n{int(self.value)}"
        return "dynamic" if self.value is None else f"dyn{self.value:g}"


@dataclass
class StageInputs:
    """What the engine hands a method for one sample at one stage. Fields a stage lacks are ``None``.

    n_visual (int): visual tokens of this sample at this stage (after earlier drops).
    n_visual_original (int): visual tokens the image produced.
    tile_grids (list[tuple[int, int]]): every token grid (rows, cols) of the sample in LLM tokens: images
        in order, tiles in order.
    token_rc (LongTensor, (n, 2)): row/col of each current visual token within its tile.
    budget_count (int | None): tokens to keep out of ``n_visual_original`` (None for dynamic budgets).
    question (str): the sample's question text (instruction-aware methods).
    instruction_embeds (Tensor, (m, d)): the question's tokens in LLM input space (`embed`, `vision`).
    visual_embeds (Tensor, (n, d)): visual tokens in LLM input space (`embed`, `vision`).
    vision_hidden (dict[int, Tensor (n, u, d_v)]): vision-tower block outputs per requested block
        (`vision`), in LLM-token order, ``u`` patches per token.
    hidden_states (Tensor, (n, d)): visual tokens' hidden states after layer ``k`` (`llm`, `glimpse`).
    text_attention (Tensor, (h, n)): softmax attention of the last prompt token to the visual tokens
        at layer ``k`` (`llm`), or of the probe token at layer ``k`` (`glimpse`); over all keys.
    text_logits (Tensor, (h, n)): the same row as raw q.k/sqrt(head_dim) logits.
    generator (torch.Generator): seeded per sample for methods that sample.
    extras (dict): model- or stage-specific additions (documented where set).
    token_tile (LongTensor, (n,) | None): index into ``tile_grids`` of each current visual token.
    token_image (LongTensor, (n,) | None): image index in the sample of each current visual token.
        Both ``None`` = all zeros (one image, one tile); the engine always sets them.
    A budget is over all visual tokens of the sample (every image, every tile).
    """

    n_visual: int
    n_visual_original: int
    tile_grids: list[tuple[int, int]]
    token_rc: torch.Tensor
    budget_count: int | None
    question: str = ""
    instruction_embeds: torch.Tensor | None = None
    visual_embeds: torch.Tensor | None = None
    vision_hidden: dict[int, torch.Tensor] | None = None
    hidden_states: torch.Tensor | None = None
    text_attention: torch.Tensor | None = None
    text_logits: torch.Tensor | None = None
    generator: torch.Generator | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    token_tile: torch.Tensor | None = None
    token_image: torch.Tensor | None = None


@dataclass
class KeepDecision:
    """A method's answer for one sample at one stage.

    keep_index (LongTensor, (n_kept,)): indices into the stage's current visual tokens, sorted, unique.
    states (Tensor, (n_kept, d) | None): replacement states for the kept tokens in LLM space.
    vision_states (Tensor, (n_kept, u, d_v) | None): replacement states in the space of the vision
        layer that feeds the projector (merging in the vision tower, as VisionZip and VScan do); the
        engine passes them through the model's projector. At most one of the two is set.
    scores (Tensor, (n,) | None): per-token scores, kept for figures; optional.
    """

    keep_index: torch.Tensor
    states: torch.Tensor | None = None
    vision_states: torch.Tensor | None = None
    scores: torch.Tensor | None = None


@runtime_checkable
class Pruner(Protocol):
    """The method contract. See `methods/full.py` for the reference implementation.

    Required: ``name``, ``version``, ``budget``, `stages`, `stage_count`, `select`. Optional, with the
    defaults below (a method that subclasses `Pruner` inherits them; `register_method` and entry-point
    loading give them to one that does not): ``headline_retention``, ``position_policy``, `probe`.

    budget (Budget | None): what the user asked for; ``None`` = none given (the method's own default:
        keep everything, GlimpsePrune's dynamic keep, PyramidDrop's fixed ``lam``).
    headline_retention (str): the retention figure the budget is defined on: ``"input"`` (pre-LLM
        methods), ``"final"`` (GlimpsePrune) or ``"layer_avg"`` (FastV, PyramidDrop, VScan).
    position_policy (str | None): ``"keep"`` or ``"reindex"`` positions after a drop when the method's
        official code fixes one; ``None`` = the model family's default.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    budget: Budget | None
    headline_retention: ClassVar[str] = "input"
    position_policy: ClassVar[str | None] = None

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        """The stages this method acts at on ``model``, in forward order."""
        ...

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        """Tokens this stage should leave (None: the method decides, e.g. dynamic budgets)."""
        ...

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        """Choose the visual tokens to keep at ``spec`` for one sample."""
        ...

    def probe(self, model: ModelInfo) -> GlimpseProbe | None:
        """The query token a `glimpse` stage appends (methods with such a stage); None otherwise."""
        return None


_OPTIONAL = {"headline_retention": "input", "position_policy": None, "probe": Pruner.probe}


def _with_defaults(cls: type) -> type:
    """Give a method class the optional `Pruner` members it does not define (their protocol defaults)."""
    for key, default in _OPTIONAL.items():
        if not hasattr(cls, key):
            setattr(cls, key, default)
    return cls


def probe_for(method: Pruner, model: ModelInfo) -> GlimpseProbe | None:
    """The glimpse probe of a method that has a `glimpse` stage (its ``probe(model)``), else None.

    Registered methods always have ``probe`` (the protocol's default); the lookup serves classes used
    without registering (test doubles, the overhead benchmark's oracle) until they subclass `Pruner`.
    """
    make = getattr(method, "probe", None)
    return None if make is None else make(model)


def budget_count(budget: Budget | None, n_visual: int) -> int | None:
    """Tokens to keep out of ``n_visual``: ``budget.count(n_visual)``; no budget given keeps all of them."""
    return n_visual if budget is None else budget.count(n_visual)


def fixed_ratio(budget: Budget | None) -> float | None:
    """The ratio a budget asks for: a ratio budget's value, 1.0 when none was given, None for counts/dynamic."""
    if budget is None:
        return 1.0
    return budget.value if budget.kind == "ratio" else None


def is_dynamic(budget: Budget | None) -> bool:
    return budget is not None and budget.kind == "dynamic"


def budget_label(budget: Budget | None) -> str:
    """The label runs and records carry; no budget given is ``"r1"``, as `Budget.full()` was (run ids stay)."""
    return "r1" if budget is None else budget.label()


class MethodError(ValueError):
    """Unknown method, or arguments a method does not accept (or cannot use on this model)."""


def plan_stages(method: Pruner, model: ModelInfo) -> list[StageSpec]:
    """``method.stages(model)``, checked against ``model`` the way the engine will use them.

    Runs on a `ModelInfo` built from the model's config alone (`tokbench.models.config_info`), so bad
    method arguments, layers outside the model and budgets the method cannot reach are refused before
    any weights load. A method's own ``ValueError`` becomes a `MethodError` (a `BudgetError` stays one).
    """
    try:
        specs = method.stages(model)
    except (MethodError, BudgetError):
        raise
    except ValueError as err:
        raise MethodError(str(err)) from None
    for spec in specs:
        _check_spec(method, spec, model)
    return specs


def _check_spec(method: Pruner, spec: StageSpec, model: ModelInfo) -> None:
    """The engine's and adapters' requirements on one stage, as one-line `MethodError`s."""
    name = method.name
    if spec.stage in (Stage.LLM, Stage.GLIMPSE):
        last = model.n_layers - (2 if spec.attention_from == "next" else 1)
        if spec.layer is None or not 0 <= spec.layer <= last:
            raise MethodError(f"{name}: stage {spec} is outside layers 0..{last} of the {model.n_layers}-layer model")
    if spec.stage == Stage.GLIMPSE and probe_for(method, model) is None:
        raise MethodError(f"{name}: a glimpse stage needs a probe() method")
    depth = model.vision_depth
    for block in (*spec.vision_layers, *spec.vision_attention):
        if not -depth <= block < depth:
            raise MethodError(f"{name}: vision block {block} is outside the {depth}-block vision tower")
    for block in spec.vision_attention:
        if block % depth not in model.vision_full_attention:
            raise MethodError(
                f"{name}: vision block {block} uses window attention; attention statistics need a full-attention "
                f"block ({', '.join(map(str, model.vision_full_attention))})"
            )


_REGISTRY: dict[str, str | type] = {}

# Built-in methods by lazy target; importing them needs torch only when resolved.
_BUILTIN: dict[str, str] = {
    "full": "methods.full:Full",
    "random": "methods.random_drop:Random",
    "fastv": "methods.fastv:FastV",
    "pool": "methods.pool:Pool",
    "downsample": "methods.downsample:Downsample",
    "visionzip": "methods.visionzip:VisionZip",
    "vscan": "methods.vscan:VScan",
    "pyramiddrop": "methods.pyramiddrop:PyramidDrop",
    "glimpseprune": "methods.glimpseprune:GlimpsePrune",
    "divprune": "methods.divprune:DivPrune",
    "cdpruner": "methods.cdpruner:CDPruner",
    "dart": "methods.dart:DART",
    "vispruner": "methods.vispruner:VisPruner",
    "sparsevlm": "methods.sparsevlm:SparseVLM",
}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: register a `Pruner` under ``name``. A second, different target is an error."""

    def wrap(cls: type) -> type:
        current = _REGISTRY.get(name)
        if current is not None and current is not cls and not _same_target(current, cls):
            raise MethodError(f"method name {name!r} is already registered to {current}")
        _REGISTRY[name] = cls
        cls.name = name
        return _with_defaults(cls)

    return wrap


def _same_target(target: str | type, cls: type) -> bool:
    return isinstance(target, str) and target == f"{cls.__module__}:{cls.__qualname__}"


def _all_targets() -> dict[str, str | type]:
    targets: dict[str, str | type] = dict(_BUILTIN)
    for ep in entry_points(group="tokbench.methods"):
        targets.setdefault(ep.name, ep.value)
    targets.update(_REGISTRY)
    return targets


def method_names() -> list[str]:
    """All registered method names, without importing any method module."""
    return sorted(_all_targets())


def get_method_class(name: str) -> type:
    """Resolve a method name to its class, importing lazily; unknown names suggest close matches."""
    targets = _all_targets()
    if name not in targets:
        close = difflib.get_close_matches(name, targets, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise MethodError(f"unknown method {name!r}; {hint}known methods: {', '.join(sorted(targets))}")
    target = targets[name]
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        target = _with_defaults(getattr(importlib.import_module(module_name), attr))
        _REGISTRY[name] = target
    return target


def build_method(name: str, budget: Budget | None, args: dict[str, str] | None = None) -> Pruner:
    """Instantiate method ``name`` with ``budget`` and string ``args`` (from ``--method-arg k=v``).

    Arguments are converted to the types of the class's dataclass fields; unknown keys are an error.
    """
    cls = get_method_class(name)
    fields = {k: f for k, f in getattr(cls, "__dataclass_fields__", {}).items() if f.init}
    kwargs: dict[str, Any] = {}
    for key, raw in (args or {}).items():
        if key not in fields or key == "budget":
            allowed = sorted(k for k in fields if k != "budget")
            raise MethodError(
                f"method {name!r} does not accept argument {key!r}; it accepts: {', '.join(allowed) or 'none'}"
            )
        kwargs[key] = _convert(raw, fields[key].type, name, key)
    kwargs["budget"] = budget
    return cls(**kwargs)


def _convert(raw: Any, annotation: Any, method: str, key: str) -> Any:
    if not isinstance(raw, str):
        return raw
    text = str(annotation)
    try:
        if "bool" in text:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if "int" in text and "float" not in text:
            return int(raw)
        if "float" in text:
            return float(raw)
    except ValueError:
        raise MethodError(f"method {method!r}: argument {key}={raw!r} is not a valid {text}") from None
    return raw


def method_config(method: Pruner) -> dict[str, Any]:
    """The method's settings as plain values, for manifests."""
    fields = [k for k, f in getattr(method, "__dataclass_fields__", {}).items() if f.init]
    out: dict[str, Any] = {"name": method.name, "version": method.version}
    for key in fields:
        value = getattr(method, key)
        out[key] = budget_label(value) if key == "budget" or isinstance(value, Budget) else value
    return out
