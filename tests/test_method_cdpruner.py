"""CDPruner: greedy DPP MAP vs brute-force determinants, relevance, CLIP relevance with a tiny local CLIP."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import noise_image, tiny_adapter

from methods.cdpruner import dpp_greedy_map, dpp_greedy_order, min_max, strip_answer_format
from tokbench.engine import Engine
from tokbench.pruner import Budget, MethodError, ModelInfo, Stage, StageInputs, StageSpec, build_method

# the tiny models' capabilities (tokbench.models.tiny): Qwen's windowed 2x2-merge tower, LLaVA's CLIP with CLS
TINY_QWEN = ModelInfo("tiny-qwen2.5-vl", 4, 64, 4, 4, -1, (1, 3), 4, vision_hidden_size=32, position_rows=3)
TINY_LLAVA = ModelInfo("tiny-llava", 4, 64, 4, 4, -2, (0, 1, 2, 3), 1, vision_hidden_size=32, has_cls=True)


def _det(kernel: torch.Tensor, subset) -> float:
    subset = list(subset)
    return torch.linalg.det(kernel[subset][:, subset]).item()


def _psd_kernel(n: int, seed: int, rank: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return features @ features.T + 1e-3 * torch.eye(n, dtype=torch.float64)


def _inputs(n: int, budget: int, **fields) -> StageInputs:
    return StageInputs(n_visual=n, n_visual_original=n, tile_grids=[(1, n)],
                       token_rc=torch.zeros(n, 2, dtype=torch.long), budget_count=budget, **fields)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_map_agrees_with_brute_force_determinants(seed):
    for n in range(2, 9):
        kernel = _psd_kernel(n, seed * 100 + n)
        for k in range(1, min(4, n) + 1):
            # every step adds the token j maximising det(L_{S+j}), found by computing all those determinants
            chosen: list[int] = []
            for _ in range(k):
                chosen.append(max((j for j in range(n) if j not in chosen), key=lambda j: _det(kernel, chosen + [j])))
            assert dpp_greedy_order(kernel, k).tolist() == chosen
            # and against the best of all C(n, k) subsets: greedy MAP is close to (usually equal to) the optimum
            best = max(_det(kernel, s) for s in itertools.combinations(range(n), k))
            assert _det(kernel, dpp_greedy_map(kernel, k).tolist()) >= 0.5 * best


@pytest.mark.parametrize("n, rank, k", [(10, 2, 6), (256, 3, 128)])
def test_rank_deficient_kernel_still_gives_k_unique_tokens(n, rank, k):
    features = torch.randn(n, rank, generator=torch.Generator().manual_seed(0))
    kernel = features @ features.T  # rank < k: the later gains underflow, then blow up without care
    kept = dpp_greedy_map(kernel, k).tolist()
    assert len(kept) == k and kept == sorted(set(kept))


def test_irrelevant_duplicates_lose():
    # tokens 0..2 are relevant and distinct; 3..5 duplicate them but have (near) zero relevance
    x = torch.eye(6)[:3].repeat(2, 1)
    relevance = torch.tensor([1.0, 1.0, 1.0, 1e-6, 1e-6, 1e-6])
    kernel = relevance[:, None] * (x @ x.T) * relevance[None, :]
    assert dpp_greedy_map(kernel, 3).tolist() == [0, 1, 2]


def test_min_max_follows_the_official_formula():
    assert torch.allclose(min_max(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([1e-6, 2 + 1e-6, 1 + 1e-6]) / 2)
    assert min_max(torch.tensor([1.0, 1.0])).tolist() == [1.0, 1.0]


def test_strip_answer_format():
    q = "What colour is the square?\nAnswer with the option's letter from the given choices directly."
    assert strip_answer_format(q) == "What colour is the square?"
    assert strip_answer_format("Why?\nAnswer the question using a single word or phrase.") == "Why?"


def test_embeds_relevance_prefers_tokens_aligned_with_the_instruction():
    # tokens 0..2 point along the question (plus distinct small parts); tokens 3..5 are orthogonal to it
    # and to each other, so a plain diversity DPP prefers them, the conditional one the relevant ones
    d = 8
    q = torch.zeros(d)
    q[0] = 1.0
    relevant = q + 0.3 * torch.eye(d)[1:4]
    irrelevant = torch.eye(d)[4:7]
    visual = torch.cat([relevant, irrelevant])
    words = torch.stack([q, q + 0.1 * torch.eye(d)[7]])  # two instruction tokens
    method = build_method("cdpruner", Budget.tokens(3), {"relevance": "embeds"})
    decision = method.select(StageSpec(Stage.EMBED), _inputs(6, 3, visual_embeds=visual, instruction_embeds=words))
    assert decision.keep_index.tolist() == [0, 1, 2]
    assert decision.scores.argmin() >= 3 and decision.scores[:3].min() > decision.scores[3:].max()
    unit = torch.nn.functional.normalize(visual, dim=-1)
    assert dpp_greedy_map(unit @ unit.T, 3).tolist() != [0, 1, 2]


def test_bad_arguments_are_rejected():
    qwen = TINY_QWEN
    with pytest.raises(MethodError, match="relevance=embeds"):
        build_method("cdpruner", Budget.tokens(4), {"relevance": "clip"}).stages(qwen)
    with pytest.raises(MethodError, match="auto, clip or embeds"):
        build_method("cdpruner", Budget.tokens(4), {"relevance": "attention"}).stages(qwen)
    with pytest.raises(MethodError, match="--ratio or --budget"):
        build_method("cdpruner", Budget.dynamic()).stages(qwen)


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_end_to_end_embeds_relevance(family):
    adapter = tiny_adapter(family)
    image = noise_image(448, 336)
    method = build_method("cdpruner", Budget.tokens(10), {"relevance": "embeds"})
    runs = [Engine(adapter, method, record_kept=True).generate([[image]], ["What colour?"], [0], 1) for _ in range(2)]
    sample = runs[0].samples[0]
    assert sample.n_visual == adapter.n_visual_tokens(image) and sample.n_kept_input == 10
    assert sample.kept_per_layer == [10] * adapter.n_layers
    kept = sample.kept_index["embed"]
    assert kept == sorted(set(kept)) and kept[-1] < sample.n_visual and kept == runs[1].samples[0].kept_index["embed"]


# --- CLIP relevance (the official LLaVA recipe) with a tiny CLIP built from a config -------------------------


def _clip_tokenizer():
    """A real CLIPTokenizer over single byte-level characters (no merges): BOS 512, EOS 513 = the top id."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 2 * len(chars), "<|endoftext|>": 2 * len(chars) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(path, model, tokenizer): vision width 32 and 112/14 px like the tiny LLaVA's tower."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        # eos_token_id=2 as in the openai checkpoints' configs: the pooled text state is at argmax(input_ids)
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
                       "image_size": 112, "patch_size": 14},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


@torch.no_grad()
def _reference_relevance(model, tokenizer, patches: torch.Tensor, question: str) -> torch.Tensor:
    """The official formula computed segment by segment without padding (padding cannot change it)."""
    ids = tokenizer(question).input_ids
    image = model.visual_projection(model.vision_model.post_layernorm(patches))
    cosines = []
    for start in range(0, len(ids), 77):
        text = model.get_text_features(input_ids=torch.tensor([ids[start : start + 77]])).pooler_output
        cosines.append(torch.nn.functional.cosine_similarity(image, text, dim=-1))
    r = -torch.stack(cosines, dim=1).mean(dim=1)
    return (r - r.min() + 1e-6) / (r.max() - r.min())


@pytest.mark.parametrize(
    ("question", "segments"), [("What colour is the square?", 1), ("Describe every object. " * 5, 2)]
)
def test_clip_relevance_matches_the_official_formula(tiny_clip, question, segments):
    path, model, tokenizer = tiny_clip
    n = 20
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(n, 1, 32, generator=g)
    inputs = _inputs(n, 6, visual_embeds=torch.randn(n, 64, generator=g), vision_hidden={-2: patches},
                     question=question + "\nAnswer the question using a single word or phrase.")
    method = build_method("cdpruner", Budget.tokens(6), {"clip": str(path)})
    assert [s.stage for s in method.stages(TINY_LLAVA)] == [Stage.VISION]
    decision = method.select(StageSpec(Stage.VISION, vision_layers=(-2,)), inputs)
    expected = _reference_relevance(model, tokenizer, patches[:, 0], question)
    assert (len(tokenizer(question).input_ids) - 1) // 77 + 1 == segments
    torch.testing.assert_close(decision.scores, expected, rtol=1e-4, atol=1e-5)
    x = torch.nn.functional.normalize(inputs.visual_embeds, dim=-1)
    assert decision.keep_index.tolist() == dpp_greedy_map(expected[:, None] * (x @ x.T) * expected[None, :], 6).tolist()


def test_capabilities_choose_the_relevance(tiny_clip):
    """No family name: ``auto`` is ``clip`` exactly on a CLIP-style tower (CLS token, one patch per token)."""
    clip = {"clip": str(tiny_clip[0])}
    cases = [(TINY_LLAVA, Stage.VISION), (TINY_QWEN, Stage.EMBED),
             (ModelInfo("cls-merged", 4, 64, 4, 4, -1, (0, 1, 2, 3), 4, has_cls=True), Stage.EMBED),
             (ModelInfo("no-cls", 4, 64, 4, 4, -1, (0, 1, 2, 3), 1), Stage.EMBED)]  # fmt: skip
    for model, stage in cases:
        assert [s.stage for s in build_method("cdpruner", Budget.tokens(4), clip).stages(model)] == [stage]
    with pytest.raises(MethodError, match="needs a CLIP vision tower"):
        build_method("cdpruner", Budget.tokens(4), {**clip, "relevance": "clip"}).stages(cases[2][0])


def test_llava_clip_relevance_end_to_end(tiny_clip):
    adapter = tiny_adapter("tiny-llava")
    image = noise_image(448, 336)
    method = build_method("cdpruner", Budget.tokens(12), {"clip": str(tiny_clip[0])})  # relevance=auto -> clip
    out = Engine(adapter, method, record_kept=True).generate([[image]], ["What colour?"], [0], 1)
    sample = out.samples[0]
    assert sample.n_kept_input == 12 and sample.kept_per_layer == [12] * adapter.n_layers
    assert list(sample.kept_index) == ["vision"] and len(sample.kept_index["vision"]) == 12


def test_missing_clip_is_a_clear_error_when_the_engine_is_built(tmp_path):
    method = build_method("cdpruner", Budget.tokens(12), {"clip": str(tmp_path / "nope")})
    with pytest.raises(MethodError, match="relevance=embeds") as err:
        Engine(tiny_adapter("tiny-llava"), method)
    assert "clip=PATH" in str(err.value) and "\n" not in str(err.value)
