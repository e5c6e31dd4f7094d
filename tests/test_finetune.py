"""train.init_from / --init-from: fine-tuning from a ddpmkit run or a diffusers folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ddpmkit.cli import main
from ddpmkit.config import load_config
from ddpmkit.errors import UserError
from ddpmkit.pretrained import load_pretrained, Source
from ddpmkit.interop import export_diffusers
from ddpmkit.training import train
from ddpmkit.unet import UNet

from conftest import TINY


def quiet(*_):
    pass


def _ckpt(run_path, step):
    return load_file(run_path / "checkpoints" / f"step_{step:09d}.safetensors")


def _group(weights, prefix):
    return {k.split("/", 1)[1]: v for k, v in weights.items() if k.startswith(prefix + "/")}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "run"
    cfg = load_config(None, {**TINY, "train.out_dir": str(out), "train.max_steps": 20})
    train(cfg, log=quiet, progress=False)
    return out


def test_init_from_a_run_loads_weights_and_restarts_the_step(source, tiny):
    messages = []
    run = train(tiny(**{"train.init_from": str(source), "train.max_steps": 20, "train.lr": 1e-3}),
                log=messages.append, progress=False)
    assert any("starting from" in m and "step 20" in m for m in messages)
    state = run.read_state()
    # counted from zero, not from 20
    assert sorted(e["step"] for e in state["checkpoints"]) == [10, 20]
    meta = json.loads(run.meta_path.read_text())
    assert str(source) in meta["init_from"]
    src, new = _group(_ckpt(source, 20), "model"), _group(_ckpt(run.path, 20), "model")
    moved = max((src[k] - new[k]).abs().max().item() for k in src)
    assert moved > 1e-4  # trained on
    fresh = UNet(load_config(None, {**TINY, "model.in_channels": 1}).model, 8).state_dict()
    closer = (sum((src[k] - new[k]).norm() for k in src)
              < sum((fresh[k] - new[k]).norm() for k in src))
    assert closer  # it started from the source, not from a random init


def test_with_zero_learning_rate_the_weights_and_ema_are_the_imported_ones(source, tiny, tmp_path):
    # a diffusers folder: model = EMA
    exported = export_diffusers(source, tmp_path / "diffusers", log=quiet)
    run = train(tiny(**{"train.init_from": str(exported), "train.max_steps": 10, "train.lr": 0.0}),
                log=quiet, progress=False)
    imported = _group(_ckpt(source, 20), "ema")
    weights = _ckpt(run.path, 10)
    for prefix in ("model", "ema"):
        got = _group(weights, prefix)
        assert all(torch.equal(got[k], imported[k]) for k in imported), prefix


def test_architecture_comes_from_the_source_and_attention_follows_a_new_image_size(tmp_path):
    src = tmp_path / "att"
    train(load_config(None, {**TINY, "train.out_dir": str(src), "train.max_steps": 2,
                             "model.attention_resolutions": [4]}),
          log=quiet, progress=False)
    messages = []
    cfg = load_config(None, {**TINY, "train.out_dir": str(tmp_path / "big"), "train.max_steps": 2,
                             "data.image_size": 16, "model.base_channels": 32,
                             "train.init_from": str(src)})
    run = train(cfg, log=messages.append, progress=False)
    # the caller's config is never changed: the run's is resolved
    recorded = load_config(run.config_path)
    assert recorded.model.base_channels == 16 and recorded.model.attention_resolutions == [8]
    assert any("model.base_channels=16" in m and "model.attention_resolutions=[8]" in m
               for m in messages)
    from ddpmkit.run import load_run

    # recorded: sampling rebuilds it
    assert load_run(run.path).config.model.attention_resolutions == [8]


def test_a_different_class_count_gets_a_new_class_embedding(source):
    cfg = load_config(None, {**TINY, "model.in_channels": 1, "model.num_classes": 3,
                             "model.class_conditional": True})
    model, ema = UNet(cfg.model, 8), UNet(cfg.model, 8)
    before = model.class_embedding.weight.clone()
    messages = []
    load_pretrained(model, ema, Source(str(source)), [], log=messages.append)
    assert (torch.equal(model.class_embedding.weight, before)
            and any("new class embedding" in m for m in messages))
    assert torch.equal(model.conv_in.weight, _group(_ckpt(source, 20), "model")["conv_in.weight"])


def test_mismatched_channels_are_refused_in_one_line(source, tmp_path, capsys, tiny):
    rgb = tmp_path / "rgb.npy"
    import numpy as np

    np.save(rgb, np.zeros((4, 8, 8, 3), dtype=np.uint8))
    code = main(["train", f"data.path={rgb}", f"--init-from={source}", f"--out={tmp_path / 'x'}",
                 "--quiet"]
                + [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in TINY.items()])
    err = capsys.readouterr().err
    assert code == 2 and "source has 1 channel(s) and the data 3: set data.channels=1" in err
    with pytest.raises(UserError, match="not a diffusers folder"):
        Source(str(tmp_path))


def test_a_checkpoint_file_or_a_missing_source_is_named(source):
    checkpoint = sorted((source / "checkpoints").glob("step_*.safetensors"))[-1]
    with pytest.raises(UserError, match=f"is a file of run {source}: give the run's folder"):
        Source(str(checkpoint))
    with pytest.raises(UserError, match="train.init_from nowhere: no such folder .give a ddpmkit "
                                        "run, a diffusers folder or a hub id"):
        Source("nowhere")


def test_export_and_import_commands_round_trip_a_run(source, tmp_path, capsys):
    assert main(["export", str(source), "--format", "diffusers", "--out",
                 str(tmp_path / "hf")]) == 0
    assert ((tmp_path / "hf" / "model_index.json").is_file()
            and (tmp_path / "hf" / "unet" / "config.json").is_file())
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert main(["sample", str(tmp_path / "back"), "-n", "4", "--steps", "5",
                 "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert len(list((tmp_path / "s" / "individual").glob("*.png"))) == 4
    back = _group(load_file(next((tmp_path / "back" / "checkpoints").glob("*.safetensors"))), "ema")
    original = _group(_ckpt(source, 20), "ema")
    assert all(torch.equal(back[k], original[k]) for k in original)
    # never over an existing export
    assert main(["export", str(source), "--out", str(tmp_path / "hf")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "hf"), "--out", str(source)]) == 2  # nor over a run
    assert capsys.readouterr().err.strip() == (f"ddpmkit: error: {source} already exists and is "
                                               f"not empty: choose another output folder")


def test_a_local_source_is_recorded_absolute_and_its_augmentation_change_named(
        source, tiny, tmp_path, monkeypatch):
    """As data.path is: the same command from another folder resumes instead of being refused as a
    different config. A source trained with augmentation, fine-tuned without: its augmentation
    embedding is dropped, and said so."""
    augmented = train(tiny(**{"train.out_dir": str(tmp_path / "aug"), "train.max_steps": 2,
                              "train.augment": ["hflip"], "train.augment_p": 0.5}),
                      log=quiet, progress=False)
    monkeypatch.chdir(tmp_path)
    said = []
    run = train(tiny(**{"train.init_from": "aug", "train.max_steps": 2}), log=said.append,
                progress=False)
    assert load_config(run.config_path).train.init_from == str(augmented.path.resolve())
    assert ("init_from: augmentation embedding dropped (train.augment [], the source's [hflip])"
            in said)


def test_a_fine_tuning_run_resumes_without_its_source(source, tiny, tmp_path):
    import shutil

    copy = tmp_path / "source_copy"
    shutil.copytree(source, copy)
    run = train(tiny(**{"train.init_from": str(copy), "train.max_steps": 10, "train.lr": 1e-3}),
                log=quiet, progress=False)
    shutil.rmtree(copy)  # moved, deleted, or a hub id while offline
    said = []
    train(tiny(**{"train.init_from": str(copy), "train.max_steps": 20, "train.lr": 1e-3}),
          log=said.append, progress=False)
    assert any("resuming" in line and "from step 10" in line for line in said), said
    assert run.read_state()["checkpoints"][-1]["step"] == 20
    assert str(copy) in run.meta()["init_from"]  # the record still names where it started


def test_fine_tuning_an_unconditional_model_into_a_conditional_one_records_it(source, tiny,
                                                                              tmp_path):
    run = train(tiny(**{"train.init_from": str(source), "train.max_steps": 4,
                        "model.class_conditional": True}),
                log=quiet, progress=False)
    saved = load_config(run.config_path, {})
    # not the source's "unconditional"
    assert saved.model.class_conditional and saved.model.num_classes == 10
    assert main(["sample", str(run.path), "-n", "2", "--steps", "2", "--class", "3", "--quiet",
                 "--out", str(tmp_path / "threes")]) == 0


def test_a_class_conditional_model_round_trips_through_diffusers_with_its_class_names(tmp_path):
    import shutil

    from conftest import write_images

    for name in ("cat", "dog"):
        write_images(tmp_path / "pets" / name, n=4, size=(8, 8), seed=len(name))
    cond = tmp_path / "cond"
    train(load_config(None, {**TINY, "data.path": str(tmp_path / "pets"),
                             "model.class_conditional": True, "train.max_steps": 2,
                             "train.out_dir": str(cond)}), log=quiet, progress=False)
    assert main(["export", str(cond), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_config(tmp_path / "back" / "config.yaml", {})
    assert back.model.class_conditional and back.data.class_names == ["cat", "dog"]
    assert main(["sample", str(tmp_path / "back"), "-n", "2", "--steps", "2", "--class", "dog",
                 "--quiet", "--out", str(tmp_path / "sevens")]) == 0
    # an import has no training data of its own: nothing to balance, nothing to compare with
    assert main(["balance", str(tmp_path / "back"), "--out", str(tmp_path / "bal")]) == 2
    assert main(["eval", str(tmp_path / "sevens"), "--ref", str(tmp_path / "back")]) == 2
    assert not (tmp_path / "bal").exists()
    # a diffusers model from elsewhere has no names: its classes are its indices, still sampled
    # by class
    shutil.copytree(tmp_path / "hf" / "unet", tmp_path / "bare")
    assert main(["import", str(tmp_path / "bare"), "--out", str(tmp_path / "bare_run")]) == 0
    assert load_config(tmp_path / "bare_run" / "config.yaml", {}).data.class_names == ["0", "1"]


def test_training_an_imported_run_in_place_points_to_init_from(source, tmp_path):
    assert main(["export", str(source), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    cfg = load_config(tmp_path / "back" / "config.yaml", {"train.max_steps": 4})
    with pytest.raises(UserError, match="imported weights without optimizer state, .* fine-tune "
                                        "from it with --init-from"):
        train(cfg, log=quiet, progress=False)


def test_classes_of_other_names_at_the_same_places_are_said(tmp_path):
    """The class embedding is kept by position: a source whose classes are named otherwise gets a
    note naming the pairs, not silence."""
    from ddpmkit.config import updated
    from ddpmkit.pretrained import adopt_architecture

    base = load_config(None, {**TINY, "model.class_conditional": True, "model.num_classes": 3,
                              "model.in_channels": 1})
    ours = updated(base, {"data.class_names": ["automobile", "bird", "cat"]})
    theirs = updated(base, {"data.class_names": ["Katze", "bird", "voiture"]})
    said = []
    adopt_architecture(ours, theirs, log=said.append)
    assert said == ["init_from: note: each class starts from the source's class at its place, and "
                    "2 of their names differ (Katze -> automobile, voiture -> cat): if they are "
                    "other classes, fine-tuning must first unlearn the source's"]
    said.clear()
    adopt_architecture(ours, ours, log=said.append)
    assert said == []


def test_resuming_a_fine_tuned_run_without_its_source_names_init_from_first(source, tiny):
    run = train(tiny(**{"train.init_from": str(source), "train.max_steps": 2,
                        "model.base_channels": 32}), log=quiet, progress=False)
    with pytest.raises(UserError, match=rf"different config \(train.init_from: {source} -> null; "
                                        r"model.base_channels: 16 -> 32; "):
        train(tiny(**{"train.max_steps": 3, "model.base_channels": 32}), log=quiet,
              progress=False)
    assert run.path.is_dir()


def test_a_fine_tuning_run_resumes_without_its_source_named_relative(source, tiny, tmp_path,
                                                                    monkeypatch):
    """The same command again, --init-from a relative path whose folder is gone since: the run
    recorded it absolute, and resumes (not "a different config ... --fresh", which would throw
    the fine-tuning away)."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(source, tmp_path / "src")
    run = train(tiny(**{"train.init_from": "src", "train.max_steps": 10}), log=quiet,
                progress=False)
    shutil.rmtree(tmp_path / "src")
    train(tiny(**{"train.init_from": "src", "train.max_steps": 20}), log=quiet, progress=False)
    assert run.read_state()["checkpoints"][-1]["step"] == 20
    assert run.config().train.init_from == str(tmp_path / "src")
