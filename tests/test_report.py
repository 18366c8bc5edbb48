"""report.html, plots and model cards, from one short tiny training run shared by the module."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from captune import cli, report
from captune.generate import GenerationOptions, caption_images
from captune.model import load_model_and_processor

N_VAL = 12
PROMPT = "a picture of "
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 6-step tiny run through the CLI (Java-less scoring: METEOR's JVM start would triple its time), logging
    every 4th step, on data that is a git repository."""
    from captune.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("report")
    data = make_synthetic(root / "data", n_train=48, n_val=N_VAL)
    git = ["git", "-C", str(data), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "data"]):
        subprocess.run(git + args, check=True)
    out = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("captune.metrics.shutil.which", lambda name: None)
        code = cli.main(["-q", "train", "--model", "tiny", "--data", str(data), "--output", str(out), "--epochs", "2",
                         "--batch-size", "16", "--lr", "1e-3", "--num-workers", "0", "--prompt", PROMPT,
                         "--set", "train.log_every_steps=4", "--set", "eval.num_beams=1",
                         "--set", "eval.max_new_tokens=6", "--set", "eval.min_new_tokens=0"])
    assert code == 0
    return out


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.hrefs, self.other = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "a":
            self.hrefs.append(attrs.get("href", ""))
        elif tag in ("script", "link", "iframe", "source", "video", "audio"):
            self.other.append(tag)


def _parse(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text(encoding="utf-8"))
    return links


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_images(n_val: int) -> int:
    """3 plots, the gallery, and best + worst examples (see report.py)."""
    k = min(report.EXTREMES, n_val // 2) or 1
    return 3 + min(report.GALLERY_SIZE, n_val) + 2 * k


def test_training_writes_report_plots_and_before_captions(run):
    assert (run / "report.html").is_file()
    for name in ("loss.png", "lr.png", "validation.png"):
        with Image.open(run / "plots" / name) as image:
            assert image.format == "PNG" and image.width > 300
    before = _jsonl(run / "val_predictions_before.jsonl")
    after = _jsonl(run / "val_predictions.jsonl")
    assert [r["id"] for r in before] == [r["id"] for r in after] and len(after) == N_VAL
    assert all(Path(r["image"]).is_file() and "cider" in r for r in before + after)
    assert any(b["prediction"] != a["prediction"] for b, a in zip(before, after))  # fine-tuning changed them
    splits = [json.loads(line)["split"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert splits[0] == "before" and "validation" in splits and "train" in splits
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train_images"] == 48 and summary["data"]["validation_images"] == N_VAL


def test_report_references_only_existing_files_and_no_network(run):
    page = (run / "report.html").read_text(encoding="utf-8")
    links = _parse(run / "report.html")
    assert links.other == []  # no scripts, stylesheets or frames to fetch
    assert "http://" not in page and "https://" not in page
    assert len(links.images) == expected_images(N_VAL)
    for src in links.images:
        assert src.startswith("data:image/"), src
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.load()
    assert "config.yaml" in links.hrefs and "plots/loss.png" in links.hrefs and "best/README.md" in links.hrefs
    for href in links.hrefs:
        assert (run / href).is_file(), href


def test_report_shows_config_metrics_captions_and_ranked_examples(run):
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "eval:" in page and "caption_before: true" in page  # the resolved config.yaml, verbatim
    assert "base model (before fine-tuning, step 0)" in page and "last/ (step 6)" in page
    before = _jsonl(run / "val_predictions_before.jsonl")
    after = _jsonl(run / "val_predictions.jsonl")
    import html

    for record in before[: report.GALLERY_SIZE] + after[: report.GALLERY_SIZE]:
        assert html.escape(record["prediction"]) in page
    best_part, worst_part = page.split("<h3>Best")[1].split("<h3>Worst")
    best_ids = re.findall(r"<p class=id>([^<]+)</p>", best_part)
    worst_ids = re.findall(r"<p class=id>([^<]+)</p>", worst_part)
    cider = {r["id"]: r["cider"] for r in after}
    assert len(best_ids) == len(worst_ids) == 5
    assert min(cider[i] for i in best_ids) >= max(cider[i] for i in worst_ids)
    assert [cider[i] for i in best_ids] == sorted(cider.values(), reverse=True)[:5]


def test_metric_table_holds_the_runs_numbers_and_each_card_its_own_captions(run):
    """Kills "report metric columns swapped" and "report cards show the after caption as the before one"
    (tools/mutants.py): `html.escape(prediction) in page` holds for an empty prediction or one shown on the wrong
    card, and no test read the numbers of the metric table."""
    import html

    page = (run / "report.html").read_text(encoding="utf-8")
    final = json.loads((run / "summary.json").read_text())["final_metrics"]
    base = [r for r in _jsonl(run / "metrics.jsonl") if r["split"] == "before"][-1]
    table = page.split("<table class=metrics>")[1].split("</table>")[0]
    for key in ("bleu_4", "rouge_l", "cider"):
        row = re.search(rf"<tr><th>{key}</th>(.*?)</tr>", table).group(1)
        cells = re.findall(r"<td>(.*?)</td>", row)
        assert cells[0] == f"{base[key]:.4f}" and cells[-1] == f"{final[key]:.4f}", (key, cells)
    before = {r["id"]: r["prediction"] for r in _jsonl(run / "val_predictions_before.jsonl")}
    after = {r["id"]: r["prediction"] for r in _jsonl(run / "val_predictions.jsonl")}
    gallery = page.split("<h3>Best")[0]
    cards = re.findall(r"<p class=id>([^<]+)</p><p class=before><b>[^<]*</b> (.*?)(?: <span|</p>)"
                       r".*?<p class=after><b>[^<]*</b> (.*?)(?: <span|</p>)", gallery)
    assert len(cards) == min(report.GALLERY_SIZE, N_VAL)
    for image_id, shown_before, shown_after in cards:
        assert shown_before == html.escape(before[html.unescape(image_id)])
        assert shown_after == html.escape(after[html.unescape(image_id)])
    assert any(before[i] != after[i] for i in before), "the run must change some caption for this to test anything"


def test_best_and_worst_cards_show_their_references(run):
    page = (run / "report.html").read_text(encoding="utf-8")
    examples = page.split("<h2>Best and worst examples</h2>")[1].split("</section>")[0]
    cards = examples.split("<div class=card>")[1:]
    assert len(cards) == 10 and "<details" not in examples  # nothing folded away
    after = {r["id"]: r for r in _jsonl(run / "val_predictions_best.jsonl")}
    import html

    for card in cards:
        record = after[re.search(r"<p class=id>([^<]+)</p>", card).group(1)]
        references = card.split("<div class=refs>")[1]
        assert all(f"<li>{html.escape(r)}</li>" in references for r in record["references"])


def test_gallery_shows_best_and_every_caption_names_its_model(run, tmp_path):
    summary = json.loads((run / "summary.json").read_text())
    best = _jsonl(run / "val_predictions_best.jsonl")
    # The best/ captions are what best/ really writes, decoded as `captune eval RUN/best` decodes.
    settings = json.loads((run / "best" / "captune.json").read_text())
    model, processor = load_model_and_processor(str(run / "best"))
    options = GenerationOptions(prompt=settings["prompt"], **settings["generation"])
    images = [Image.open(r["image"]) for r in best]
    assert caption_images(model.eval(), processor, images, options) == [r["prediction"] for r in best]

    # A run whose last validation is not its best: the page must show best/'s captions, under best/'s name.
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("best", "last", "checkpoints", "plots"))
    last = [{**r, "prediction": "a caption of the last model"} for r in best]
    (copy / "val_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in last))
    summary["best_step"] = 3
    (copy / "summary.json").write_text(json.dumps(summary))
    page = report.write_report(copy).read_text(encoding="utf-8")
    gallery = page.split("<h2>Validation gallery</h2>")[1].split("</section>")[0]
    assert "a caption of the last model" not in page
    assert gallery.count("<b>best/ (step 3):</b>") == min(report.GALLERY_SIZE, N_VAL)
    assert gallery.count("<b>base model:</b>") == min(report.GALLERY_SIZE, N_VAL)
    metrics = page.split("<h2>Summary</h2>")[1].split("</section>")[0]
    assert "<th>best/ (step 3)</th>" in metrics and "<th>last/ (step 6)</th>" in metrics


def test_cider_is_plotted_on_its_own_axis(run, tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(report, "_plot", lambda path, panels: drawn.setdefault(path.name, panels) and path)
    report.make_plots(report.read_jsonl(run / "metrics.jsonl"), tmp_path, loss_floor=1.36)
    (scores, cider) = drawn["validation.png"]
    assert "cider" not in scores[2] and {"bleu_4", "rouge_l"} <= set(scores[2]) and "0-1" in scores[1]
    assert list(cider[2]) == ["cider"] and "0-10" in cider[1]
    (loss_panel,) = drawn["loss.png"]
    assert set(loss_panel[2]) == {"training", "validation"} and loss_panel[3] == {"floor": 1.36}


def test_last_training_step_is_always_logged(run):
    train = [r for r in _jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 4, 6]  # log_every_steps=4 and 6 steps: 6 too
    assert train[-1]["lr"] < train[-2]["lr"]  # the cosine is seen to come down


def test_report_states_the_runs_facts(run):
    facts = json.loads((run / "summary.json").read_text())["run"]
    import accelerate
    import torch
    import transformers

    assert facts["versions"]["torch"] == torch.__version__ and facts["versions"]["accelerate"] == accelerate.__version__
    assert facts["device"] == "cpu" and facts["precision"] == "no" and facts["processes"] == 1
    assert 0 < facts["train_seconds"] < facts["wall_seconds"] and facts["samples_per_s"] > 0
    assert facts["peak_memory"]["bytes"] > 100 * 2**20
    commit = subprocess.run(["git", "-C", str(run.parent / "data"), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert facts["data_git"] == {"commit": commit, "dirty": False}
    page = (run / "report.html").read_text(encoding="utf-8")
    section = page.split("<h2>Run</h2>")[1].split("</section>")[0]
    for text in (commit, f"transformers {transformers.__version__}", "peft ", "captune ", "cpu, no (fp32)",
                 "pairs/s", "GiB", "wall time"):
        assert text in section, text


def test_validation_loss_is_the_training_objective_on_validation_captions(run):
    from captune.data import build_dataset
    from captune.data.collate import CaptionCollator, CaptionPairs
    from captune.train import batch_loss_sum, target_tokens

    records = _jsonl(run / "metrics.jsonl")
    checks = [r for r in records if r["split"] in ("before", "validation")]
    assert [r["step"] for r in checks] == [0, 3, 6] and all(r["loss"] > 0 for r in checks)
    assert checks[-1]["loss"] < checks[0]["loss"]  # training lowered it
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_step"] == 6  # so last/ holds the weights of the final validation
    assert json.loads((run / "last" / "captune.json").read_text())["step"] == 6  # what `serve` shows
    # Recomputed independently: last/ on every validation caption, one batch, the loss per caption token.
    model, processor = load_model_and_processor(str(run / "last"))
    validation = build_dataset(str(run.parent / "data")).validation
    batch = CaptionCollator(processor, 40, PROMPT)([CaptionPairs(validation)[i] for i in range(N_VAL)])
    batch.pop("pairs")
    import torch

    with torch.no_grad():
        expected = (batch_loss_sum(model.eval(), batch, 0.1) / target_tokens(batch["labels"])).item()
    assert abs(checks[-1]["loss"] - expected) < 1e-3
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "<th>validation loss</th>" in page and "label smoothing 0.1" in page and "below 1.36" in page


def test_loss_floor_is_the_smallest_label_smoothed_loss():
    import torch
    import torch.nn.functional as F

    from captune.runinfo import loss_floor

    vocab, smoothing = 50, 0.1
    target = torch.full((vocab,), smoothing / vocab)
    target[3] += 1 - smoothing
    best = F.cross_entropy(target.log().unsqueeze(0), torch.tensor([3]), label_smoothing=smoothing).item()
    assert abs(loss_floor(smoothing, vocab) - best) < 1e-5
    for logits in (torch.randn(1, vocab) * 5, torch.eye(vocab)[3:4] * 30):  # anything else is higher
        assert F.cross_entropy(logits, torch.tensor([3]), label_smoothing=smoothing).item() > best
    assert loss_floor(0.0, vocab) == 0.0 and round(loss_floor(0.1, 30524), 2) == 1.36


def test_report_command_rebuilds_it(run, capsys):
    (run / "report.html").unlink()
    shutil.rmtree(run / "plots")
    assert cli.main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and (run / "plots" / "loss.png").is_file()
    assert len(_parse(run / "report.html").images) == expected_images(N_VAL)


def test_report_of_missing_directory_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) != 0
    assert cli.main(["report", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("captune: error:") for line in err)


def test_report_lists_skipped_samples_and_survives_moved_images(run, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "val_predictions.jsonl"):
        shutil.copy(run / name, copy / name)
    summary = json.loads((copy / "summary.json").read_text())
    summary["skipped_samples"] = [{"file": "broken.jpg", "reason": "cannot decode <image>"}, "gone.png: missing"]
    (copy / "summary.json").write_text(json.dumps(summary))
    records = _jsonl(copy / "val_predictions.jsonl")
    records[0]["image"] = str(tmp_path / "moved.png")
    (copy / "val_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = report.write_report(copy).read_text(encoding="utf-8")
    assert "Skipped samples (2)" in page and "cannot decode &lt;image&gt;" in page and "gone.png: missing" in page
    assert "image not available" in page
    links = _parse(copy / "report.html")
    assert all(src.startswith("data:image/") for src in links.images)
    assert all((copy / href).is_file() for href in links.hrefs)


def test_model_cards_have_hub_front_matter(run):
    for folder in ("best", "last"):
        text = (run / folder / "README.md").read_text(encoding="utf-8")
        assert text.startswith("---\n")
        front = yaml.safe_load(text.split("---\n")[1])
        assert front["library_name"] == "transformers" and front["pipeline_tag"] == "image-text-to-text"
        assert "base_model" not in front  # `tiny` is no Hub id; the Hub would reject it
        assert {"bleu", "meteor", "rouge", "cider"} <= set(front["metrics"]) and "captune" in front["tags"]
        for heading in ("## Base model", "## Data", "## Hyperparameters", "## Validation metrics", "## Usage"):
            assert heading in text
        assert "| lr | 0.001 |" in text and "train images: 48" in text and "| cider |" in text


def test_model_card_base_model_is_a_hub_id_only():
    from captune.modelcard import hub_base_model, model_card
    from captune.models import family_module

    assert hub_base_model("Salesforce/blip-image-captioning-base") == "Salesforce/blip-image-captioning-base"
    assert hub_base_model("tiny") is None and hub_base_model("./runs/x/best") is None
    card = model_card(base_model="Salesforce/blip-image-captioning-base", data={}, hyperparameters={},
                      metrics=None, generation={"num_beams": 3}, family=family_module("blip"))
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "Salesforce/blip-image-captioning-base"
    assert "No validation data" in card


def test_model_card_usage_snippet_runs_with_plain_transformers(run):
    text = (run / "best" / "README.md").read_text(encoding="utf-8")
    snippet = text.split("```python\n")[1].split("```")[0]
    image = sorted((run.parent / "data" / "validation").glob("*.png"))[0]
    snippet = snippet.replace('"path/to/this/directory"', repr(str(run / "best"))).replace('"photo.jpg"', repr(str(image)))
    assert "captune" not in snippet  # plain transformers only
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), {})
    settings = json.loads((run / "best" / "captune.json").read_text())
    model, processor = load_model_and_processor(str(run / "best"))
    options = GenerationOptions(prompt=PROMPT, **settings["generation"])
    expected = caption_images(model.eval(), processor, [Image.open(image)], options)[0]
    assert printed.getvalue().strip() == expected


def test_model_card_pipeline_snippet_runs_with_transformers_5(run):
    """The card's pipeline_tag names a task transformers 5 has, and its pipeline snippet, run as written, prints what
    captune's own decoding of best/ prints (prompt removed)."""
    text = (run / "best" / "README.md").read_text(encoding="utf-8")
    tag = yaml.safe_load(text.split("---\n")[1])["pipeline_tag"]
    from transformers.pipelines import SUPPORTED_TASKS

    assert tag in SUPPORTED_TASKS
    snippet = text.split("```python\n")[2].split("```")[0]
    assert f'pipeline("{tag}"' in snippet and "text='a picture of'" in snippet
    image = sorted((run.parent / "data" / "validation").glob("*.png"))[1]
    snippet = snippet.replace('"path/to/this/directory"', repr(str(run / "best"))).replace('"photo.jpg"', repr(str(image)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), {})
    settings = json.loads((run / "best" / "captune.json").read_text())
    model, processor = load_model_and_processor(str(run / "best"))
    options = GenerationOptions(prompt=PROMPT, **settings["generation"])
    assert printed.getvalue().strip() == caption_images(model.eval(), processor, [Image.open(image)], options)[0]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium)")
def test_chromium_renders_plots_and_gallery(run, tmp_path):
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "report.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto((run / "report.html").resolve().as_uri())
            page.wait_for_load_state("load")
            sizes = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.className])")
            # The best/worst cards' references are on screen without a click.
            references = page.locator(".refs li")
            assert references.count() >= 10 and references.first.is_visible()
            assert page.locator("table.facts").is_visible() and page.locator("#loss-note").is_visible()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert len(sizes) == expected_images(N_VAL)
    assert all(complete and width > 0 for complete, width, _ in sizes)
    assert sum(cls.startswith("plot") for *_, cls in sizes) == 3
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert image.height > 2000  # plots and gallery laid out, not an error page
    assert colours is None or len(colours) > 50  # not blank


def test_report_of_a_run_without_validation_has_curves_only(tmp_path):
    (tmp_path / "config.yaml").write_text("output: x\n")
    lines = [{"step": s, "epoch": 0, "split": "train", "loss": 5.0 / s, "lr": 1e-4} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "spl')
    page = report.write_report(tmp_path).read_text(encoding="utf-8")  # a torn last line (killed run) is skipped
    assert len(_parse(tmp_path / "report.html").images) == 2
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png", "lr.png"]
    assert "No validation metrics" in page and "Validation gallery" not in page
