"""Shared fixtures: the tiny model, small synthetic image folders."""

from __future__ import annotations

import pytest

from captune.data.synthetic import make_synthetic
from captune.model import load_model_and_processor


@pytest.fixture(scope="session")
def tiny():
    """A freshly initialised tiny BLIP and its processor (treat as read-only; load your own to train)."""
    return load_model_and_processor("tiny", seed=0)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A small synthetic imagefolder with train/ (64 images) and validation/ (16 images)."""
    return make_synthetic(tmp_path_factory.mktemp("synthetic"), n_train=64, n_val=16, seed=3)


@pytest.fixture(scope="module")
def no_java():
    """Score with captune's Java-less fallback (simple tokeniser, no METEOR) for a whole module.

    For modules whose runs are all in-process and whose claims are relative (a run against its resume, before
    against after): under Java every validation starts the PTB tokeniser's JVM and each run's last one METEOR's
    (~10 s), which was most of those modules' time. Parity with pycocoevalcap under Java is test_metrics.py's; a
    module comparing against `-m captune` subprocesses (which still see Java) must not use this.
    Opt in with `pytestmark = pytest.mark.usefixtures("no_java")`: module scope, so it is on before the module's
    own shared training runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("captune.metrics.shutil.which", lambda name: None)
        yield
