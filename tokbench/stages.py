"""What the engine does around the decoder layers for each in-LLM stage kind: one handler per kind.

`Engine._prefill` runs the layers and, at each one, asks every handler of the method's stages whether
it has work before the layer (with the layer's input) and after it (with its output); that work is
selection, timed ``select``. A handler that drops tokens returns True from `StageHandler.after`, and the
engine recomputes rotary embeddings and the mask for the shorter sequence. A new stage kind is one
handler class here plus its entry in `HANDLERS`.

Notation: ``b`` batch, ``L`` sequence length, ``d`` hidden size, ``h`` heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokbench.attention import attention_row
from tokbench.pruner import GlimpseProbe, Stage, StageInputs, StageSpec
from tokbench.sequence import LayerKVCache, Sequence

if TYPE_CHECKING:
    from tokbench.engine import Engine, _Context


class StopPrefill(Exception):
    """Raised by a handler that only collects its stage's inputs (GlimpsePrune training)."""

    def __init__(self, inputs: list[StageInputs]):
        super().__init__("prefill stopped at the glimpse stage")
        self.inputs = inputs


class StageHandler:
    """One stage's work around the decoder layers; the default does nothing."""

    def __init__(self, engine: Engine, ctx: _Context, spec: StageSpec):
        self.engine, self.ctx, self.spec = engine, ctx, spec

    def begin(self, seq: Sequence) -> None:
        """Before layer 0 (timed ``select`` by the handler itself where it works)."""

    def works_before(self, index: int) -> bool:
        return False

    def before(self, index: int, layer: torch.nn.Module, seq: Sequence, rope) -> None:
        """With layer ``index``'s input (only where `works_before`)."""

    def works_after(self, index: int) -> bool:
        return False

    def after(self, index: int, seq: Sequence, rope, cache: LayerKVCache) -> bool:
        """With layer ``index``'s output (only where `works_after`); True when it dropped tokens."""
        return False

    def close(self, index: int) -> None:
        """After `after`'s ``select`` span closed."""

    def _rope(self, rope):
        return rope if self.spec.attention_rope else None


class LLMStage(StageHandler):
    """`llm`: after layer k, hand the method the last prompt token's attention row (from layer k's own
    projections on its input, or layer k+1's on its output) and the visual hidden states; drop from the
    sequence (layers > k see fewer tokens; layers <= k keep their cache)."""

    row: tuple[torch.Tensor, torch.Tensor] | None = None

    def works_before(self, index: int) -> bool:
        return index == self.spec.layer and (self.spec.attention_from == "same" or self.spec.prompt_context)

    def before(self, index, layer, seq, rope) -> None:
        adapter = self.engine.adapter
        if self.spec.attention_from == "same":
            self.row = attention_row(adapter, layer, seq.hidden, -1, seq.valid, self._rope(rope))
            self.ctx.count_rows(seq.valid)
        if self.spec.prompt_context:
            self.ctx.prompt_context(layer, seq, self._rope(rope))

    def works_after(self, index: int) -> bool:
        return index == self.spec.layer

    def after(self, index, seq, rope, cache) -> bool:
        if self.spec.attention_from == "next":
            adapter = self.engine.adapter
            self.row = attention_row(adapter, adapter.layers[index + 1], seq.hidden, -1, seq.valid, self._rope(rope))
            self.ctx.count_rows(seq.valid)
        keep = self.ctx.decide(self.spec, seq, attention=self.row)
        seq.compact(keep, self.engine.reindex)
        return True


class GlimpseStage(StageHandler):
    """`glimpse`: append the method's probe token after the prompt, add its per-layer embeddings and read
    its attention logits up to layer K, then drop the unkept visual tokens (and the probe) from the
    sequence and from the KV cache of layers 0..K. The span ``glimpse`` covers all of it."""

    def __init__(self, engine: Engine, ctx: _Context, spec: StageSpec, collect_only: bool = False):
        super().__init__(engine, ctx, spec)
        self.probe: GlimpseProbe = engine.probe
        self.collect_only = collect_only
        self.logits: list[torch.Tensor] = []  # (b, h, L) per attention layer

    def begin(self, seq: Sequence) -> None:
        self.ctx.timer.begin("glimpse")
        with self.ctx.timer.span("select"):
            b = seq.hidden.shape[0]
            token = self.probe.token_embed.to(seq.hidden).expand(b, 1, -1)
            seq.append_scratch(token)  # at the row's last position + 1 (every M-RoPE row)

    def works_before(self, index: int) -> bool:
        return index <= self.spec.layer

    def before(self, index, layer, seq, rope) -> None:
        layer_embeds = self.probe.layer_embeds
        if layer_embeds is not None and index < layer_embeds.shape[0]:
            seq.hidden = seq.hidden + seq.scratch[..., None] * layer_embeds[index].to(seq.hidden)
        if index in self.probe.attention_layers:
            self.logits.append(attention_row(self.engine.adapter, layer, seq.hidden, -1, seq.valid, rope)[0].to(seq.hidden.device))
            self.ctx.count_rows(seq.valid)

    def works_after(self, index: int) -> bool:
        return index == self.spec.layer

    def after(self, index, seq, rope, cache) -> bool:
        row = (torch.stack([x.to(seq.hidden.device) for x in self.logits], dim=1), None) if self.logits else None
        if self.collect_only:
            raise StopPrefill([self.ctx.inputs(self.spec, seq, i, seq.is_visual[i].nonzero()[:, 0], row)
                               for i in range(len(self.ctx.doc_ids))])  # fmt: skip
        keep = self.ctx.decide(self.spec, seq, attention=row)
        gather, valid = seq.compact(keep & ~seq.scratch, self.engine.reindex)
        for done in range(index + 1):
            cache.compact(done, gather.to(cache.keys[done].device), valid.to(cache.keys[done].device))
        return True

    def close(self, index: int) -> None:
        self.ctx.timer.end("glimpse")


HANDLERS: dict[Stage, type[StageHandler]] = {Stage.LLM: LLMStage, Stage.GLIMPSE: GlimpseStage}
