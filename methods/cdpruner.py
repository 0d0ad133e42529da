"""`cdpruner`: CDPruner (Zhang et al., arXiv 2506.10967), Sec. 3.2–3.3 "Conditional DPP".

Keeps the visual tokens that are both *diverse* and *relevant to the instruction* by MAP inference of a
conditional determinantal point process:

* similarity S = cos(X, X) of the projected visual tokens X (LLM input space), Sec. 3.2;
* relevance r of each token to the instruction, min–max normalised to [0, 1], Sec. 3.3;
* kernel L = diag(r) · S · diag(r) (Eq. 6);
* greedy MAP with incremental Cholesky updates (Chen et al., NeurIPS 2018), exactly ``budget`` steps,
  kept tokens in original order.

Relevance sources (``relevance`` arg): ``clip`` — the official LLaVA recipe: CLIP image embeddings
(post-layernorm + visual projection of the vision tower's feature-layer patch states; LLaVA-1.5's tower
*is* CLIP ViT-L/14-336) against CLIP text embeddings of the question in 77-token chunks, averaged over
chunks; the official code negates the cosine before min–max normalisation and so do we. ``embeds`` — for
Qwen2.5-VL, whose relevance recipe was published without code: cosine between each visual token and the
question's token embeddings in the LLM's own input space, averaged over question tokens, min–max
normalised (no negation: there is no CLIP sign convention to match). ``auto`` (default) picks ``clip`` for
LLaVA and ``embeds`` for Qwen2.5-VL. The CLIP weights load from ``clip`` (hub id or local path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokbench.pruner import Budget, KeepDecision, ModelInfo, Stage, StageInputs, StageSpec, register_method


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of a DPP by incremental Cholesky updates. kernel (n, n) PSD -> sorted indices (k,)."""
    kernel = kernel.double()
    n = kernel.shape[0]
    if k >= n:
        return torch.arange(n)
    factors = torch.zeros(k, n, dtype=kernel.dtype, device=kernel.device)  # rows of the Cholesky factor
    gains = kernel.diagonal().clone()  # d_j^2: marginal gain of adding j
    chosen: list[int] = []
    for step in range(k):
        # once the kernel's rank is exhausted gains can turn NaN; never pick a chosen token
        pick = int(torch.nan_to_num(gains, nan=-1e300).argmax())
        chosen.append(pick)
        e = (kernel[pick] - factors[:step].T @ factors[:step, pick]) / gains[pick].clamp_min(1e-12).sqrt()
        factors[step] = e
        gains = gains - e**2
        gains[chosen] = float("-inf")
    return torch.tensor(sorted(chosen), dtype=torch.long)


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Min–max normalisation to [0, 1] (all-equal inputs give ones)."""
    span = x.max() - x.min()
    return torch.ones_like(x) if span <= 0 else (x - x.min()) / span


@register_method("cdpruner")
@dataclass
class CDPruner:
    budget: Budget
    relevance: str = "auto"  # auto | clip | embeds
    clip: str = "openai/clip-vit-large-patch14-336"
    version = "1"
    headline_retention = "input"
    _source: str = field(default="embeds", init=False, repr=False)
    _clip: Any = field(default=None, init=False, repr=False)

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        if self.relevance not in ("auto", "clip", "embeds"):
            raise ValueError(f"cdpruner: relevance={self.relevance!r}; use auto, clip or embeds")
        self._source = self.relevance if self.relevance != "auto" else ("clip" if model.family == "llava" else "embeds")
        if self._source == "clip":
            if model.family != "llava":
                raise ValueError("cdpruner: relevance=clip needs a CLIP vision tower (LLaVA); use relevance=embeds")
            return [StageSpec(Stage.VISION, vision_layers=(model.vision_feature_layer,))]
        return [StageSpec(Stage.EMBED)]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return min(inputs.budget_count, inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        x = torch.nn.functional.normalize(inputs.visual_embeds.float(), dim=-1)
        similarity = x @ x.T
        if self._source == "clip":
            relevance = min_max(-self._clip_cosine(inputs.vision_hidden[spec.vision_layers[0]][:, 0], inputs.question))
        else:
            words = torch.nn.functional.normalize(inputs.instruction_embeds.float(), dim=-1)
            relevance = min_max((x @ words.T).mean(dim=1))
        kernel = relevance[:, None] * similarity * relevance[None, :]
        return KeepDecision(dpp_greedy_map(kernel, self.stage_count(spec, inputs)), scores=relevance)

    def _clip_cosine(self, patch_states: torch.Tensor, question: str) -> torch.Tensor:
        """(n,) cosine between CLIP image embeddings of the patches and the question's text embedding."""
        model, tokenizer = self._load_clip()
        with torch.no_grad():
            image = model.visual_projection(model.vision_model.post_layernorm(patch_states.to(model.dtype)))
            ids = tokenizer(question, add_special_tokens=False).input_ids or [tokenizer.eos_token_id or 0]
            width = min(77, model.config.text_config.max_position_embeddings) - 2
            chunks = [ids[i : i + width] for i in range(0, len(ids), width)]
            texts = []
            for chunk in chunks:
                batch = torch.tensor([chunk], device=model.device)
                out = model.get_text_features(input_ids=batch)
                texts.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
            text = torch.nn.functional.normalize(torch.cat(texts).float(), dim=-1)  # (chunks, p)
        image = torch.nn.functional.normalize(image.float(), dim=-1)
        return (image @ text.T).mean(dim=1)

    def _load_clip(self):
        if self._clip is None:
            from transformers import AutoTokenizer, CLIPModel

            try:
                model = CLIPModel.from_pretrained(self.clip).eval()
                tokenizer = AutoTokenizer.from_pretrained(self.clip)
            except OSError:
                raise ValueError(
                    f"cdpruner: cannot load CLIP {self.clip!r} for relevance (offline?); pass --method-arg clip=PATH "
                    "or --method-arg relevance=embeds"
                ) from None
            self._clip = (model, tokenizer)
        return self._clip
