"""Runs are checked from the model's config alone, before any weights load (docs/errors.md, issue #16 item 13).

Every bad input exits 2 with one line, leaves no run dir behind and never reaches `load_model`; a hint
that names a setting is a setting that passes the same checks.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_FAMILY_MODELS, tiny_adapter
from typer.testing import CliRunner

import tokbench.models
from tokbench.cli import app
from tokbench.config import load_config
from tokbench.models import ModelError
from tokbench.models.config_info import config_info
from tokbench.pruner import Budget, BudgetError, MethodError, ModelInfo, Stage, StageSpec, build_method, plan_stages
from tokbench.runner import RunConfig, validate

runner = CliRunner()
ALIASES = load_config().models


def _weights_dirs(root: Path) -> dict[str, str]:
    """Placeholders -> paths: an empty dir, a dir with only config.json, broken GlimpsePrune weights."""
    paths = {name: root / name for name in ("EMPTY_DIR", "CONFIG_ONLY", "GP_EMPTY", "GP_CORRUPT_PT", "GP_BAD_JSON")}
    for path in paths.values():
        path.mkdir()
    (paths["CONFIG_ONLY"] / "config.json").write_text('{"model_type": "llava"}')
    (paths["GP_CORRUPT_PT"] / "config.json").write_text("{}")
    (paths["GP_CORRUPT_PT"] / "new_modules_gp.pt").write_bytes(b"\x80\x02not a torch file")
    (paths["GP_BAD_JSON"] / "config.json").write_text("{not json")
    torch.save({"attn_fuser": {}, "learnable_embeddings": torch.zeros(1)}, paths["GP_BAD_JSON"] / "new_modules_gp.pt")
    return {**{k: str(v) for k, v in paths.items()}, "MISSING_DIR": str(root / "no-such-dir"), "NO_CLIP": str(root / "no-clip")}


PREFLIGHT = [  # (extra args, message); every row exits 2 before the model loads
    (["--method", "fastv", "--method-arg", "k=-7"], "fastv: k=-7 must lie in 1..3 for a 4-layer model; pass --method-arg k=2"),
    (["--method", "fastv", "--method-arg", "k=0", "--ratio", "0.25"], "fastv: k=0 must lie in 1..3"),
    (["--method", "fastv", "--method-arg", "k=4"], "fastv: k=4 must lie in 1..3"),
    (["--method", "fastv", "--ratio", "0.25"], "fastv: layer-averaged retention 0.25 is unreachable with k=2 of 4 layers"),
    (["--method", "fastv", "--ratio", "0.4"], "k=1 reaches it (retention > 0.25): pass --method-arg k=1"),
    (["--method", "pyramiddrop", "--ratio", "0.2"], "pyramiddrop: layer-averaged retention 0.2 is unreachable"),
    (["--method", "pyramiddrop", "--method-arg", "lam=2"], "pyramiddrop: lam=2.0 must lie in (0, 1]"),
    (["--method", "pyramiddrop", "--method-arg", "layer_list=a,b"], "use comma-separated layer counts"),
    (["--method", "pyramiddrop", "--method-arg", "layer_list=2,4"], "boundaries (2, 4) must lie in 1..3"),
    (["--method", "vscan", "--method-arg", "mid_layer=0.1"], "vscan: mid_layer=0.1 puts stage 2 after 0 of 4 layers"),
    (["--method", "vscan", "--method-arg", "mid_keep=0"], "vscan: mid_keep=0.0 must lie in (0, 1]"),
    (["--dtype", "int8"], "unknown dtype 'int8'; use auto, bfloat16, float16, float32"),
    (["--attn", "bogus"], "unknown attention implementation 'bogus'"),
    (["--model", ""], "--model is empty"),
    (["--model", "EMPTY_DIR"], "has no config.json"),
    (["--model", "CONFIG_ONLY"], "has no weights"),
    (["--model", "someorg/not-a-real-vlm"], "not a local checkpoint and not in the HF cache"),
    (["--method", "glimpseprune", "--model", "tiny-llava"], "glimpseprune has no default weights for 'tiny-llava'"),
    (["--method", "cdpruner", "--model", "tiny-llava", "--method-arg", "clip="], "relevance=clip needs a CLIP checkpoint"),
    (["--method", "cdpruner", "--model", "tiny-llava", "--method-arg", "clip=NO_CLIP"], "cdpruner: cannot load CLIP"),
    (["--method", "cdpruner", "--method-arg", "relevance=text"], "cdpruner: relevance='text'; use auto, clip or embeds"),
    (["--method", "divprune", "--method-arg", "features=pixels"], "divprune: features='pixels'; use embeds or vision"),
    (["--method", "glimpseprune", "--method-arg", "weights=MISSING_DIR"], "glimpseprune cannot fetch weights"),
    (["--method", "glimpseprune", "--method-arg", "weights=GP_EMPTY"], "GP_EMPTY/config.json is missing"),
    (["--method", "glimpseprune", "--method-arg", "weights=GP_CORRUPT_PT"], "GP_CORRUPT_PT/new_modules_gp.pt with torch.load"),
    (["--method", "glimpseprune", "--method-arg", "weights=GP_BAD_JSON"], "GP_BAD_JSON/config.json is not valid JSON"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before validation failed")

    monkeypatch.setattr(tokbench.models, "load_model", refuse)


def _invoke(tmp_path: Path, extra: list[str]):
    places = _weights_dirs(tmp_path)
    out = tmp_path / "out"
    args = {"--method": "random", "--task": "vstar-synth", "--model": "tiny-qwen2.5-vl", "--limit": "1", "--output": str(out)}
    for key, value in zip(extra[::2], extra[1::2]):  # every case is option/value pairs
        value = re.sub("|".join(places), lambda m: places[m.group(0)], value)
        if key == "--method-arg":
            args.setdefault("--method-arg", [])
            args["--method-arg"] = [*args["--method-arg"], value] if isinstance(args["--method-arg"], list) else [value]
        else:
            args[key] = value
    argv = ["run"]
    for key, value in args.items():
        argv += [x for v in (value if isinstance(value, list) else [value]) for x in (key, v)]
    return runner.invoke(app, argv), out, places


@pytest.mark.parametrize(("extra", "message"), PREFLIGHT, ids=[m[:40] for _, m in PREFLIGHT])
def test_refused_before_the_model_loads_with_one_line_and_no_run_dir(tmp_path, no_model_load, extra, message):
    result, out, places = _invoke(tmp_path, extra)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # rich wraps long lines at the terminal width
    expected = re.sub("|".join(places), lambda m: places[m.group(0)], message)
    assert expected in text, result.output
    assert "Traceback" not in result.output and "AssertionError" not in result.output
    assert not out.exists() or not any(out.iterdir())  # no run dir, no manifest


def _hinted(message: str) -> dict:
    """The settings a hint names: ``pass --method-arg k=1 --ratio 0.3`` -> RunConfig overrides."""
    words = message.rsplit("pass ", 1)[1].split()
    changes: dict = {"method_args": {}}
    for option, value in zip(words[::2], words[1::2]):
        if option == "--method-arg":
            key, _, setting = value.partition("=")
            changes["method_args"][key] = setting
        else:
            changes[option.removeprefix("--")] = float(value) if option == "--ratio" else int(value)
    return changes


HINTED = [  # (model, method, ratio, method args, random weights)
    ("tiny-qwen2.5-vl", "fastv", 0.25, {}, False),
    ("tiny-llava", "fastv", 0.4, {}, False),
    ("tiny-llava", "fastv", 0.5, {"k": "0"}, False),
    ("tiny-qwen2.5-vl", "pyramiddrop", 0.25, {}, False),
    ("llava-1.5-7b", "fastv", 0.03, {}, True),  # below 1/32: k=1 and a larger ratio
    ("llava-1.5-7b", "fastv", 0.2, {"k": "9"}, True),
    ("llava-1.5-7b", "pyramiddrop", 0.05, {}, True),  # first drop after 2 of 32 layers: early_layer=1
    ("llava-1.5-7b", "pyramiddrop", 0.02, {}, True),
    ("qwen2.5-vl-7b", "pyramiddrop", 0.2, {"early_layer": "0"}, True),
    ("qwen2.5-vl-7b", "pyramiddrop", 0.2, {"layer_list": "7,14,21"}, True),
]


@pytest.mark.parametrize(("model", "method", "ratio", "args", "random_weights"), HINTED)
def test_the_hint_names_a_setting_that_passes(tmp_path, no_model_load, model, method, ratio, args, random_weights):
    config = RunConfig(model=model, method=method, task="vstar-synth", ratio=ratio, method_args=args,
                       random_weights=random_weights, output=str(tmp_path))  # fmt: skip
    with pytest.raises((BudgetError, MethodError)) as refused:
        validate(config, ALIASES)
    changes = _hinted(str(refused.value))
    fixed = RunConfig(**{**config.__dict__, "method_args": {**args, **changes.pop("method_args")}, **changes})
    method, _ = validate(fixed, ALIASES)
    assert method.budget.value <= max(ratio, fixed.ratio)


@pytest.mark.parametrize("name", TINY_FAMILY_MODELS)
def test_config_only_model_info_equals_the_loaded_adapters(name):
    assert config_info(name, ALIASES) == tiny_adapter(name).info()


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "llava-1.5-7b"])
def test_config_only_model_info_of_shipped_configs_equals_the_adapters(name):
    from tokbench.models import adapter_class
    from tokbench.models.random_weights import build_random

    model, processor = build_random(name, torch.bfloat16, "sdpa", "meta")
    adapter = adapter_class(model.config.model_type)(model, processor, name)
    assert config_info(name, ALIASES, random_weights=True) == adapter.info()


def test_a_valid_run_passes_without_loading_the_model(tmp_path, no_model_load):
    for method, args in (("fastv", {"k": "1"}), ("pyramiddrop", {}), ("glimpseprune", {}), ("vscan", {})):
        config = RunConfig(model="tiny-qwen2.5-vl", method=method, task="vstar-synth", ratio=0.4, method_args=args,
                           output=str(tmp_path))  # fmt: skip
        built, _ = validate(config, ALIASES)
        assert built.name == method


def test_unknown_hub_model_online_names_what_to_pass(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"hf download someorg/not-a-real-vlm\) or pass a local path"):
        config_info("someorg/not-a-real-vlm", {})


QWEN_TINY = ModelInfo("t", 4, 64, 4, 4, -1, (1, 3), 4, 32, position_rows=3)


class _Plugin:
    name, version = "plugin", "1"

    def __init__(self, specs):
        self.specs = specs

    def stages(self, model):
        return self.specs


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StageSpec(Stage.LLM, layer=4), "stage llm(4) is outside layers 0..3 of the 4-layer model"),
        (StageSpec(Stage.LLM, layer=3, attention_from="next"), "outside layers 0..2"),
        (StageSpec(Stage.LLM, layer=-1), "outside layers 0..3"),
        (StageSpec(Stage.VISION, vision_layers=(4,)), "vision block 4 is outside the 4-block vision tower"),
        (StageSpec(Stage.VISION, vision_attention=(0,)), "vision block 0 uses window attention"),
        (StageSpec(Stage.GLIMPSE, layer=2), "a glimpse stage needs a probe() method"),
    ],
)
def test_plan_stages_applies_the_engines_rules_to_the_config(spec, message):
    with pytest.raises(MethodError, match=re.escape(message)):
        plan_stages(_Plugin([spec]), QWEN_TINY)


def test_plan_stages_accepts_the_last_valid_layers():
    specs = [StageSpec(Stage.LLM, layer=3), StageSpec(Stage.LLM, layer=2, attention_from="next"),
             StageSpec(Stage.VISION, vision_layers=(-4, 3), vision_attention=(-1, 1))]  # fmt: skip
    assert plan_stages(_Plugin(specs), QWEN_TINY) == specs


def test_fastv_count_budgets_refused_per_image_name_a_working_setting():
    from tokbench.pruner import StageInputs

    def count(k, budget):
        method = build_method("fastv", Budget.tokens(budget), {"k": str(k)})
        spec = method.stages(QWEN_TINY)[0]
        return method.stage_count(spec, StageInputs(64, 64, (8, 8), torch.zeros(64, 2), budget))

    with pytest.raises(BudgetError, match="pass --method-arg k=1$"):
        count(2, 20)
    assert count(1, 20) == 5
    with pytest.raises(BudgetError, match="pass --method-arg k=1 --budget 17$"):
        count(1, 16)
    assert count(1, 17) == 1
