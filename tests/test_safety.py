"""Faults injected on purpose: full disks, signals, NaNs, planted pickles, random inputs."""

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError

import ddpmkit.checkpoint
import ddpmkit.generation
import ddpmkit.training
from ddpmkit.cli import main
from ddpmkit.config import from_dict
from ddpmkit.pixels import array_to_uint8_nchw
from ddpmkit.errors import UserError
from ddpmkit.run import RunDir, load_run
from ddpmkit.training import train
from ddpmkit.unet import UNet
from test_cli import TINY_ARGS


def quiet(*_):
    pass


def leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_disk_full_while_checkpointing_keeps_the_previous_one(tiny, monkeypatch):
    run = train(tiny(**{"train.max_steps": 10}), log=quiet, progress=False)
    real_save = ddpmkit.checkpoint.save_file

    def full_disk(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(1000)  # half-written, then the disk is full, as safetensors reports it
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(ddpmkit.checkpoint, "save_file", full_disk)
    with pytest.raises(UserError, match="No space left on device; checkpoint of step 10 kept"):
        train(tiny(**{"train.max_steps": 20}), log=quiet, progress=False)
    assert leftovers(run.path) == []
    assert [e["step"] for e in RunDir(run.path).verified_checkpoints()] == [10]
    assert load_run(run.path).step == 10


@pytest.mark.skipif(not hasattr(os, "fork"), reason="limits a child process's file size")
def test_a_file_size_limit_on_checkpoints_and_exports_is_one_line(tmp_path):
    """A real write failure (RLIMIT_FSIZE, as a full disk or quota fails it): safetensors raises its
    own error type, not an OSError; each is one line naming the file, and nothing half-written."""
    import resource

    def run(*args, limit=None):
        cap = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
        return subprocess.run([sys.executable, "-m", "ddpmkit", *map(str, args)],
                              capture_output=True, text=True, timeout=300, preexec_fn=cap)

    model = [*TINY_ARGS, "train.max_steps=2", "--quiet"]
    done = run("train", "--out", tmp_path / "run", *model, limit=1_000_000)  # the digests fit
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr[-2000:]
    assert "cannot write checkpoint" in err[0] and "File too large" in err[0], err
    assert leftovers(tmp_path / "run") == []
    assert run("train", "--out", tmp_path / "run", *model).returncode == 0
    done = run("export", tmp_path / "run", "--out", tmp_path / "exported", limit=300_000)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr[-2000:]
    assert "diffusion_pytorch_model.safetensors: File too large" in err[0], err
    assert not (tmp_path / "exported").exists() and not list(tmp_path.glob(".exported*"))


def test_disk_full_while_sampling_keeps_finished_images(tiny, tmp_path, monkeypatch, capsys):
    run = train(tiny(**{"train.max_steps": 5}), log=quiet, progress=False)
    args = ["sample", str(run.path), "--num", "12", "--steps", "2", "--batch-size", "4", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    real_write, calls = ddpmkit.generation._write_png, []

    def fills_up(path, img, text):
        calls.append(path)
        if len(calls) > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, img, text)

    monkeypatch.setattr(ddpmkit.generation, "_write_png", fills_up)
    out = tmp_path / "o"
    assert main(args + ["--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert leftovers(out) == [] and not (out / "manifest.csv").exists()
    monkeypatch.setattr(ddpmkit.generation, "_write_png", real_write)
    assert main(args + ["--out", str(out)]) == 0  # the disk has room again: rerun completes
    for i in range(12):
        name = f"individual/{i:06d}.png"
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_exits_nonzero(tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ddpmkit", "train", *TINY_ARGS, "train.max_steps=100000",
           "train.checkpoint_every=1000", "train.log_every=1", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while time.time() < deadline and (not (out / "stats.jsonl").exists()
                                      or (out / "stats.jsonl").stat().st_size < 2000):
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "checkpoint saved; rerun the same command to resume" in stdout
    step = RunDir(out).verified_checkpoints()[0]["step"]
    assert step > 0 and step % 1000 != 0  # saved where it stopped, not at an interval


def test_a_signal_gets_its_checkpoint_before_any_grid_or_evaluation(tiny, monkeypatch):
    """A scheduler's grace period (often 30 s) must not
    be spent sampling a grid or 500 evaluation images."""
    from ddpmkit.metrics import features

    monkeypatch.setitem(features.CLASSIFIER_RECIPE, "epochs", 1)
    monkeypatch.setenv("DDPMKIT_CACHE", str(tiny().train.out_dir) + "_cache")
    real_loss, calls = ddpmkit.training.diffusion_loss, []

    def signalled_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(ddpmkit.training, "diffusion_loss", signalled_at_step_7)
    monkeypatch.setattr(ddpmkit.training, "_evaluate",
                        lambda *a: pytest.fail("evaluated while stopping"))
    cfg = tiny(**{"train.max_steps": 100, "train.eval_every": 10, "train.sample_every": 5})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=quiet, progress=False)
    run = RunDir(Path(cfg.train.out_dir))
    assert run.verified_checkpoints()[0]["step"] == 7
    # none sampled at the stop
    assert sorted(p.name for p in run.grids.iterdir()) == ["step_000000005.png"]


def test_evaluation_that_cannot_run_stops_the_run_before_it_trains(tmp_path, tiny):
    data = tmp_path / "unlabelled.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    cfg = tiny(**{"data.path": str(data), "train.eval_every": 10})
    with pytest.raises(UserError, match="train.eval_features=classifier, and .*unlabelled.npy has "
                                        "no labels: set "
                                        "train.eval_features=efficientnet or inception"):
        train(cfg, log=quiet, progress=False)
    assert (not RunDir(Path(cfg.train.out_dir)).stats_path.exists()
            or not RunDir(Path(cfg.train.out_dir)).stats_path.read_text())


def test_a_restart_before_the_first_checkpoint_and_a_torn_log_line_leave_one_clean_log(tiny):
    from ddpmkit.report import build_report

    cfg = tiny(**{"train.max_steps": 10})
    run = train(cfg, log=quiet, progress=False)
    # as if it had died before its first checkpoint, mid-way through appending a log line
    run.state_path.unlink()
    shutil.rmtree(run.checkpoints)
    with open(run.stats_path, "a") as f:
        f.write('{"step": 11, "lo')
    assert "<html" in build_report(run)  # the torn line is skipped, not a traceback
    train(cfg, log=quiet, progress=False)
    steps = [r["step"] for r in run.read_stats()]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # the first attempt's lines are gone


def test_one_nan_batch_is_skipped_and_counted(tiny, monkeypatch):
    real_loss, calls = ddpmkit.training.diffusion_loss, []

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(ddpmkit.training, "diffusion_loss", sometimes_nan)
    run = train(tiny(**{"train.max_steps": 20}), log=quiet, progress=False)
    last = json.loads(run.stats_path.read_text().splitlines()[-1])
    assert last["skipped_nonfinite"] == 1 and np.isfinite(last["loss"])
    net = load_run(run.path).net
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_divergence_stops_with_the_last_good_checkpoint_intact(tiny, monkeypatch):
    run = train(tiny(**{"train.max_steps": 10}), log=quiet, progress=False)
    monkeypatch.setattr(ddpmkit.training, "diffusion_loss",
                        lambda *a, **k: torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(UserError, match="diverged: [4-5] non-finite losses in a row by step 15"):
        train(tiny(**{"train.max_steps": 40, "train.max_nonfinite": 4}), log=quiet, progress=False)
    assert [e["step"] for e in RunDir(run.path).verified_checkpoints()] == [10]


def test_divergence_before_any_checkpoint_claims_none(tiny, monkeypatch):
    monkeypatch.setattr(ddpmkit.training, "diffusion_loss",
                        lambda *a, **k: torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(UserError, match="by step [4-5]; no checkpoint was written before it; "):
        train(tiny(**{"train.max_steps": 40, "train.max_nonfinite": 4}), log=quiet, progress=False)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_planted_as_checkpoint_runs_no_code(tiny, tmp_path, capsys):
    run = train(tiny(**{"train.max_steps": 10}), log=quiet, progress=False)
    marker = tmp_path / "PWNED"
    ckpt = run.checkpoint_file(10)
    ckpt.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    state = run.read_state()
    # an attacker fixes the hash too
    state["checkpoints"][0]["sha256"] = ddpmkit.checkpoint.file_sha256(ckpt)
    run.write_state(state)
    assert main(["sample", str(run.path), "--num", "1", "--out", str(tmp_path / "s")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert main(["train", *TINY_ARGS, "--steps", "20", "--out", str(run.path), "--quiet"]) == 2
    assert not marker.exists()


def test_train_output_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["train", *TINY_ARGS, "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err


SECTION_KEYS = {
    "data": {"image_size": st.integers(-4, 40), "channels": st.sampled_from([None, 1, 2, 3]),
             "hflip": st.booleans(), "on_error": st.sampled_from(["skip", "fail", "ignore"])},
    "model": {"base_channels": st.integers(-8, 40),
              "channel_mult": st.lists(st.integers(-1, 3), max_size=4),
              "num_res_blocks": st.integers(-1, 2),
              "attention_resolutions": st.lists(st.integers(1, 16), max_size=2),
              "norm_groups": st.integers(0, 16), "dropout": st.floats(-1, 1),
              "preset": st.sampled_from([None, "small", "x"])},
    "diffusion": {"num_timesteps": st.integers(-5, 50),
                  "schedule": st.sampled_from(["linear", "cosine", "exp"]),
                  "beta_start": st.floats(-0.1, 0.5), "beta_end": st.floats(-0.1, 1.5),
                  "prediction": st.sampled_from(["eps", "x0", "v", "score"])},
    "train": {"batch_size": st.integers(-2, 8), "lr": st.floats(-1, 1),
              "ema_decay": st.floats(-0.5, 1.5)},
}
junk = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5),
                 st.lists(st.integers(), max_size=3))
config_dicts = st.fixed_dictionaries({}, optional={
    name: st.fixed_dictionaries({}, optional={**{k: st.one_of(v, junk) for k, v in keys.items()},
                                              "bogus": junk})
    for name, keys in SECTION_KEYS.items()})


# Examples and randomness come from the profile in conftest.py: fixed for CI, wide and random with
# HYPOTHESIS_PROFILE=wide (how the last bugs here were found).
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(config_dicts)
def test_any_config_is_accepted_and_works_or_refused_with_a_user_error(raw):
    try:
        cfg = from_dict(raw)
    except UserError:
        return
    model = replace(cfg.model, in_channels=cfg.data.channels or 1)
    net = UNet(model, cfg.data.image_size)  # accepted means buildable and runnable
    x = torch.zeros(1, model.in_channels, cfg.data.image_size, cfg.data.image_size)
    assert net(x, torch.tensor([0])).shape == x.shape


@given(st.lists(st.integers(0, 6), min_size=0, max_size=5),
       st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]),
       st.sampled_from([0.0, 1.0, 255.0, -1.0, 300.0, float("nan"), float("inf")]))
def test_any_array_is_accepted_or_refused_with_a_user_error(shape, dtype, fill):
    arr = np.full(shape,
                  fill if np.issubdtype(dtype, np.floating) else abs(np.nan_to_num(fill, posinf=7)),
                  dtype=dtype) \
        if np.issubdtype(dtype, np.floating) or np.isfinite(fill) else np.zeros(shape, dtype=dtype)
    try:
        out = array_to_uint8_nchw(arr, "x")
    except UserError:
        return
    assert (out.dtype == torch.uint8 and out.dim() == 4 and out.shape[1] in (1, 3)
            and out.shape[0] > 0)


def test_a_second_training_into_the_same_run_is_refused(tiny):
    from ddpmkit.atomic import FolderLock

    cfg = tiny(**{"train.max_steps": 4})
    with FolderLock(Path(cfg.train.out_dir), "train"):  # as if another `ddpmkit train` held the run
        with pytest.raises(UserError, match="another ddpmkit train is writing to"):
            train(cfg, log=quiet, progress=False)
    run = train(cfg, log=quiet, progress=False)  # released: trains
    assert run.read_state()["checkpoints"][-1]["step"] == 4


def test_a_checkpoint_saved_before_any_logged_loss_is_never_best(tiny):
    from ddpmkit.checkpoint import save_checkpoint

    cfg = tiny(**{"train.max_steps": 3, "train.log_every": 100, "train.checkpoint_every": 100})
    run = train(cfg, log=quiet, progress=False)
    assert np.isfinite(run.read_state()["checkpoints"][-1]["loss"])  # the final log line covers it
    net = UNet(load_run(run.path).config.model, 8)
    run.write_state({"checkpoints": [{"step": 1, "file": run.checkpoint_name(1), "sha256": "0" * 64,
                                      "loss": float("nan")}], "best": 1})
    sha = save_checkpoint(run.checkpoint_file(2), net, UNet(net.cfg, 8),
                          torch.optim.AdamW(net.parameters()), 2)
    run.add_checkpoint(sha, 2, 0.5, keep_last=5)
    assert run.read_state()["best"] == 2


def test_json_files_are_standard_json(tiny):
    """A checkpoint saved before any loss was logged has no loss: null in state.json, not NaN (which
    JSON.parse and most tools refuse); the report and the choice of the best checkpoint take it."""
    from ddpmkit.report import write_report

    run = train(tiny(**{"train.max_steps": 4, "train.checkpoint_every": 2, "train.log_every": 4}),
                log=lambda *_: None, progress=False)
    text = (run.path / "state.json").read_text()
    assert "NaN" not in text
    state = json.loads(text)
    assert [c["loss"] is None for c in state["checkpoints"]] == [True, False] and state["best"] == 4
    write_report(run.path)
    for line in (run.path / "stats.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_a_lock_taken_on_a_file_its_last_holder_unlinked_is_taken_again(tmp_path, monkeypatch):
    """Job B opens the lock file, job A (its holder) unlinks it and ends, B locks the unlinked file
    while job C makes a new one: both would write. B sees its file is no longer the named one and
    takes the lock again, on the file C would lock."""
    import ddpmkit.atomic as atomic

    folder = tmp_path / "out"
    folder.mkdir()
    stale = open(folder / atomic.FolderLock.NAME, "w+")
    (folder / atomic.FolderLock.NAME).unlink()
    opened, real = [], atomic.open_in_place
    monkeypatch.setattr(atomic, "open_in_place", lambda path, mode: opened.append(path) or (
        stale if len(opened) == 1 else real(path, mode)))
    with atomic.FolderLock(folder, "sample"):
        assert len(opened) == 2 and (folder / atomic.FolderLock.NAME).exists()
        with pytest.raises(UserError, match="another ddpmkit sample is writing"):
            with atomic.FolderLock(folder, "sample"):
                pass


def test_an_evaluation_measured_otherwise_after_a_resume_deletes_no_earlier_best(tmp_path):
    """train.eval_num changed on resume: FDs of other image counts are not compared, so the best
    is chosen among the new measure's, and the best of the earlier measure is kept beside it."""
    from ddpmkit.checkpoint import file_sha256
    from ddpmkit.run import RunDir

    run = RunDir(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)

    def checkpoint(step, fd, images):
        run.checkpoint_file(step).write_bytes(str(step).encode())
        run.add_checkpoint(file_sha256(run.checkpoint_file(step)), step, 1.0, keep_last=1)
        run.record_evaluation(step, {"fd": fd, "features": "classifier", "weights": "w",
                                     "images": images}, keep_last=1)

    for step, fd in ((100, 20.0), (200, 18.0), (300, 21.0)):
        checkpoint(step, fd, 32)
    for step, fd in ((400, 19.0), (500, 18.5)):
        checkpoint(step, fd, 1000)
    state = run.read_state()
    assert state["best"] == 500 and [e["step"] for e in state["checkpoints"]] == [200, 500]
    assert sorted(p.name for p in run.checkpoint_file(1).parent.iterdir()) == [
        run.checkpoint_file(200).name, run.checkpoint_file(500).name]


def test_damaged_log_lines_are_said_when_a_resume_drops_them_and_a_torn_last_one_is_not(
        tmp_path):
    from ddpmkit.run import RunDir

    run = RunDir(tmp_path)
    rows = [f'{{"step": {s}, "loss": 0.5}}\n' for s in (10, 20, 30, 40, 50)]
    rows[1] = '{"step": 20, "lo\x00ss": \n'  # damaged bytes in the middle of the file
    (tmp_path / "stats.jsonl").write_text("".join(rows) + '{"step": 60, "lo')  # then torn
    said = []
    run.truncate_stats(40, said.append)
    assert [r["step"] for r in run.read_stats()] == [10, 30, 40]
    assert said == [f"warning: 1 damaged line(s) of {tmp_path / 'stats.jsonl'} (line 2) were "
                    f"left out: the log has no row for them"]
    (tmp_path / "stats.jsonl").write_text("".join(rows[:1]) + '{"step": 20, "lo')
    said.clear()
    run.truncate_stats(40, said.append)
    assert said == [] and [r["step"] for r in run.read_stats()] == [10]


def test_damaged_log_lines_are_counted_as_lines_of_the_file(tmp_path, capsys):
    """A line longer than any row is one damaged line, and no row is read from its tail; a stray
    carriage return does not split a line; blank lines are no damage."""
    from ddpmkit.run import MAX_STATS_LINE, RunDir

    def row(step):
        return f'{{"step": {step}, "loss": 0.5}}\n'

    (tmp_path / "stats.jsonl").write_text(
        row(1) + "x" * MAX_STATS_LINE + '{"step": 999}\n' + row(3) + '{"step": 4, "lo\rss"\n'
        + "\n" + row(5) + "garbage\n" + row(7))
    RunDir(tmp_path).truncate_stats(10)
    assert [r["step"] for r in RunDir(tmp_path).read_stats()] == [1, 3, 5, 7]
    assert capsys.readouterr().out == (
        f"warning: 3 damaged line(s) of {tmp_path / 'stats.jsonl'} (lines 2, 4, 7) were left "
        f"out: the log has no row for them\n")


def test_an_evaluation_that_gave_no_number_is_never_best_and_breaks_no_later_checkpoint(tmp_path):
    from ddpmkit.checkpoint import file_sha256
    from ddpmkit.run import RunDir

    run = RunDir(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    measure = {"features": "classifier", "weights": "w", "images": 32}
    for step, fd in ((100, 20.0), (200, float("nan")), (300, 25.0)):
        run.checkpoint_file(step).write_bytes(str(step).encode())
        run.add_checkpoint(file_sha256(run.checkpoint_file(step)), step, 1.0, keep_last=2)
        run.record_evaluation(step, {"fd": fd, **measure}, keep_last=2)
    state = run.read_state()
    assert state["best"] == 100 and [e["step"] for e in state["checkpoints"]] == [100, 200, 300]
