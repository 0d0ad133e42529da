"""The lmms-eval model plugin: any lmms-eval task, run through the tokbench engine with a method.

Registered through the ``lmms_eval.models`` entry-point group (pyproject.toml) as ``tokbench``::

    python -m lmms_eval eval --model tokbench \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=visionzip,ratio=0.111 \\
        --tasks vstar_bench --batch_size 4 --output_path out/

Model args: ``pretrained`` (alias, hub id or path), ``method``, ``ratio`` or ``budget``, ``dtype``,
``attn_implementation``, ``max_pixels``, ``random_weights``, ``seed``, ``efficiency_path`` (JSONL file for
per-sample efficiency records; default ``tokbench_efficiency.jsonl`` in the working directory); every
other key is a method argument (as ``--method-arg`` on the tokbench CLI). Data parallelism: launch with
``accelerate launch -m lmms_eval ...``; each process takes its own GPU and its share of the documents
(lmms-eval shards them by rank), and writes its own efficiency file (``.rank<N>`` suffix).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="tokbench", simple_class_path="tokbench.lmms.TokbenchLMM")


def _make_class():
    """Build the class lazily so that importing the manifest does not import torch/accelerate."""
    from accelerate import Accelerator
    from lmms_eval import utils
    from lmms_eval.api.model import lmms

    from tokbench.config import load_config
    from tokbench.engine import Engine
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
            accelerator = Accelerator()
            if accelerator.num_processes > 1:
                device = f"cuda:{accelerator.local_process_index}"
                self._rank, self._world_size = accelerator.local_process_index, accelerator.num_processes
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

        def generate_until(self, requests) -> list[str]:
            results: list[str] = []
            collator = utils.Collator([r.args for r in requests], lambda x: (-len(x[0]), x[0]), grouping=True)
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                contexts, all_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
                gen_kwargs = dict(all_kwargs[0])
                if float(gen_kwargs.get("temperature", 0) or 0) > 0:
                    raise ValueError("tokbench decodes greedily; set temperature 0 in the task's generation_kwargs")
                images = [
                    [v for v in (fn(self.task_dict[task][split][doc]) or []) if hasattr(v, "convert")]
                    for fn, doc, task, split in zip(doc_to_visual, doc_ids, tasks, splits)
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
                for sample, doc, task, context in zip(out.samples, doc_ids, tasks, contexts):
                    text = sample.text
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                    fields = efficiency_fields(
                        sample, out, memory, self.shape, getattr(self.method, "headline_retention", "input"),
                        self.adapter.dtype.itemsize,
                    )
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


def __getattr__(name: str):
    if name == "TokbenchLMM":
        cls = _make_class()
        globals()["TokbenchLMM"] = cls
        return cls
    raise AttributeError(name)
