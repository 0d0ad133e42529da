"""The engine against the model's own `generate`, and what dropping does to counts, caches and positions."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import TINY_FAMILY_MODELS, layer_lengths, noise_image, text_length, tiny_adapter

from tokbench.engine import Engine, SelectionError, split_budget
from tokbench.pruner import (
    Budget,
    GlimpseProbe,
    KeepDecision,
    Stage,
    StageInputs,
    StageSpec,
    build_method,
)

QUESTIONS = ["What colour is the small square? (A) red (B) blue", "Where is it?", "Describe the picture in detail."]


def _batch(family_sizes):
    return [[noise_image(w, h, seed=i)] for i, (w, h) in enumerate(family_sizes)]


SIZES = [(448, 336), (224, 224), (336, 448)]


def _hf_greedy(adapter, images, questions, max_new_tokens):
    batch = adapter.preprocess(images, questions)
    with torch.no_grad():
        out = adapter.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            **batch.model_inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        logits = adapter.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs
        ).logits[:, -1]
    eos = set(adapter.eos_token_ids)
    tokens = []
    for row in out[:, batch.input_ids.shape[1] :].tolist():
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        tokens.append(row[:cut])
    return tokens, logits.float()


@pytest.mark.parametrize("n", [1, 3])
def test_full_equals_generate(adapter, n):
    images, questions = _batch(SIZES[:n]), QUESTIONS[:n]
    engine = Engine(adapter, build_method("full", Budget.full()))
    out = engine.generate(images, questions, list(range(n)), max_new_tokens=10)
    expected, logits = _hf_greedy(adapter, images, questions, 10)
    assert [s.tokens for s in out.samples] == expected
    torch.testing.assert_close(out.first_logits, logits, atol=1e-4, rtol=1e-4)
    assert all(s.n_kept_input == s.n_visual for s in out.samples)


@pytest.mark.parametrize("family", TINY_FAMILY_MODELS)
def test_full_equals_generate_eager_attention(family):
    adapter = tiny_adapter(family, attn="eager")
    images, questions = _batch(SIZES), QUESTIONS
    out = Engine(adapter, build_method("full", Budget.full())).generate(images, questions, [0, 1, 2], 6)
    expected, _ = _hf_greedy(adapter, images, questions, 6)
    assert [s.tokens for s in out.samples] == expected


def test_qwen_batch_has_different_visual_counts(qwen):
    out = Engine(qwen, build_method("full", Budget.full())).generate(_batch(SIZES), QUESTIONS, [0, 1, 2], 2)
    assert [s.n_visual for s in out.samples] == [16 * 12, 8 * 8, 12 * 16]


def test_random_budget_exact_and_matches_shapes(adapter):
    image = noise_image(448, 336)
    with layer_lengths(adapter) as lengths:
        out = Engine(adapter, build_method("random", Budget.tokens(20))).generate([[image]], [QUESTIONS[0]], [7], 3)
    sample = out.samples[0]
    n_text = text_length(adapter, image, QUESTIONS[0])
    assert sample.n_kept_input == 20
    assert sample.kept_per_layer == [20] * adapter.n_layers
    assert lengths == [n_text + 20] * adapter.n_layers
    assert sample.kv_len_per_layer == lengths


def test_random_batch_every_sample_keeps_budget(qwen):
    out = Engine(qwen, build_method("random", Budget.tokens(30))).generate(_batch(SIZES), QUESTIONS, [0, 1, 2], 2)
    assert [s.n_kept_input for s in out.samples] == [30, 30, 30]


def test_random_is_deterministic_per_document(qwen):
    method = build_method("random", Budget.ratio(0.25))
    engine = Engine(qwen, method, seed=3, record_kept=True)
    first = engine.generate(_batch(SIZES), QUESTIONS, [0, 1, 2], 1).samples
    alone = engine.generate(_batch(SIZES)[1:2], QUESTIONS[1:2], [1], 1).samples
    assert first[1].kept_index == alone[0].kept_index
    other = Engine(qwen, method, seed=4, record_kept=True)
    assert other.generate(_batch(SIZES)[1:2], QUESTIONS[1:2], [1], 1).samples[0].kept_index != alone[0].kept_index


def test_fastv_later_layers_see_reduced_count(adapter):
    image = noise_image(448, 336)
    with layer_lengths(adapter) as lengths:
        method = build_method("fastv", Budget.ratio(0.625), {"k": "2"})
        out = Engine(adapter, method).generate([[image]], [QUESTIONS[0]], [0], 3)
    sample = out.samples[0]
    n = sample.n_visual
    kept = round((round(0.625 * n) * 4 - 2 * n) / 2)  # layer average 0.625 over 4 layers, 2 of them full
    n_text = text_length(adapter, image, QUESTIONS[0])
    assert sample.kept_per_layer == [n, n, kept, kept]
    assert lengths == [n_text + n, n_text + n, n_text + kept, n_text + kept]
    # earlier layers keep their full cache, later ones the reduced one
    assert sample.kv_len_per_layer == lengths


def test_keep_all_at_every_stage_equals_full(adapter):
    """Dropping nothing through each mechanism must leave greedy output and logits unchanged."""
    images, questions = _batch(SIZES), QUESTIONS
    full = Engine(adapter, build_method("full", Budget.full())).generate(images, questions, [0, 1, 2], 6)
    for method in (build_method("random", Budget.ratio(1.0)), build_method("fastv", Budget.ratio(1.0))):
        out = Engine(adapter, method, position_policy="keep").generate(images, questions, [0, 1, 2], 6)
        assert [s.tokens for s in out.samples] == [s.tokens for s in full.samples]
        torch.testing.assert_close(out.first_logits, full.first_logits, atol=1e-5, rtol=1e-5)


def test_qwen_positions_survive_drop(qwen, monkeypatch):
    """After an embed-stage drop, text after the image keeps its M-RoPE ids; kept visual tokens keep theirs."""
    image = noise_image(448, 336)
    batch = qwen.preprocess([[image]], [QUESTIONS[0]])
    original = qwen.initial_position_ids(batch)[:, 0]  # (3, L)
    is_image = (batch.input_ids[0] == qwen.image_token_id)
    seen = []
    real = qwen.rotary
    monkeypatch.setattr(qwen, "rotary", lambda h, p: (seen.append(p.clone()), real(h, p))[1])
    engine = Engine(qwen, build_method("random", Budget.tokens(10)), record_kept=True)
    out = engine.generate([[image]], [QUESTIONS[0]], [0], 2)
    pruned = seen[0][:, 0]  # (3, L') positions entering layer 0
    kept = torch.tensor(out.samples[0].kept_index["embed"])
    image_positions = is_image.nonzero()[:, 0]
    expected = torch.cat(
        [original[:, : image_positions[0]], original[:, image_positions[kept]], original[:, image_positions[-1] + 1 :]],
        dim=1,
    )
    torch.testing.assert_close(pruned, expected)
    # text after the image: the same ids as in the unpruned sequence
    torch.testing.assert_close(pruned[:, -5:], original[:, -5:])
    # decoding continues from the last kept position + 1
    assert seen[1][:, 0, 0].tolist() == [int(original.max()) + 1] * 3


def test_llava_reindexes_positions_after_drop(llava, monkeypatch):
    seen = []
    real = llava.rotary
    monkeypatch.setattr(llava, "rotary", lambda h, p: (seen.append(p.clone()), real(h, p))[1])
    out = Engine(llava, build_method("random", Budget.tokens(10))).generate([[noise_image(112, 112)]], ["Hi?"], [0], 2)
    length = seen[0].shape[-1]
    assert seen[0][0, 0].tolist() == list(range(length))
    assert seen[1][0, 0, 0].item() == length
    assert out.samples[0].n_kept_input == 10


@dataclass
class _ProbeTopK:
    """A test method using the glimpse mechanics: a probe token, top-k by its attention at layer K."""

    budget: Budget
    layer: int = 1
    zero_probe: bool = False
    version = "test"
    name = "probe-topk"

    def stages(self, model):
        return [StageSpec(Stage.GLIMPSE, layer=self.layer)]

    def probe(self, model):
        hidden_size = model.hidden_size
        g = torch.Generator().manual_seed(0)
        token = torch.zeros(hidden_size) if self.zero_probe else torch.randn(hidden_size, generator=g)
        return GlimpseProbe(token, torch.randn(self.layer + 1, hidden_size, generator=g), (0, self.layer))

    def stage_count(self, spec, inputs: StageInputs):
        return inputs.budget_count

    def select(self, spec, inputs: StageInputs):
        logits = inputs.extras["probe_logits"]  # (layers, h, n)
        assert logits.shape[:1] == (2,) and logits.shape[-1] == inputs.n_visual
        score = logits.mean(dim=(0, 1))
        return KeepDecision(score.topk(inputs.budget_count).indices.sort().values)


def test_glimpse_keep_all_equals_full(adapter):
    """The probe sits after the prompt: keeping every token must reproduce the unpruned run exactly."""
    images, questions = _batch(SIZES), QUESTIONS
    full = Engine(adapter, build_method("full", Budget.full())).generate(images, questions, [0, 1, 2], 6)
    out = Engine(adapter, _ProbeTopK(Budget.ratio(1.0)), position_policy="keep").generate(images, questions, [0, 1, 2], 6)
    assert [s.tokens for s in out.samples] == [s.tokens for s in full.samples]
    torch.testing.assert_close(out.first_logits, full.first_logits, atol=1e-5, rtol=1e-5)


def test_glimpse_drops_from_earlier_caches(adapter):
    image = noise_image(448, 336)
    with layer_lengths(adapter) as lengths:
        out = Engine(adapter, _ProbeTopK(Budget.tokens(12), layer=1)).generate([[image]], [QUESTIONS[0]], [0], 3)
    sample = out.samples[0]
    n_text = text_length(adapter, image, QUESTIONS[0])
    n = sample.n_visual
    # layers 0..K ran with every token and the probe; layers K+1.. with the kept ones only
    assert lengths == [n_text + n + 1, n_text + n + 1, n_text + 12, n_text + 12]
    # ...and every layer's cache, 0..K included, holds only text + kept tokens (no probe)
    assert sample.kv_len_per_layer == [n_text + 12] * adapter.n_layers
    assert sample.kept_per_layer == [n, n, 12, 12]


def test_invalid_selection_is_reported():
    adapter = tiny_adapter("tiny-qwen2.5-vl")

    @dataclass
    class Unsorted:
        budget: Budget
        version = "test"
        name = "unsorted"

        def stages(self, model):
            return [StageSpec(Stage.EMBED)]

        def stage_count(self, spec, inputs):
            return inputs.budget_count

        def select(self, spec, inputs):
            return KeepDecision(torch.tensor([3, 1]))

    with pytest.raises(SelectionError, match="sorted and unique"):
        Engine(adapter, Unsorted(Budget.tokens(2))).generate([[noise_image(224, 224)]], ["q"], [5], 1)


def test_pool_and_downsample_counts(adapter):
    image = noise_image(448, 336)
    pool = Engine(adapter, build_method("pool", Budget.tokens(16))).generate([[image]], ["q?"], [0], 1).samples[0]
    assert pool.n_kept_input == 16
    down = Engine(adapter, build_method("downsample", Budget.tokens(30))).generate([[image]], ["q?"], [0], 1)
    sample = down.samples[0]
    assert sample.n_visual == adapter.n_visual_tokens(image)
    assert 0 < sample.n_kept_input <= 30


def test_downsample_splits_a_samples_budget_over_its_images(adapter):
    images = [[noise_image(448, 336, seed=1), noise_image(224, 224, seed=2)]]
    out = Engine(adapter, build_method("downsample", Budget.ratio(0.25))).generate(images, ["q?"], [0], 1).samples[0]
    assert 0 < out.n_kept_input <= round(0.25 * out.n_visual)


def test_split_budget_is_proportional_and_exact():
    assert split_budget(64, [192, 64]) == [48, 16]
    assert split_budget(10, [5, 5, 5]) == [4, 3, 3] and sum(split_budget(7, [100, 1])) == 7
    assert split_budget(2, [100, 100, 100]) == [1, 1, 1]  # at least one token per image


def test_llava_small_image_is_resized_up_not_cropped_down(llava):
    out = Engine(llava, build_method("full", Budget.full())).generate([[noise_image(56, 40)]], ["q?"], [0], 1)
    assert out.samples[0].n_visual == out.samples[0].n_kept_input == 256  # (224 / 14)^2


def test_merged_vision_states_identity_equals_full(adapter):
    """Returning the feature layer's own states for every token through the projector changes nothing."""

    @dataclass
    class Identity:
        budget: Budget
        version = "test"
        name = "identity"

        def stages(self, model):
            return [StageSpec(Stage.VISION, vision_layers=(model.vision_feature_layer,))]

        def stage_count(self, spec, inputs):
            return inputs.n_visual

        def select(self, spec, inputs):
            states = inputs.vision_hidden[spec.vision_layers[0]]
            return KeepDecision(torch.arange(inputs.n_visual), vision_states=states)

    images, questions = _batch(SIZES), QUESTIONS
    full = Engine(adapter, build_method("full", Budget.full())).generate(images, questions, [0, 1, 2], 4)
    out = Engine(adapter, Identity(Budget.full())).generate(images, questions, [0, 1, 2], 4)
    assert [s.tokens for s in out.samples] == [s.tokens for s in full.samples]
    torch.testing.assert_close(out.first_logits, full.first_logits, atol=1e-4, rtol=1e-4)


def test_position_policy_precedence(llava):
    glimpse = build_method("glimpseprune", Budget.ratio(0.5), {"allow_untrained": "true"})
    assert Engine(llava, glimpse).reindex is False  # the method's official default
    assert Engine(llava, glimpse, position_policy="reindex").reindex is True  # explicit wins
    assert Engine(llava, build_method("random", Budget.ratio(0.5))).reindex is True  # family default


def test_decoder_layers_get_the_cache_by_their_own_keyword(adapter):
    """No deprecated keyword reaches transformers (the `past_key_values` FutureWarning fired on every layer
    call), and the keyword the engine uses is one the layer declares, so the cache is never dropped silently."""
    import inspect
    import warnings

    from tokbench.engine import Engine
    from tokbench.pruner import Budget, build_method

    engine = Engine(adapter, build_method("full", Budget.full()))
    assert engine.cache_kwarg in inspect.signature(adapter.layers[0].forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        engine.generate([[noise_image(224, 224)]], ["What colour is the square?"], [0], max_new_tokens=3)


def test_prompt_context_matches_the_layers_own_attention(adapter):
    """At a `prompt_context` stage the prompt's last rater row is the engine's last-token row, the keys and
    rows cover exactly the prompt after the image, and layer-0 inputs keep every visual token."""
    from dataclasses import dataclass as _dataclass

    import torch as _torch

    from tokbench.engine import Engine
    from tokbench.pruner import KeepDecision, Stage, StageSpec

    @_dataclass
    class Recorder:
        budget: Budget | None = None
        name = "recorder"
        version = "test"
        seen = []

        def stages(self, model):
            return [StageSpec(Stage.LLM, layer=1, prompt_context=True)]

        def stage_count(self, spec, inputs):
            return None

        def select(self, spec, inputs):
            Recorder.seen.append(inputs)
            return KeepDecision(_torch.arange(inputs.n_visual // 2))

    images = [[noise_image(224, 224)], [noise_image(448, 336, seed=1)]]
    questions = ["What colour is the square?", "Is the red square left of the blue one, or not?"]
    Recorder.seen = []
    Engine(adapter, Recorder()).generate(images, questions, [0, 1], max_new_tokens=1)
    for inputs, question in zip(Recorder.seen, questions):
        extras, n = inputs.extras, inputs.n_visual
        m = extras["text_keys"].shape[0]
        assert extras["visual_keys"].shape[0] == n and extras["prompt_attention"].shape[1:] == (inputs.text_attention.shape[0], n)
        assert extras["prompt_attention"].shape[0] == extras["text_hidden_states"].shape[0] == extras["prompt_embeds"].shape[0] == m
        assert m >= len(question) // 8 and extras["visual_input_embeds"].shape[0] == inputs.n_visual_original
        _torch.testing.assert_close(extras["prompt_attention"][-1], inputs.text_attention, atol=1e-5, rtol=1e-4)
