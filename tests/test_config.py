import os
import re

import pytest

from ddpmkit.config import load_config, parse_override, to_yaml
from ddpmkit.run import refused_changes
from ddpmkit.errors import UserError


def test_defaults_and_overrides():
    cfg = load_config(None, {"train.lr": "1e-4", "data.image_size": 16,
                             "model.channel_mult": [1, 2]})
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string: still a float
    assert cfg.data.image_size == 16


def test_parse_override_reads_yaml_values():
    assert parse_override("train.batch_size=64") == ("train.batch_size", 64)
    assert parse_override("model.channel_mult=[1,2,4]") == ("model.channel_mult", [1, 2, 4])
    assert parse_override("data.path=null") == ("data.path", None)
    assert parse_override("data.hflip=true") == ("data.hflip", True)
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("batch_size")


@pytest.mark.parametrize("overrides,message", [
    ({"train.batchsize": 4}, "unknown config key train.batchsize"),
    ({"nosection.x": 1}, "unknown config key nosection.x"),
    ({"train.batch_size": "abc"}, "train.batch_size: expected an integer"),
    ({"train.batch_size": 0}, "train.batch_size: must be positive"),
    ({"train.batch_size": -3}, "train.batch_size: must be positive"),
    ({"train.lr": -1.0}, "train.lr: must not be negative"),
    ({"data.hflip": "sometimes"}, "data.hflip: expected true or false"),
    ({"diffusion.prediction": "score"}, "diffusion.prediction"),
    ({"model.channel_mult": "wide"}, "model.channel_mult: expected a list"),
    ({"model.preset": "huge"}, "model.preset"),
    ({"train.ema_decay": 1.5}, "train.ema_decay"),
    ({"sample.steps": 5000}, "sample.steps"),
    ({"sample.compile": True, "sample.compile_mode": "fast"},
     "sample.compile_mode: 'fast' is not one of"),
    # nan passes every sign check and trains (or samples) nothing but NaN; inf likewise
    ({"train.lr": float("nan")}, "train.lr: must be a finite number"),
    ({"train.lr": float("inf")}, "train.lr: must be a finite number"),
    ({"sample.eta": "nan"}, "sample.eta: must be a finite number"),
    ({"sample.guidance": float("-inf")}, "sample.guidance: must be a finite number"),
    ({"model.dropout": 1.5}, "model.dropout: must be in [0, 1)"),
    ({"train.label_dropout": 3}, "train.label_dropout: a share of labels, in [0, 1]"),
    ({"train.augment_p": 2}, "train.augment_p: a probability, in [0, 1]"),
    ({"model.norm_eps": -1}, "model.norm_eps: must be positive"),
    ({"model.in_channels": 0}, "model.in_channels: must be positive"),
    ({"model.attention_head_dim": 0}, "model.attention_head_dim: must be positive"),
    ({"model.attention_head_dim": 20},
     "model.attention_head_dim: 20 makes 3 heads of the 64 channels of a level"),
    # each would train: to NaN, from a "noise" end that is 90% signal, towards a broken sampler
    ({"model.time_freq_shift": 16}, "model.time_freq_shift: 16 must be below half of"),
    ({"diffusion.num_timesteps": 1}, "diffusion.num_timesteps: 1 is too few; use at least 2"),
    ({"sample.class_label": "3"},
     "--class 3: the model is not class-conditional, so it has no classes (config key "
     "sample.class_label)"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, overrides)


def test_attention_resolutions_must_name_a_level_of_the_model(tmp_path):
    load_config(None, {"data.image_size": 32, "model.attention_resolutions": [16]})
    with pytest.raises(UserError, match=r"no level of this model is 16x16 "
                                        r"\(data.image_size=28, .*levels 28, 14, 7\)"):
        load_config(None, {"data.image_size": 28, "model.channel_mult": [1, 2, 2],
                           "model.attention_resolutions": [16]})


def test_yaml_file_unknown_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trian:\n  lr: 1\n")
    with pytest.raises(UserError, match="unknown config section 'trian'"):
        load_config(p)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    os.mkfifo(tmp_path / "piped.yaml")  # it exists: not "not found", and never read (a hang)
    with pytest.raises(UserError, match="piped.yaml is not a regular file"):
        load_config(tmp_path / "piped.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, {"model.preset": "ddpm-cifar10", "data.image_size": 32,
                             "train.lr": 2e-4})
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg


def test_refused_changes_ignores_what_a_resume_may_change():
    a = load_config(None).to_dict()
    b = load_config(None, {"train.max_steps": 99, "sample.num": 5, "train.lr": 0.5}).to_dict()
    assert refused_changes(a, b) == ["train.lr"]


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 7
    for path in configs:
        load_config(path)


def test_default_yaml_is_what_no_config_means():
    from pathlib import Path

    assert load_config(Path(__file__).parents[1] / "configs" / "default.yaml") == load_config(None)


def test_class_names_take_one_unicode_form_and_are_written_as_letters():
    decomposed, composed = "n\u0303andu\u0301", "\u00f1and\u00fa"  # as macOS writes them
    cfg = load_config(None, {"sample.class_label": decomposed, "data.filter_label": decomposed,
                             "data.class_names": ["cat", decomposed],
                             "model.class_conditional": True,
                             "data.path": f"/data/{decomposed}"})
    assert (cfg.sample.class_label, cfg.data.filter_label, cfg.data.class_names) == (
        composed, composed, ["cat", composed])
    assert cfg.data.path == f"/data/{decomposed}"  # a file name is the file system's, not ours
    assert f"class_names: [cat, {composed}]" in to_yaml(cfg)


def test_a_text_key_takes_the_text_as_typed():
    """YAML would read 0010 as the number 8, 2024_01 as 202401 and cut `#3` as a comment: a key
    whose value is text (a checkpoint step, a class, a path) keeps what was typed."""
    assert parse_override("sample.checkpoint=0010") == ("sample.checkpoint", "0010")
    assert parse_override("data.filter_label=010") == ("data.filter_label", "010")
    assert parse_override("train.out_dir=runs/exp #3") == ("train.out_dir", "runs/exp #3")
    assert parse_override("train.out_dir=2024_01") == ("train.out_dir", "2024_01")
    assert parse_override("data.class_names=[01, 02]") == ("data.class_names", ["01", "02"])
    assert parse_override("sample.class_label='a b'") == ("sample.class_label", "a b")
    assert parse_override("model.preset=null") == ("model.preset", None)
    assert parse_override("train.augment=[hflip]") == ("train.augment", ["hflip"])
    cfg = load_config(None, dict([parse_override("sample.checkpoint=0010")]))
    assert cfg.sample.checkpoint == "0010"
    with pytest.raises(UserError, match="config key data.path: empty"):
        load_config(None, dict([parse_override("data.path=''")]))  # not the current folder


def test_a_yaml_mistake_is_named_with_its_line_and_column(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 5.0e-4\n\tmax_steps: 2\n")
    with pytest.raises(UserError, match=r"not valid YAML: while scanning for the next token; "
                                        r"found character '\\t' that cannot start any token "
                                        r"\(line 3, column 1\)"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("train:\n  lr: 5.0e-4\n  max_steps: 2\n  lr: 1.0e-3\n")
    with pytest.raises(UserError, match=r"key 'lr' is given twice in one mapping \(line 4, "
                                        r"column 3\)"):  # where it is given again
        load_config(tmp_path / "c.yaml")


def test_a_key_given_twice_in_a_file_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 5.0e-4\ntrain:\n  max_steps: 2\n")
    with pytest.raises(UserError, match="not valid YAML: key 'train' is given twice"):
        load_config(tmp_path / "c.yaml")
    from ddpmkit.config import safe_yaml

    merged = safe_yaml("a: &a {b: 1, c: 2}\nd:\n  <<: *a\n  b: 3\n", "x")
    assert merged["d"] == {"b": 3, "c": 2}  # a merge key's values may still be overridden


def test_a_preset_named_by_an_override_beats_the_files_architecture(tmp_path):
    (tmp_path / "c.yaml").write_text(to_yaml(load_config(None, {"data.image_size": 32})))
    cfg = load_config(tmp_path / "c.yaml", {"model.preset": "ddpm-cifar10"})
    assert (cfg.model.preset, cfg.model.base_channels, cfg.model.channel_mult) == (
        "ddpm-cifar10", 128, [1, 2, 2, 2])
    cfg = load_config(tmp_path / "c.yaml", {"model.preset": "ddpm-cifar10",
                                            "model.base_channels": 64})
    assert cfg.model.base_channels == 64  # a key named beside it still wins


@pytest.mark.parametrize("overrides,message", [
    ({"diffusion.schedule": "cosine", "diffusion.beta_start": 0.3},
     "diffusion.beta_start/beta_end shape the linear schedule; the cosine schedule has none"),
    ({"diffusion.num_timesteps": 10**10}, "diffusion.num_timesteps: 10,000,000,000 is too many"),
    ({"train.seed": 2**64}, "train.seed: a seed in [0, 2**63)"),
    ({"sample.seed": -1}, "sample.seed: a seed in [0, 2**63)"),
    ({"train.eval_num": 1}, "train.eval_num: must be at least 2"),
])
def test_values_that_failed_later_are_refused_naming_the_key(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, overrides)
    assert load_config(None, {"diffusion.schedule": "cosine"}).diffusion.beta_start is None


def test_config_files_that_are_not_one_are_named(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"train:\n  out_dir: caf\xe9\n")
    with pytest.raises(UserError, match="latin1.yaml is not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    with pytest.raises(UserError, match=r"run is a run, not a config file: give .*config.yaml "
                                        r"to train another like it, or --out .*run to resume"):
        load_config(tmp_path / "run")


def test_a_class_named_twice_is_refused_in_any_unicode_form():
    with pytest.raises(UserError, match="config key data.class_names: 'caf\u00e9' is named twice"):
        load_config(None, {"data.class_names": ["caf\u00e9", "a", "cafe\u0301"]})
    # spaces around a name are not part of it, as when labels are read from a CSV
    cfg = load_config(None, {"sample.class_label": " Off ", "model.class_conditional": True})
    assert cfg.sample.class_label == "Off"


def test_a_class_count_without_class_conditioning_is_refused_when_training_starts():
    # the embedding would be built, never trained, and exported as a conditional model; a run
    # already trained so still opens
    from ddpmkit.resolve import prepare_training

    cfg = load_config(None, {"model.num_classes": 3})
    with pytest.raises(UserError, match="model.num_classes: 3 classes for a model that is not "
                                        "class-conditional: add model.class_conditional=true"):
        prepare_training(cfg, fresh=True)
