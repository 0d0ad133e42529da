"""vstar_synth data hook. Prompt and scoring come from lmms-eval's vstar_bench (see the YAML)."""

from __future__ import annotations

PLACEHOLDER_COLUMN = "tokbench_placeholder"


def process_docs(dataset, variant: str = "vstar_synth"):
    """Swap the one-row placeholder for the generated dataset; real data (an override) passes through."""
    if PLACEHOLDER_COLUMN not in dataset.column_names:
        return dataset
    import datasets

    from tokbench.synth import data_root, ensure_vstar_synth, quiet_datasets
    from tokbench.synth.vstar import VARIANTS

    path = ensure_vstar_synth(**VARIANTS[variant]) / "test.parquet"
    with quiet_datasets():
        return datasets.Dataset.from_parquet(str(path), cache_dir=str(data_root() / "hf-datasets"))


def process_docs_hires(dataset):
    """As `process_docs`, with the V*-sized images of ``vstar_synth_hires``."""
    return process_docs(dataset, "vstar_synth_hires")
