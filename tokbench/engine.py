"""Prefill that drops visual tokens at the stages a method asks for, then greedy decoding.

Notation: ``b`` batch, ``L`` sequence length, ``n`` visual tokens of a sample, ``d`` hidden size,
``P`` position rows, ``h`` heads.

The engine runs the decoder layers itself (each layer is the model's own module, with its own
SDPA/FA2 attention), so that between layers it can hand a method what it needs, drop tokens from the
hidden states (and, for `glimpse`, from the KV cache of the layers already run), and keep position ids
right. With the `full` method it computes exactly what ``model.generate(do_sample=False)`` computes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from PIL import Image

from tokbench.attention import last_rows, layer_keys
from tokbench.metrics import LLMShape, StageTimer, attention_row_flops, count_flops
from tokbench.models.base import ModelAdapter, PreparedBatch, Tile, VisualTokens
from tokbench.pruner import KeepDecision, Pruner, Stage, StageInputs, StageSpec, budget_count, plan_stages, probe_for
from tokbench.sequence import LayerKVCache, Sequence, attention_mask
from tokbench.stages import HANDLERS, GlimpseStage, StageHandler, StopPrefill


class SelectionError(RuntimeError):
    """A method returned an invalid keep set (unsorted, duplicate, out of range, wrong count)."""


class ContextLengthError(ValueError):
    """Samples whose prompt plus generation exceed the model's context; ``doc_ids`` names them."""

    def __init__(self, doc_ids: list[int], message: str):
        super().__init__(message)
        self.doc_ids = doc_ids


@dataclass
class SampleOutput:
    """What one sample produced. Counts are visual tokens; ``seq_len_per_layer`` includes text.

    vision_flops / vision_flops_full: the tower and projector on the images as fed / as given (they
    differ for input-stage methods); select_flops: the selection work the method caused.
    """

    tokens: list[int]
    text: str
    n_visual: int
    n_kept_input: int
    kept_per_layer: list[int]
    seq_len_per_layer: list[int]
    kv_len_per_layer: list[int]
    kept_index: dict[str, list[int]] = field(default_factory=dict)
    token_tiles: list[list[Tile]] = field(default_factory=list)  # per image fed, its tiles, with record_kept
    vision_flops: float = 0.0
    vision_flops_full: float = 0.0
    select_flops: float = 0.0


@dataclass
class BatchOutput:
    samples: list[SampleOutput]
    first_logits: torch.Tensor  # (b, vocab), float32
    timings_ms: dict[str, float]  # batch latencies: preprocess, vision, select, prefill, ttft, ttft_e2e, decode, e2e (+ glimpse)
    n_generated: int
    kv_cache_bytes: int


class Engine:
    """Runs one method on one model; `generate` takes a batch of (images, question)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        method: Pruner,
        position_policy: str | None = None,
        seed: int = 0,
        record_kept: bool = False,
    ):
        self.adapter = adapter
        self.method = method
        # explicit setting, else the method's official default, else the model family's
        policy = position_policy or getattr(method, "position_policy", None) or adapter.default_position_policy
        self.reindex = policy == "reindex"
        self.seed = seed
        self.record_kept = record_kept
        self.info = adapter.info()
        self.specs = plan_stages(method, self.info)  # the same checks a run makes before the model loads
        self.probe = probe_for(method, self.info)
        self.attn_impl = adapter.model.config._attn_implementation
        # transformers 5.24 renamed the decoder layers' `past_key_values` to `cache` (the old name goes in 5.40)
        forward = inspect.signature(adapter.layers[0].forward).parameters
        self.cache_kwarg = "cache" if "cache" in forward else "past_key_values"

    @torch.no_grad()
    def generate(
        self,
        images: list[list[Image.Image]],
        questions: list[str],
        doc_ids: list[int],
        max_new_tokens: int = 16,
    ) -> BatchOutput:
        """Prefill with the method's drops, then greedy decoding; timings per docs/metrics.md.

        Spans: ``preprocess`` (input-stage resize, template, processor, host-to-device), ``ttft`` (vision
        tower to the first token's logits) made of ``vision`` (tower only), ``select`` (everything the
        method causes) and ``prefill`` (the rest: LLM layers, embedding, LM head); ``glimpse`` (the
        glimpse pass, inside prefill + select); ``decode``; ``e2e`` (all of it). tokbench's own FLOP
        counting runs in ``_count`` spans, which are excluded from every span around them.
        """
        adapter = self.adapter
        timer = StageTimer(adapter.device)
        with timer.span("e2e"):
            with timer.span("preprocess"):
                batch, ctx = self._start(images, questions, doc_ids, max_new_tokens, timer)
            with timer.span("ttft"):
                seq = self._encode(batch, ctx)
                for spec in self.specs:
                    if spec.stage in (Stage.VISION, Stage.EMBED):
                        with timer.span("select"):
                            keep = ctx.decide(spec, seq, attention=None)
                            seq.compact(keep, self.reindex)
                n_kept_input = seq.visual_count().tolist()
                cache, kept_per_layer, seq_lens = self._prefill(seq, ctx)
                first_logits = adapter.logits(seq.hidden[:, -1]).float()
            kv_lens = [valid.sum(1).tolist() for valid in cache.valid]
            with timer.span("decode"):
                tokens = self._decode(seq, cache, first_logits, max_new_tokens)
        timings = timer.finish()
        timings.setdefault("select", 0.0)
        timings["prefill"] = timings["ttft"] - timings["vision"] - timings["select"]
        timings["ttft_e2e"] = timings["preprocess"] + timings["ttft"]
        texts = adapter.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        samples = [
            SampleOutput(
                tokens=tokens[i],
                text=texts[i],
                n_visual=ctx.n_original[i],
                n_kept_input=n_kept_input[i],
                kept_per_layer=[row[i] for row in kept_per_layer],
                seq_len_per_layer=[row[i] for row in seq_lens],
                kv_len_per_layer=[row[i] for row in kv_lens],
                kept_index=ctx.kept_index[i],
                token_tiles=ctx.token_tiles[i],
                vision_flops=sum(adapter.vision_flops(t.grid) for v in ctx.visual[i] for t in v.tiles),
                vision_flops_full=sum(adapter.vision_flops(t.grid) for tiles in ctx.original_tiles[i] for t in tiles),
                select_flops=ctx.select_flops[i],
            )
            for i in range(len(questions))
        ]
        return BatchOutput(samples, first_logits, timings, max(len(t) for t in tokens), cache.nbytes())

    def glimpse_inputs(self, images: list[list[Image.Image]], questions: list[str]) -> list[StageInputs]:
        """Each sample's `StageInputs` at the glimpse stage, from a prefill that stops there.

        For training the glimpse token and the VIP (`tokbench.train.glimpse`): the vision tower runs
        without gradients; the LLM layers up to the glimpse layer run in the caller's grad mode, so
        gradients reach ``self.probe``'s tensors through the probe logits.
        """
        timer = StageTimer(self.adapter.device)
        with torch.no_grad():
            batch, ctx = self._start(images, questions, list(range(len(images))), 1, timer, count_flops=False)
            seq = self._encode(batch, ctx)
        try:
            self._prefill(seq, ctx, collect_glimpse=True)
        except StopPrefill as stop:
            return stop.inputs
        raise RuntimeError(f"{self.method.name} has no glimpse stage")

    def _start(self, images, questions, doc_ids, max_new_tokens, timer, count_flops=True):
        """Input-stage resize, template and processor, context check: (PreparedBatch, _Context)."""
        adapter = self.adapter
        original_tiles = [[adapter.token_tiles(img) for img in imgs] for imgs in images]
        budgets = [budget_count(self.method.budget, _n_tokens(tiles)) for tiles in original_tiles]
        if any(s.stage == Stage.INPUT for s in self.specs):
            images = [
                [adapter.resize_to_tokens(img, k) for img, k in zip(imgs, split_budget(budget, [_n_tokens([t]) for t in tiles]))]
                for imgs, budget, tiles in zip(images, budgets, original_tiles)
            ]
        batch = adapter.preprocess(images, questions)
        _check_context(batch.attention_mask.sum(1).tolist(), max_new_tokens, adapter, doc_ids)
        ctx = _Context(self, [len(imgs) for imgs in images], original_tiles, budgets, doc_ids, questions, timer, count_flops)
        if self.record_kept:
            ctx.token_tiles = _group(batch.tiles, ctx.images_per_sample)
        return batch, ctx

    def _encode(self, batch: PreparedBatch, ctx: _Context) -> Sequence:
        """Vision tower (timed ``vision``) and its attention statistics (``select``): the initial sequence."""
        adapter = self.adapter
        vision_layers = tuple(sorted({v for s in self.specs for v in s.vision_layers}))
        attention_layers = tuple(sorted({v for s in self.specs for v in s.vision_attention}))
        with ctx.timer.span("vision"):
            visual = adapter.encode_images(batch, vision_layers, attention_layers)
        ctx.set_visual(_group(visual, ctx.images_per_sample))
        if attention_layers:
            block_inputs = [[dict(v.extras["block_inputs"]) for v in per_sample] for per_sample in ctx.visual]
            with ctx.timer.span("select"):
                adapter.vision_attention(visual)
            ctx.count_vision_attention(block_inputs)
        return self._initial_sequence(batch, visual)

    # --- prefill ----------------------------------------------------------------------------------
    def _initial_sequence(self, batch, visual: list[VisualTokens]) -> Sequence:
        adapter = self.adapter
        embeds = adapter.text_model.embed_tokens(batch.input_ids)
        image_mask = batch.input_ids == adapter.image_token_id
        features = torch.cat([v.embeds.to(embeds.device) for v in visual]).to(embeds.dtype)
        if int(image_mask.sum()) != features.shape[0]:
            raise RuntimeError(f"{int(image_mask.sum())} image tokens in the prompt, {features.shape[0]} features")
        embeds = embeds.masked_scatter(image_mask[..., None], features)
        visual_index = torch.where(image_mask, image_mask.long().cumsum(-1) - 1, -1)
        valid = batch.attention_mask.bool()
        positions = adapter.initial_position_ids(batch)
        return Sequence(embeds, positions, valid, visual_index, torch.zeros_like(valid))

    def _prefill(self, seq: Sequence, ctx: _Context, collect_glimpse: bool = False):
        """LLM layers with the method's `llm`/`glimpse` stages, each run by its handler (`tokbench.stages`);
        every selection step is timed ``select`` and its attention rows are booked (analytically) as the
        sample's selection FLOPs. Under a device map, the sequence follows each layer to its device."""
        adapter, timer = self.adapter, ctx.timer
        handlers = [self._handler(spec, ctx, collect_glimpse) for spec in self.specs if spec.stage in HANDLERS]
        if any(s.prompt_context for s in self.specs):
            ctx.keep_layer_0_inputs(seq)
        for handler in handlers:
            handler.begin(seq)
        cache = LayerKVCache(adapter.n_layers)
        kept_per_layer, seq_lens = [], []
        rope = mask = None
        for index, layer in enumerate(adapter.layers):
            device = adapter.layer_device(index)
            if rope is None or seq.hidden.device != device:
                seq.to(device)
                rope, mask = self._rope_and_mask(seq)
            working = [h for h in handlers if h.works_before(index)]
            if working:
                with timer.span("select"):
                    for handler in working:
                        handler.before(index, layer, seq, rope)
            kept_per_layer.append(seq.visual_count().tolist())
            seq_lens.append((seq.valid & ~seq.scratch).sum(1).tolist())
            seq.hidden = layer(
                seq.hidden, attention_mask=mask, position_embeddings=rope, use_cache=True, **{self.cache_kwarg: cache}
            )
            seq.hidden = adapter.after_layer(index, seq.hidden, seq.visual_index, ctx.visual)
            cache.valid[index] = seq.valid
            for handler in (h for h in handlers if h.works_after(index)):
                with timer.span("select"):
                    if handler.after(index, seq, rope, cache):
                        rope, mask = self._rope_and_mask(seq)
                handler.close(index)
        return cache, kept_per_layer, seq_lens

    def _handler(self, spec: StageSpec, ctx: _Context, collect_glimpse: bool) -> StageHandler:
        if spec.stage == Stage.GLIMPSE:
            return GlimpseStage(self, ctx, spec, collect_only=collect_glimpse)
        return HANDLERS[spec.stage](self, ctx, spec)

    def _rope_and_mask(self, seq: Sequence):
        """The layers' rotary cos/sin and attention mask for the sequence as it is now, on its device."""
        rope = self.adapter.rotary(seq.hidden, seq.positions)
        return rope, attention_mask(seq.valid, seq.valid, self.attn_impl, seq.hidden.dtype)

    # --- decoding ---------------------------------------------------------------------------------
    def _decode(self, seq: Sequence, cache: LayerKVCache, first_logits: torch.Tensor, max_new_tokens: int):
        """Greedy decoding on the pruned cache; each layer's mask follows its own cache length."""
        adapter = self.adapter
        eos = torch.tensor(adapter.eos_token_ids, device=first_logits.device)
        token = first_logits.argmax(-1)
        generated = [token]
        finished = torch.isin(token, eos)
        positions = seq.next_positions()
        b = token.shape[0]
        embed_device = adapter.text_model.embed_tokens.weight.device
        for _ in range(max_new_tokens - 1):
            if bool(finished.all()):
                break
            hidden = adapter.text_model.embed_tokens(token[:, None].to(embed_device))
            rope = adapter.rotary(hidden, positions.to(embed_device))
            masks: dict[int, torch.Tensor | None] = {}
            for index, layer in enumerate(adapter.layers):
                previous = cache.valid[index]
                if hidden.device != previous.device:  # the next layer lives on another device (device map)
                    hidden, rope = hidden.to(previous.device), tuple(t.to(previous.device) for t in rope)
                if id(previous) not in masks:
                    new_valid = torch.ones(b, 1, dtype=torch.bool, device=previous.device)
                    grown = torch.cat([previous, new_valid], dim=1)
                    masks[id(previous)] = (grown, attention_mask(new_valid, grown, self.attn_impl, hidden.dtype))
                cache.valid[index], mask = masks[id(previous)]
                hidden = layer(
                    hidden, attention_mask=mask, position_embeddings=rope, use_cache=True, **{self.cache_kwarg: cache}
                )
            token = adapter.logits(hidden[:, -1]).argmax(-1).to(finished.device)
            token = torch.where(finished, adapter.pad_token_id, token)
            generated.append(token)
            finished |= torch.isin(token, eos)
            positions = positions + 1
        out = torch.stack(generated, dim=1).tolist()
        eos_ids = set(adapter.eos_token_ids)
        return [_until_eos(row, eos_ids) for row in out]


def _check_context(lengths: list[int], max_new: int, adapter: ModelAdapter, doc_ids: list[int]) -> None:
    """Raise ``ContextLengthError`` for samples whose prompt (all visual tokens) + ``max_new`` exceed
    the language model's ``max_position_embeddings``."""
    limit = adapter.text_config.max_position_embeddings
    over = [(d, n) for d, n in zip(doc_ids, lengths) if n + max_new > limit]
    if over:
        worst = max(n for _, n in over)
        raise ContextLengthError(
            [d for d, _ in over],
            f"prompt of {worst} tokens + {max_new} new tokens exceeds the model's context of {limit}; "
            "lower --max-pixels or --max-new-tokens",
        )


class _Context:
    """Per-batch selection bookkeeping: builds `StageInputs` per sample, validates decisions and counts
    each sample's selection FLOPs (``select_flops``)."""

    def __init__(self, engine: Engine, images_per_sample, original_tiles, budgets, doc_ids, questions,
                 timer: StageTimer, count_flops: bool = True):  # fmt: skip
        self.engine = engine
        self.questions = questions
        self.images_per_sample: list[int] = images_per_sample
        self.visual: list[list[VisualTokens]] = []  # per sample, after the vision tower (set_visual)
        self.original_tiles: list[list[list[Tile]]] = original_tiles  # per sample, per image as given
        self.n_original = [_n_tokens(tiles) for tiles in original_tiles]
        self.budgets = budgets
        self.doc_ids = doc_ids
        self.timer = timer
        self.kept_index: list[dict[str, list[int]]] = [{} for _ in doc_ids]
        self.token_tiles: list[list[list[Tile]]] = [[] for _ in doc_ids]  # with record_kept
        self.select_flops: list[float] = [0.0 for _ in doc_ids]
        self.count_flops = count_flops
        self.shape = LLMShape.from_config(engine.adapter.text_config)

    def set_visual(self, visual: list[list[VisualTokens]]) -> None:
        self.visual = visual
        self.layout = [_token_layout(v) for v in visual]  # per sample: (tile grids, (n, 4) image/tile/row/col)

    def count_rows(self, valid: torch.Tensor, rows: list[int] | None = None) -> None:
        """Book ``rows[i]`` (default 1) recomputed attention rows of sample ``i`` over its ``valid`` (b, L) keys."""
        for i, length in enumerate(valid.sum(1).tolist()):
            self.select_flops[i] += attention_row_flops(self.shape, length, rows[i] if rows else 1)

    def keep_layer_0_inputs(self, seq: Sequence) -> None:
        """The prompt after the image and the visual tokens as they enter layer 0 (`StageSpec.prompt_context`)."""
        after = _after_image(seq)
        self.prompt_embeds = [seq.hidden[i, after[i]] for i in range(len(self.doc_ids))]
        self.visual_input_embeds = [seq.hidden[i, seq.is_visual[i]] for i in range(len(self.doc_ids))]

    def prompt_context(self, layer, seq: Sequence, rope) -> None:
        """Layer ``layer``'s keys and the causal attention rows of the prompt after the image, from its input."""
        after = _after_image(seq)
        counts = after.sum(1).tolist()
        keys = layer_keys(self.engine.adapter, layer, seq.hidden, rope)  # (b, h_kv, L, hd)
        rows = last_rows(self.engine.adapter, layer, seq.hidden, keys, max(counts), seq.valid, rope)  # (b, h, M, L)
        self.llm_context = {"keys": keys, "rows": rows, "after": after, "counts": counts}
        self.count_rows(seq.valid, counts)

    def _count(self, i: int, fn) -> None:
        """Add the FLOPs of ``fn()`` (`tokbench.metrics.count_flops`) to sample ``i``; the rerun is tokbench's own
        bookkeeping, timed as ``_count`` and excluded from every span around it."""
        if self.count_flops:
            with self.timer.span("_count"):
                self.select_flops[i] += count_flops(fn)

    def count_vision_attention(self, block_inputs: list[list[dict]]) -> None:
        """Selection FLOPs of the vision-attention statistics, recomputed per sample from the kept block inputs."""
        adapter = self.engine.adapter
        for i, per_image in enumerate(block_inputs):
            copies = [VisualTokens(v.embeds, v.tiles, extras={**v.extras, "block_inputs": b}) for v, b in zip(self.visual[i], per_image)]
            self._count(i, lambda copies=copies: adapter.vision_attention(copies))

    def decide(self, spec: StageSpec, seq: Sequence, attention) -> torch.Tensor:
        """(b, L) keep mask for ``spec``: text and padding always kept, visual tokens per the method."""
        keep = ~seq.is_visual
        method = self.engine.method
        for i in range(seq.hidden.shape[0]):
            positions = seq.is_visual[i].nonzero()[:, 0]
            inputs = self.inputs(spec, seq, i, positions, attention)
            count = method.stage_count(spec, inputs)
            decision = method.select(spec, inputs)
            index = _validate(decision, inputs, count, spec, self.doc_ids[i], method.name)
            # the method is a pure function of its inputs: rerun it on fresh ones to count its FLOPs
            self._count(i, lambda i=i, positions=positions: method.select(spec, self.inputs(spec, seq, i, positions, attention)))
            kept_positions = positions[index.to(positions.device)]
            keep[i, kept_positions] = True
            states = decision.states
            if decision.vision_states is not None:
                states = self.engine.adapter.project_vision(decision.vision_states.to(self.engine.adapter.dtype))
            if states is not None:
                seq.hidden[i, kept_positions] = states.to(seq.hidden)
            if self.engine.record_kept:
                original = seq.visual_index[i, kept_positions]
                self.kept_index[i][str(spec)] = original.tolist()
        return keep

    def inputs(self, spec: StageSpec, seq: Sequence, i: int, positions, attention) -> StageInputs:
        original = seq.visual_index[i, positions]
        visual = self.visual[i]
        tile_grids, layout = self.layout[i]
        where = layout[original.cpu()]  # (n, 4): image, tile, row, col
        inputs = StageInputs(
            n_visual=int(positions.numel()),
            n_visual_original=self.n_original[i],
            tile_grids=tile_grids,
            token_rc=where[:, 2:],
            budget_count=self.budgets[i],
            token_tile=where[:, 1],
            token_image=where[:, 0],
            question=self.questions[i],
            generator=torch.Generator().manual_seed(self.engine.seed * 1_000_003 + int(self.doc_ids[i])),
        )
        if spec.stage in (Stage.VISION, Stage.EMBED):
            adapter = self.engine.adapter
            inputs.visual_embeds = seq.hidden[i, positions]
            ids = adapter.tokenizer(self.questions[i], add_special_tokens=False, return_tensors="pt").input_ids
            inputs.instruction_embeds = adapter.text_model.embed_tokens(ids.to(adapter.device))[0]
        if spec.vision_layers:
            inputs.vision_hidden = {
                layer: torch.cat([v.vision_hidden[layer] for v in visual])[original] for layer in spec.vision_layers
            }
            if "cls" in visual[0].extras:  # (T, d_v): every tile's CLS output, the sample's tiles in order
                inputs.extras["cls"] = {layer: torch.cat([v.extras["cls"][layer] for v in visual]) for layer in spec.vision_layers}
        if spec.vision_attention:
            inputs.extras["vision_attention"] = {
                layer: _index_stats([v.extras["vision_attention"][layer] for v in visual], original)
                for layer in spec.vision_attention
            }
        if spec.stage in (Stage.LLM, Stage.GLIMPSE):
            inputs.hidden_states = seq.hidden[i, positions]
        if spec.stage == Stage.LLM and spec.prompt_context:
            context, after, m = self.llm_context, self.llm_context["after"][i], self.llm_context["counts"][i]
            keys = context["keys"][i].transpose(0, 1)  # (L, h_kv, hd)
            rows = context["rows"][i][:, context["rows"].shape[2] - m :]  # (h, m, L): this row's prompt
            inputs.extras.update(
                visual_keys=keys[positions], text_keys=keys[after], text_hidden_states=seq.hidden[i, after],
                prompt_attention=rows[:, :, positions].transpose(0, 1), prompt_embeds=self.prompt_embeds[i],
                visual_input_embeds=self.visual_input_embeds[i],
                final_norm_weight=self.engine.adapter.text_model.norm.weight,
            )
        if spec.stage == Stage.LLM and attention is not None:
            logits, probs = attention
            inputs.text_logits = logits[i][:, positions]
            inputs.text_attention = probs[i][:, positions]
        if spec.stage == Stage.GLIMPSE and attention is not None:
            inputs.extras["probe_logits"] = attention[0][i][:, :, positions]
            # over every key the probe sees (text and itself included), for an exact log-softmax
            inputs.extras["probe_logsumexp"] = attention[0][i].logsumexp(dim=-1)  # (layers, h)
        return inputs


def _validate(decision: KeepDecision, inputs: StageInputs, count, spec, doc_id, method) -> torch.Tensor:
    index = decision.keep_index.long().cpu()
    where = f"{method} at {spec} on doc {doc_id}"
    if index.ndim != 1 or index.numel() == 0:
        raise SelectionError(f"{where}: keep_index must be a non-empty 1-D index, got shape {tuple(index.shape)}")
    if bool((index[1:] <= index[:-1]).any()):
        raise SelectionError(f"{where}: keep_index must be sorted and unique")
    if int(index[0]) < 0 or int(index[-1]) >= inputs.n_visual:
        raise SelectionError(f"{where}: keep_index outside 0..{inputs.n_visual - 1}")
    if count is not None and index.numel() != count:
        raise SelectionError(f"{where}: kept {index.numel()} tokens, the budget asks for {count}")
    for states in (decision.states, decision.vision_states):
        if states is not None and states.shape[0] != index.numel():
            raise SelectionError(f"{where}: {states.shape[0]} merged states for {index.numel()} kept tokens")
    return index


def _index_stats(per_image: list[dict[str, torch.Tensor]], original: torch.Tensor) -> dict[str, torch.Tensor]:
    """Concatenate one block's attention statistics over a sample's images; keep the current tokens."""
    out = {}
    for name in per_image[0]:
        dim = 1 if name == "cls" else 0  # cls is (h, n); the others are token-first
        out[name] = torch.cat([stats[name] for stats in per_image], dim=dim).index_select(dim, original)
    return out


def _after_image(seq: Sequence) -> torch.Tensor:
    """(b, L) the valid tokens after each row's last visual token (the prompt after the image)."""
    index = torch.arange(seq.hidden.shape[1], device=seq.hidden.device)
    last = torch.where(seq.is_visual, index, -1).amax(dim=1, keepdim=True)
    return seq.valid & ~seq.scratch & (index > last)


def _token_layout(visual: list[VisualTokens]) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """A sample's tile grids (images in order, tiles in order) and (n, 4) image / tile / row / col of every
    visual token (images and tiles concatenated, raster order within a tile)."""
    grids, rows = [], []
    for image, v in enumerate(visual):
        for tile in v.tiles:
            r, c = tile.grid
            rc = torch.stack(torch.meshgrid(torch.arange(r), torch.arange(c), indexing="ij"), dim=-1).reshape(-1, 2)
            ids = torch.tensor([image, len(grids)]).expand(r * c, 2)
            rows.append(torch.cat([ids, rc], dim=1))
            grids.append((r, c))
    return grids, torch.cat(rows)


def split_budget(budget: int, counts: list[int]) -> list[int]:
    """A sample's token budget over its images in proportion to their tokens (largest remainders, at least
    1 each, never more than an image has): ``split_budget(64, [192, 64]) == [48, 16]``."""
    total = sum(counts)
    shares = [budget * n / total for n in counts]
    out = [max(1, min(n, int(share))) for n, share in zip(counts, shares)]
    for i in sorted(range(len(counts)), key=lambda i: shares[i] - int(shares[i]), reverse=True):
        if sum(out) >= budget:
            break
        if out[i] < counts[i]:
            out[i] += 1
    return out


def _n_tokens(tiles: list[list[Tile]]) -> int:
    """Visual tokens of a sample whose images have ``tiles``."""
    return sum(t.n_tokens for image in tiles for t in image)


def _group(visual: list[VisualTokens], counts: list[int]) -> list[list[VisualTokens]]:
    out, start = [], 0
    for count in counts:
        out.append(visual[start : start + count])
        start += count
    return out


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    for j, tok in enumerate(row):
        if tok in eos:
            return row[:j]
    return row
