"""Which visual tokens survive: the image once per method, pruned token cells dimmed.

The image is drawn as the model sees it (Qwen2.5-VL: resized to its token grid x 28 px; LLaVA: the
processor's shortest-edge resize and centre crop), so grid cells align with the model's tokens for any
aspect ratio. A token counts as kept when it survives the method's last stage (what decoding attends to).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tokbench.models.base import ModelAdapter
from tokbench.pruner import Budget, Stage, build_method


def model_view(adapter: ModelAdapter, image: Image.Image) -> Image.Image:
    """``image`` cropped/resized to exactly the region the model's token grid covers."""
    rows, cols = adapter.token_grid(image)
    if adapter.family == "llava":
        short = min(image.size)
        left, top = (image.width - short) // 2, (image.height - short) // 2
        image = image.crop((left, top, left + short, top + short))
    cell = 28 if adapter.family != "llava" else 14
    return image.convert("RGB").resize((cols * cell, rows * cell), Image.BICUBIC)


def kept_mask(kept_index: dict[str, list[int]], n_visual: int) -> np.ndarray:
    """(n_visual,) bool: tokens kept by the last stage that acted (all, when none did)."""
    mask = np.zeros(n_visual, dtype=bool)
    if not kept_index:
        mask[:] = True
        return mask
    mask[list(kept_index.values())[-1]] = True
    return mask


def dim_pruned(view: Image.Image, grid: tuple[int, int], mask: np.ndarray, dim: float = 0.25) -> Image.Image:
    """``view`` with the cells of tokens where ``mask`` is False darkened to ``dim`` brightness."""
    rows, cols = grid
    pixels = np.asarray(view, dtype=np.float32)
    cell_h, cell_w = pixels.shape[0] // rows, pixels.shape[1] // cols
    factor = np.where(mask.reshape(rows, cols), 1.0, dim).repeat(cell_h, 0).repeat(cell_w, 1)
    return Image.fromarray((pixels * factor[..., None]).clip(0, 255).astype(np.uint8))


def run_methods(adapter: ModelAdapter, image: Image.Image, question: str, methods: list[str], budget: Budget,
                method_args: dict[str, dict[str, str]] | None = None, max_new_tokens: int = 16) -> list[dict]:
    """One panel per method: the dimmed view, kept count, retention and the answer."""
    from tokbench.engine import Engine

    panels = []
    for name in methods:
        method = build_method(name, Budget.full() if name == "full" else budget, (method_args or {}).get(name))
        source = image
        if any(s.stage == Stage.INPUT for s in method.stages(adapter.info())):
            source = adapter.resize_to_tokens(image, budget.count(adapter.n_visual_tokens(image)))
        out = Engine(adapter, method, record_kept=True).generate([[image]], [question], [0], max_new_tokens)
        sample = out.samples[0]
        grid = adapter.token_grid(source)
        mask = kept_mask(sample.kept_index, grid[0] * grid[1])
        panels.append({
            "method": name,
            "view": dim_pruned(model_view(adapter, source), grid, mask),
            "kept": int(mask.sum()),
            "retention": int(mask.sum()) / sample.n_visual,
            "answer": "".join(ch for ch in sample.text.strip() if ch.isprintable()),
        })
    return panels


def draw(panels: list[dict], out: Path) -> list[Path]:
    """A row of panels titled method / retention / answer; writes ``out`` (and its .pdf/.png twin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.imshow(panel["view"])
        answer = panel["answer"][:24] + ("…" if len(panel["answer"]) > 24 else "")
        ax.set_title(f"{panel['method']}\n{panel['kept']} tokens ({panel['retention']:.0%})\n“{answer}”", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".pdf"):
        path = out.with_suffix(suffix)
        fig.savefig(path, dpi=150, bbox_inches="tight")
        written.append(path)
    plt.close(fig)
    return written
