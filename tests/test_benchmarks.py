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
def test_train_step_lora_smoke(tmp_path):
    """--mode lora: peft adapters on both sides, on the same modules (equal trainable parameter counts)."""
    _run(ROOT / "benchmarks/train_step.py", "--smoke", "--batch-sizes", "2", "--mode", "lora", "--model", "blip2",
         "git", "florence2", "paligemma", "--json", tmp_path / "r.json")
    for model, variants in _by_model(tmp_path / "r.json").items():
        assert variants["transformers"]["trainable_params"] == variants["captune"]["trainable_params"] > 0, model
        assert variants["captune"]["mode"] == "lora"


@pytest.mark.slow
def test_caption_smoke():
    out = _run(ROOT / "benchmarks/caption.py", "--smoke")
    assert "| greedy | captune |" in out and "| beam 3 | pipeline |" in out
    assert "| greedy | captune-int8 |" in out and "| beam 3 | captune-int8 |" in out
    assert "int8 vs fp32: vision embedding cosine 0.99" in out  # measured 0.999 (tiny and full size)
    assert "int8 vs fp32 captune, beam 3: words equal" in out


@pytest.mark.slow
def test_gpu_sh_smoke(tmp_path):
    """gpu.sh end to end with --smoke: on a CPU machine its Python commands run the tiny presets and every section
    reports: BLIP-base in depth, every family's training step against plain transformers, SCST against
    cross-entropy."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for section in ("full", "full grouped", "frozen-vision", "lora", "notebook", "caption beam 3"):
        assert f"| {section} |" in done.stdout, done.stdout
    results = json.loads((tmp_path / "gpu_bench.json").read_text())["results"]
    assert results["full"]["samples_per_s"] > 0 and results["full"]["flops_per_sample"] > 0
    assert results["caption beam 3"]["captions_per_s"] > 0

    # Every family: captune's loop and the plain transformers loop both ran, in the family's default mode, and
    # trained exactly the same parameters (the comparison is fair).
    rows = _by_model(tmp_path / "train_step_families.json")
    assert sorted(rows) == ["blip", "blip2", "blip2-t5", "florence2", "git", "paligemma", "smolvlm"]
    for model, variants in rows.items():
        assert {"transformers", "captune"} <= set(variants), model
        plain, ours = variants["transformers"], variants["captune"]
        assert plain["trainable_params"] == ours["trainable_params"] > 0, model
        assert plain["mode"] == ours["mode"] == ("frozen-lm" if model.startswith("blip2") else "full")
        assert f"| {model} | {ours['mode']} | 2 | captune |" in done.stdout
    # BLIP-2's paper mode freezes the language model.
    blip2 = rows["blip2"]["captune"]["trainable_params"]
    assert blip2 < rows["git"]["captune"]["trainable_params"]

    # SCST against cross-entropy at the same batch of images.
    scst = _by_model(tmp_path / "train_step_scst.json")["blip"]
    assert set(scst) == {"captune", "captune-scst"}
    assert scst["captune-scst"]["scst_samples"] == 5 and scst["captune-scst"]["samples_per_s"] > 0
    assert scst["captune-scst"]["batch_size"] == scst["captune"]["batch_size"] == 2
    assert "| blip | full | 2 | captune-scst |" in done.stdout and "x captune" in done.stdout


def test_gpu_sh_reports_failed_sections(tmp_path):
    """Each section that fails is named, the next one still runs, and the script exits 1 (a Python that fails at
    once); an unknown --model is refused before anything runs."""
    env = dict(os.environ, PYTHON="false", OUT=str(tmp_path))
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    failed = done.stdout.split("failed sections:")[1]
    for section in ("1. BLIP-base in depth", "2. training step vs plain transformers", "3. SCST vs cross-entropy"):
        assert section in failed
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), "--model", "nope"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--model nope is not a family" in done.stderr


@pytest.mark.slow
def test_padding_smoke():
    out = _run(ROOT / "benchmarks/padding.py", "--smoke")
    rows = [line for line in out.splitlines() if line.startswith("| shuffled") or line.startswith("| length-grouped")]
    assert len(rows) == 2
    # Sorting mega-batches by length can only remove padding.
    shuffled_pad, grouped_pad = (float(row.split("|")[3].strip().rstrip("%")) for row in rows)
    assert grouped_pad < shuffled_pad
