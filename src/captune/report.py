"""RUN/report.html: one self-contained page (no network, images inlined as base64) built from the run dir alone.

Inputs, all optional except that the directory exists (a section whose file is missing is left out):
    config.yaml                       the resolved configuration
    metrics.jsonl                     split=train: loss, lr per step; split=validation: metrics; split=before
    summary.json                      steps, best step and score, data counts, skipped_samples (if the reader lists them)
    val_predictions_before.jsonl      validation captions of the model before the first step
    val_predictions.jsonl             validation captions of the last validation, with per-image cider
Outputs: report.html and plots/{loss,lr,validation}.png (the same PNGs the page inlines).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from datetime import datetime
from pathlib import Path

from .errors import CaptuneError
from .metrics import guard_warnings

log = logging.getLogger("captune")

GALLERY_SIZE = 12
"""Validation images shown with before/after captions (the first ones, in dataset order)."""
EXTREMES = 5
"""Best and worst examples by per-image CIDEr."""
THUMBNAIL_PX = 224
TABLE_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice", "exact_match",
                 "repeated_ngram_rate", "distinct_captions", "distinct_references", "vocabulary")
PLOTTED_METRICS = ("bleu_4", "meteor", "rouge_l", "cider", "spice")
LINKED_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "val_predictions_before.jsonl",
                "val_predictions.jsonl", "best/README.md", "last/README.md")


def write_report(run_dir: str | Path) -> Path:
    """Build RUN/report.html and RUN/plots/*.png from the files in the run directory.

    Args:
        run_dir: a directory written by `captune train`.

    Returns:
        The path of report.html.

    Raises:
        CaptuneError: `run_dir` does not exist or holds none of the files a run writes.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise CaptuneError(f"run directory {run} does not exist: pass the --output of a `captune train` run")
    if not any((run / name).is_file() for name in ("config.yaml", "metrics.jsonl", "summary.json")):
        raise CaptuneError(f"{run} has no config.yaml, metrics.jsonl or summary.json: is it a captune run directory?")
    records = read_jsonl(run / "metrics.jsonl")
    summary = _read_json(run / "summary.json")
    before = read_jsonl(run / "val_predictions_before.jsonl")
    after = read_jsonl(run / "val_predictions.jsonl")
    plots = make_plots(records, run / "plots")

    thumbnails: dict[str, str | None] = {}
    sections = [
        _metrics_section(records, summary),
        _plots_section(plots, run),
        _gallery_section(before, after, thumbnails),
        _extremes_section(after, before, thumbnails),
        _data_section(summary),
        _config_section(run / "config.yaml"),
        _files_section(run),
    ]
    page = _page(run.resolve().name, "\n".join(s for s in sections if s))
    path = run / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; [] when it is absent. A torn last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("report: skipping an unreadable line in %s", path)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        log.warning("report: %s is not valid JSON, leaving it out", path)
        return {}


# ---- plots -------------------------------------------------------------------------------------------------------

def make_plots(records: list[dict], folder: Path) -> dict[str, Path]:
    """Write loss.png, lr.png and validation.png (those with data) into `folder`; return title -> path."""
    train = [r for r in records if r.get("split") == "train"]
    checks = [r for r in records if r.get("split") in ("before", "validation")]
    plots: dict[str, Path] = {}
    if not train and not checks:
        return plots
    folder.mkdir(parents=True, exist_ok=True)
    if train:
        steps = [r["step"] for r in train]
        plots["training loss"] = _line_plot(folder / "loss.png", "training loss", steps,
                                            {"loss": [r.get("loss") for r in train]}, "loss")
        plots["learning rate"] = _line_plot(folder / "lr.png", "learning rate", steps,
                                            {"lr": [r.get("lr") for r in train]}, "learning rate")
    if checks:
        series = {k: [r.get(k) for r in checks] for k in PLOTTED_METRICS if any(_number(r.get(k)) for r in checks)}
        if series:
            plots["validation metrics"] = _line_plot(
                folder / "validation.png", "validation metrics (step 0: before fine-tuning)",
                [r["step"] for r in checks], series, "score")
    return plots


def _line_plot(path: Path, title: str, steps: list, series: dict[str, list], ylabel: str) -> Path:
    # Figure + the Agg canvas directly, not pyplot: no global backend or figure state, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, values in series.items():
        points = [(s, v) for s, v in zip(steps, values) if _number(v)]
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=name)
    axes.set_title(title)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize="small")
    figure.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- sections ----------------------------------------------------------------------------------------------------

def _metrics_section(records: list[dict], summary: dict) -> str:
    validations = [r for r in records if r.get("split") == "validation"]
    columns: dict[str, dict] = {}
    before = [r for r in records if r.get("split") == "before"]
    if before:
        columns["before fine-tuning"] = before[-1]
    best_step = summary.get("best_step")
    best = [r for r in validations if r.get("step") == best_step]
    if best:
        columns[f"best (step {best_step})"] = best[-1]
    if summary.get("final_metrics"):
        columns[f"final (step {summary.get('steps')})"] = summary["final_metrics"]
    elif validations:
        columns[f"last validation (step {validations[-1].get('step')})"] = validations[-1]
    facts = []
    if "steps" in summary:
        facts.append(f"{summary['steps']} optimizer steps")
    if summary.get("best_metric") and _number(summary.get("best_score")):
        facts.append(f"best {summary['best_metric']} {summary['best_score']:.4f} at step {best_step}")
    out = ["<section><h2>Summary</h2>"]
    if facts:
        out.append(f"<p>{_e('; '.join(facts))}.</p>")
    if columns:
        keys = [k for k in TABLE_METRICS if any(_number(c.get(k)) for c in columns.values())]
        out.append("<table><tr><th>metric</th>" + "".join(f"<th>{_e(n)}</th>" for n in columns) + "</tr>")
        for key in keys:
            cells = "".join(f"<td>{_fmt(c.get(key))}</td>" for c in columns.values())
            out.append(f"<tr><th>{_e(key)}</th>{cells}</tr>")
        out.append("</table><p class=note>pycocoevalcap scorers; METEOR only at the final validation (Java). "
                   "repeated_ngram_rate: share of captions repeating a word or a word trigram; distinct_captions: "
                   "distinct captions / images (distinct_references: the same for the references); vocabulary: "
                   "distinct words used.</p>")
        images = (summary.get("data") or {}).get("validation_images")
        judged = summary.get("final_metrics") or (validations[-1] if validations else {})
        for warning in guard_warnings(judged, images=images):
            out.append(f"<p class=warning><b>Warning:</b> {_e(warning)}</p>")
    else:
        out.append("<p>No validation metrics (the run had no validation data).</p>")
    out.append("</section>")
    return "\n".join(out)


def _plots_section(plots: dict[str, Path], run: Path) -> str:
    if not plots:
        return ""
    figures = []
    for title, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        link = path.relative_to(run).as_posix()
        figures.append(f'<figure><img class=plot alt="{_e(title)}" src="data:image/png;base64,{data}">'
                       f'<figcaption><a href="{_e(link)}">{_e(link)}</a></figcaption></figure>')
    return "<section><h2>Training curves</h2><div class=plots>" + "".join(figures) + "</div></section>"


def _gallery_section(before: list[dict], after: list[dict], thumbnails: dict) -> str:
    if not after and not before:
        return ""
    base = after or before
    before_by_id = {r["id"]: r for r in before}
    after_by_id = {r["id"]: r for r in after}
    cards = [_card(after_by_id.get(r["id"]), before_by_id.get(r["id"]), r, thumbnails) for r in base[:GALLERY_SIZE]]
    note = f"The first {len(cards)} of {len(base)} validation images."
    if not before:
        note += " No captions from before fine-tuning (val_predictions_before.jsonl is absent)."
    return f"<section><h2>Validation gallery</h2><p class=note>{_e(note)}</p><div class=grid>{''.join(cards)}</div></section>"


def _extremes_section(after: list[dict], before: list[dict], thumbnails: dict) -> str:
    scored = [r for r in after if _number(r.get("cider"))]
    if not scored:
        return ""
    before_by_id = {r["id"]: r for r in before}
    ranked = sorted(scored, key=lambda r: (-r["cider"], r["id"]))
    k = min(EXTREMES, len(ranked) // 2) or 1
    out = ["<section><h2>Best and worst examples</h2>"
           "<p class=note>Ranked by per-image CIDEr of the fine-tuned model's caption.</p>"]
    for title, chosen in (("Best", ranked[:k]), ("Worst", ranked[::-1][:k])):
        cards = "".join(_card(r, before_by_id.get(r["id"]), r, thumbnails) for r in chosen)
        out.append(f"<h3>{title} {len(chosen)}</h3><div class=grid>{cards}</div>")
    out.append("</section>")
    return "\n".join(out)


def _card(after: dict | None, before: dict | None, record: dict, thumbnails: dict) -> str:
    image = _thumbnail(record.get("image"), thumbnails)
    # Upscaled small images stay crisp; shrunk photos would look jagged with pixelated rendering.
    css = "thumb px" if image and image.startswith("data:image/png") else "thumb"
    picture = (f'<img class="{css}" alt="{_e(record["id"])}" src="{image}">' if image
               else "<div class=noimg>image not available</div>")
    refs = "".join(f"<li>{_e(r)}</li>" for r in record.get("references", []))
    rows = []
    for label, rec in (("before", before), ("after", after)):
        if rec is not None:
            score = f' <span class=score>CIDEr {_fmt(rec.get("cider"))}</span>' if _number(rec.get("cider")) else ""
            rows.append(f"<p class={label}><b>{label}:</b> {_e(rec.get('prediction', ''))}{score}</p>")
    return (f"<div class=card>{picture}<p class=id>{_e(record['id'])}</p>{''.join(rows)}"
            f"<details><summary>references</summary><ul>{refs}</ul></details></div>")


def _thumbnail(path: str | None, cache: dict) -> str | None:
    """A data: URI of the image shrunk to THUMBNAIL_PX (None when there is no readable file)."""
    if not path:
        return None
    if path in cache:
        return cache[path]
    from PIL import Image, ImageOps

    uri = None
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        # Small images (icons, synthetic shapes) stay lossless; photos go to JPEG to keep the page light.
        small = image.width * image.height <= 128 * 128
        image.save(buffer, format="PNG" if small else "JPEG", quality=85)
        uri = f"data:image/{'png' if small else 'jpeg'};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
    except Exception as err:  # moved, deleted or undecodable since training: the caption is still worth showing
        log.warning("report: cannot read image %s (%s)", path, err)
    cache[path] = uri
    return uri


def _data_section(summary: dict) -> str:
    counts = summary.get("data") or {}
    skipped = summary.get("skipped_samples")
    if not counts and skipped is None:
        return ""
    out = ["<section><h2>Data</h2>"]
    if counts:
        out.append("<table>" + "".join(f"<tr><th>{_e(str(k).replace('_', ' '))}</th><td>{_e(str(v))}</td></tr>"
                                       for k, v in counts.items()) + "</table>")
    if skipped is not None:
        out.append(f"<h3>Skipped samples ({len(skipped)})</h3>")
        if skipped:
            items = "".join(f"<li>{_e(_describe(s))}</li>" for s in skipped[:500])
            more = f"<p class=note>... and {len(skipped) - 500} more (see summary.json)</p>" if len(skipped) > 500 else ""
            out.append(f"<ul class=skipped>{items}</ul>{more}")
        else:
            out.append("<p>None.</p>")
    out.append("</section>")
    return "\n".join(out)


def _describe(item) -> str:
    if isinstance(item, dict):
        return "; ".join(f"{k}: {v}" for k, v in item.items())
    return str(item)


def _config_section(path: Path) -> str:
    if not path.is_file():
        return ""
    return (f'<section><h2>Configuration</h2><p class=note>Resolved, as <a href="config.yaml">config.yaml</a>.</p>'
            f"<pre>{_e(path.read_text(encoding='utf-8'))}</pre></section>")


def _files_section(run: Path) -> str:
    present = [name for name in LINKED_FILES if (run / name).is_file()]
    if not present:
        return ""
    items = "".join(f'<li><a href="{_e(name)}">{_e(name)}</a></li>' for name in present)
    return f"<section><h2>Files</h2><ul>{items}</ul></section>"


def _page(title: str, body: str) -> str:
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>captune report: {_e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head>
<body><h1>captune report: {_e(title)}</h1><p class=note>Built {stamp} from the files in this run directory.</p>
{body}
</body></html>
"""


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
td{font-variant-numeric:tabular-nums}.note{color:#666;font-size:.9em}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plot{width:480px;max-width:100%}figure{margin:0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:.8em}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em;font-size:.9em}
.thumb{width:160px;height:auto;display:block;margin:auto}.px{image-rendering:pixelated}
.noimg{width:160px;height:96px;margin:auto;background:#eee;color:#777;display:flex;align-items:center;justify-content:center}
.id{color:#777;font-size:.8em;word-break:break-all}.before{color:#a33}.after{color:#262}.score{color:#777;font-size:.85em}
.warning{background:#fff4e0;border-left:4px solid #e08a00;padding:.5em .8em}
pre{background:#f6f6f6;padding:.8em;overflow:auto}ul.skipped{max-height:20em;overflow:auto}
"""


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value) -> str:
    return f"{value:.4f}" if _number(value) else "n/a"
