"""The batch being prefilled, its per-layer KV cache, and the one operation that drops tokens from both.

Notation: ``b`` batch, ``L`` current sequence length, ``d`` hidden size, ``P`` position rows,
``h_kv`` key/value heads, ``hd`` head dim.

Dropping re-left-pads: each row's surviving tokens keep their order and are right-aligned, so the last
prompt token stays at ``L - 1`` for every row. Toy example (one row, ``.`` is padding)::

    tokens   [. T V V V V T]      keep V1, V3 (and all text)
    ->       [. . . T V V T]      gather_index [0, 0, 0, 1, 3, 5, 6], valid [F F F T T T T]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def compaction_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that gather the kept tokens of each row, right-aligned (left padding).

    keep (BoolTensor, (b, L)) -> gather_index (LongTensor, (b, L')), valid (BoolTensor, (b, L')),
    with ``L' = keep.sum(1).max()``. Padding slots gather index 0 and are ``valid == False``.
    """
    b, length = keep.shape
    arange = torch.arange(length, device=keep.device).expand(b, length)
    key = torch.where(keep, arange, torch.full_like(arange, -1))
    key, _ = key.sort(dim=1)  # padding (-1) first, kept indices ascending after
    new_length = int(keep.sum(1).max())
    key = key[:, length - new_length :]
    valid = key >= 0
    return key.clamp(min=0), valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (b, L, ...) gathered along dim 1 with index (b, L') -> (b, L', ...)."""
    view = index.view(*index.shape, *([1] * (x.ndim - 2)))
    return x.gather(1, view.expand(*index.shape, *x.shape[2:]))


def gather_heads(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (b, h, L, hd) gathered along dim 2 with index (b, L') -> (b, h, L', hd)."""
    b, h, _, hd = x.shape
    return x.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], hd))


class LayerKVCache:
    """Per-layer key/value tensors that may differ in length between layers.

    Decoder layers call ``update(keys, values, layer_idx)`` exactly as on a transformers ``Cache``.
    keys[l], values[l] (Tensor, (b, h_kv, L_l, hd)); valid[l] (BoolTensor, (b, L_l)).
    """

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.valid: list[torch.Tensor | None] = [None] * n_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        keys = self.keys[layer_idx]
        return 0 if keys is None else keys.shape[-2]

    def compact(self, layer_idx: int, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep only the tokens ``index`` (b, L') of layer ``layer_idx``'s cache."""
        self.keys[layer_idx] = gather_heads(self.keys[layer_idx], index)
        self.values[layer_idx] = gather_heads(self.values[layer_idx], index)
        self.valid[layer_idx] = valid

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


@dataclass
class Sequence:
    """The prefill state of a batch between two decoder layers.

    hidden (Tensor, (b, L, d)); positions (LongTensor, (P, b, L)); valid (BoolTensor, (b, L));
    visual_index (LongTensor, (b, L)): the original index of each visual token, -1 for text/padding;
    scratch (BoolTensor, (b, L)): tokens a stage handler appended for its own scoring (GlimpsePrune's
        probe token); never kept by a drop, never counted in sequence lengths.
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    visual_index: torch.Tensor
    scratch: torch.Tensor

    def to(self, device: torch.device) -> None:
        """Move every tensor to ``device`` (the next decoder layer's, under a device map)."""
        for name in ("hidden", "positions", "valid", "visual_index", "scratch"):
            setattr(self, name, getattr(self, name).to(device))

    def append_scratch(self, embeds: torch.Tensor) -> None:
        """Append one scratch token per row, embeds (b, 1, d), after the last position (id last + 1 in
        every position row)."""
        b = embeds.shape[0]
        self.hidden = torch.cat([self.hidden, embeds], dim=1)
        self.positions = torch.cat([self.positions, self.next_positions()], dim=2)
        ones = torch.ones(b, 1, dtype=torch.bool, device=self.valid.device)
        self.valid = torch.cat([self.valid, ones], dim=1)
        self.visual_index = torch.cat([self.visual_index, torch.full_like(ones, -1, dtype=torch.long)], dim=1)
        self.scratch = torch.cat([self.scratch, ones], dim=1)

    @property
    def is_visual(self) -> torch.Tensor:
        return self.visual_index >= 0

    def visual_count(self) -> torch.Tensor:
        """(b,) visual tokens currently in each row."""
        return self.is_visual.sum(1)

    def compact(self, keep: torch.Tensor, reindex: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop every token with ``keep == False``; returns the (index, valid) used, for the KV cache.

        With ``reindex`` the survivors get contiguous positions ``0..n-1`` (LLaVA policy); otherwise
        they keep their original ids (all three M-RoPE rows for Qwen2.5-VL).
        """
        index, valid = compaction_index(keep & self.valid)
        self.hidden = gather_tokens(self.hidden, index)
        self.positions = torch.stack([gather_tokens(p, index) for p in self.positions])
        self.visual_index = torch.where(valid, gather_tokens(self.visual_index, index), -1)
        self.scratch = gather_tokens(self.scratch, index) & valid
        self.valid = valid
        if reindex:
            contiguous = (valid.long().cumsum(-1) - 1).clamp(min=0)
            self.positions = contiguous.expand_as(self.positions).clone()
        return index, valid

    def next_positions(self) -> torch.Tensor:
        """(P, b, 1) position ids for the first generated token: the row's largest id + 1."""
        masked = torch.where(self.valid, self.positions, torch.zeros_like(self.positions))
        return masked.amax(dim=(0, 2)).view(1, -1, 1).expand(self.positions.shape[0], -1, 1) + 1


def attention_mask(
    q_valid: torch.Tensor, kv_valid: torch.Tensor, implementation: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """The mask decoder layers take, for queries that are the last ``q`` tokens of the keys.

    q_valid (b, q), kv_valid (b, k) -> sdpa: bool (b, 1, q, k), True = attend; eager: additive float;
    flash_attention_2: the (b, k) padding mask; sdpa without padding: None. Padding queries attend to themselves only (no NaN rows).
    """
    if implementation == "flash_attention_2":
        return kv_valid.long()
    if implementation == "sdpa" and bool(kv_valid.all()):
        return None  # no padding: SDPA's own causal path (is_causal for prefill, full row for decode)
    q, k = q_valid.shape[1], kv_valid.shape[1]
    q_pos = torch.arange(k - q, k, device=kv_valid.device)
    k_pos = torch.arange(k, device=kv_valid.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (q, k)
    allowed = causal[None] & kv_valid[:, None, :]
    diagonal = (k_pos[None, :] == q_pos[:, None])[None] & ~q_valid[:, :, None]
    allowed = (allowed | diagonal)[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
