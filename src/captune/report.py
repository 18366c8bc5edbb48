"""RUN/report.html: one self-contained page (no network, images inlined as base64) built from the run dir alone.

Inputs, all optional except that the directory exists (a section whose file is missing is left out):
    config.yaml                       the resolved configuration
    metrics.jsonl                     split=train: loss, lr (SCST: reward, greedy_reward) per step;
                                      split=validation: metrics; split=before
    summary.json                      steps, best step and score, data counts, skipped_samples, run facts
    val_predictions_before.jsonl      validation captions of the model before the first step
    val_predictions_best.jsonl        validation captions of best/ (the validation that chose it), per-image cider
    val_predictions.jsonl             validation captions of the last validation (used when _best is absent)
Outputs: report.html and plots/{loss,lr,validation}.png, reward.png for SCST runs (the same PNGs the page inlines).

Every caption and score on the page names the model it comes from: the base model (before fine-tuning), best/ or
last/, with its optimizer step.
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
# Captions longer than this many words (Florence-2's detailed tasks, chat VLMs: 50-200) get a card two columns wide
# and a scrolling box, so the grid stays readable; the whole caption is always there, never cut.
LONG_CAPTION_WORDS = 40
TABLE_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice", "exact_match",
                 "repeated_ngram_rate", "distinct_captions", "distinct_references", "vocabulary")
PLOTTED_METRICS = ("bleu_4", "meteor", "rouge_l", "spice")
"""Scores in [0, 1], drawn on one axis; CIDEr (0 to 10) gets its own beside them."""
LINKED_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "val_predictions_before.jsonl",
                "val_predictions_best.jsonl", "val_predictions.jsonl", "best/README.md", "last/README.md")


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
    after, after_label = read_jsonl(run / "val_predictions_best.jsonl"), f"best/ (step {summary.get('best_step')})"
    if not after:  # a run from before val_predictions_best.jsonl existed, or one killed before its first validation
        validations = [r for r in records if r.get("split") == "validation"]
        after = read_jsonl(run / "val_predictions.jsonl")
        after_label = f"last validation (step {validations[-1].get('step') if validations else '?'})"
    floor = (summary.get("run") or {}).get("loss_floor")
    plots = make_plots(records, run / "plots", loss_floor=floor)

    thumbnails: dict[str, str | None] = {}
    labels = ("base model", after_label)
    sections = [
        _metrics_section(records, summary),
        _plots_section(plots, run, summary),
        _gallery_section(before, after, thumbnails, labels),
        _extremes_section(after, before, thumbnails, labels),
        _run_section(summary),
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

def make_plots(records: list[dict], folder: Path, loss_floor: float | None = None) -> dict[str, Path]:
    """Write loss.png, lr.png and validation.png (those with data) into `folder`; return title -> path.

    loss.png draws the training loss, the validation loss (teacher-forced, step 0 = before fine-tuning) and, when
    given, the floor label smoothing puts under both. validation.png has two panels: the [0, 1] scores, and CIDEr on
    its own 0-10 axis.
    """
    train = [r for r in records if r.get("split") == "train"]
    checks = [r for r in records if r.get("split") in ("before", "validation")]
    plots: dict[str, Path] = {}
    if not train and not checks:
        return plots
    folder.mkdir(parents=True, exist_ok=True)
    check_steps = [r["step"] for r in checks]
    losses = {"training": ([r["step"] for r in train], [r.get("loss") for r in train]),
              "validation": (check_steps, [r.get("loss") for r in checks])}
    losses = {k: v for k, v in losses.items() if any(_number(x) for x in v[1])}
    if losses:
        floor = ({"floor": loss_floor} if _number(loss_floor) and loss_floor > 0 else {})
        plots["loss"] = _plot(folder / "loss.png", [("loss (step 0: before fine-tuning)", "loss", losses, floor)])
    if train:
        plots["learning rate"] = _plot(folder / "lr.png", [
            ("learning rate", "learning rate", {"lr": ([r["step"] for r in train], [r.get("lr") for r in train])}, {})])
        rewards = {k: ([r["step"] for r in train], [r.get(k) for r in train]) for k in ("reward", "greedy_reward")
                   if any(_number(r.get(k)) for r in train)}
        if rewards:  # an SCST run: the mean CIDEr-D of the sampled (and greedy) training captions
            plots["SCST reward"] = _plot(folder / "reward.png", [
                ("SCST reward (training CIDEr-D)", "CIDEr-D", rewards, {})])
    if checks:
        scores = {k: (check_steps, [r.get(k) for r in checks]) for k in PLOTTED_METRICS
                  if any(_number(r.get(k)) for r in checks)}
        panels = [("validation scores (step 0: before)", "score (0-1)", scores, {})] if scores else []
        if any(_number(r.get("cider")) for r in checks):
            panels.append(("validation CIDEr", "CIDEr (0-10)", {"cider": (check_steps, [r.get("cider") for r in checks])},
                           {}))
        if panels:
            plots["validation metrics"] = _plot(folder / "validation.png", panels)
    return plots


def _plot(path: Path, panels: list[tuple[str, str, dict[str, tuple[list, list]], dict[str, float]]]) -> Path:
    """One PNG with a panel per (title, y label, {name: (steps, values)}, {name: horizontal line at y})."""
    # Figure + the Agg canvas directly, not pyplot: no global backend or figure state, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4 * len(panels), 3.6), dpi=100)
    FigureCanvasAgg(figure)
    for index, (title, ylabel, series, lines) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        for name, (steps, values) in series.items():
            points = [(s, v) for s, v in zip(steps, values) if _number(v)]
            if points:
                xs, ys = zip(*points)
                axes.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=name)
        for name, y in lines.items():
            axes.axhline(y, linestyle="--", color="grey", linewidth=1, label=f"{name} {y:.2f}")
        axes.set_title(title)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if len(series) + len(lines) > 1:
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
        columns["base model (before fine-tuning, step 0)"] = before[-1]
    best_step, steps = summary.get("best_step"), summary.get("steps")
    best = [r for r in validations if r.get("step") == best_step]
    final = summary.get("final_metrics")
    if best and not (final and best_step == steps):
        columns[f"best/ (step {best_step})"] = best[-1]
    if final:
        columns[f"{'best/ = ' if best_step == steps else ''}last/ (step {steps})"] = final
    elif validations:
        columns[f"last validation (step {validations[-1].get('step')})"] = validations[-1]
    facts = []
    if "steps" in summary:
        facts.append(f"{summary['steps']} optimizer steps")
    if summary.get("best_metric") and _number(summary.get("best_score")):
        facts.append(f"best/ chosen by {summary['best_metric']}: {summary['best_score']:.4f} at step {best_step}")
    out = ["<section><h2>Summary</h2>"]
    if facts:
        out.append(f"<p>{_e('; '.join(facts))}.</p>")
    if columns:
        keys = [k for k in TABLE_METRICS if any(_number(c.get(k)) for c in columns.values())]
        out.append("<table class=metrics><tr><th>metric</th>" + "".join(f"<th>{_e(n)}</th>" for n in columns)
                   + "</tr>")
        for key in keys:
            cells = "".join(f"<td>{_fmt(c.get(key))}</td>" for c in columns.values())
            out.append(f"<tr><th>{_e(key)}</th>{cells}</tr>")
        if any(_number(c.get("loss")) for c in columns.values()):
            cells = "".join(f"<td>{_fmt(c.get('loss'))}</td>" for c in columns.values())
            out.append(f"<tr><th>validation loss</th>{cells}</tr>")
        out.append("</table><p class=note>Each column is one model scored on the validation images: the base model "
                   "before the first step, best/ (the checkpoint the selection metric chose) and last/ (the final "
                   "weights). pycocoevalcap scorers; METEOR only at the final validation (Java); CIDEr on its raw "
                   "0-10 scale. repeated_ngram_rate: share of captions repeating a word or a word trigram; "
                   "distinct_captions: distinct captions / images (distinct_references: the same for the "
                   "references); vocabulary: distinct words used.</p>")
        images = (summary.get("data") or {}).get("validation_images")
        judged = summary.get("final_metrics") or (validations[-1] if validations else {})
        for warning in guard_warnings(judged, images=images):
            out.append(f"<p class=warning><b>Warning:</b> {_e(warning)}</p>")
    else:
        out.append("<p>No validation metrics (the run had no validation data).</p>")
    out.append("</section>")
    return "\n".join(out)


def _plots_section(plots: dict[str, Path], run: Path, summary: dict) -> str:
    if not plots:
        return ""
    figures = []
    for title, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        link = path.relative_to(run).as_posix()
        wide = " wide" if title == "validation metrics" else ""
        figures.append(f'<figure><img class="plot{wide}" alt="{_e(title)}" src="data:image/png;base64,{data}">'
                       f'<figcaption><a href="{_e(link)}">{_e(link)}</a></figcaption></figure>')
    facts = summary.get("run") or {}
    floor, smoothing = facts.get("loss_floor"), facts.get("label_smoothing")
    note = ("The validation loss is the training objective (teacher-forced: the model reads each reference caption "
            "and predicts its next token) on every validation caption, measured at each validation; step 0 is the "
            "base model.")
    if _number(floor) and floor > 0:
        note += (f" With label smoothing {smoothing:g} the target gives {smoothing:g} of its mass to the whole "
                 f"vocabulary, so even a perfect model cannot go below {floor:.2f} (the dashed floor: the entropy "
                 "of that target); a loss flattening near it has learnt about all the objective can teach.")
    return (f"<section><h2>Training curves</h2><div class=plots>{''.join(figures)}</div>"
            f"<p class=note id=loss-note>{_e(note)}</p></section>")


def _gallery_section(before: list[dict], after: list[dict], thumbnails: dict, labels: tuple[str, str]) -> str:
    if not after and not before:
        return ""
    base = after or before
    before_by_id = {r["id"]: r for r in before}
    after_by_id = {r["id"]: r for r in after}
    cards = [_card(after_by_id.get(r["id"]), before_by_id.get(r["id"]), r, thumbnails, labels)
             for r in base[:GALLERY_SIZE]]
    note = f"The first {len(cards)} of {len(base)} validation images, captioned by {labels[0]} and {labels[1]}."
    if not before:
        note += " No captions from before fine-tuning (val_predictions_before.jsonl is absent)."
    return f"<section><h2>Validation gallery</h2><p class=note>{_e(note)}</p><div class=grid>{''.join(cards)}</div></section>"


def _extremes_section(after: list[dict], before: list[dict], thumbnails: dict, labels: tuple[str, str]) -> str:
    scored = [r for r in after if _number(r.get("cider"))]
    if not scored:
        return ""
    before_by_id = {r["id"]: r for r in before}
    ranked = sorted(scored, key=lambda r: (-r["cider"], r["id"]))
    k = min(EXTREMES, len(ranked) // 2) or 1
    out = ["<section><h2>Best and worst examples</h2>"
           f"<p class=note>Ranked by per-image CIDEr of {_e(labels[1])}'s caption, references listed under "
           "each.</p>"]
    for title, chosen in (("Best", ranked[:k]), ("Worst", ranked[::-1][:k])):
        cards = "".join(_card(r, before_by_id.get(r["id"]), r, thumbnails, labels, open_references=True)
                        for r in chosen)
        out.append(f"<h3>{title} {len(chosen)}</h3><div class=grid>{cards}</div>")
    out.append("</section>")
    return "\n".join(out)


def _card(after: dict | None, before: dict | None, record: dict, thumbnails: dict, labels: tuple[str, str],
          open_references: bool = False) -> str:
    image = _thumbnail(record.get("image"), thumbnails)
    # Upscaled small images stay crisp; shrunk photos would look jagged with pixelated rendering.
    css = "thumb px" if image and image.startswith("data:image/png") else "thumb"
    picture = (f'<img class="{css}" alt="{_e(record["id"])}" src="{image}">' if image
               else "<div class=noimg>image not available</div>")
    refs = "".join(f"<li>{_e(r)}</li>" for r in record.get("references", []))
    rows, long = [], False
    for css_class, label, rec in (("before", labels[0], before), ("after", labels[1], after)):
        if rec is not None:
            score = f' <span class=score>CIDEr {_fmt(rec.get("cider"))}</span>' if _number(rec.get("cider")) else ""
            text = str(rec.get("prediction", ""))
            words = len(text.split())
            if words > LONG_CAPTION_WORDS:
                long = True
                rows.append(f"<p class={css_class}><b>{_e(label)}</b> <span class=words>({words} words)</span>"
                            f"{score}<span class=long>{_e(text)}</span></p>")
            else:
                rows.append(f"<p class={css_class}><b>{_e(label)}:</b> {_e(text)}{score}</p>")
    long = long or any(len(str(r).split()) > LONG_CAPTION_WORDS for r in record.get("references", []))
    # On the best/worst cards the references are the point of comparison: shown, not folded away.
    references = (f"<div class=refs><b>references:</b><ul>{refs}</ul></div>" if open_references
                  else f"<details><summary>references</summary><ul>{refs}</ul></details>")
    card = "'card wide'" if long else "card"
    return f"<div class={card}>{picture}<p class=id>{_e(record['id'])}</p>{''.join(rows)}{references}</div>"


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


def _run_section(summary: dict) -> str:
    facts = summary.get("run") or {}
    if not facts:
        return ""
    rows = []
    if _number(facts.get("wall_seconds")):
        rows.append(("wall time", f"{_duration(facts['wall_seconds'])} (training loop {_duration(facts.get('train_seconds', 0))})"))
    rows.append(("device and precision", f"{facts.get('device')}, {facts.get('precision')}"
                                         f"{' (fp32)' if facts.get('precision') == 'no' else ''}"))
    rows.append(("processes", f"{facts.get('processes')} (batch {facts.get('batch_size')} per process)"))
    if _number(facts.get("samples_per_s")):
        rows.append(("training throughput", f"{facts['samples_per_s']:.1f} image-caption pairs/s"))
    memory = facts.get("peak_memory") or {}
    if _number(memory.get("bytes")):
        rows.append(("peak memory", f"{memory['bytes'] / 2**30:.2f} GiB ({memory.get('kind')})"))
    versions = facts.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    git = facts.get("data_git") or {}
    rows.append(("data git commit", f"{git['commit']}{' (with uncommitted changes)' if git.get('dirty') else ''}"
                 if git.get("commit") else "not a git repository"))
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<section><h2>Run</h2><table class=facts>{table}</table></section>"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m {seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s"


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
.plots{display:flex;flex-wrap:wrap;gap:1em}.plot{width:480px;max-width:100%}.plot.wide{width:960px}figure{margin:0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:.8em}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em;font-size:.9em;overflow-wrap:anywhere}
.card.wide{grid-column:span 2}.long{display:block;max-height:12em;overflow:auto;line-height:1.4;margin-top:.2em;
padding-right:.3em}.words{color:#777;font-size:.85em}
.thumb{width:160px;height:auto;display:block;margin:auto}.px{image-rendering:pixelated}
.noimg{width:160px;height:96px;margin:auto;background:#eee;color:#777;display:flex;align-items:center;justify-content:center}
.id{color:#777;font-size:.8em;word-break:break-all}.before{color:#a33}.after{color:#262}.score{color:#777;font-size:.85em}
.refs ul{margin:.2em 0;padding-left:1.2em;color:#444}.refs{font-size:.9em}
.warning{background:#fff4e0;border-left:4px solid #e08a00;padding:.5em .8em}
pre{background:#f6f6f6;padding:.8em;overflow:auto}ul.skipped{max-height:20em;overflow:auto}
"""


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value) -> str:
    return f"{value:.4f}" if _number(value) else "n/a"
