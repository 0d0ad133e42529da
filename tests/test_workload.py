"""The V*-sized offline workload: vstar-synth-hires feeds ~4000 visual tokens per image at the protocol's
max_pixels, while the canary task stays small."""

from __future__ import annotations

from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from tokbench.tasks import load_task

PROTOCOL_MAX_PIXELS = 3211264  # GlimpsePrune's V* efficiency protocol


def _qwen_tokens(width: int, height: int) -> int:
    h, w = smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=PROTOCOL_MAX_PIXELS)
    return (h // 28) * (w // 28)


def test_hires_task_has_v_star_sized_images():
    task = load_task("vstar-synth-hires")
    assert len(task) == 24
    tokens = [_qwen_tokens(*task.doc(d).images[0].size) for d in task.doc_ids()]
    assert min(tokens) >= 3900 and max(tokens) <= 4096
    sizes = {task.doc(d).images[0].size for d in task.doc_ids()}
    assert all(w * h >= 3.1e6 for w, h in sizes)  # real V* images average ~2246x1582 (3.55 MP)


def test_canary_task_stays_small():
    task = load_task("vstar-synth", limit=5)
    assert all(_qwen_tokens(*task.doc(d).images[0].size) <= 256 for d in task.doc_ids())
