"""The benchmarks' --smoke modes run end to end on the tiny model and print their ratio tables."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=240):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_train_step_smoke(tmp_path):
    out = _run(ROOT / "benchmarks/train_step.py", "--smoke", "--batch-sizes", "2", "--variants", "notebook", "captune",
               "captune-grouped", "--captions-per-image", "2", "--json", tmp_path / "r.json")
    assert "| blip | full | 2 | notebook |" in out and "| blip | full | 2 | captune |" in out and "x notebook" in out
    assert "| blip | full | 2 | captune-grouped |" in out
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {r["captions_per_image"] for r in results} == {2}


def _by_model(path):
    rows = {}
    for r in json.loads(path.read_text())["results"]:
        rows.setdefault(r["model"], {})[r["variant"]] = r
    return rows


@pytest.mark.slow
def test_train_step_every_family_smoke(tmp_path):
    """--model for every family: captune's loop and the plain transformers loop both run on the family's tiny
    preset, in the family's default mode, and train exactly the same parameters (a fair comparison)."""
    families = ["blip2", "blip2-t5", "git", "florence2", "paligemma"]
    out = _run(ROOT / "benchmarks/train_step.py", "--smoke", "--batch-sizes", "2", "--model", *families,
               "--json", tmp_path / "r.json")
    rows = _by_model(tmp_path / "r.json")
    assert sorted(rows) == sorted(families)
    for model, variants in rows.items():
        assert set(variants) == {"transformers", "captune"}, model
        plain, ours = variants["transformers"], variants["captune"]
        assert plain["trainable_params"] == ours["trainable_params"] > 0, model
        assert plain["mode"] == ours["mode"] == ("frozen-lm" if model.startswith("blip2") else "full")
        assert f"| {model} | {ours['mode']} | 2 | captune |" in out and "x transformers" in out
    # BLIP-2's paper mode freezes the language model: far fewer trainable parameters than the whole model.
    assert rows["blip2"]["captune"]["trainable_params"] < rows["git"]["captune"]["trainable_params"]


@pytest.mark.slow
def test_train_step_lora_smoke(tmp_path):
    """--mode lora: peft adapters on both sides, on the same modules (equal trainable parameter counts)."""
    _run(ROOT / "benchmarks/train_step.py", "--smoke", "--batch-sizes", "2", "--mode", "lora", "--model", "blip2",
         "git", "florence2", "paligemma", "--json", tmp_path / "r.json")
    for model, variants in _by_model(tmp_path / "r.json").items():
        assert variants["transformers"]["trainable_params"] == variants["captune"]["trainable_params"] > 0, model
        assert variants["captune"]["mode"] == "lora"


@pytest.mark.slow
def test_train_step_scst_smoke(tmp_path):
    """--objective scst: captune's SCST step against its cross-entropy step at the same batch of images."""
    out = _run(ROOT / "benchmarks/train_step.py", "--smoke", "--batch-sizes", "2", "--objective", "scst",
               "--scst-samples", "3", "--json", tmp_path / "r.json")
    assert "| blip | full | 2 | captune-scst |" in out and "x captune" in out
    rows = _by_model(tmp_path / "r.json")["blip"]
    assert set(rows) == {"captune", "captune-scst"}
    assert rows["captune-scst"]["scst_samples"] == 3 and rows["captune-scst"]["samples_per_s"] > 0
    assert rows["captune-scst"]["batch_size"] == rows["captune"]["batch_size"] == 2


@pytest.mark.slow
def test_caption_smoke():
    out = _run(ROOT / "benchmarks/caption.py", "--smoke")
    assert "| greedy | captune |" in out and "| beam 3 | pipeline |" in out
    assert "| greedy | captune-int8 |" in out and "| beam 3 | captune-int8 |" in out
    assert "int8 vs fp32: vision embedding cosine 0.99" in out  # measured 0.999 (tiny and full size)
    assert "int8 vs fp32 captune, beam 3: words equal" in out


@pytest.mark.slow
def test_gpu_sh_smoke(tmp_path):
    """gpu.sh end to end with --smoke: on a CPU machine its Python part runs the tiny model, every section reports."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for section in ("full", "full grouped", "frozen-vision", "lora", "notebook", "caption beam 3"):
        assert f"| {section} |" in done.stdout, done.stdout
    results = json.loads((tmp_path / "gpu_bench.json").read_text())["results"]
    assert results["full"]["samples_per_s"] > 0 and results["full"]["flops_per_sample"] > 0
    assert results["caption beam 3"]["captions_per_s"] > 0


@pytest.mark.slow
def test_padding_smoke():
    out = _run(ROOT / "benchmarks/padding.py", "--smoke")
    rows = [line for line in out.splitlines() if line.startswith("| shuffled") or line.startswith("| length-grouped")]
    assert len(rows) == 2
    # Sorting mega-batches by length can only remove padding.
    shuffled_pad, grouped_pad = (float(row.split("|")[3].strip().rstrip("%")) for row in rows)
    assert grouped_pad < shuffled_pad
