"""Prefill that drops visual tokens at the stages a method asks for, then greedy decoding.

Notation: ``b`` batch, ``L`` sequence length, ``n`` visual tokens of a sample, ``d`` hidden size,
``P`` position rows, ``h`` heads.

The engine runs the decoder layers itself (each layer is the model's own module, with its own
SDPA/FA2 attention), so that between layers it can hand a method what it needs, drop tokens from the
hidden states (and, for `glimpse`, from the KV cache of the layers already run), and keep position ids
right. With the `full` method it computes exactly what ``model.generate(do_sample=False)`` computes.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from PIL import Image

from tokbench.attention import attention_row, last_rows, layer_keys
from tokbench.metrics import LLMShape, StageTimer, attention_row_flops, count_flops
from tokbench.models.base import ModelAdapter, PreparedBatch, VisualTokens
from tokbench.pruner import KeepDecision, Pruner, Stage, StageInputs, StageSpec, budget_count, plan_stages, probe_for
from tokbench.sequence import LayerKVCache, Sequence, attention_mask


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
    token_grids: list[tuple[int, int]] = field(default_factory=list)  # (rows, cols) per image fed, with record_kept
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
                token_grids=ctx.token_grids[i],
                vision_flops=sum(adapter.vision_flops(v.grid_hw) for v in ctx.visual[i]),
                vision_flops_full=sum(adapter.vision_flops(grid) for grid in ctx.original_grids[i]),
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
        return self._prefill(seq, ctx, stop_at_glimpse=True)

    def _start(self, images, questions, doc_ids, max_new_tokens, timer, count_flops=True):
        """Input-stage resize, template and processor, context check: (PreparedBatch, _Context)."""
        adapter = self.adapter
        original_grids = [[adapter.token_grid(img) for img in imgs] for imgs in images]
        budgets = [budget_count(self.method.budget, sum(r * c for r, c in grids)) for grids in original_grids]
        if any(s.stage == Stage.INPUT for s in self.specs):
            images = [[adapter.resize_to_tokens(img, k) for img in imgs] for imgs, k in zip(images, budgets)]
        batch = adapter.preprocess(images, questions)
        _check_context(batch.attention_mask.sum(1).tolist(), max_new_tokens, adapter, doc_ids)
        ctx = _Context(self, [len(imgs) for imgs in images], original_grids, budgets, doc_ids, questions, timer, count_flops)
        if self.record_kept:
            ctx.token_grids = [[adapter.token_grid(img) for img in imgs] for imgs in images]
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
        features = torch.cat([v.embeds for v in visual]).to(embeds.dtype)
        if int(image_mask.sum()) != features.shape[0]:
            raise RuntimeError(f"{int(image_mask.sum())} image tokens in the prompt, {features.shape[0]} features")
        embeds = embeds.masked_scatter(image_mask[..., None], features)
        visual_index = torch.where(image_mask, image_mask.long().cumsum(-1) - 1, -1)
        valid = batch.attention_mask.bool()
        positions = adapter.initial_position_ids(batch)
        probe = torch.zeros_like(valid)
        return Sequence(embeds, positions, valid, visual_index, probe)

    def _append_probe(self, seq: Sequence) -> None:
        """Append the glimpse token after the prompt, at position last + 1 (all M-RoPE rows)."""
        b = seq.hidden.shape[0]
        token = self.probe.token_embed.to(seq.hidden)
        seq.hidden = torch.cat([seq.hidden, token.expand(b, 1, -1)], dim=1)
        seq.positions = torch.cat([seq.positions, seq.next_positions()], dim=2)
        ones = torch.ones(b, 1, dtype=torch.bool, device=seq.valid.device)
        seq.valid = torch.cat([seq.valid, ones], dim=1)
        seq.visual_index = torch.cat([seq.visual_index, torch.full_like(ones, -1, dtype=torch.long)], dim=1)
        seq.probe = torch.cat([torch.zeros_like(seq.probe), ones], dim=1)

    def _prefill(self, seq: Sequence, ctx: _Context, stop_at_glimpse: bool = False):
        """LLM layers with the method's `llm`/`glimpse` stages; every selection step is timed ``select``
        and its attention rows are booked (analytically) as the sample's selection FLOPs."""
        adapter = self.adapter
        timer = ctx.timer
        stage_at = {s.layer: s for s in self.specs if s.stage in (Stage.LLM, Stage.GLIMPSE)}
        glimpse = next((s for s in self.specs if s.stage == Stage.GLIMPSE), None)
        if glimpse is not None:
            timer.begin("glimpse")
            with timer.span("select"):
                self._append_probe(seq)
        cache = LayerKVCache(adapter.n_layers)
        rope = adapter.rotary(seq.hidden, seq.positions)
        mask = attention_mask(seq.valid, seq.valid, self.attn_impl, seq.hidden.dtype)
        probe_logits: list[torch.Tensor] = []
        kept_per_layer, seq_lens = [], []
        if any(s.prompt_context for s in self.specs):
            ctx.keep_layer_0_inputs(seq)
        for index, layer in enumerate(adapter.layers):
            spec = stage_at.get(index)
            row = None
            selecting = spec is not None or (glimpse is not None and index <= glimpse.layer)
            with timer.span("select") if selecting else contextlib.nullcontext():
                if glimpse is not None and index <= glimpse.layer:
                    layer_embeds = self.probe.layer_embeds
                    if layer_embeds is not None and index < layer_embeds.shape[0]:
                        seq.hidden = seq.hidden + seq.probe[..., None] * layer_embeds[index].to(seq.hidden)
                    if index in self.probe.attention_layers:
                        probe_logits.append(attention_row(layer, seq.hidden, -1, seq.valid, rope)[0])
                        ctx.count_rows(seq.valid)
                if spec is not None and spec.stage == Stage.LLM and spec.attention_from == "same":
                    row = attention_row(layer, seq.hidden, -1, seq.valid, rope if spec.attention_rope else None)
                    ctx.count_rows(seq.valid)
                if spec is not None and spec.prompt_context:
                    ctx.prompt_context(layer, seq, rope if spec.attention_rope else None)
            kept_per_layer.append(seq.visual_count().tolist())
            seq_lens.append((seq.valid & ~seq.probe).sum(1).tolist())
            seq.hidden = layer(
                seq.hidden, attention_mask=mask, position_embeddings=rope, use_cache=True, **{self.cache_kwarg: cache}
            )
            cache.valid[index] = seq.valid
            if spec is None:
                continue
            with timer.span("select"):
                if spec.stage == Stage.LLM and spec.attention_from == "next":
                    nxt = adapter.layers[index + 1]
                    row = attention_row(nxt, seq.hidden, -1, seq.valid, rope if spec.attention_rope else None)
                    ctx.count_rows(seq.valid)
                if spec.stage == Stage.GLIMPSE:
                    row = (torch.stack(probe_logits, dim=1), None) if probe_logits else None  # (b, layers, h, L)
                    if stop_at_glimpse:
                        return [ctx.inputs(spec, seq, i, seq.is_visual[i].nonzero()[:, 0], row) for i in range(len(ctx.doc_ids))]
                keep = ctx.decide(spec, seq, attention=row)
                gather, valid = seq.compact(keep & ~seq.probe, self.reindex)
                if spec.stage == Stage.GLIMPSE:
                    for done in range(index + 1):
                        cache.compact(done, gather, valid)
                rope = adapter.rotary(seq.hidden, seq.positions)
                mask = attention_mask(seq.valid, seq.valid, self.attn_impl, seq.hidden.dtype)
            if spec.stage == Stage.GLIMPSE:
                timer.end("glimpse")
        return cache, kept_per_layer, seq_lens

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
        new_valid = torch.ones(b, 1, dtype=torch.bool, device=token.device)
        for _ in range(max_new_tokens - 1):
            if bool(finished.all()):
                break
            hidden = adapter.text_model.embed_tokens(token[:, None])
            rope = adapter.rotary(hidden, positions)
            masks: dict[int, torch.Tensor | None] = {}
            for index, layer in enumerate(adapter.layers):
                previous = cache.valid[index]
                if id(previous) not in masks:
                    grown = torch.cat([previous, new_valid], dim=1)
                    masks[id(previous)] = (grown, attention_mask(new_valid, grown, self.attn_impl, hidden.dtype))
                cache.valid[index], mask = masks[id(previous)]
                hidden = layer(
                    hidden, attention_mask=mask, position_embeddings=rope, use_cache=True, **{self.cache_kwarg: cache}
                )
            token = adapter.logits(hidden[:, -1]).argmax(-1)
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

    def __init__(self, engine: Engine, images_per_sample, original_grids, budgets, doc_ids, questions,
                 timer: StageTimer, count_flops: bool = True):  # fmt: skip
        self.engine = engine
        self.questions = questions
        self.images_per_sample: list[int] = images_per_sample
        self.visual: list[list[VisualTokens]] = []  # per sample, after the vision tower (set_visual)
        self.original_grids: list[list[tuple[int, int]]] = original_grids  # per sample, per image as given
        self.n_original = [sum(r * c for r, c in grids) for grids in original_grids]
        self.budgets = budgets
        self.doc_ids = doc_ids
        self.timer = timer
        self.kept_index: list[dict[str, list[int]]] = [{} for _ in doc_ids]
        self.token_grids: list[list[tuple[int, int]]] = [[] for _ in doc_ids]  # with record_kept
        self.select_flops: list[float] = [0.0 for _ in doc_ids]
        self.count_flops = count_flops
        self.shape = LLMShape.from_config(engine.adapter.text_config)

    def set_visual(self, visual: list[list[VisualTokens]]) -> None:
        self.visual = visual
        self.rc = [_token_rc(v) for v in visual]

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
        keys = layer_keys(layer, seq.hidden, rope)  # (b, h_kv, L, hd)
        rows = last_rows(layer, seq.hidden, keys, max(counts), seq.valid, rope)  # (b, h, M, L)
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
            copies = [VisualTokens(v.embeds, v.grid_hw, extras={**v.extras, "block_inputs": b}) for v, b in zip(self.visual[i], per_image)]
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
        inputs = StageInputs(
            n_visual=int(positions.numel()),
            n_visual_original=self.n_original[i],
            grid_hw=visual[0].grid_hw,
            token_rc=self.rc[i][original.cpu()],
            budget_count=self.budgets[i],
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
            if "cls" in visual[0].extras:
                inputs.extras["cls"] = {layer: visual[0].extras["cls"][layer] for layer in spec.vision_layers}
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
    return seq.valid & ~seq.probe & (index > last)


def _token_rc(visual: list[VisualTokens]) -> torch.Tensor:
    """(n, 2) row/col of every visual token of a sample (images concatenated)."""
    rows = []
    for v in visual:
        r, c = v.grid_hw
        grid = torch.stack(torch.meshgrid(torch.arange(r), torch.arange(c), indexing="ij"), dim=-1)
        rows.append(grid.reshape(-1, 2))
    return torch.cat(rows)


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
