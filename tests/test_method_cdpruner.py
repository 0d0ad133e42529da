"""CDPruner: greedy DPP MAP vs brute force, relevance, and end-to-end runs (embeds and tiny-CLIP relevance)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import noise_image, tiny_adapter

from methods.cdpruner import dpp_greedy_map, min_max
from tokbench.engine import Engine
from tokbench.pruner import Budget, build_method


def _brute_force_greedy(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy by explicit determinants: each step adds the item maximising det(L_S)."""
    chosen: list[int] = []
    for _ in range(k):
        best = max((j for j in range(kernel.shape[0]) if j not in chosen),
                   key=lambda j: torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]).item())
        chosen.append(best)
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_map_matches_determinant_greedy_and_is_near_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 8, 4
    features = torch.randn(n, 5, generator=g, dtype=torch.float64)
    kernel = features @ features.T + 1e-3 * torch.eye(n, dtype=torch.float64)
    kept = dpp_greedy_map(kernel, k).tolist()
    assert kept == _brute_force_greedy(kernel, k)
    best = max(torch.linalg.det(kernel[list(s)][:, list(s)]).item() for s in itertools.combinations(range(n), k))
    assert torch.linalg.det(kernel[kept][:, kept]).item() >= 0.25 * best


def test_irrelevant_duplicates_lose():
    # tokens 0..2 are relevant and distinct; 3..5 duplicate token 0 and have zero relevance
    x = torch.eye(6)[:3].repeat(2, 1)
    relevance = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    kernel = relevance[:, None] * (x @ x.T) * relevance[None, :] + 1e-6 * torch.eye(6)
    assert dpp_greedy_map(kernel, 3).tolist() == [0, 1, 2]


def test_min_max():
    assert min_max(torch.tensor([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert min_max(torch.tensor([1.0, 1.0])).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_end_to_end_embeds_relevance(family):
    adapter = tiny_adapter(family)
    method = build_method("cdpruner", Budget.tokens(10), {"relevance": "embeds"})
    out = Engine(adapter, method, record_kept=True).generate([[noise_image(448, 336)]], ["What colour?"], [0], 1)
    assert out.samples[0].n_kept_input == 10


def _tiny_clip(path):
    from transformers import CLIPConfig, CLIPModel

    from tokbench.models.tiny import llava_processor

    processor, _ = llava_processor(112, 14)
    config = CLIPConfig(
        text_config={"vocab_size": len(processor.tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
                       "image_size": 112, "patch_size": 14},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    return path


def test_llava_clip_relevance_with_a_local_clip(tmp_path):
    adapter = tiny_adapter("tiny-llava")
    clip = _tiny_clip(tmp_path / "clip")
    method = build_method("cdpruner", Budget.tokens(12), {"clip": str(clip)})
    out = Engine(adapter, method, record_kept=True).generate([[noise_image(448, 336)]], ["What colour?"], [0], 1)
    assert out.samples[0].n_kept_input == 12 and list(out.samples[0].kept_index) == ["vision"]


def test_missing_clip_is_a_clear_error(tmp_path):
    adapter = tiny_adapter("tiny-llava")
    method = build_method("cdpruner", Budget.tokens(12), {"clip": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="relevance=embeds"):
        Engine(adapter, method).generate([[noise_image(112, 112)]], ["q"], [0], 1)
