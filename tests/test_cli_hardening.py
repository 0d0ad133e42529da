"""The CLI's answers to a hostile trial (issue #16): bad numbers, bad config files, unwritable outputs,
corrupt runs, interrupts, text that must not be wrapped or eaten, tables that fit, flags that read as
flags. Usage errors are table-driven: (command, exit code, the one line expected)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tokbench.cli import app
from tokbench.cli.build import unpruned_note
from tokbench.cli.table import fit_report

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
RUN = ["run", "--method", "random", "--ratio", "0.5", "--task", "vstar-synth", "--model", "tiny-qwen2.5-vl"]
SWEEP = ["sweep", "--methods", "random", "--ratios", "0.5", "--task", "vstar-synth", "--model", "tiny-qwen2.5-vl"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> Path:
    """One finished tiny run (full, 1 document) inside its own results folder."""
    out = tmp_path_factory.mktemp("one-run")
    result = runner.invoke(app, ["run", "--method", "full", "--task", "vstar-synth", "--limit", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """Placeholders of the table below → real paths."""
    (tmp_path / "a-file").write_text("")
    paths = {
        "TYPES_TOML": ("[defaults]\nbatch_size = \"four\"\n", "types.toml"),
        "KEY_TOML": ("[defaults]\nbatchsize = 4\n", "key.toml"),
        "MODELS_TOML": ("models = 3\n", "models.toml"),
        "WARMUP_TOML": ("[defaults]\nwarmup = -2\n", "warmup.toml"),
    }
    found = {"UNWRITABLE": str(tmp_path / "a-file" / "sub"), "NO_TOML": str(tmp_path / "no" / "such.toml"),
             "OUT": str(tmp_path / "out")}  # fmt: skip
    for name, (text, file) in paths.items():
        (tmp_path / file).write_text(text)
        found[name] = str(tmp_path / file)
    bad_manifest = tmp_path / "bad-manifest"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text("{not json")
    found["BAD_MANIFEST"] = str(bad_manifest)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text(json.dumps({"run_id": "corrupt", "config": {}, "settings": {}}))
    (corrupt / "samples.jsonl").write_text('{"doc_id": 0}\n{broken\n{"doc_id": 2}\n')
    found["CORRUPT"] = str(corrupt)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "manifest.json").write_text(json.dumps({"config": {}, "settings": {}}))
    (lists / "samples.jsonl").write_text("[1, 2]\n")
    found["LIST_ROWS"] = str(lists)
    empty = tmp_path / "no-runs-here"
    empty.mkdir()
    found["NO_RUNS"] = str(empty)
    return found


USAGE = [  # (command, exit code, expected text of the one line)
    # item 4: numbers the runner cannot use
    ([*RUN, "--max-new-tokens", "0"], 2, "--max-new-tokens 0 must be >= 1"),
    ([*RUN, "--max-new-tokens", "-3"], 2, "--max-new-tokens -3 must be >= 1"),
    ([*RUN, "--warmup", "-1"], 2, "--warmup -1 must be >= 0"),
    ([*RUN, "--max-pixels", "0"], 2, "--max-pixels 0 must be >= 1"),
    ([*RUN, "--max-pixels", "-10"], 2, "--max-pixels -10 must be >= 1"),
    ([*SWEEP, "--warmup", "-1"], 2, "--warmup -1 must be >= 0"),
    ([*SWEEP, "--max-new-tokens", "0"], 2, "--max-new-tokens 0 must be >= 1"),
    (["bench", "--batch-size", "0"], 2, "--batch-size 0 must be >= 1"),
    ([*RUN, "--batch-size", "four"], 2, "Invalid value for '--batch-size'"),
    (["runn"], 2, "No such command 'runn'"),
    # item 12: tokbench.toml and --config
    ([*RUN, "--config", "TYPES_TOML"], 2, "[defaults] batch_size = 'four' must be a whole number"),
    ([*RUN, "--config", "KEY_TOML"], 2, "unknown key 'batchsize' in [defaults]"),
    ([*RUN, "--config", "MODELS_TOML"], 2, "[models] must be a table"),  # rich markup ate "[models]"
    ([*RUN, "--config", "WARMUP_TOML"], 2, "warmup -2 (tokbench.toml [defaults]) must be >= 0"),
    ([*RUN, "--config", "NO_TOML"], 2, "does not exist; pass --config with an existing tokbench.toml"),
    ([*SWEEP, "--config", "NO_TOML"], 2, "does not exist"),
    (["judge", "CORRUPT", "--judge", "exact", "--config", "NO_TOML"], 2, "does not exist"),
    # item 12: outputs that cannot be written
    (["report", "RUN_DIR", "--output", "UNWRITABLE"], 2, "--output UNWRITABLE is not writable"),
    (["plot", "RUN_DIR", "--output", "UNWRITABLE"], 2, "--output UNWRITABLE is not writable"),
    (["html", "RUN_DIR", "--output", "UNWRITABLE"], 2, "--output UNWRITABLE is not writable"),
    (["regress", "RUN_DIR", "--write-baseline", "UNWRITABLE/b.json"], 2, "--write-baseline UNWRITABLE is not writable"),
    (["regress", "RUN_DIR", "--baseline", "RUN_DIR", "--summary", "UNWRITABLE/s.md"], 2, "--summary UNWRITABLE is not writable"),
    # item 12: corrupt runs name the file
    (["show", "LIST_ROWS", "--doc-id", "0", "--output", "OUT/x.png"], 2, "LIST_ROWS/samples.jsonl: line 1 is not a sample row"),
    (["judge", "BAD_MANIFEST", "--judge", "exact"], 2, "BAD_MANIFEST/manifest.json is not valid JSON"),
    (["judge", "CORRUPT", "--judge", "exact"], 2, "CORRUPT/samples.jsonl: line 2 is not valid JSON"),
    # item 23: a folder without runs says what to pass
    (["judge", "NO_RUNS", "--judge", "exact"], 2, "is not a tokbench run directory and holds none"),
    # structure: sweep takes --method-arg, validated before any model loads
    ([*SWEEP, "--method-arg", "nope=1", "--output", "OUT"], 2, "does not accept argument 'nope'"),
    ([*SWEEP, "--method-arg", "fastv:k=1", "--output", "OUT"], 2, "'fastv' is not one of the methods run"),
    ([*RUN, "--method-arg", "fastv:k=1"], 2, "method:key=value is for sweeps"),
    # structure: sweep takes run's options, checked by the same builder
    ([*SWEEP, "--random-weights"], 2, "no shipped config for 'tiny-qwen2.5-vl' with --random-weights"),
    ([*SWEEP[:-4], "--task", "visual-cot-synth", "--judge", "gpt-4"], 2, "unknown judge 'gpt-4'"),
    ([*SWEEP, "--position-policy", "shift"], 2, "use keep or reindex"),
]


@pytest.mark.parametrize(("command", "code", "message"), USAGE, ids=[" ".join(m.split()[:4]) for _, _, m in USAGE])
def test_bad_usage_is_one_line(command, code, message, files, one_run):
    files = {**files, "RUN_DIR": str(one_run)}

    def fill(text: str) -> str:
        for name in sorted(files, key=len, reverse=True):
            text = text.replace(name, files[name])
        return text

    args = [fill(a) for a in command]
    if args[0] in ("run", "sweep") and "--output" not in args:
        args += ["--output", files["OUT"]]
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert fill(message) in lines[0]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_during_start_up_is_one_line(tmp_path, signum, code):
    """The signal arrives once the run has validated its output dir (model loading, first batches)."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "tokbench", *RUN, "--output", str(out)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=tmp_path)
    try:
        while not out.exists() and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[0]
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "interrupted" in line]
    expected = f"interrupted ({signal.Signals(signum).name}); finished batches are saved under {out}. Rerun the same command to resume."
    assert lines == [expected], output


def test_an_interrupt_a_library_wraps_is_still_one_line(capsys):
    """transformers' lazy imports turn a KeyboardInterrupt into their own error: still one line, 143."""
    from tokbench import interrupts

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, interrupts.handled():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises long before this ends
        except KeyboardInterrupt as err:
            raise RuntimeError("Failed to import transformers.models.qwen2_5_vl") from err
    assert stopped.value.code == 143
    assert capsys.readouterr().err == "interrupted (SIGTERM); finished work is kept. Rerun the same command to resume.\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_help_and_list_import_no_torch():
    for command in (["--help"], ["list", "methods"]):
        code = ("import sys, runpy; sys.argv = ['tokbench', *sys.argv[1:]]\n"
                "try:\n    runpy.run_module('tokbench', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'lmms_eval'})\n"
                "print('HEAVY', heavy)")  # fmt: skip
        result = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, env=_env(), check=False)
        assert result.returncode == 0, result.stderr
        assert "HEAVY []" in result.stdout, result.stdout[-500:]


def test_command_modules_import_one_way():
    """Any command module imports first on its own (no circle), and `python -m tokbench` works."""
    for module in ("run", "listing", "judge", "results", "train", "bench", "common", "build", "table"):
        result = subprocess.run([sys.executable, "-c", f"import tokbench.cli.{module}"], capture_output=True, text=True, env=_env(), check=False)
        assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "tokbench", "--help"], capture_output=True, text=True, env=_env(), check=False)
    assert result.returncode == 0 and "sweep" in result.stdout


def test_output_flag_everywhere():
    for command in ("run", "sweep", "show", "report", "plot", "html", "train-canary", "train-glimpse"):
        text = runner.invoke(app, [command, "--help"]).output
        assert "--output" in text and "-o" in text, command
    for command in ("run", "sweep", "train-canary", "train-glimpse", "bench"):
        assert "--batch-size" in runner.invoke(app, [command, "--help"]).output, command


def test_flags_read_as_flags_and_help_keeps_brackets():
    run_help = runner.invoke(app, ["run", "--help"]).output
    assert "<bool>" not in run_help and "--save-masks" in run_help
    assert "[judge] table" in runner.invoke(app, ["judge", "--help"]).output


def test_help_examples_are_never_rewrapped():
    """Every `tokbench ...` example line of every command's help is printed whole, on one line."""
    callbacks = {info.name or info.callback.__name__: info.callback for info in app.registered_commands}
    for command in ("run", "sweep", "show", "judge", "report", "regress", "plot", "html", "bench", "train-canary",
                    "train-glimpse"):  # fmt: skip
        lines = [line.strip() for line in callbacks[command].__doc__.splitlines()]
        examples = [line.split("   #")[0].rstrip() for line in lines if line.startswith("tokbench ")]
        shown = runner.invoke(app, [command, "--help"]).output
        assert examples and all(example in shown for example in examples), command


def test_list_models_columns_align():
    lines = runner.invoke(app, ["list", "models"]).output.splitlines()
    starts = {line.index(target) for line in lines for target in [line.split()[1]]}
    assert len(lines) >= 4 and len(starts) == 1


def test_long_paths_and_commands_are_never_wrapped(tmp_path):
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 6)
    result = runner.invoke(app, ["sweep", "--methods", "full", "--task", "vstar-synth", "--limit", "1", "--output", str(deep)])
    assert result.exit_code == 0, result.output
    assert f"report: tokbench report {deep}\n" in result.output  # the suggested command, on one line
    empty = tmp_path.joinpath(*["another-long-folder-name"] * 6)
    empty.mkdir(parents=True)
    result = runner.invoke(app, ["judge", str(empty), "--judge", "exact"])
    assert result.exit_code == 2 and str(empty) in result.output and len(result.output.strip().splitlines()) == 1


def test_run_without_budget_says_it_is_unpruned(tmp_path):
    result = runner.invoke(app, ["run", "--method", "random", "--task", "vstar-synth", "--limit", "1", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "note: no --ratio or --budget: random keeps every visual token" in result.output
    assert unpruned_note("glimpseprune", None, None, {}) is None and unpruned_note("full", None, None, {}) is None
    assert unpruned_note("random", 0.5, None, {}) is None and unpruned_note("fastv", None, 64, {}) is None


def test_judge_a_folder_of_runs(tmp_path):
    for method in (["--method", "full"], ["--method", "random", "--ratio", "0.5"]):
        args = ["run", *method, "--task", "visual-cot-synth", "--limit", "1", "--max-new-tokens", "4", "--output", str(tmp_path)]
        assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["judge", str(tmp_path), "--judge", "exact"])
    assert result.exit_code == 0, result.output
    assert result.output.count("judged 1") == 2
    for manifest in tmp_path.glob("*/manifest.json"):
        assert json.loads(manifest.read_text())["summary"]["n_unscored"] == 0


def test_report_off_a_terminal_is_markdown_and_fits_on_one(one_run):
    result = runner.invoke(app, ["report", str(one_run)])
    assert result.exit_code == 0 and result.stdout.splitlines()[0].startswith("| method"), result.output
    from tokbench.report import report

    table = report([one_run])
    for width in (80, 120):
        rendered, hidden = fit_report(table, None, width)
        with open(os.devnull, "w") as devnull:
            console = Console(width=width, record=True, file=devnull)
            console.print(rendered)
        text = console.export_text()
        assert max(map(len, text.splitlines())) <= width and "…" not in text
        assert {"method", "acc", "n"} <= {col.header for col in rendered.columns}
        assert hidden if width == 80 else True
    chosen = runner.invoke(app, ["report", str(one_run), "--format", "table", "--columns", "method,acc"])
    assert chosen.exit_code == 0 and "acc" in chosen.stdout and "speedup" not in chosen.stdout
    wrong = runner.invoke(app, ["report", str(one_run), "--format", "table", "--columns", "colour"])
    assert wrong.exit_code == 2 and "no column 'colour'" in wrong.output


def test_sweep_method_args_reach_the_cells():
    from tokbench.runner import RunConfig
    from tokbench.sweep import plan

    cells = plan(RunConfig("m", "x", "t"), ["fastv", "pyramiddrop"], [0.5], method_args={"": {"k": "1"}, "fastv": {"k": "2"}})
    assert [(cell.method, cell.method_args) for cell in cells] == [
        ("full", {}), ("fastv", {"k": "2"}), ("pyramiddrop", {"k": "1"})
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[defaults]\nbatch_size = "four"\n', "[defaults] batch_size = 'four' must be a whole number"),
        ("[defaults]\nbatch_size = true\n", "[defaults] batch_size = True must be a whole number"),
        ("[defaults]\ndtype = 16\n", "[defaults] dtype = 16 must be a string"),
        ("[judge]\nconcurrency = 2.5\n", "[judge] concurrency = 2.5 must be a whole number"),
        ("[judge]\nendpoint = 'x'\n", "unknown key 'endpoint' in [judge]"),
        ('[models]\nmine = 3\n', "[models] mine = 3 must be a string"),
        ("defaults = 1\n", "[defaults] must be a table"),
    ],
)
def test_config_values_are_type_checked(tmp_path, text, message):
    from tokbench.config import ConfigError, load_config

    path = tmp_path / "tokbench.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {message}" or str(caught.value).startswith(f"{path}: {message}")


def test_good_config_values_load(tmp_path):
    from tokbench.config import load_config

    path = tmp_path / "tokbench.toml"
    path.write_text('[defaults]\nbatch_size = 4\noutput = "out"\n[judge]\nretries = 2\n[models]\nmine = "tiny:tiny-llava"\n')
    config = load_config(path)
    assert config.defaults["batch_size"] == 4 and config.judge["retries"] == 2 and config.models["mine"] == "tiny:tiny-llava"
