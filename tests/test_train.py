import json

import numpy as np
import pytest
import torch
from conftest import write_images
from safetensors.torch import load_file

from ddpmkit.checkpoint import restore, save_checkpoint
from ddpmkit.config import updated
from ddpmkit.errors import UserError
from ddpmkit.run import RunDir, load_run
from ddpmkit.training import EpochOrder, train
from ddpmkit.unet import UNet


def quiet(*_):
    pass


def stats(run_dir):
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def test_loss_goes_down_on_tiny_data(tiny):
    cfg = tiny(**{"train.max_steps": 80, "train.log_every": 10})
    run = train(cfg, log=quiet, progress=False)
    losses = [r["loss"] for r in stats(run.path)]
    assert losses[-1] < 0.6 * losses[0] and losses[-1] < 0.5  # eps-MSE starts near 1
    assert ({"step", "images_seen", "loss", "lr", "images_per_sec", "memory_mb"}
            <= set(stats(run.path)[0]))


def test_run_directory_records_everything(tiny):
    run = train(tiny(**{"train.max_steps": 10, "train.sample_every": 5}), log=quiet, progress=False)
    meta = json.loads(run.meta_path.read_text())
    assert meta["environment"]["torch"] == torch.__version__ and "command" in meta["environment"]
    assert meta["num_images"] == 1797
    assert sorted(p.name for p in run.grids.iterdir()) == ["step_000000005.png",
                                                           "step_000000010.png"]
    state = run.read_state()
    assert [e["step"] for e in state["checkpoints"]] == [10] and state["best"] == 10
    loaded = load_run(run.path)
    assert loaded.step == 10 and loaded.channels == 1 and not loaded.net.training


def test_checkpoint_round_trip(tmp_path, tiny):
    cfg = updated(tiny(), {"model.in_channels": 1})
    torch.manual_seed(0)
    model, ema = UNet(cfg.model, 8), UNet(cfg.model, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", model, ema, opt, step=7)
    model2, ema2 = UNet(cfg.model, 8), UNet(cfg.model, 8)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    meta = restore(tmp_path / "c.safetensors", model2, ema2, opt2)
    assert meta["step"] == 7
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)


def test_resume_equals_uninterrupted_bitwise(tmp_path, tiny):
    straight = train(tiny(**{"train.max_steps": 30, "train.out_dir": str(tmp_path / "a")}),
                     log=quiet, progress=False)
    # the same run stopped at step 10, then resumed by the same command (only max_steps changed)
    train(tiny(**{"train.max_steps": 10, "train.out_dir": str(tmp_path / "b")}), log=quiet,
          progress=False)
    messages = []
    resumed = train(tiny(**{"train.max_steps": 30, "train.out_dir": str(tmp_path / "b")}),
                    log=messages.append, progress=False)
    assert any("resuming" in m and "step 10" in m for m in messages)
    a = load_file(straight.checkpoint_file(30))
    b = load_file(resumed.checkpoint_file(30))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_changed_config_is_refused_unless_fresh(tiny):
    train(tiny(**{"train.max_steps": 10}), log=quiet, progress=False)
    with pytest.raises(UserError, match=r"train\.lr: 0\.002 -> 0\.1"):
        train(tiny(**{"train.max_steps": 20, "train.lr": 0.1}), log=quiet, progress=False)
    run = train(tiny(**{"train.max_steps": 10, "train.lr": 0.1}), fresh=True, log=quiet,
                progress=False)
    assert run.read_state()["checkpoints"][-1]["step"] == 10


def test_fresh_deletes_only_a_ddpmkit_run(tiny, tmp_path):
    out = tmp_path / "run"  # tiny's train.out_dir: someone's project with its own config.yaml
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "model.ckpt").write_bytes(b"weights")
    # parses as ours
    (out / "config.yaml").write_text("data:\n  path: ./images\ntrain:\n  batch_size: 32\n")
    for fresh in (False, True):
        with pytest.raises(UserError,
                           match="exists and is not a ddpmkit run: choose another --out"):
            train(tiny(**{"train.max_steps": 2}), fresh=fresh, log=quiet, progress=False)
    assert (out / "checkpoints" / "model.ckpt").read_bytes() == b"weights"
    run = tmp_path / "source"
    train(tiny(**{"train.max_steps": 2, "train.out_dir": str(run)}), log=quiet, progress=False)
    with pytest.raises(UserError, match="--fresh would delete .*source's checkpoints, which "
                                        "train.init_from starts from"):
        train(tiny(**{"train.max_steps": 4, "train.out_dir": str(run),
                      "train.init_from": str(run)}), fresh=True, log=quiet, progress=False)
    assert run.joinpath("state.json").is_file()
    # the user's samples inside the run, as `make demo` does
    (run / "samples" / "individual").mkdir(parents=True)
    resumed = train(tiny(**{"train.max_steps": 4, "train.out_dir": str(run)}), log=quiet,
                    progress=False)
    assert resumed.read_state()["checkpoints"][-1]["step"] == 4
    train(tiny(**{"train.max_steps": 2, "train.out_dir": str(run), "train.lr": 0.5}), fresh=True,
          log=quiet, progress=False)
    # --fresh replaced ddpmkit's files and kept the user's
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "checkpoints", "config.yaml", "grids", "meta.json", "report.html", "samples", "state.json",
        "stats.jsonl", "training_images.sha256"]


def test_damaged_latest_checkpoint_falls_back_to_previous(tiny):
    cfg = tiny(**{"train.max_steps": 20, "train.checkpoint_every": 10})
    run = train(cfg, log=quiet, progress=False)
    latest = run.checkpoint_file(20)
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    messages = []
    cfg = tiny(**{"train.max_steps": 20, "train.checkpoint_every": 10})
    train(cfg, log=messages.append, progress=False)
    assert any("damaged" in m for m in messages) and any("from step 10" in m for m in messages)
    assert load_run(run.path).step == 20  # retrained and re-saved



def test_a_run_stopped_before_its_first_log_line_has_its_log_file(tiny):
    said = []
    run = train(tiny(**{"train.max_minutes": 1e-6, "train.max_steps": 50, "train.log_every": 40}),
                log=said.append, progress=False)
    assert any("train.max_minutes=1e-06 reached" in m for m in said)
    assert run.stats_path.read_text() == "" and f"log {run.stats_path}" in said[-1]


def test_a_damaged_checkpoint_leaves_the_record_and_never_an_intact_one(tiny):
    """keep_last=2 with 10 and a damaged 20 on record: resumed from 10 to 30, the run keeps 10
    and 30, not the damaged 20, and no command warns of it again. The damaged file stays: it no
    longer holds what ddpmkit wrote (tests/test_hostile.py)."""
    settings = {"train.checkpoint_every": 1000, "train.keep_last": 2}
    for steps in (10, 20):
        run = train(tiny(**settings, **{"train.max_steps": steps}), log=quiet, progress=False)
    damaged = run.checkpoint_file(20)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    messages = []
    train(tiny(**settings, **{"train.max_steps": 30}), log=messages.append, progress=False)
    assert any("damaged" in m for m in messages) and any("from step 10" in m for m in messages)
    state = RunDir(run.path).read_state()
    assert sorted(e["step"] for e in state["checkpoints"]) == [10, 30]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        "step_000000010.safetensors", "step_000000020.safetensors", "step_000000030.safetensors"]
    assert len(damaged.read_bytes()) == 1000
    warned = []
    assert RunDir(run.path).verified_checkpoints(warn=warned.append) and not warned


def test_keep_last_prunes_old_checkpoints_but_keeps_best(tiny):
    run = train(tiny(**{"train.max_steps": 50, "train.checkpoint_every": 10, "train.keep_last": 2}),
                log=quiet, progress=False)
    state = RunDir(run.path).read_state()
    kept = sorted(e["step"] for e in state["checkpoints"])
    assert set(kept) >= {40, 50} and state["best"] in kept and len(kept) <= 3
    losses = {e["step"]: e["loss"] for e in state["checkpoints"]}
    assert losses[state["best"]] == min(losses.values())  # best: the lowest mean loss
    assert (sorted(p.name for p in run.checkpoints.iterdir())
            == [f"step_{s:09d}.safetensors" for s in kept])


def test_non_finite_losses_are_skipped_then_stop(tiny):
    cfg = tiny(**{"train.max_steps": 30, "train.lr": 1e30, "train.warmup_steps": 1,
                  "train.max_nonfinite": 3, "train.grad_clip": 0.0})
    with pytest.raises(UserError, match="diverged"):
        train(cfg, log=quiet, progress=False)


def test_epoch_order_is_a_permutation_per_epoch():
    order = EpochOrder(10, 4, seed=0)
    epoch0 = torch.cat([order.indices(0), order.indices(1)])
    assert len(set(epoch0.tolist())) == 8
    assert not torch.equal(order.indices(0), order.indices(2))  # next epoch reshuffled
    small = EpochOrder(3, 8, 0).indices(0)  # a dataset smaller than a batch: each image 2-3 times
    assert len(small) == 8 and sorted(torch.bincount(small, minlength=3).tolist()) in ([2, 3, 3],)


def test_evaluation_during_training_picks_the_best_checkpoint(tiny, monkeypatch):
    from ddpmkit.metrics import features

    monkeypatch.setitem(features.CLASSIFIER_RECIPE, "epochs", 2)
    monkeypatch.setenv("DDPMKIT_CACHE", str(tiny().train.out_dir) + "_cache")
    cfg = tiny(**{"train.max_steps": 30, "train.checkpoint_every": 10, "train.eval_every": 10,
                  "train.eval_num": 24})
    run = train(cfg, log=quiet, progress=False)
    evals = [r for r in stats(run.path) if "eval" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(r["eval"]["features"] == "classifier" and r["eval"]["fd"] > 0 for r in evals)
    state = run.read_state()
    assert state["best"] == min(state["checkpoints"], key=lambda e: e["fd"])["step"]
    # resumed with another eval_num: its FDs are not compared with the earlier ones (an FD of
    # fewer images is biased upward), so the one checkpoint measured so is the best
    run = train(tiny(**{**{k: getattr(cfg.train, k.split(".")[1]) for k in (
        "train.checkpoint_every", "train.eval_every")}, "train.max_steps": 40,
        "train.eval_num": 16}), log=quiet, progress=False)
    state = run.read_state()
    weights = evals[-1]["eval"]["weights"]  # the classifier's: another one's FDs differ too
    assert state["best"] == 40 and [e.get("fd_of") for e in state["checkpoints"]][-1] == (
        f"classifier features ({weights}) of 16 images")
    from ddpmkit.report import write_report

    page = write_report(run.path).read_text()
    assert (f"(classifier features ({weights}) of 16 images); 3 earlier evaluation(s) of other"
            in page)
    # the checkpoint table says what each FD was measured on: "best" is among the latest kind
    assert f"<td>classifier features ({weights}) of 16 images</td>" in page
    assert f"<td>classifier features ({weights}) of 24 images</td>" in page


def test_a_refused_start_leaves_no_files(tiny, tmp_path):
    """Refusals used to leave RUN/.lock in a user's folder, or config.yaml, meta.json and the
    digests of a run that never began."""
    mine = tmp_path / "my_folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not a ddpmkit run"):
        train(tiny(**{"train.out_dir": str(mine)}), log=lambda *_: None, progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    blank = tmp_path / "blank"
    images = tmp_path / "images"
    write_images(images, n=8, size=(8, 8))
    with pytest.raises(UserError, match="needs labelled training images"):
        train(tiny(**{"train.out_dir": str(blank), "data.path": str(images),
                      "train.eval_every": 2}),
              log=lambda *_: None, progress=False)
    assert not blank.exists()


def test_streaming_idx_data_is_refused_in_one_clear_line(tiny, tmp_path):
    """data.stream reads .npy files and image folders: an IDX folder was searched for image files
    ("no images found") and an IDX file called "a suffix-less file"; both now say what they are and
    what to do."""
    import struct

    import numpy as np

    folder = tmp_path / "mnist"
    folder.mkdir()
    images = np.zeros((4, 8, 8), np.uint8)
    idx = folder / "train-images-idx3-ubyte"
    idx.write_bytes(struct.pack(">BBBB3I", 0, 0, 0x08, 3, *images.shape) + images.tobytes())
    for path in (folder, idx):
        out = tmp_path / f"run_{path.name}"
        cfg = tiny(**{"data.path": str(path), "data.stream": True, "train.out_dir": str(out)})
        with pytest.raises(UserError) as refused:
            train(cfg, log=quiet, progress=False)
        assert str(refused.value) == (f"data.stream=true reads .npy files and image folders, and "
                                      f"{path} is MNIST-style IDX data: set data.stream=false "
                                      f"(IDX data is small enough to load: MNIST's 60,000 images "
                                      f"take 47 MB)")
        assert not out.exists()
    # loaded, it trains
    train(tiny(**{"data.path": str(folder), "train.max_steps": 1}), log=quiet, progress=False)


def test_resuming_on_changed_data_records_the_new_images(tiny, tmp_path):
    """The leakage guard reads training_images.sha256: a resume on a folder with new images must add
    them (it kept the first start's list), and say that the data changed."""
    images = tmp_path / "images"
    write_images(images, n=8, size=(8, 8))
    cfg = {"data.path": str(images), "train.out_dir": str(tmp_path / "run"),
           "train.checkpoint_every": 2}
    run = train(tiny(**cfg, **{"train.max_steps": 2}), log=lambda *_: None, progress=False)
    first = run.digests_path.read_text().split()
    assert len(first) == 8
    (images / "img_000.png").unlink()
    write_images(tmp_path / "more", n=1, size=(8, 8), seed=99)
    (tmp_path / "more" / "img_000.png").rename(images / "new.png")
    said = []
    train(tiny(**cfg, **{"train.max_steps": 4}), log=said.append, progress=False)
    recorded = run.digests_path.read_text().split()
    # the removed image stays: it was trained on
    assert len(recorded) == 9 and set(first) < set(recorded)
    assert any("the data changed" in line and "1 image(s)" in line for line in said)
    assert any("1 image(s) " + str(run.path) + " trained on are no longer in its data" in line
               for line in said)  # a removed image is said too
    assert run.meta()["num_images"] == 8  # what the run trains on from here
    said.clear()
    # same data: quiet
    train(tiny(**cfg, **{"train.max_steps": 6}), log=said.append, progress=False)
    assert not any("the data changed" in line for line in said), said
    assert run.digests_path.read_text().split() == recorded


def test_data_paths_are_recorded_absolute(tiny, tmp_path, monkeypatch):
    """A run records where its data is as an absolute path, so `eval --ref RUN`, `balance` and a
    resume work from any folder."""
    from ddpmkit.config import read_yaml

    write_images(tmp_path / "images", n=8, size=(8, 8))
    monkeypatch.chdir(tmp_path)
    cfg = {"data.path": "images", "train.out_dir": str(tmp_path / "run"),
           "train.checkpoint_every": 2}
    run = train(tiny(**cfg, **{"train.max_steps": 2}), log=lambda *_: None, progress=False)
    assert read_yaml(run.config_path)["data"]["path"] == str(tmp_path / "images")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg["data.path"] = str(tmp_path / "images")
    assert train(tiny(**cfg, **{"train.max_steps": 4}), log=lambda *_: None,
                 progress=False).read_state()["best"]


def test_a_run_records_the_bit_depth_it_chose(tiny, tmp_path):
    import yaml
    from PIL import Image

    (tmp_path / "x12").mkdir()
    for i, top in enumerate((4095, 3000, 2000, 1000)):  # 12-bit values in 16-bit PNGs
        Image.fromarray(np.full((8, 8), top, dtype=np.uint16)).save(tmp_path / "x12" / f"{i}.png")
    logs = []
    cfg = tiny(**{"data.path": str(tmp_path / "x12"), "train.max_steps": 2})
    run = train(cfg, log=logs.append, progress=False)
    assert (yaml.safe_load(run.config_path.read_text())["data"]["bit_depth"] == 12
            and "12-bit values" in "\n".join(logs))


def test_attention_at_no_level_is_refused(tiny, tmp_path):
    from ddpmkit.training import train

    quiet = dict(log=lambda *a: None, progress=False)
    with pytest.raises(UserError,
                       match=r"model.attention_resolutions=\[3\]: no level of this model is 3x3"):
        train(tiny(**{"model.attention_resolutions": [3]}), **quiet)
    assert not (tmp_path / "run").exists()


def test_the_first_line_says_the_size_the_model_trains_at_beside_the_datas_own(tiny):
    """Digits are 8x8; trained at 16x16 (data.image_size), the model's size is the one said."""
    said = []
    train(tiny(**{"data.image_size": 16, "train.max_steps": 1}), log=said.append, progress=False)
    assert " parameters at 16x16, scikit-learn digits (1797 images, 8x8), on cpu" in said[0], said
