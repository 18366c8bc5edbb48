"""The lab notebook (notebooks/finetune_blip.ipynb) runs top to bottom and is committed without outputs.

The notebook is executed by nbclient in an ipykernel started with this interpreter, with CAPTUNE_NOTEBOOK_TINY=1 (the
tiny BLIP on synthetic data, offline, CPU) and its working directory in tmp_path, so data/ and runs/ land there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e .[test]")
nbclient = pytest.importorskip("nbclient", reason="pip install -e .[test]")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "finetune_blip.ipynb"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def write_kernelspec(directory: Path) -> None:
    """A `python3` kernelspec running ipykernel with this interpreter and the tiny-mode environment.

    Found first because JUPYTER_PATH outranks every other kernelspec location, so a system-wide `python3` kernel of
    another interpreter (without captune) cannot be picked up instead.
    """
    spec = directory / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (captune tests)",
        "language": "python",
        "env": {"CAPTUNE_NOTEBOOK_TINY": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                # The shell cell's `!captune ...` finds this interpreter's entry point, as in an activated venv.
                "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")},
    }))


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def text_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif "data" in output:
            parts.append(output.data.get("text/plain", ""))
    return "".join(parts)


def assert_pads_are_minus_100(collator_text: str) -> None:
    """The collator cell prints, per row, its tokens, input_ids and labels: every [PAD] column is labelled -100 (the
    cell adds a one-word caption so there is padding), and in the batch without a prompt every other column after
    [DEC] is labelled with its own id.

    Kills "blip: pads not -100 (as the notebook shows it)" (tools/mutants.py): `"-100" in collator_text` alone was
    satisfied by the prompt's masked positions.
    """
    lines = [line.split() for line in collator_text.splitlines()]
    rows = [(lines[i], lines[i + 1][:-2], lines[i + 2][:-2]) for i in range(len(lines) - 2)
            if lines[i + 1][-2:] == ["<-", "input_ids"] and lines[i + 2][-2:] == ["<-", "labels"]]
    assert len(rows) == 6, collator_text  # three captions (one of a single word), without and with a prompt
    assert any("[PAD]" in tokens for tokens, _, _ in rows), "the shown batches must contain padding"
    for index, (tokens, ids, labels) in enumerate(rows):
        assert tokens[0] == "[DEC]" and labels[0] == "-100"
        for token, token_id, label in zip(tokens[1:], ids[1:], labels[1:]):
            if token == "[PAD]":
                assert label == "-100", (tokens, labels)
            elif index < len(rows) // 2:  # no prompt: every caption token is a target
                assert label == token_id, (tokens, labels)


@pytest.mark.timeout(900)
def test_notebook_runs_top_to_bottom_in_tiny_mode(tmp_path, monkeypatch):
    write_kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    work = tmp_path / "work"
    work.mkdir()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(work)}},
        store_widget_state=True,
    )
    client.execute()  # raises CellExecutionError (with the cell's traceback) when any cell fails

    cells = {cell.id: cell for cell in code_cells(notebook)}
    assert "tiny on cpu" in text_of(cells["settings"]), "the kernel did not see CAPTUNE_NOTEBOOK_TINY=1"
    # The processor section shows the [DEC] bos and -100 labels.
    collator_text = text_of(cells["collator"])
    assert "[DEC]" in collator_text and "-100" in collator_text
    assert_pads_are_minus_100(collator_text)
    # Training drew its tqdm.auto progress bar as a Jupyter widget, not as text.
    assert any(WIDGET_VIEW in output.get("data", {}) for output in cells["train"].outputs)
    # The metrics table compares before and after, and the tiny model learned something in its few epochs.
    table = text_of(cells["eval"])
    assert "before" in table and "after" in table and "cider" in table
    summary = json.loads((work / "runs" / "notebook" / "summary.json").read_text())
    assert summary["best_score"] > 0.5, summary
    assert (work / "runs" / "notebook" / "best" / "model.safetensors").is_file()
    assert (work / "data" / "synthetic" / "train" / "metadata.jsonl").is_file()
    # Figures (the data grid, the captions after training) were drawn.
    assert any("image/png" in output.get("data", {}) for output in cells["look"].outputs)
    assert "nothing pushed" in text_of(cells["hub"])
    # The hand-written loop: a batch, one step, the loss going down, its curve; then train()'s loss curves.
    assert "pixel_values" in text_of(cells["loop-data"]) and "first step's loss" in text_of(cells["loop-step"])
    first, last = map(float, re.search(r"loss: ([\d.]+) at the first step, ([\d.]+) over the last five",
                                       text_of(cells["loop-train"])).groups())
    assert last < first - 0.5, (first, last)
    assert any(WIDGET_VIEW in output.get("data", {}) for output in cells["loop-train"].outputs)
    for cell_id in ("loop-plot", "curves"):
        assert any("image/png" in output.get("data", {}) for output in cells[cell_id].outputs), cell_id
    # Every shell command of the notebook ran: check, a dry run, eval (its table), caption (one line).
    shell = text_of(cells["shell"])
    assert "ok: no errors" in shell and "dry run: nothing written" in shell and "cider" in shell, shell
    assert (work / "runs" / "notebook" / "eval" / "metrics.json").is_file() and not (work / "runs" / "cli").exists()


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    cells = code_cells(notebook)
    assert cells
    for cell in cells:
        assert cell.outputs == [], f"cell {cell.id} has outputs: clear them before committing"
        assert cell.execution_count is None, f"cell {cell.id} has an execution count: clear outputs"
    assert "widgets" not in notebook.metadata, "widget state is committed: clear outputs"


def test_notebook_defaults_to_blip_base_and_does_not_push():
    """Without CAPTUNE_NOTEBOOK_TINY the lab trains BLIP-base, and the Hub cell is off unless the user turns it on."""
    sources = {cell.id: cell.source for cell in code_cells(nbformat.read(NOTEBOOK, as_version=4))}
    assert 'os.environ.get("CAPTUNE_NOTEBOOK_TINY") == "1"' in sources["settings"]
    assert '"Salesforce/blip-image-captioning-base"' in sources["settings"]
    assert "PUSH_TO_HUB = False" in sources["hub"]


def test_notebook_outputs_are_ignored_by_git():
    """Run from a clone (working directory notebooks/), the lab writes data/ and runs/ there: git ignores both, so
    `git status` stays clean."""
    repo = NOTEBOOK.parents[1]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["notebooks/data/synthetic/train/metadata.jsonl", "notebooks/runs/notebook/best/model.safetensors"]
    done = subprocess.run(["git", "-C", str(repo), "check-ignore", "--no-index", *paths], capture_output=True, text=True)
    assert done.stdout.split() == paths


def test_notebook_doc_commands_match_the_notebook():
    """docs/notebook.md shows the commands that work: an install from a clone with the extra that brings Jupyter."""
    doc = (NOTEBOOK.parents[1] / "docs" / "notebook.md").read_text()
    assert 'pip install -e ".[notebook]"' in doc and "OWNER" not in doc
    source = "".join(cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells)
    assert "OWNER/captune" not in source and "--output" in source
    import tomllib

    extras = tomllib.loads((NOTEBOOK.parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("jupyterlab") for dep in extras["notebook"])


# Every shell command of docs/notebook.md runs (its ```bash blocks). Each command is run by the test named for it
# here; test_every_doc_command_is_run fails when the doc gains a command that no test runs.
DOC = NOTEBOOK.parents[1] / "docs" / "notebook.md"
REPO = NOTEBOOK.parents[1]
DOC_COMMANDS = {  # how the command starts (after VAR=value assignments) -> the test that runs it
    "pip install": "test_doc_install_command_resolves_offline",
    "jupyter lab": "test_doc_jupyter_lab_command_serves_the_notebook",
    "jupyter nbconvert": "test_doc_clear_output_command_restores_the_committed_notebook",
}


def doc_commands() -> list[str]:
    """The command lines of the doc's ```bash blocks, trailing comments removed."""
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
             for line in block.splitlines()]
    commands = [re.sub(r"\s+#.*$", "", line) for line in lines if line and not line.startswith("#")]
    assert commands and not any("#" in command for command in commands), commands
    return commands


def doc_command(start: str) -> str:
    (command,) = [c for c in doc_commands() if re.sub(r"^(\w+=\S*\s+)*", "", c).startswith(start)]
    return command


def shell_env(tmp_path: Path) -> dict:
    """This interpreter's bin/ first on PATH (as in an activated venv); Jupyter's files under tmp_path, not $HOME."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for name in ("JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR"):
        env[name] = str(tmp_path / name.lower())
    env.pop("JUPYTER_PATH", None)
    return env


def git_status() -> str | None:
    """`git status` of the clone, untracked files listed one by one (None outside a git checkout)."""
    if not (REPO / ".git").exists():
        return None
    return subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all"],
                          capture_output=True, text=True, check=True).stdout


def test_every_doc_command_is_run():
    commands = doc_commands()
    for command in commands:
        bare = re.sub(r"^(\w+=\S*\s+)*", "", command)
        assert any(bare.startswith(start) for start in DOC_COMMANDS), \
            f"docs/notebook.md shows `{command}`, which no test runs: add it to DOC_COMMANDS and a test"
    for start in DOC_COMMANDS:
        doc_command(start)  # each runner's command is still in the doc, exactly once


# Offline pip flags: resolve against what is installed (no index), build the metadata with the installed setuptools,
# install nothing. pip still fails when the extra is unknown to it or a requirement is missing or the wrong version.
PIP_OFFLINE = "--dry-run --no-index --no-build-isolation"


def test_doc_install_command_resolves_offline(tmp_path):
    command = doc_command("pip install")
    before = git_status()
    done = subprocess.run(["bash", "-c", f"{command} {PIP_OFFLINE}"], cwd=REPO, env=shell_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Would install captune-" in done.stdout, done.stdout[-2000:]
    assert "does not provide the extra" not in done.stdout + done.stderr, done.stderr[-2000:]
    for requirement in ("jupyterlab", "ipywidgets"):  # the notebook extra's, not only captune's own
        assert re.search(rf"Requirement already satisfied: {requirement}\b", done.stdout, re.I), requirement
    assert git_status() == before


def run_install_cell(source: str, cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the notebook's install cell as a kernel without captune would: captune is installed here, so the cell is
    told it is not, and its pip command runs as the offline dry run."""
    prelude = textwrap.dedent(f"""
        import importlib.util, subprocess
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *rest: None if name == "captune" else find_spec(name, *rest)
        run = subprocess.run
        def dry_run(args, **kwargs):
            print("RAN", args)
            return run([*args, *{PIP_OFFLINE.split()!r}], **kwargs)
        subprocess.run = dry_run
    """)
    done = subprocess.run([sys.executable, "-c", prelude + source], cwd=cwd, env=shell_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "\ncaptune " in done.stdout, done.stdout  # and the cell's `import captune` then worked
    return done


def test_notebook_install_cell_installs_the_clone_or_the_git_url(tmp_path):
    """Both branches of the install cell: from a clone `pip install -e REPO[notebook]`; elsewhere (Colab) with
    CAPTUNE_GIT_URL set, `pip install "captune[notebook] @ git+URL"`, here with this clone's file:// URL (pip clones
    it: its committed state)."""
    source = {cell.id: cell.source for cell in code_cells(nbformat.read(NOTEBOOK, as_version=4))}["install"]
    before = git_status()
    done = run_install_cell(source, REPO / "notebooks", tmp_path)
    assert f"'-e', '{REPO}[notebook]']" in done.stdout, done.stdout
    assert git_status() == before
    if before is None:
        return  # not a git checkout: no URL to install from
    assert source.count('CAPTUNE_GIT_URL = ""') == 1
    elsewhere = tmp_path / "colab"  # not a clone: no pyproject.toml above it
    elsewhere.mkdir()
    done = run_install_cell(source.replace('CAPTUNE_GIT_URL = ""', f'CAPTUNE_GIT_URL = "file://{REPO}"'), elsewhere,
                            tmp_path)
    assert f"'captune[notebook] @ git+file://{REPO}'" in done.stdout, done.stdout


def test_doc_jupyter_lab_command_serves_the_notebook(tmp_path):
    """`jupyter lab notebooks/finetune_blip.ipynb` starts, serves the lab and the notebook, and stops cleanly."""
    import urllib.request

    command = doc_command("jupyter lab") + " --no-browser --port=0"  # no display here; any free port
    if os.geteuid() == 0:
        command += " --allow-root"  # a CI container runs as root; the doc says when to add it
    env = shell_env(tmp_path)
    runtime = Path(env["JUPYTER_RUNTIME_DIR"])
    before = git_status()
    server = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list(runtime.glob("jpserver-*.json")):  # written once the server listens
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "jupyter lab did not start in 180 s"
            time.sleep(0.2)
        info = json.loads(next(runtime.glob("jpserver-*.json")).read_text())

        def get(path: str, method: str = "GET") -> tuple[int, bytes]:
            request = urllib.request.Request(info["url"] + path, method=method,
                                             headers={"Authorization": f"token {info['token']}"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()

        status, body = get("api/status")
        assert status == 200 and "started" in json.loads(body)
        status, body = get("lab")
        assert status == 200 and b"<title>JupyterLab" in body
        # It serves the notebook the command names (from its folder: the lab opens it at start).
        status, body = get("api/contents/finetune_blip.ipynb?content=0")
        assert status == 200 and json.loads(body)["type"] == "notebook"
        assert Path(info["root_dir"]) == NOTEBOOK.parent
        assert get("api/shutdown", method="POST")[0] == 200
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        server.stdout.close()
    assert git_status() == before


def test_doc_clear_output_command_restores_the_committed_notebook(tmp_path):
    """The doc's clear-output command, run on a copy that JupyterLab saved after running it (outputs of every kind,
    execution counts), gives back the committed file byte for byte: what the command leaves is what
    test_committed_notebook_has_no_outputs accepts."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for count, cell in enumerate(code_cells(notebook), start=1):
        cell.execution_count = count
        cell.outputs = [
            nbformat.v4.new_output("stream", name="stdout", text="loss 2.7\n"),
            nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}),
            nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "1", "version_major": 2,
                                                                       "version_minor": 0}}),
            nbformat.v4.new_output("execute_result", data={"text/plain": "3"}, execution_count=count),
        ]
    copy = tmp_path / "notebooks" / NOTEBOOK.name
    copy.parent.mkdir()
    nbformat.write(notebook, copy)
    assert copy.read_text() != NOTEBOOK.read_text()
    done = subprocess.run(["bash", "-c", doc_command("jupyter nbconvert")], cwd=tmp_path, env=shell_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert copy.read_text() == NOTEBOOK.read_text()
