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
