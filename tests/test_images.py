"""Task images (tokbench/images.py): strict decoding, bombs as document errors, downscaling that keeps the
model's token grid."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import noise_image
from PIL import Image

from tokbench.images import decode_image, load_visuals, reduction_factor
from tokbench.synth import generate_vstar_synth
from tokbench.tasks import DocError, load_task


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _vstar_with(tmp_path: Path, images: dict[int, bytes], n: int = 4) -> Path:
    """A vstar-synth folder whose docs ``images`` keys carry the given encoded image bytes."""
    import datasets

    out = generate_vstar_synth(tmp_path / "data", n=n, seed=0)
    table = datasets.Dataset.from_parquet(str(out / "test.parquet"), cache_dir=str(tmp_path / "cache"))
    table = table.cast_column("image", datasets.Image(decode=False))
    table = table.map(
        lambda row, i: {"image": {"bytes": images.get(i, row["image"]["bytes"]), "path": row["image"]["path"]}},
        with_indices=True,
    )
    table.cast_column("image", datasets.Image()).to_parquet(str(out / "test.parquet"))
    return out


def test_truncated_png_is_the_docs_error_even_with_lmms_evals_tolerant_flag(tmp_path):
    from PIL import ImageFile

    whole = _png(noise_image(448, 336, seed=1))
    task = load_task("vstar-synth", data_dir=str(_vstar_with(tmp_path, {2: whole[: len(whole) * 2 // 3]})))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # lmms-eval's import turned it on, globally
    assert task.doc(1).images[0].size == (448, 336)
    with pytest.raises(DocError, match=r"doc 2 \(image images/000002.png in .*\): OSError: .*truncated"):
        task.doc(2)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_truncated_visual_cot_image_file_is_the_docs_error(tmp_path):
    from tokbench.synth.visual_cot import generate_visual_cot_synth

    root = generate_visual_cot_synth(tmp_path / "viscot", n=2)
    path = root / "images" / "shapes" / "000001.png"
    path.write_bytes(path.read_bytes()[:2000])
    task = load_task("visual_cot_synth", data_dir=str(root))
    assert task.doc(0).images[0].size == (448, 448)
    with pytest.raises(DocError, match=r"doc 1: OSError: .*truncated"):
        task.doc(1)


def test_decompression_bomb_is_one_docs_error_not_a_task_failure(tmp_path, monkeypatch):
    big = _png(Image.new("RGB", (1200, 1000), (40, 90, 160)))
    out = _vstar_with(tmp_path, {0: big})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300_000)  # refused above 600k pixels; the others are ~150k
    task = load_task("vstar-synth", data_dir=str(out))  # lmms-eval reads doc 0 while building the task
    with pytest.raises(DocError, match=r"doc 0 .*DecompressionBombError"):
        task.doc(0)
    assert task.doc(1).images[0].mode == "RGB"


@pytest.mark.parametrize("encode", [_png, _jpeg])
def test_downscaled_doc_gives_the_models_token_grid(tmp_path, qwen, encode):
    sizes = {0: (3000, 2000), 1: (1234, 4321), 2: (700, 500)}
    out = _vstar_with(tmp_path, {i: encode(noise_image(w, h, seed=i)) for i, (w, h) in sizes.items()})
    task = load_task("vstar-synth", data_dir=str(out))
    budget = qwen.processor.image_processor.size["longest_edge"]
    for doc_id, size in sizes.items():
        full, reduced = task.doc(doc_id).images[0], task.doc(doc_id, max_pixels=budget).images[0]
        assert full.size == size
        assert qwen.token_grid(reduced) == qwen.token_grid(full)
        batch = qwen.preprocess([[reduced]], ["q"])
        expected = qwen.preprocess([[full]], ["q"])
        assert batch.model_inputs["image_grid_thw"].tolist() == expected.model_inputs["image_grid_thw"].tolist()
        if doc_id != 2:  # 700 x 500 is below twice the target: kept as is
            assert reduced.width * reduced.height < full.width * full.height / 4
        else:
            assert reduced.size == full.size


def test_reduction_never_goes_below_the_target_or_changes_the_grid():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    rng = np.random.default_rng(0)
    reduced_any = 0
    for _ in range(400):
        width, height = (int(v) for v in rng.integers(100, 13000, 2))
        max_pixels = int(rng.choice([50176, 200704, 1003520, 3211264]))
        factor = reduction_factor(width, height, max_pixels)
        target = smart_resize(height, width, 28, 3136, max_pixels)
        if factor > 1:
            small = (-(-height // factor), -(-width // factor))
            assert small[0] >= target[0] and small[1] >= target[1]
            assert smart_resize(*small, 28, 3136, max_pixels) == target
            reduced_any += 1
    assert reduced_any > 200
    assert reduction_factor(12000, 12000, 50176) >= 50  # 12000² → about 227², not a 432 MB decode


def test_a_task_that_crops_gets_the_full_image_then_reduced():
    image = noise_image(2000, 1600, seed=3)
    row = {"image": {"bytes": _png(image), "path": None}}

    def crop_left_half(doc):
        return [doc["image"].crop((0, 0, 1000, 1600))]

    (visual,) = load_visuals(crop_left_half, row, ["image"], max_pixels=50176)
    expected = image.crop((0, 0, 1000, 1600))
    factor = reduction_factor(1000, 1600, 50176)
    assert factor > 1 and visual.size == expected.reduce(factor).size
    assert np.array_equal(np.asarray(visual), np.asarray(expected.reduce(factor)))


def test_decode_image_reads_paths_bytes_and_hub_dicts(tmp_path):
    image = noise_image(64, 48)
    (tmp_path / "a.png").write_bytes(_png(image))
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), _png(image), {"bytes": None, "path": str(tmp_path / "a.png")}):
        assert np.array_equal(np.asarray(decode_image(source)), np.asarray(image))
    with pytest.raises(OSError):
        decode_image(b"not an image")


def test_max_pixels_hint_comes_from_the_qwen_processor(qwen, llava):
    from tokbench.images import max_pixels_of

    assert max_pixels_of(qwen) == qwen.processor.image_processor.size["longest_edge"] == 200704
    assert max_pixels_of(llava) is None
