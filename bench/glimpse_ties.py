"""GlimpsePrune's capped selection in bf16: how many kept tokens differ between the official ranking and tokbench's.

The official ``_get_remain_masks`` takes ``topk`` of ``sigmoid(logit)`` in the model's dtype; in bf16 the
sigmoid is exactly 1.0 from a logit of ~6.24, so when more tokens saturate than the cap keeps, its choice
among them is arbitrary. tokbench ranks by the float32 logit, ties to the lower index
(``methods.glimpseprune.top_tokens``). Constructed cases: ``n`` tokens, a share of "relevant" tokens with
logits N(mu, 2), the rest N(-6, 2), cap ``int(0.111 n)``; prints the saturated count and how many of the
cap's kept tokens differ (official = this machine's ``topk`` on bf16 probabilities). docs/methods/glimpseprune.md.

    python bench/glimpse_ties.py --tokens 4096 --seeds 10
"""

from __future__ import annotations

import argparse

import torch

from methods.glimpseprune import top_tokens


def official_top(logits: torch.Tensor, k: int) -> set[int]:
    """The VIP's logits in bf16, sigmoid in bf16, ``topk`` of the probabilities."""
    return set(torch.topk(logits.to(torch.bfloat16).sigmoid(), k).indices.tolist())


def saturation_logit() -> float:
    """The smallest logit on a 0.01 grid whose bf16 sigmoid is exactly 1.0."""
    grid = torch.linspace(-10, 10, 2001)
    return float(grid[(grid.to(torch.bfloat16).sigmoid() == 1).nonzero()[0, 0]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--cap", type=float, default=0.111)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    n, k = args.tokens, int(args.cap * args.tokens)
    print(f"bf16 sigmoid is 1.0 from logit {saturation_logit():.2f}; {n} tokens, cap keeps {k}")
    for share, mu in ((0.12, 8.0), (0.2, 9.0), (0.3, 10.0)):
        differ, saturated, over = [], [], []
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            relevant = torch.rand(n, generator=g) < share
            noise = 2 * torch.randn(n, generator=g)
            logits = torch.where(relevant, mu + noise, -6 + noise)
            saturated.append(int((logits.to(torch.bfloat16).sigmoid() == 1).sum()))
            over.append(int((logits > 0).sum()))
            differ.append(k - len(official_top(logits, k) & set(top_tokens(logits, k).tolist())))
        print(
            f"relevant {share:.0%}, mu {mu:g}: over 0.5 {sum(over) / len(over):.0f}, saturated "
            f"{sum(saturated) / len(saturated):.0f}, differ {min(differ)}..{max(differ)} "
            f"(mean {sum(differ) / len(differ):.1f} of {k})"
        )


if __name__ == "__main__":
    main()
