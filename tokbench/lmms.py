"""The lmms-eval model plugin: any lmms-eval task, run through the tokbench engine with a method.

Registered through the ``lmms_eval.models`` entry-point group (pyproject.toml) as ``tokbench``::

    python -m lmms_eval eval --model tokbench \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=visionzip,ratio=0.111 \\
        --tasks vstar_bench --batch_size 4 --output_path out/

Model args: ``pretrained`` (alias, hub id or path), ``method``, ``ratio`` or ``budget``, ``dtype``,
``attn_implementation``, ``max_pixels``, ``random_weights``, ``seed``, ``efficiency_path`` (JSONL file for
per-sample efficiency records; default ``tokbench_efficiency.jsonl`` in the working directory); every
other key is a method argument (as ``--method-arg`` on the tokbench CLI). Data parallelism: launch with
``accelerate launch --multi_gpu --num_processes N -m lmms_eval ...``; each process takes its own GPU
(CPU processes over gloo on a machine without one) and its share of the documents (lmms-eval shards them
by rank), and writes its own efficiency file (``.rank<N>`` suffix; lmms-eval's padding requests, which
even out the ranks, are left out). Images are decoded strictly and within the model's pixel budget
(``tokbench.images``). Each answer carries lmms-eval's token counts (``--log_samples`` then fills the
results' ``efficiency`` block): input = tokens entering the LLM's first layer (text + the visual tokens
kept before the LLM), output = generated tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="tokbench", simple_class_path="tokbench.lmms.TokbenchLMM")


def _make_class():
    """Build the class lazily so that importing the manifest does not import torch/accelerate."""
    import torch
    from lmms_eval import utils
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms

    from tokbench.config import load_config
    from tokbench.engine import Engine
    from tokbench.images import load_visuals, max_pixels_of, undecoded
    from tokbench.metrics import LLMShape, PeakMemory
    from tokbench.models import load_model
    from tokbench.pruner import Budget, build_method
    from tokbench.records import efficiency_fields

    class TokbenchLMM(lmms):
        """lmms-eval `simple` model: generate_until through `tokbench.engine.Engine`."""

        def __init__(
            self,
            pretrained: str = "tiny-qwen2.5-vl",
            method: str = "full",
            ratio: float | None = None,
            budget: int | None = None,
            batch_size: int | str = 1,
            dtype: str = "auto",
            attn_implementation: str = "auto",
            max_pixels: int | None = None,
            random_weights: bool = False,
            seed: int = 0,
            position_policy: str | None = None,
            efficiency_path: str = "tokbench_efficiency.jsonl",
            device: str | None = None,
            **method_args: Any,
        ) -> None:
            super().__init__()
            rank, world, local_rank, accelerator = _processes()
            if world > 1:  # lmms-eval shards the docs by rank and gathers counts on self.device
                self._rank, self._world_size = rank, world
                if accelerator is not None:
                    self.accelerator = accelerator
                device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
            if ratio is not None and budget is not None:
                raise ValueError("pass ratio or budget, not both")
            chosen = Budget.tokens(int(budget)) if budget is not None else Budget.ratio(float(ratio or 1.0))
            self.method = build_method(method, chosen, {k: str(v) for k, v in method_args.items()})
            self.adapter = load_model(
                str(pretrained), load_config().models, dtype=dtype, attn_implementation=attn_implementation,
                device=device if device and device != "auto" else None,
                random_weights=str(random_weights).lower() in ("1", "true", "yes"),
                max_pixels=int(max_pixels) if max_pixels else None,
            )
            self.engine = Engine(self.adapter, self.method, position_policy, seed=int(seed))
            self.batch_size = int(batch_size)
            self.shape = LLMShape.from_config(self.adapter.text_config)
            suffix = f".rank{self._rank}" if self._world_size > 1 else ""
            self.efficiency_path = Path(str(efficiency_path) + suffix)
            self.labels = {"model": str(pretrained), "method": method, "budget": chosen.label()}
            self._undecoded: dict[tuple[str, str], tuple[Any, list[str]]] = {}

        @property
        def device(self) -> torch.device:
            """Where the model runs (lmms-eval puts its cross-rank counters there)."""
            return torch.device(self.adapter.device)

        def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
            """The doc's images, decoded strictly and within the model's pixel budget (tokbench.images)."""
            key = (task, split)
            if key not in self._undecoded:
                self._undecoded[key] = undecoded(self.task_dict[task][split])
            docs, columns = self._undecoded[key]
            visuals = load_visuals(doc_to_visual, docs[doc_id], columns, max_pixels_of(self.adapter))
            return [v for v in visuals if hasattr(v, "convert")]

        def generate_until(self, requests) -> list[GenerationResult]:
            """Greedy generation per request; each result carries lmms-eval's token counts (input: the
            tokens entering the LLM's first layer, i.e. text + visual tokens kept before the LLM)."""
            results: list[GenerationResult] = []
            padding = [bool((r.metadata or {}).get("__padding_only__")) for r in requests]  # evens out the ranks
            args = [(*r.args, pad) for r, pad in zip(requests, padding)]
            collator = utils.Collator(args, lambda x: (-len(x[0]), x[0]), grouping=True)
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                contexts, all_kwargs, doc_to_visual, doc_ids, tasks, splits, pads = zip(*chunk)
                gen_kwargs = dict(all_kwargs[0])
                if float(gen_kwargs.get("temperature", 0) or 0) > 0:
                    raise ValueError("tokbench decodes greedily; set temperature 0 in the task's generation_kwargs")
                images = [
                    self._visuals(fn, task, split, doc) for fn, doc, task, split in zip(doc_to_visual, doc_ids, tasks, splits)
                ]
                questions = [c.replace("<image>", "").strip() for c in contexts]
                with PeakMemory(self.adapter.device) as memory:
                    out = self.engine.generate(
                        [[img.convert("RGB") for img in imgs] for imgs in images], questions, list(doc_ids),
                        int(gen_kwargs.get("max_new_tokens", 128)),
                    )
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else until
                rows = []
                for sample, doc, task, context, pad in zip(out.samples, doc_ids, tasks, contexts, pads):
                    text = sample.text
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    counts = TokenCounts(input_tokens=sample.seq_len_per_layer[0], output_tokens=len(sample.tokens))
                    results.append(GenerationResult(text=text, token_counts=counts))
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                    fields = efficiency_fields(
                        sample, out, memory, self.shape, getattr(self.method, "headline_retention", "input"),
                        self.adapter.dtype.itemsize,
                    )
                    if not pad:
                        rows.append({**self.labels, "task": task, "doc_id": doc, "prediction": text, **fields})
                self._write(rows)
            return collator.get_original(results)

        def _write(self, rows: list[dict]) -> None:
            self.efficiency_path.parent.mkdir(parents=True, exist_ok=True)
            with self.efficiency_path.open("a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")

        def loglikelihood(self, requests):
            raise NotImplementedError("tokbench measures generation; loglikelihood tasks are not supported")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("tokbench runs single-turn generation")

    return TokbenchLMM


def _processes():
    """(rank, world size, local rank, accelerator or None) of this process.

    lmms-eval's CLI builds an ``Accelerator()`` first; on a machine without GPUs that one reports a
    single process although torch.distributed (gloo) is up with every rank, and lmms-eval then uses
    its torchrun code path. So the process group decides, and the accelerator is kept only when it
    agrees.
    """
    import os

    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = accelerator.process_index, accelerator.num_processes
    local_rank = int(os.environ.get("LOCAL_RANK", accelerator.local_process_index))
    return rank, world, local_rank, accelerator if accelerator.num_processes == world > 1 else None


def __getattr__(name: str):
    if name == "TokbenchLMM":
        cls = _make_class()
        globals()["TokbenchLMM"] = cls
        return cls
    raise AttributeError(name)
