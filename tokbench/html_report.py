"""A static HTML report over saved runs: tables, figures and a per-sample gallery with overlays.

``tokbench html RUN_DIR... --out DIR`` writes ``DIR/index.html`` plus ``DIR/plots/*.png`` and
``DIR/thumbs/*.jpg``; nothing is fetched from a server or CDN, so the folder opens from the file
system and can be zipped next to a paper. Tables sort by clicking a header; the gallery filters by
method, task and correctness (score >= 0.5 counts as correct, the V* and judge scores being 0-1).
Thumbnails are small JPEGs loaded lazily; with ``--save-masks`` runs they show the kept-token overlay.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

THUMB_PX = 160
BY = ("model", "method", "budget", "task")

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top}
th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.correct td.score{background:#e5f5e5}tr.wrong td.score{background:#fbe3e3}tr.error td.score{background:#eee}
.figures img{max-width:32%;margin-right:1%}
.filters select{margin-right:1em}
td.text{max-width:28em;white-space:pre-wrap;word-break:break-word}
img.thumb{width:THUMB_PXpx;height:auto;image-rendering:pixelated}
""".replace("THUMB_PX", str(THUMB_PX))

_SCRIPT = """
function cellValue(row, col){const c=row.cells[col];return c.dataset.v!==undefined?c.dataset.v:c.textContent.trim();}
function sortBy(th){
  const table=th.closest('table'), col=th.cellIndex, body=table.tBodies[0];
  const asc=th.dataset.dir!=='asc';
  table.querySelectorAll('th').forEach(h=>delete h.dataset.dir);
  th.dataset.dir=asc?'asc':'desc';
  const rows=Array.from(body.rows);
  rows.sort((a,b)=>{
    const x=cellValue(a,col), y=cellValue(b,col), nx=parseFloat(x), ny=parseFloat(y);
    const c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);
    return asc?c:-c;
  });
  rows.forEach(r=>body.appendChild(r));
}
function applyFilters(){
  const want={};
  document.querySelectorAll('.filters select').forEach(s=>{want[s.name]=s.value;});
  let shown=0;
  document.querySelectorAll('#gallery tbody tr').forEach(r=>{
    const ok=Object.keys(want).every(k=>want[k]===''||r.dataset[k]===want[k]);
    r.hidden=!ok; if(ok) shown++;
  });
  document.getElementById('shown').textContent=shown;
}
document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
document.querySelectorAll('.filters select').forEach(s=>s.addEventListener('change',applyFilters));
applyFilters();
document.body.dataset.ready='1';
"""


def correctness(row: pd.Series) -> str:
    """correct | wrong | error | unscored (a judged task not judged yet)."""
    if isinstance(row.get("error"), str) and row["error"]:
        return "error"
    if pd.isna(row.get("score")):
        return "unscored"
    return "correct" if float(row["score"]) >= 0.5 else "wrong"


def _thumbnails(samples: pd.DataFrame, out_dir: Path) -> tuple[dict[int, str], dict[int, str], list[str]]:
    """Write one thumbnail per sample row; returns ({row: file}, {row: question}, notes on what failed)."""
    from tokbench.show import DocSource, saved_overlay
    from tokbench.store import RunStore

    docs, manifests = DocSource(), {}
    files, questions, notes = {}, {}, []
    (out_dir / "thumbs").mkdir(parents=True, exist_ok=True)
    for index, row in samples.iterrows():
        run_dir = Path(row["run_dir"])
        if run_dir not in manifests:
            manifests[run_dir] = RunStore(run_dir.parent, run_dir.name).manifest()
        manifest = manifests[run_dir]
        try:
            doc = docs.doc(manifest, int(row["doc_id"]))
        except Exception as err:  # noqa: BLE001 - data gone or unreadable: the row stays, without a picture
            notes.append(f"{run_dir.name} doc {row['doc_id']}: {type(err).__name__}: {err}")
            continue
        questions[index] = str(doc.meta.get("question", doc.prompt))
        if not doc.images:
            continue
        tiles = row.get("token_tiles")
        if isinstance(tiles, list) and tiles:
            view = saved_overlay(doc.images[0], row.to_dict())[0]
        else:
            view = doc.images[0].convert("RGB")
        view.thumbnail((THUMB_PX, THUMB_PX * 4))
        name = f"thumbs/{index}.jpg"
        view.save(out_dir / name, quality=80)
        files[index] = name
    return files, questions, notes


def _cell(value: object, fmt: str | None = None, cls: str = "") -> str:
    if value is None or (not isinstance(value, (list, dict, str)) and pd.isna(value)):
        return f'<td class="{cls}" data-v="">—</td>'
    if fmt:
        return f'<td class="num {cls}" data-v="{float(value)}">{format(float(value), fmt)}</td>'
    return f'<td class="{cls}">{html.escape(str(value))}</td>'


def _gallery(samples: pd.DataFrame, thumbs: dict[int, str], questions: dict[int, str]) -> str:
    head = ["image", "task", "doc", "method", "budget", "question", "target", "answer", "score", "retention"]
    rows = []
    for index, row in samples.iterrows():
        verdict = correctness(row)
        image = f'<img class="thumb" loading="lazy" src="{thumbs[index]}" alt="doc {row["doc_id"]}">' if index in thumbs else ""
        answer = row["error"] if verdict == "error" else row.get("prediction")
        attrs = " ".join(f'data-{k}="{html.escape(str(v))}"' for k, v in
                         (("method", row["method"]), ("task", row["task"]), ("correct", verdict)))  # fmt: skip
        rows.append(
            f'<tr class="{verdict}" {attrs}><td>{image}</td>{_cell(row["task"])}{_cell(row["doc_id"], "g")}'
            f'{_cell(row["method"])}{_cell(row["budget"])}{_cell(questions.get(index), cls="text")}'
            f'{_cell(row.get("target"), cls="text")}{_cell(answer, cls="text")}'
            f'{_cell(row.get("score"), ".2f", "score")}{_cell(row.get("retention"), ".3f")}</tr>'
        )
    header = "".join(f"<th>{h}</th>" for h in head)
    return f'<table id="gallery" class="sortable"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _filters(samples: pd.DataFrame) -> str:
    verdicts = sorted({correctness(r) for _, r in samples.iterrows()})
    selects = []
    for name, values in (("method", sorted(samples["method"].astype(str).unique())),
                         ("task", sorted(samples["task"].astype(str).unique())), ("correct", verdicts)):  # fmt: skip
        options = "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)
        selects.append(f'<label>{name} <select name="{name}"><option value="">all</option>{options}</select></label>')
    return f'<p class="filters">{"".join(selects)} <span id="shown"></span> of {len(samples)} samples shown</p>'


def build(paths: Sequence[Path], out_dir: Path, n_boot: int = 1000) -> tuple[Path, list[str]]:
    """Write the report for the runs under ``paths`` into ``out_dir``; returns (index.html, notes)."""
    from tokbench.plots import plot_table
    from tokbench.report import aggregate, caption, display_frame
    from tokbench.store import load_runs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = load_runs(list(paths)).reset_index(drop=True)
    table = aggregate(samples, BY, n_boot=n_boot)
    figures, notes = plot_table(table, out_dir / "plots", formats=("png",))
    thumbs, questions, failed = _thumbnails(samples, out_dir)
    notes += failed
    report = display_frame(table, drop_empty=True).to_html(index=False, classes="sortable", table_id="report", border=0)
    images = "".join(f'<img src="plots/{p.name}" alt="{p.stem}">' for p in figures)
    runs = "".join(f"<li>{html.escape(d)}</li>" for d in samples["run_dir"].unique())
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tokbench report</title>'
        f"<style>{_STYLE}</style></head><body>"
        "<script>window.addEventListener('error',()=>{document.body.dataset.errors=(+(document.body.dataset.errors||0))+1;});</script>"
        f"<h1>tokbench report</h1><details><summary>{samples['run_dir'].nunique()} runs</summary><ul>{runs}</ul></details>"
        f"<h2>Results</h2><p>{html.escape(caption(table))}</p>{report}<h2>Figures</h2><div class=\"figures\">{images}</div>"
        f"<h2>Samples</h2>{_filters(samples)}{_gallery(samples, thumbs, questions)}"
        f"<script>{_SCRIPT}</script></body></html>"
    )
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index, notes
