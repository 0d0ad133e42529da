"""One attention row, recomputed for selection, so the model itself never leaves SDPA/FA2.

Queries and keys come from the family adapter (`ModelAdapter.project_queries` / ``project_keys``: the
layer's projections plus any per-head norms the family applies, e.g. Qwen3's q_norm/k_norm), rotary
embeddings from ``adapter.rotary``; the scale is the attention module's own.

Notation: ``b`` batch, ``L`` keys, ``h`` query heads, ``h_kv`` key/value heads, ``hd`` head dim.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, heads, L, hd), cos/sin (b, L, hd) -> rotated x (standard half-rotation RoPE)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _scale(attn: torch.nn.Module) -> float:
    return getattr(attn, "scaling", attn.head_dim**-0.5)


def attention_row(
    adapter,
    layer: torch.nn.Module,
    layer_input: torch.Tensor,
    query_index: int,
    key_valid: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query position to every key, as decoder ``layer`` computes it.

    adapter (ModelAdapter): projects queries and keys as the family does.
    layer_input (Tensor, (b, L, d)): the hidden states entering ``layer`` (before its input norm).
    query_index (int): the query's position in the sequence (e.g. -1, the last prompt token).
    key_valid (BoolTensor, (b, L)): keys the query may see (padding excluded; the query sees all
        earlier tokens, so no causal cut is needed for the last position).
    rope: cos/sin (b, L, hd) of the sequence, or None to score without rotary embeddings.
    Returns (logits, probs), each (Tensor, (b, h, L)) in float32: ``q.k / sqrt(hd)`` and its softmax
    over valid keys (masked keys: logit -inf, probability 0).
    """
    normed = layer.input_layernorm(layer_input)
    length = normed.shape[1]
    query = adapter.project_queries(layer, normed[:, query_index : query_index + 1 if query_index != -1 else None])
    keys = adapter.project_keys(layer, normed)  # (b, h_kv, L, hd)
    if rope is not None:
        cos, sin = rope
        q_pos = query_index % length
        query = _apply_rope(query, cos[:, q_pos : q_pos + 1], sin[:, q_pos : q_pos + 1])
        keys = _apply_rope(keys, cos, sin)
    groups = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)  # (b, h, L, hd)
    logits = (query.float() @ keys.float().transpose(-1, -2))[:, :, 0] * _scale(layer.self_attn)  # (b, h, L)
    logits = logits.masked_fill(~key_valid[:, None, :], float("-inf"))
    return logits, logits.softmax(dim=-1)


def attention_received(
    query: torch.Tensor, key: torch.Tensor, scaling: float, chunk: int = 1024
) -> torch.Tensor:
    """Attention each key receives, summed over heads and averaged over queries, without the full map.

    query, key (Tensor, (h, N, hd)) of one image's full (bidirectional) attention -> (N,) float32.
    Queries are processed ``chunk`` at a time, so memory stays at h * chunk * N.
    """
    n = query.shape[1]
    received = torch.zeros(n, dtype=torch.float32, device=query.device)
    key_t = key.float().transpose(-1, -2)
    for start in range(0, n, chunk):
        probs = (query[:, start : start + chunk].float() @ key_t * scaling).softmax(dim=-1)  # (h, c, N)
        received += probs.sum(dim=(0, 1))
    return received / n


def layer_keys(adapter, layer: torch.nn.Module, layer_input: torch.Tensor, rope) -> torch.Tensor:
    """Keys of decoder ``layer`` at every position: layer_input (b, L, d) -> (b, h_kv, L, hd), with the
    family's rotary embedding when ``rope`` (cos/sin (b, L, hd)) is given, as the layer caches them."""
    keys = adapter.project_keys(layer, layer.input_layernorm(layer_input))
    return keys if rope is None else _apply_rope(keys, *rope)


def last_rows(
    adapter, layer: torch.nn.Module, layer_input: torch.Tensor, keys: torch.Tensor, n_queries: int, key_valid: torch.Tensor, rope
) -> torch.Tensor:
    """Causal softmax attention of the last ``n_queries`` positions to every key, as ``layer`` computes it.

    keys (b, h_kv, L, hd) from `layer_keys`; key_valid (BoolTensor, (b, L)) -> (b, h, n_queries, L) float32.
    The last row equals `attention_row(...)[1]` for the last position.
    """
    normed = layer.input_layernorm(layer_input[:, -n_queries:])
    length = key_valid.shape[1]
    query = adapter.project_queries(layer, normed)  # (b, h, M, hd)
    if rope is not None:
        cos, sin = rope
        query = _apply_rope(query, cos[:, -n_queries:], sin[:, -n_queries:])
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    logits = (query.float() @ keys.float().transpose(-1, -2)) * _scale(layer.self_attn)  # (b, h, M, L)
    q_pos = torch.arange(length - n_queries, length, device=logits.device)
    causal = torch.arange(length, device=logits.device)[None, :] <= q_pos[:, None]  # (M, L)
    allowed = causal[None, None] & key_valid[:, None, None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
