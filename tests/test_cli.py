"""The command line end to end: what a user types, what lands on disk, and each user error."""

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY, write_images
import ddpmkit.cli
from ddpmkit.cli import main

TINY_ARGS = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in TINY.items()]


def cli(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli("train", *TINY_ARGS, "--steps", 20, "--out", out, "--quiet") == 0
    return out


def test_sample_writes_the_layout(trained, tmp_path):
    out = tmp_path / "s"
    assert cli("sample", trained, "--num", 40, "--sampler", "ddim", "--steps", 5, "--seed", 0,
               "--out", out, "--gif") == 0
    pngs = sorted((out / "individual").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(40)]
    with Image.open(pngs[0]) as im:
        assert im.size == (8, 8) and im.mode == "L" and im.text["ddpmkit"] == "synthetic"
    assert (sorted(p.name for p in (out / "grids").iterdir())
            == ["grid_4x4.png", "grid_6x6.png"])  # 8x8 needs 64
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert list(rows[0]) == ["file", "index", "seed", "sampler", "steps", "checkpoint", "label",
                             "synthetic"]
    assert (len(rows) == 40 and rows[3]["file"] == "individual/000003.png"
            and rows[3]["synthetic"] == "true")
    assert rows[0]["steps"] == "5" and rows[0]["checkpoint"] == "step_000000020.safetensors"
    with Image.open(out / "trajectory.gif") as gif:  # the noise, then each of the 5 steps
        assert gif.n_frames == 6


def test_sampling_does_not_depend_on_batch_size(trained, tmp_path):
    for bs in (3, 16):
        assert cli("sample", trained, "--num", 7, "--steps", 4, "--batch-size", bs,
                   "--out", tmp_path / str(bs), "--sampler", "ddpm") == 0
    for i in range(7):
        a = (tmp_path / "3" / "individual" / f"{i:06d}.png").read_bytes()
        assert a == (tmp_path / "16" / "individual" / f"{i:06d}.png").read_bytes()


def test_upsampled_output_and_raw_weights(trained, tmp_path):
    assert cli("sample", trained, "--num", 2, "--size", 32, "--no-ema", "--checkpoint", "latest",
               "sample.spacing=quadratic", "--out", tmp_path / "big") == 0
    with Image.open(tmp_path / "big" / "individual" / "000001.png") as im:
        assert im.size == (32, 32)


def test_rgb_folder_training_writes_rgb(tmp_path):
    write_images(tmp_path / "imgs", 10, size=(12, 12), mode="RGB")
    run = tmp_path / "rgb"
    assert cli("train", *TINY_ARGS, "--data", tmp_path / "imgs", "--image-size", 8, "--steps", 3,
               "--out", run, "--quiet") == 0
    assert cli("sample", run, "--num", 1, "--steps", 2, "--out", tmp_path / "o") == 0
    with Image.open(tmp_path / "o" / "individual" / "000000.png") as im:
        assert im.mode == "RGB" and im.size == (8, 8)


def user_error(capsys, *args, match: str):
    code = cli(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("ddpmkit: error:") and match in err[0], err
    return err[0]


def test_user_errors_are_one_line(capsys, tmp_path, trained):
    out = tmp_path / "never"
    user_error(capsys, "train", "--data", tmp_path / "missing", "--out", out,
               match="data path not found")
    (tmp_path / "empty").mkdir()
    user_error(capsys, "train", "--data", tmp_path / "empty", "--out", out, match="no images")
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG garbage")
    user_error(capsys, "train", "--data", tmp_path / "imgs", "data.on_error=fail", "--out", out,
               match="broken.png")
    (tmp_path / "labels.csv").write_text("image,label\nimg_000.png,a\nghost.png,a\n")
    user_error(capsys, "train", "--data", tmp_path / "imgs", "data.on_error=fail",
               f"data.labels={tmp_path / 'labels.csv'}", "--out", out, match="ghost.png")
    user_error(capsys, "train", "train.learning_rate=1", "--out", out, match="train.learning_rate")
    user_error(capsys, "train", "train.batch_size=-1", "--out", out, match="must be positive")
    user_error(capsys, "train", tmp_path / "nope.yaml", match="config file not found")
    assert not out.exists()  # nothing half-written
    user_error(capsys, "sample", tmp_path / "norun", match="not a ddpmkit run")
    user_error(capsys, "sample", trained, "--num", 0, "--out", tmp_path / "x", match="sample.num")
    (tmp_path / "afile").write_text("x")
    user_error(capsys, "sample", trained, "--out", tmp_path / "afile", match="is a file")
    user_error(capsys, "sample", trained, "--out", tmp_path / "afile" / "x",  # the OS's words
               match="afile/x: Not a directory; a part of this path is a file, not a folder")
    user_error(capsys, "sample", trained, "--checkpoint", 12345, "--out", tmp_path / "x",
               match="no checkpoint at step")
    user_error(capsys, "sample", trained, "train.lr=1", match="only sample.* keys")
    for device in ("foo", "meta"):  # meta holds no values: no traceback at the first .item()
        user_error(capsys, "sample", trained, "--device", device, "--out", tmp_path / "x",
                   match=f"device '{device}'")
    if not torch.backends.mps.is_available():  # every machine but a Mac's
        user_error(capsys, "sample", trained, "--device", "mps", "--out", tmp_path / "x",
                   match="device mps asked for, but this PyTorch or machine has no Apple GPU")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("error, said", [
    # a rename's target is the path the user knows, not the temporary file renamed onto it
    (OSError(errno.EISDIR, "Is a directory", "out/.manifest.csv.ddpmkit-x.tmp", None,
             "out/manifest.csv"), "out/manifest.csv: Is a directory; it is a folder"),
    (OSError(errno.ENOENT, "No such file or directory"), "No such file or directory\n"),
])
def test_os_errors_name_the_path_the_user_knows(monkeypatch, capsys, error, said):
    def fails(ns):
        raise error
    monkeypatch.setitem(ddpmkit.cli.COMMANDS, "info", fails)
    assert main(["info", "anything"]) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["sample", "run"], "ddpmkit: interrupted; rerun the same command to resume\n"),
    (["sample", "run", "--fresh"], "ddpmkit: interrupted; rerun without --fresh to resume\n"),
    (["downstream", "--real", "r", "--synthetic", "s", "--out", "o"],
     "ddpmkit: interrupted\n"),  # a rerun starts again
])
def test_an_interrupted_job_says_whether_a_rerun_resumes(monkeypatch, capsys, argv, said):
    def interrupted(ns):
        raise KeyboardInterrupt
    monkeypatch.setitem(ddpmkit.cli.COMMANDS, argv[0], interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err == said


def test_checkpoint_from_another_architecture_is_refused(capsys, trained, tmp_path):
    import shutil

    other = tmp_path / "other"
    args = [a for a in TINY_ARGS if not a.startswith("model.base_channels")]
    assert cli("train", *args, "model.base_channels=24", "--steps", 2, "--out", other,
               "--quiet") == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(trained, mixed)
    shutil.copy(other / "config.yaml", mixed / "config.yaml")  # config and weights disagree
    user_error(capsys, "sample", mixed, "--out", tmp_path / "x", match="does not fit this model")


def test_python_dash_m_and_help():
    out = subprocess.run([sys.executable, "-m", "ddpmkit", "sample", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "--sampler" in out.stdout and "examples:" in out.stdout


def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path):
    """Kill -9 after the first checkpoint, rerun the same command: same final weights, bitwise."""
    args = [*TINY_ARGS, "train.max_steps=60", "train.checkpoint_every=10", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "ddpmkit", "train", *args]
    subprocess.run(base + ["--out", str(tmp_path / "straight")], check=True, env=env,
                   capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(base + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while (time.time() < deadline
           and not (killed / "checkpoints" / "step_000000020.safetensors").exists()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(base + ["--out", str(killed)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0 and "resuming" in rerun.stdout
    a = load_file(tmp_path / "straight" / "checkpoints" / "step_000000060.safetensors")
    b = load_file(killed / "checkpoints" / "step_000000060.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_json_output_for_scripts(trained, tmp_path, capsys):
    assert cli("sample", trained, "--num", 2, "--steps", 2, "--out", tmp_path / "j", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num"] == 2 and out["manifest"].endswith("manifest.csv")
    # already trained: a no-op
    assert cli("train", *TINY_ARGS, "--steps", 20, "--out", trained, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 20 and out["report"].endswith("report.html")
    assert out["stopped_by"] == "train.max_steps"
    assert cli("train", *TINY_ARGS, "--steps", 50, "--max-minutes", 1e-6, "train.log_every=2",
               "--out", tmp_path / "timed", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stopped_by"] == "train.max_minutes" and out["step"] < 50
    # fewer steps than it has: still a no-op, and its record is not rewritten
    recorded = (trained / "config.yaml").read_text()
    assert cli("train", *TINY_ARGS, "--steps", 5, "--out", trained, "--json") == 0
    assert json.loads(capsys.readouterr().out)["step"] == 20
    assert (trained / "config.yaml").read_text() == recorded


def test_a_damaged_checkpoints_warning_leaves_json_output_json(trained, tmp_path, capsys):
    import shutil

    run = shutil.copytree(trained, tmp_path / "run")
    latest = sorted((run / "checkpoints").glob("step_*.safetensors"))[-1]
    with open(latest, "r+b") as f:  # damaged inside: its SHA-256 no longer matches
        f.seek(1000)
        f.write(b"XXXX")
    assert cli("sample", run, "--num", 2, "--steps", 2, "--out", tmp_path / "j", "--json") == 0
    told = capsys.readouterr()
    assert json.loads(told.out)["num"] == 2
    assert f"warning: checkpoint {latest} is damaged" in told.err


def test_eval_ref_takes_several_words_as_the_readme_writes_them():
    from ddpmkit.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["eval", "gen", "--ref", "data.path=/d", "data.split=test"]).ref == [
        "data.path=/d", "data.split=test"]
    assert parse(["eval", "gen", "--ref", "data.path=/d", "--ref", "data.split=test"]).ref == [
        "data.path=/d", "data.split=test"]


def test_the_readmes_flag_table_is_the_flags_keys():
    """Each flag the table gives a config key is the flag that sets it, and every such flag is
    in the table."""
    import re
    from pathlib import Path

    from ddpmkit.cli import ALIASES, SAMPLE_FLAGS, TRAIN_FLAGS

    def flags(table: dict) -> dict:
        out = {}
        for name, key in table.items():
            for flag in ["--" + name.replace("_", "-"), *ALIASES.get(name, [])]:
                out[flag] = key
        return out

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("| `train` flag | key |")[1].split("\n\n")[0]
    told = {"train": {}, "sample": {}}
    for row in table.strip().splitlines()[1:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        for side, (flag_cell, key_cell) in zip(told, (cells[:2], cells[2:])):
            names, keys = re.findall(r"`(-[^`]+)`", flag_cell), re.findall(r"`(\w+\.\w+)`",
                                                                           key_cell)
            if len(names) == len(keys):
                told[side].update(zip(names, keys))
    for side, table in (("train", flags(TRAIN_FLAGS)), ("sample", flags(SAMPLE_FLAGS))):
        assert told[side] == {f: table[f] for f in told[side]}
        assert set(table.values()) <= set(told[side].values()), side
