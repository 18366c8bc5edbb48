import pytest

from captune.config import Config, load_config, save_config
from captune.errors import CaptuneError


def test_defaults_follow_the_original_blip():
    from captune.config import resolve_defaults
    from captune.models import family_module

    cfg = resolve_defaults(Config(), family_module("blip").defaults("Salesforce/blip-image-captioning-base"))
    assert cfg.train.label_smoothing == 0.1
    assert cfg.train.weight_decay == 0.05
    assert cfg.data.max_caption_tokens == 40
    assert cfg.data.prompt == ""
    assert cfg.model.name == "Salesforce/blip-image-captioning-base"


def test_yaml_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 3.0e-5\n  epochs: 2\nmodel:\n  name: tiny\n")
    cfg = load_config(recipe, ["train.lr=1e-4", "data.prompt=a picture of ", "train.mixed_precision=bf16"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2
    assert cfg.model.name == "tiny"
    assert cfg.data.prompt.strip() == "a picture of"
    assert cfg.train.mixed_precision == "bf16"


def test_round_trip_through_the_run_dir_file(tmp_path):
    cfg = load_config(None, ["train.lr=2e-5", "data.path=/x"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["train.mixed_precision=fp8"], "train.mixed_precision must be one of"),
        (["train.lr=-1"], "train.lr must be > 0"),
        (["train.batch_size=0"], "train.batch_size must be >= 1"),
        (["train.epochs=two"], "train.epochs must be int"),
        (["data.val_split=1.5"], "data.val_split must be in [0, 1)"),
        (["eval.max_new_tokens=20", "eval.min_new_tokens=50"], "eval.min_new_tokens"),
        (["lr"], "must look like section.key=value"),
    ],
)
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(CaptuneError, match=None) as info:
        load_config(None, override)
    assert message in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(CaptuneError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(CaptuneError, match="not valid YAML"):
        load_config(bad)
