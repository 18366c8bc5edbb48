"""report.html, plots and model cards, from one short tiny training run shared by the module."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
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
    """A 6-step tiny run through the CLI (Java-less scoring: METEOR's JVM start would triple its time)."""
    from captune.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("report")
    data = make_synthetic(root / "data", n_train=48, n_val=N_VAL)
    out = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("captune.metrics.shutil.which", lambda name: None)
        code = cli.main(["-q", "train", "--model", "tiny", "--data", str(data), "--output", str(out), "--epochs", "2",
                         "--batch-size", "16", "--lr", "1e-3", "--num-workers", "0", "--prompt", PROMPT,
                         "--set", "train.log_every_steps=1", "--set", "eval.num_beams=1",
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
    assert "before fine-tuning" in page and "final (step 6)" in page
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
        assert front["library_name"] == "transformers" and front["pipeline_tag"] == "image-to-text"
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
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert len(sizes) == expected_images(N_VAL)
    assert all(complete and width > 0 for complete, width, _ in sizes)
    assert sum(cls == "plot" for *_, cls in sizes) == 3
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
