"""GlimpsePrune's trainable parts: the glimpse-token embeddings and the VIP ("attn fuser").

Notation: ``n`` visual tokens, ``d`` LLM hidden size, ``d_v`` vision hidden size, ``h`` LLM heads,
``F`` fuser width (``attn_fuse_size``, 256), ``C`` condition width (``visual_cond_size``, 512),
``G`` fuser heads (``attn_fuse_num_heads``, 4), ``hd = (F + C) / G`` fuser head dim.

Behaviour read from the official code (HVision-NKU/GlimpsePrune): `AttnFuserV1`, `AttnFuserLayer`,
`CondSdpaAttention`, `MLP`, `_init_new_modules`, `_try_add_le`, `save_new_modules`/`load_new_modules` in
``transformers_gp/models/qwen2_5_vl/model_gp.py`` and ``llava_gp/model/language_model/llava_llama.py``.
Parameter names equal the official ones, so ``new_modules_gp.pt`` (a dict ``{"attn_fuser": state_dict,
"learnable_embeddings": Tensor (len(le_layers), le_length, d), "le_proj": state_dict, "le_norm":
state_dict}``) loads with ``strict=True``; ``config.json`` carries the base model's config and the GP settings
under their official keys, which is what the official ``load_new_modules`` reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
# official config keys tokbench does not use, written at their off values so the file has every official key:
# glimpse-embedding dropout (training) and the oracle / empty masks of the evaluation scripts
INFERENCE_OFF = {"le_dropout_prob": 0.0, "use_ref_masks": False, "use_zero_masks": False}
# The model capabilities a checkpoint is for (`GlimpseConfig`). Official checkpoints do not carry them but
# name their port in ``model_type``; these are the capabilities of the models each port was written for.
CAPABILITY_KEYS = ("has_cls", "patches_per_token", "vision_windowed")
LLAVA_PORT = {"has_cls": True, "patches_per_token": 1, "vision_windowed": False}  # LLaVA-1.5: CLIP ViT-L/14
QWEN_PORT = {"has_cls": False, "patches_per_token": 4, "vision_windowed": True}  # Qwen2.5-VL ViT
# ``model_type`` of the official GP configs by the base model's ``config.model_type``; other bases: "<type>_gp"
GP_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl_gp", "llava": "llava_llama_gp"}


def gp_model_type(model_type: str) -> str:
    """The GP ``model_type`` written for a base model's ``model_type``: ``llava -> llava_llama_gp``,
    ``qwen3_vl -> qwen3_vl_gp``; a GP type (``..._gp``) is returned as is."""
    if model_type.endswith("_gp"):
        return model_type
    return GP_MODEL_TYPES.get(model_type, f"{model_type}_gp")


def official_capabilities(raw: dict) -> dict:
    """The capability keys of an official ``config.json`` (no such keys; its port named by ``model_type``)."""
    model_type = str(raw.get("model_type", ""))
    if "llava" in model_type or "mm_vision_tower" in raw:
        return dict(LLAVA_PORT)
    if model_type.startswith("qwen2_5_vl"):
        return dict(QWEN_PORT)
    raise ValueError(
        f"glimpseprune: config.json has no {', '.join(CAPABILITY_KEYS)} and model_type {model_type!r} is not an "
        "official GlimpsePrune one (qwen2_5_vl_gp, llava_llama_gp)"
    )


@dataclass
class GlimpseConfig:
    """The official config keys GlimpsePrune reads (defaults: the shipped train configs), and the capabilities
    of the model the checkpoint is for (``has_cls``, ``patches_per_token``, ``vision_windowed``: `ModelInfo`'s).

    ``has_cls`` also fixes what ``selected_visual_layers`` count: ``hidden_states`` indices (0 = the patch
    embeddings, block ``b`` = ``b + 1``) on a tower with a CLS token, as the LLaVA port counts CLIP's; vision
    block indices otherwise, as the Qwen port does. ``vision_windowed`` lets ``attn_fuse_global = False``
    window the VIP as the Qwen port does (the LLaVA port has no windowed VIP).
    """

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vision_hidden_size: int  # official: vision_config.hidden_size (Qwen) / the CLIP tower's (LLaVA)
    reduce_layer: int
    selected_layers: tuple[int, ...]
    le_layers: tuple[int, ...]
    selected_visual_layers: tuple[int, ...]  # hidden_states indices with has_cls, else vision block indices
    has_cls: bool
    patches_per_token: int
    vision_windowed: bool
    rms_norm_eps: float = 1e-6
    use_attention_logits: bool = True  # Qwen port True (raw q.k), LLaVA port False (log-softmax)
    attn_fuse_global: bool = True  # full attention per tile (False, windowed towers: 4x4 windows of tokens)
    attn_fuse_type: str = "AttnFuserV1"
    attn_fuse_size: int = 256
    visual_cond_size: int = 512
    attn_fuse_num_heads: int = 4
    attn_fuse_hidden_act: str = "silu"
    deep_supervision: bool = False
    ori_attn_supervision: bool = False
    le_length: int = 1
    le_norm_type: str = "rmsnorm"
    reduce_threshold: float = 0.5
    min_remain_num: int | None = 1
    max_remain_ratio: float | None = None
    anchor_positions: tuple[str, ...] = ()

    def vision_blocks(self) -> tuple[int, ...]:
        """``selected_visual_layers`` as vision block indices (0-based block outputs)."""
        return tuple(v - 1 if self.has_cls else v for v in self.selected_visual_layers)

    def to_json(self, base: dict | None = None, model_type: str | None = None) -> dict:
        """``config.json`` as the official ``save_new_modules`` writes it: the base model's config with the
        GP keys (and the capability keys) at the top level, ``model_type`` = `gp_model_type` of
        ``model_type`` (the base model's ``config.model_type``, or a GP one), else of ``base["model_type"]``;
        neither: no ``model_type`` (tokbench reads the capability keys).

        The official ``load_new_modules`` replaces the whole model config with this file
        (``config_class.from_json_file``), so it must carry the base config (``image_token_id``,
        ``vision_config``, the text settings); `official_base` puts that in the layout of the official
        pin. Without ``base``, only the GP keys and the vision width (tokbench loads that; the official
        code does not).
        """
        gp = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        vision = {"hidden_size": gp.pop("vision_hidden_size")}
        gp.update(INFERENCE_OFF)
        model_type = model_type or (base or {}).get("model_type")
        if model_type:
            gp["model_type"] = gp_model_type(model_type)
        if base is None:
            return {**gp, "vision_config": vision}
        out = official_base(base)
        width = out.setdefault("vision_config", vision).get("hidden_size")
        if width != vision["hidden_size"]:
            raise ValueError(f"glimpseprune: the base config's vision width {width} is not {vision['hidden_size']}")
        return {**out, **gp}

    @classmethod
    def from_json(cls, raw: dict, vision_hidden_size: int) -> GlimpseConfig:
        """Read an official ``config.json`` (text settings top level or under ``text_config``)."""
        text = raw.get("text_config") or {}
        known = {f.name for f in fields(cls)}
        values = {k: raw[k] if k in raw else text[k] for k in known if k in raw or k in text}
        if not all(key in values for key in CAPABILITY_KEYS):
            values.update(official_capabilities(raw))
        values["vision_hidden_size"] = vision_hidden_size
        for key in ("selected_layers", "le_layers", "selected_visual_layers", "anchor_positions"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)


def official_base(config: dict) -> dict:
    """A base model's config (``PretrainedConfig.to_dict()``) in the layout the official code reads.

    GlimpsePrune pins transformers 4.51, whose Qwen2.5-VL config takes the text settings at the top level
    and M-RoPE as ``rope_theta`` + ``rope_scaling`` ``{"type": "mrope", "mrope_section": ...}``. Newer
    transformers nest them under ``text_config`` with ``rope_parameters``; both forms are written (newer
    readers take ``text_config``, older ones the top level). Top-level values win over nested ones.
    """
    out = json.loads(json.dumps(config))  # a deep copy of plain JSON values
    text = out.get("text_config") or {}
    for key, value in text.items():
        if key not in ("model_type", "architectures", "transformers_version"):
            out.setdefault(key, value)
    rope = out.get("rope_parameters") or {}
    if "mrope_section" in rope and not out.get("rope_scaling"):
        out["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    if "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
    return out


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` in float32 (Qwen2RMSNorm / LlamaRMSNorm)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, size: int, inner: int, act: str):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(size, inner), nn.Linear(size, inner)
        self.down_proj = nn.Linear(inner, size)
        self.act = _ACT[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class CondAttention(nn.Module):
    """Self-attention whose q/k see ``[hidden, condition]`` and whose v sees ``hidden`` only."""

    def __init__(self, size: int, cond: int, heads: int):
        super().__init__()
        self.q_proj = nn.Linear(size + cond, size + cond, bias=False)
        self.k_proj = nn.Linear(size + cond, size + cond, bias=False)
        self.v_proj = nn.Linear(size, size, bias=False)
        self.o_proj = nn.Linear(size, size, bias=False)
        self.heads = heads

    def forward(self, x, cond, cos, sin, group):
        """x (n, F), cond (n, C), cos/sin (n, hd), group (n,) long: tokens attend within their group -> (n, F)."""
        n = x.shape[0]
        qk_in = torch.cat([x, cond], dim=-1)
        q = self.q_proj(qk_in).view(n, self.heads, -1).float()  # (n, G, hd)
        k = self.k_proj(qk_in).view(n, self.heads, -1).float()
        v = self.v_proj(x).view(n, self.heads, -1)  # (n, G, F / G)
        q = (q * cos[:, None] + rotate_half(q) * sin[:, None]).to(x.dtype)  # 2-D vision RoPE
        k = (k * cos[:, None] + rotate_half(k) * sin[:, None]).to(x.dtype)
        out = grouped_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), group)
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Attention within groups without an (n, n) mask: q, k (h, n, e), v (h, n, e_v), group (n,) -> (h, n, e_v).

    One group: plain SDPA. Several: tokens are sorted by group into a padded (groups, h, size, e) batch
    with a key-padding mask, so memory is O(n * largest group) (the official code's per-window
    ``cu_seqlens``). Example: group [0 1 0 1] -> batch [[t0 t2], [t1 t3]].
    """
    e_v = v.shape[-1]
    if e_v < q.shape[-1]:  # equal head sizes let SDPA use its fused kernel (no (n, n) scores, on CPU too)
        v = F.pad(v, (0, q.shape[-1] - e_v))
    order = torch.argsort(group, stable=True)
    _, counts = torch.unique_consecutive(group[order], return_counts=True)
    if len(counts) == 1:
        return F.scaled_dot_product_attention(q, k, v)[..., :e_v]
    n_groups, size = len(counts), int(counts.max())
    batch = torch.repeat_interleave(torch.arange(n_groups, device=q.device), counts)  # (n,) in sorted order
    slot = torch.arange(len(order), device=q.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(n_groups, size, x.shape[0], x.shape[-1])
        out[batch, slot] = x[:, order].transpose(0, 1)
        return out.transpose(1, 2)  # (groups, h, size, e)

    valid = torch.zeros(n_groups, size, dtype=torch.bool, device=q.device)
    valid[batch, slot] = True
    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=valid[:, None, None, :])
    result = torch.empty(q.shape[0], len(order), e_v, dtype=out.dtype, device=out.device)
    result[:, order] = out.transpose(1, 2)[batch, slot].transpose(0, 1)[..., :e_v]
    return result


class FuserLayer(nn.Module):
    def __init__(self, size: int, cond: int, heads: int, act: str):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(size, 1e-6), RMSNorm(size, 1e-6)
        self.attn = CondAttention(size, cond, heads)
        self.mlp = MLP(size, size * 2, act)

    def forward(self, x, cond, cos, sin, group):
        x = x + self.attn(self.norm1(x), cond, cos, sin, group)
        return x + self.mlp(self.norm2(x))


class VIP(nn.Module):
    """The visual-token importance predictor (official ``AttnFuserV1``): one logit per visual token.

    ``attn_in_proj`` lifts the probe's attention features (n, layers*h) to F; layer ``i`` conditions on
    vision block ``selected_visual_layers[i]`` (deepest first) through ``cond_in_projs[i]``; the last
    ``attn_out_projs`` entry (earlier ones are Identity unless ``deep_supervision``) gives the logits.
    """

    def __init__(self, cfg: GlimpseConfig):
        super().__init__()
        if cfg.attn_fuse_type != "AttnFuserV1":
            raise ValueError(f"glimpseprune: attn_fuse_type {cfg.attn_fuse_type!r} is not supported (AttnFuserV1)")
        layers = len(cfg.selected_visual_layers)
        size, cond, heads = cfg.attn_fuse_size, cfg.visual_cond_size, cfg.attn_fuse_num_heads
        if (size + cond) % heads:
            raise ValueError(f"glimpseprune: attn_fuse_size + visual_cond_size must divide by {heads} heads")
        self.attn_in_proj = nn.Linear(len(cfg.selected_layers) * cfg.num_attention_heads, size)
        self.cond_in_projs = nn.ModuleList(nn.Linear(cfg.vision_hidden_size, cond) for _ in range(layers))
        self.layers = nn.ModuleList(FuserLayer(size, cond, heads, cfg.attn_fuse_hidden_act) for _ in range(layers))
        last = [cfg.deep_supervision or i == layers - 1 for i in range(layers)]
        self.attn_out_projs = nn.ModuleList(nn.Linear(size, 1) if out else nn.Identity() for out in last)
        self.head_dim = (size + cond) // heads
        self.windowed = cfg.vision_windowed and not cfg.attn_fuse_global

    def rope(self, token_rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (n, hd): row then column frequencies over hd/4 each, duplicated (Qwen vision RoPE)."""
        dim = self.head_dim // 2
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float, device=token_rc.device) / dim))
        angles = (token_rc.float()[:, :, None] * inv_freq).flatten(1)  # (n, 2 * dim/2): rows, then cols
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, attn: torch.Tensor, conds: list[torch.Tensor], token_rc: torch.Tensor, tile_id: torch.Tensor):
        """attn (n, layers*h), conds[i] (n, d_v), token_rc (n, 2) row/col within the tile, tile_id (n,) -> logits (n,).

        Tokens attend within their own tile (the official per-image ``cu_seqlens``: one tile per image
        there), with 2-D RoPE over their row/col in it, and within their 4x4-token window of the tile
        when the fuser is windowed (windowed tower, ``attn_fuse_global`` False).
        """
        group = tile_id.long()
        if self.windowed:
            window = token_rc.long() // 4
            span = int(window.max()) + 1
            group = (group * span + window[:, 0]) * span + window[:, 1]
        cos, sin = self.rope(token_rc)
        hidden = self.attn_in_proj(attn)  # (n, F)
        for cond_proj, layer, cond in zip(self.cond_in_projs, self.layers, conds):
            hidden = layer(hidden, cond_proj(cond), cos, sin, group)
        return self.attn_out_projs[-1](hidden)[:, 0]


@torch.no_grad()
def init_official(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """The official ``_init_weights`` for new modules: unit norms, zero biases, Xavier-uniform matrices."""
    for name, param in module.named_parameters():
        if "norm" in name or name.endswith("bias"):
            param.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        else:
            bound = math.sqrt(6.0 / (param.shape[0] + param.shape[1]))
            param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)
    return module


class GlimpseModules(nn.Module):
    """Everything GlimpsePrune trains: the VIP and the per-layer glimpse embeddings (+ Linear, norm)."""

    def __init__(self, cfg: GlimpseConfig):
        super().__init__()
        if cfg.le_length != 1:
            raise ValueError(f"glimpseprune: le_length {cfg.le_length} is not supported (one glimpse token)")
        if 0 not in cfg.le_layers:
            raise ValueError("glimpseprune: le_layers must include 0 (the glimpse token's input embedding)")
        self.cfg = cfg
        self.attn_fuser = VIP(cfg)
        d = cfg.hidden_size
        self.learnable_embeddings = nn.Parameter(torch.zeros(len(cfg.le_layers), cfg.le_length, d))
        self.le_proj = nn.Linear(d, d)
        norm = {"rmsnorm": lambda: RMSNorm(d, cfg.rms_norm_eps), "layernorm": lambda: nn.LayerNorm(d)}
        self.le_norm = norm[cfg.le_norm_type]()
        self.base_config: dict | None = None  # the base model's config, written with the GP keys (`save`)
        self.model_type: str | None = None  # the ``model_type`` of the file `load` read (`save`'s default)

    def init_untrained(self, seed: int) -> GlimpseModules:
        """Random official initialisation: Linear/norm from ``seed``, VIP ``seed + 1``, embeddings ``seed + 2``."""
        init_official(self.attn_fuser, torch.Generator().manual_seed(seed + 1))
        glimpse = nn.ModuleDict({"le_proj": self.le_proj, "le_norm": self.le_norm})
        init_official(glimpse, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 2)
            self.learnable_embeddings.copy_(torch.randn(self.learnable_embeddings.shape, generator=g) * 0.02)
        return self

    def layer_vectors(self) -> torch.Tensor:
        """(max(le_layers) + 1, d): row ``l`` = ``le_norm(le_proj(learnable_embeddings[le_layers.index(l)]))``
        (official ``_append_le`` for layer 0, ``_try_add_le`` before layer ``l > 0``), zero elsewhere.
        Differentiable while the modules are in training mode (`tokbench.train.glimpse`)."""
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            effective = self.le_norm(self.le_proj(self.learnable_embeddings[:, 0].float()))  # (len(le_layers), d)
            out = torch.zeros(max(self.cfg.le_layers) + 1, self.cfg.hidden_size, device=effective.device)
            return out.index_copy(0, torch.tensor(self.cfg.le_layers, device=effective.device), effective)

    def official_state(self) -> dict:
        return {
            "attn_fuser": self.attn_fuser.state_dict(),
            "learnable_embeddings": self.learnable_embeddings.data,
            "le_proj": self.le_proj.state_dict(),
            "le_norm": self.le_norm.state_dict(),
        }

    def save(self, directory: str | Path, model_type: str | None = None) -> None:
        """Write ``config.json`` + ``new_modules_gp.pt`` as the official ``save_new_modules`` does.

        ``config.json`` is ``base_config`` (set by `load` from the file read, or by the trainer from the
        model) with the GP keys; without a ``base_config`` it holds the GP keys only (see `GlimpseConfig.to_json`).
        ``model_type``: the base model's ``config.model_type`` (``qwen2_5_vl`` -> ``qwen2_5_vl_gp``, ``llava`` ->
        ``llava_llama_gp``, other ``t`` -> ``t_gp``) or a GP one; None: the file read's, else ``base_config``'s.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.cfg.to_json(self.base_config, model_type or self.model_type)
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        torch.save(self.official_state(), directory / "new_modules_gp.pt")

    @classmethod
    def load(cls, directory: str | Path) -> GlimpseModules:
        """Read an official checkpoint directory (strict key and shape match)."""
        directory = Path(directory)
        state = torch.load(directory / "new_modules_gp.pt", map_location="cpu", weights_only=True)
        fuser = dict(state["attn_fuser"])
        fuser.pop("rotary_pos_emb.inv_freq", None)  # a non-persistent buffer; tolerated if present
        vision_hidden_size = fuser["cond_in_projs.0.weight"].shape[1]
        raw = json.loads((directory / "config.json").read_text())
        cfg = GlimpseConfig.from_json(raw, vision_hidden_size)
        modules = cls(cfg)
        if set(raw) - set(cfg.to_json()) - {"model_type"}:  # a full model config (official, or tokbench's)
            modules.base_config = raw  # written back by `save`
        modules.model_type = raw.get("model_type")
        modules.attn_fuser.load_state_dict(fuser, strict=True)
        with torch.no_grad():
            modules.learnable_embeddings.copy_(state["learnable_embeddings"])
        modules.le_proj.load_state_dict(state["le_proj"], strict=True)
        modules.le_norm.load_state_dict(state["le_norm"], strict=True)
        return modules.float().eval()
