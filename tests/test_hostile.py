"""Hostile and careless inputs, each made here: nothing deleted that ddpmkit did not write, nothing
run from a file, memory checked before it is taken, and one line for every refusal."""

import base64
import contextlib
import csv
import gzip
import io
import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from ddpmkit.cli import main
from ddpmkit.config import DataConfig, load_config
from ddpmkit.data import load_images
from ddpmkit.errors import UserError
from ddpmkit.run import RunDir
from ddpmkit.training import train
from test_cli import TINY_ARGS


def cli(*args):
    return main([str(a) for a in args])


def one_line(capsys, *args, says: str) -> str:
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpmkit: error:") and says in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert cli("train", *TINY_ARGS, "--steps", 4, "train.checkpoint_every=2", "train.keep_last=1",
               "--out", out, "--quiet") == 0
    return out


def copy_run(run_dir: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, to)
    return to


# --- nothing deleted outside what ddpmkit wrote ---------------------------------------------------

def test_a_runs_linked_checkpoints_or_grids_folder_is_refused_not_written_through(
        run_dir, tmp_path, capsys):
    """Training would write its checkpoints through the link over another run's, then prune them
    (their digests now its own)."""
    import shutil

    victim = copy_run(run_dir, tmp_path / "victim")
    before = {p.name: p.read_bytes() for p in (victim / "checkpoints").iterdir()}
    for folder in ("checkpoints", "grids"):
        received = copy_run(run_dir, tmp_path / f"received_{folder}")
        shutil.rmtree(received / folder)
        (received / folder).symlink_to(victim / folder)
        for extra in ([], ["--fresh"]):
            one_line(capsys, "train", *TINY_ARGS, "--steps", 6, "train.checkpoint_every=2",
                     "train.keep_last=1", "--out", received, "--quiet", *extra,
                     says=f"{received / folder} is a link: a run writes and deletes files")
    assert {p.name: p.read_bytes() for p in (victim / "checkpoints").iterdir()} == before


@pytest.mark.parametrize("planted", ["absolute", "relative"])
def test_checkpoints_a_state_file_names_outside_the_run_are_never_deleted(
        run_dir, tmp_path, capsys, planted):
    run = copy_run(run_dir, tmp_path / "sent")
    victim = tmp_path / "victim.txt"
    victim.write_text("not ddpmkit's")
    state = json.loads((run / "state.json").read_text())
    name = str(victim) if planted == "absolute" else "../victim.txt"
    state["checkpoints"].insert(0, {"step": 1, "file": name, "sha256": "0" * 64, "loss": 0.5})
    (run / "state.json").write_text(json.dumps(state))
    one_line(capsys, "train", *TINY_ARGS, "--steps", 8, "train.checkpoint_every=2",
             "train.keep_last=1", "--out", run, "--quiet",
             says="state.json is not a state file ddpmkit wrote")
    assert victim.read_text() == "not ddpmkit's"


def test_run_records_edited_to_hold_odd_types_are_refused_in_one_line(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path / "huge")
    state = json.loads((run / "state.json").read_text())
    state["checkpoints"][-1]["loss"] = 10**400  # an integer no float holds
    (run / "state.json").write_text(json.dumps(state))
    one_line(capsys, "report", run, says="with a loss or FD that is not a number")
    odd = copy_run(run_dir, tmp_path / "odd")  # a meta.json of no format, environment a number
    (odd / "meta.json").write_text(json.dumps({"environment": 5}))
    one_line(capsys, "report", odd, says="is not a ddpmkit")


def test_a_checkpoint_is_deleted_only_when_it_holds_what_ddpmkit_recorded(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    swapped = RunDir(run).checkpoint_file(2)
    swapped.write_bytes(b"someone's file, in the checkpoint's place")
    state = json.loads((run / "state.json").read_text())
    state["checkpoints"].insert(0, {"step": 2, "file": "checkpoints/step_000000002.safetensors",
                                    "sha256": "1" * 64, "loss": 0.9})
    (run / "state.json").write_text(json.dumps(state))
    assert cli("train", *TINY_ARGS, "--steps", 6, "train.checkpoint_every=2", "train.keep_last=1",
               "--out", run, "--quiet") == 0
    # not the digest it recorded
    assert swapped.read_bytes() == b"someone's file, in the checkpoint's place"


@pytest.mark.parametrize("state",
                         ["{}", "[]", '{"checkpoints": [{"step": "ten"}]}', '{"checkpoints": [{}]}',
                          '{"checkpoints": [], "best": "x"}', "not json"])
def test_a_damaged_state_file_is_one_line(run_dir, tmp_path, capsys, state):
    run = copy_run(run_dir, tmp_path / "run")
    (run / "state.json").write_text(state)
    one_line(capsys, "sample", run, "-n", 1, "--steps", 2, "--out", tmp_path / "s",
             says="state.json")
    assert not (tmp_path / "s").exists()


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    def stop(*_):  # not an OSError, which the code under test may catch
        raise AssertionError("hung reading a pipe")
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)


def test_a_pipe_in_place_of_a_runs_record_is_one_line_not_a_hang(run_dir, tmp_path, capsys):
    for name, says in [("state.json", "state.json"), ("meta.json", "is not a ddpmkit run")]:
        run = copy_run(run_dir, tmp_path / name)
        (run / name).unlink()
        os.mkfifo(run / name)
        with no_hang():
            one_line(capsys, "sample", run, "-n", 1, "--steps", 2, "--out", tmp_path / "s",
                     says=says)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(data / f"{i}.png")
    os.mkfifo(data / "meta.json")  # the data loader looks for runs to leave out
    with no_hang():
        assert len(load_images(DataConfig(path=str(data), image_size=8))) == 4
    gen = tmp_path / "gen"  # a pipe in place of a generated image: eval and audit read them all
    assert cli("sample", run_dir, "-n", 3, "--steps", 2, "--out", gen, "--quiet") == 0
    (gen / "individual" / "000001.png").unlink()
    os.mkfifo(gen / "individual" / "000001.png")
    for command in (["eval", gen, "--ref", run_dir, "--features", "classifier"],
                    ["audit", gen, "--ref", run_dir, "--features", "none"]):
        with no_hang():
            one_line(capsys, *command, says="000001.png: it is not a regular file")
    (gen / "individual" / "000001.png").unlink()  # and a listed image that is missing
    for command in (["eval", gen, "--ref", run_dir, "--features", "classifier"],
                    ["audit", gen, "--ref", run_dir, "--features", "none"]):
        one_line(capsys, *command, says="000001.png: no such file")


@pytest.mark.parametrize("lost", ["config.yaml", "state.json"])
def test_a_run_that_lost_its_config_or_state_is_neither_restarted_nor_mixed(
        run_dir, tmp_path, capsys, lost):
    run = copy_run(run_dir, tmp_path / "run")
    (run / lost).unlink()
    saved = RunDir(run).checkpoint_file(4).read_bytes()
    one_line(capsys, "train", *TINY_ARGS, "--steps", 2, "--out", run, "--quiet",
             says=f"holds a run's checkpoints but its {lost} is missing")
    assert RunDir(run).checkpoint_file(4).read_bytes() == saved
    assert cli("train", *TINY_ARGS, "--steps", 2, "--out", run, "--fresh", "--quiet") == 0
    assert [e["step"] for e in RunDir(run).read_state()["checkpoints"]] == [2]


@pytest.mark.parametrize("written", [{"format": "ddpmkit-run/1"}, {}])
def test_a_run_of_another_format_is_refused_in_one_line_and_left_as_it_is(
        run_dir, tmp_path, capsys, written):
    run = copy_run(run_dir, tmp_path / "run")
    meta = {k: v for k, v in json.loads((run / "meta.json").read_text()).items() if k != "format"}
    (run / "meta.json").write_text(json.dumps({**meta, **written}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    says = "written by another version of ddpmkit (ddpmkit-run/1; this one reads ddpmkit-run/2)"
    one_line(capsys, "sample", run, "-n", 1, "--out", tmp_path / "s", says=says)
    one_line(capsys, "train", *TINY_ARGS, "--steps", 8, "--out", run, says=says)  # no resume
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "s").exists()


def test_a_run_whose_checkpoints_are_all_gone_says_how_to_train_it_again(
        run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path / "run")
    RunDir(run).checkpoint_file(4).unlink()
    one_line(capsys, "sample", run, "-n", 1, "--out", tmp_path / "s",
             says=f"train it again (ddpmkit train --out {run} --fresh)")


def test_sample_never_writes_into_someones_folder_and_fresh_deletes_only_its_own(
        run_dir, tmp_path, capsys):
    mine = tmp_path / "figures"
    (mine / "grids").mkdir(parents=True)
    (mine / "grids" / "grid_4x4.png").write_bytes(b"my figure")
    (mine / "grids" / "figure1.csv").write_text("x,y\n")
    for extra in ([], ["--fresh"]):
        one_line(capsys, "sample", run_dir, "-n", 16, "--steps", 2, "--out", mine, *extra,
                 says="--force")
    assert (mine / "grids" / "grid_4x4.png").read_bytes() == b"my figure"
    # --force writes beside them, never over one where the job writes
    one_line(capsys, "sample", run_dir, "-n", 16, "--steps", 2, "--out", mine, "--force",
             says="grid_4x4.png is not a file ddpmkit wrote, and this sampling job would write")
    assert (mine / "grids" / "grid_4x4.png").read_bytes() == b"my figure"
    (mine / "grids" / "grid_4x4.png").rename(mine / "grids" / "my_grid.png")
    assert cli("sample", run_dir, "-n", 16, "--steps", 2, "--out", mine, "--force", "--quiet") == 0
    for name in ("grid_4x4_annotated.png", "grid_explained_by_me.png"):  # named like the job's
        (mine / "grids" / name).write_bytes(b"my note")
    assert cli("sample", run_dir, "-n", 16, "--steps", 2, "--seed", 1, "--out", mine,
               "--fresh", "--quiet") == 0
    # --fresh deleted the job's files alone
    assert (mine / "grids" / "figure1.csv").read_text() == "x,y\n"
    assert (mine / "grids" / "my_grid.png").read_bytes() == b"my figure"
    for name in ("grid_4x4_annotated.png", "grid_explained_by_me.png"):
        assert (mine / "grids" / name).read_bytes() == b"my note"


def _noisy(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8), 30 * (i + 1), np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_force_writes_beside_a_users_files_never_over_them(run_dir, tmp_path, capsys):
    noisy, mine = _noisy(tmp_path / "noisy"), tmp_path / "mine"
    (mine / "individual").mkdir(parents=True)
    users = {mine / "manifest.csv": "my notes", mine / "individual" / "img0.png": "my picture",
             mine / "notes.txt": "mine"}
    for path, text in users.items():
        path.write_text(text)
    one_line(capsys, "denoise", run_dir, noisy, "--sigma", 0.2, "--out", mine, "--force",
             says="img0.png is not a file ddpmkit wrote, and this restoration would write over it")
    (mine / "individual" / "img0.png").rename(mine / "individual" / "kept.png")
    one_line(capsys, "denoise", run_dir, noisy, "--sigma", 0.2, "--out", mine, "--force",
             says="manifest.csv is not a file ddpmkit wrote")
    (mine / "manifest.csv").rename(mine / "manifest.csv.mine")
    assert cli("denoise", run_dir, noisy, "--sigma", 0.2, "--out", mine, "--force") == 0
    assert [(mine / n).read_text() for n in ("manifest.csv.mine", "individual/kept.png",
                                             "notes.txt")] == ["my notes", "my picture", "mine"]


def test_a_restoration_writes_over_no_file_its_record_does_not_name(run_dir, tmp_path, capsys):
    noisy, out = _noisy(tmp_path / "noisy", 1), tmp_path / "out"
    assert cli("denoise", run_dir, noisy, "--sigma", 0.2, "--out", out) == 0
    one_line(capsys, "denoise", run_dir, noisy, "--sigma", 0.2, "--out", out, "--no-ema",
             says="holds the restored images of another restoration (ema: True -> False)")
    (out / "individual" / "img1.png").write_text("my picture")
    _noisy(noisy, 2)  # the inputs gain an img1.png
    one_line(capsys, "denoise", run_dir, noisy, "--sigma", 0.2, "--out", out,
             says="of another restoration (files:")
    one_line(capsys, "denoise", run_dir, noisy, "--sigma", 0.2, "--out", out, "--fresh",
             says="img1.png is not a file ddpmkit wrote")
    assert (out / "individual" / "img1.png").read_text() == "my picture"
    assert (out / "individual" / "img0.png").is_file()  # refused before anything was deleted
    (out / "individual" / "img1.png").unlink()
    assert cli("audit", out, "--ref", run_dir, "--features", "none") == 0
    assert cli("denoise", run_dir, noisy, "--sigma", 0.2, "--out", out, "--fresh") == 0
    assert not (out / "audit.json").exists()  # it was about the images --fresh replaced


def test_audit_replaces_only_its_own_results_about_the_run_that_made_the_images(
        run_dir, tmp_path, capsys):
    gen, other = tmp_path / "gen", tmp_path / "other"
    assert cli("sample", run_dir, "-n", 4, "--steps", 2, "--out", gen, "--quiet") == 0
    (gen / "audit.html").write_text("my report")
    one_line(capsys, "audit", gen, "--ref", run_dir, "--features", "none",
             says="audit.html is not a file ddpmkit wrote, and ddpmkit audit would replace it")
    assert (gen / "audit.html").read_text() == "my report"
    (gen / "audit.html").unlink()
    for _ in range(2):
        assert cli("audit", gen, "--ref", run_dir, "--features", "none") == 0
    assert cli("train", *TINY_ARGS, "--steps", 2, "--out", other, "--quiet") == 0
    one_line(capsys, "audit", gen, "--ref", other, "--features", "none",
             says="audit it against the run that made it")
    one_line(capsys, "audit", gen, "--ref", gen, says="is not a ddpmkit training run")
    one_line(capsys, "audit", gen, "--ref", run_dir, "--holdout", "data.split=val",
             says="the bundled digits (no data.path) have no splits")


def test_a_users_file_named_as_an_audit_result_is_neither_replaced_nor_deleted(
        run_dir, tmp_path, capsys):
    gen = tmp_path / "gen"
    assert cli("sample", run_dir, "-n", 4, "--steps", 2, "--out", gen, "--quiet") == 0
    note = '{"note": "my summary of last week\'s ddpmkit audit: keep"}'
    (gen / "audit.json").write_text(note)  # names the tool near its start, but is not its output
    one_line(capsys, "audit", gen, "--ref", run_dir, "--features", "none",
             says="audit.json is not a file ddpmkit wrote")
    (gen / "audit.json").rename(gen / "eval_inception.json")
    (gen / "audit.html").write_text("<html>my own page</html>")
    one_line(capsys, "audit", gen, "--ref", run_dir, "--features", "none",
             says="audit.html is not a file ddpmkit wrote")
    assert not (gen / "audit.json").exists()  # refused before either file was written
    (gen / "audit.html").unlink()
    assert cli("audit", gen, "--ref", run_dir, "--features", "none") == 0
    assert cli("sample", run_dir, "-n", 4, "--steps", 3, "--out", gen, "--fresh", "--quiet") == 0
    assert not (gen / "audit.json").exists()  # ddpmkit's, about the images --fresh replaced
    assert (gen / "eval_inception.json").read_text() == note  # the user's


@pytest.mark.parametrize("args, says", [
    (["--sigma", "abc"], "--sigma abc: give the noise's standard deviation"),
    (["--sigma", 0.2, "--steps", 5], "--method mmse is one network call"),
    (["--sigma", 0.2, "--sampler", "ddpm"], "--method mmse is one network call"),
    (["--mask", "{tmp}/nowhere"], "mask folder not found"),
    (["--mask", "{tmp}/noisy", "--jump-length", 0], "--jump-length and --resamplings must be"),
    (["--mask", "{tmp}/noisy", "--resamplings", 10**9], "--resamplings 1,000,000,000: at most"),
    (["--method", "sample", "--sampler", "ddim", "--sigma", 0.2], "'ddim' is deterministic"),
])
def test_restoration_options_a_user_gets_wrong_are_one_line(run_dir, tmp_path, capsys, args,
                                                            says):
    noisy = _noisy(tmp_path / "noisy")
    command = "inpaint" if "--mask" in args else "denoise"
    args = [str(a).format(tmp=tmp_path) for a in args]
    one_line(capsys, command, run_dir, noisy, *args, "--out", tmp_path / "o", says=says)
    if args[0] == "--sigma" and args[1] != "abc":  # the same options, right, on a file
        one_line(capsys, command, run_dir, noisy / "img0.png", "--out", tmp_path / "o",
                 says="is a file: give the folder that holds the images")
    assert not (tmp_path / "o").exists()


def test_import_and_export_refuse_a_link_as_their_new_folder(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    one_line(capsys, "export", run_dir, "--out", tmp_path / "link", says="is a link")
    assert cli("export", run_dir, "--out", tmp_path / "hf") == 0
    one_line(capsys, "import", tmp_path / "hf", "--out", tmp_path / "link", says="is a link")
    assert not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("planted", [".ddpmkit.lock", ".manifest-rank0.csv"])
def test_a_link_in_place_of_a_file_a_job_changes_in_place_is_refused(
        run_dir, tmp_path, capsys, planted):
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_text("keep\npartial")
    if planted == ".manifest-rank0.csv":  # met when the same job resumes
        assert cli("sample", run_dir, "-n", 2, "--steps", 2, "--out", out, "--quiet") == 0
    out.mkdir(exist_ok=True)
    (out / planted).symlink_to(victim)
    one_line(capsys, "sample", run_dir, "-n", 4, "--steps", 2, "--out", out, "--quiet",
             says=f"{out / planted} is a link or not a regular file")
    assert victim.read_text() == "keep\npartial"


def test_a_users_files_survive_fresh_force_and_staging_clean_ups(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path / "run")
    for name in ("grids/my_notes.txt", "checkpoints/README_mine.txt", "tensorboard/old/ev"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("mine")
    assert cli("train", *TINY_ARGS, "--steps", 2, "--out", run, "--fresh", "--quiet") == 0
    assert all((run / name).read_text() == "mine" for name in (
        "grids/my_notes.txt", "checkpoints/README_mine.txt", "tensorboard/old/ev"))
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000000002.safetensors"]
    forced = tmp_path / "forced"
    (forced / "notes").mkdir(parents=True)
    (forced / ".thesis.tmp").write_text("draft")  # named like a temporary, but not one of ours
    (forced / "notes" / ".vimrc.tmp").write_text("draft")
    assert cli("sample", run_dir, "-n", 2, "--steps", 2, "--out", forced, "--force",
               "--quiet") == 0
    assert (forced / ".thesis.tmp").exists() and (forced / "notes" / ".vimrc.tmp").exists()
    # a temporary of a job writing below the folder now, and a sync tool's file named like one
    live = tmp_path / "project" / "gen_live"
    assert cli("sample", run_dir, "-n", 2, "--steps", 2, "--out", live, "--quiet") == 0
    (live / ".ddpmkit.lock").write_text("")
    kept = [live / "individual" / ".000004.png.ddpmkit-k3j9x_2a.tmp",
            tmp_path / "project" / ".syncthing.document.tmp"]
    for path in kept:
        path.write_text("in flight")
    assert cli("sample", run_dir, "-n", 2, "--steps", 2, "--out", tmp_path / "project",
               "--force", "--quiet") == 0
    assert all(path.read_text() == "in flight" for path in kept)
    staging = tmp_path / ".hf.0123abcd.partial"  # named as export stages, but with an empty mark
    staging.mkdir()
    (staging / ".ddpmkit-staging").write_text("")
    (staging / "thesis.txt").write_text("mine")
    assert cli("export", run_dir, "--out", tmp_path / "hf") == 0
    assert (staging / "thesis.txt").read_text() == "mine"


def test_the_report_embeds_no_file_a_link_in_the_grids_points_to(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"SECRET")
    (run / "grids" / "step_000000999.png").symlink_to(secret)
    assert cli("report", run) == 0
    assert base64.b64encode(b"SECRET").decode() not in (run / "report.html").read_text()


def test_a_record_with_fields_of_the_wrong_type_or_a_pipe_is_one_line(run_dir, tmp_path, capsys):
    gen = tmp_path / "gen"
    assert cli("sample", run_dir, "-n", 2, "--steps", 2, "--out", gen, "--quiet") == 0
    record = json.loads((gen / ".ddpmkit.json").read_text())
    record["job"] |= {"run": "/elsewhere", "checkpoint_sha256": ["x"],
                      "drop_copies": "not a mapping"}
    (gen / ".ddpmkit.json").write_text(json.dumps(record))
    one_line(capsys, "audit", gen, "--ref", run_dir, "--features", "none",
             says="audit it against the run that made it")
    from ddpmkit.downstream import recorded_copy_threshold

    assert recorded_copy_threshold(gen) is None
    piped = tmp_path / "piped"
    piped.mkdir()
    os.mkfifo(piped / ".ddpmkit.json")  # read, it would never end
    one_line(capsys, "sample", run_dir, "-n", 2, "--steps", 2, "--out", piped, "--quiet",
             says="holds images no ddpmkit sampling job made there")


def test_records_nested_past_the_parser_and_damaged_manifests_are_one_line(
        run_dir, tmp_path, capsys):
    deep = "[" * 200_000 + "]" * 200_000  # json.loads raises RecursionError, not ValueError
    run = copy_run(run_dir, tmp_path / "run")
    (run / "state.json").write_text(deep)
    one_line(capsys, "sample", run, "-n", 1, "--steps", 2, "--out", tmp_path / "s",
             says="nests too deep")
    with open(run / "stats.jsonl", "a") as f:  # a bad stats line is dropped, as any other
        f.write('{"step": 1, "loss": ' + deep + "}\n")
    assert RunDir(run).read_stats() == RunDir(run_dir).read_stats()
    gen = tmp_path / "gen"
    assert cli("sample", run_dir, "-n", 2, "--steps", 2, "--out", gen, "--quiet") == 0
    (gen / ".ddpmkit.json").write_text(deep)
    one_line(capsys, "sample", run_dir, "-n", 2, "--steps", 2, "--out", gen,
             says="holds images no ddpmkit sampling job made there")
    gen = tmp_path / "gen2"
    assert cli("sample", run_dir, "-n", 2, "--steps", 2, "--out", gen, "--quiet") == 0
    manifest = gen / "manifest.csv"
    for damaged in ("file,x\n" + "a" * 200_000 + ",1\n", b"file,label\n\xff\xfe,1\n"):
        (manifest.write_text if isinstance(damaged, str) else manifest.write_bytes)(damaged)
        for command in (["sample", run_dir, "-n", 2, "--steps", 2, "--out", gen],
                        ["eval", gen, "--ref", run_dir, "--features", "classifier"]):
            one_line(capsys, *command, says="it is not a manifest ddpmkit wrote")


def test_a_link_to_a_folder_inside_an_output_folder_is_refused_not_written_through(
        run_dir, tmp_path, capsys):
    out, elsewhere = tmp_path / "gen", tmp_path / "elsewhere"
    assert cli("sample", run_dir, "-n", 16, "--steps", 2, "--out", out, "--quiet") == 0
    elsewhere.mkdir()
    (elsewhere / "000000.png").write_bytes(b"not ddpmkit's")
    for linked in (out / "individual", out / "grids"):
        kept = tmp_path / f"kept_{linked.name}"
        linked.rename(kept)
        linked.symlink_to(elsewhere, target_is_directory=True)
        for extra in ([], ["--fresh"], ["--seed", 1, "--fresh"]):
            one_line(capsys, "sample", run_dir, "-n", 16, "--steps", 2, "--out", out, *extra,
                     says="is a link to a folder")
        linked.unlink()
        kept.rename(linked)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["000000.png"]
    assert (elsewhere / "000000.png").read_bytes() == b"not ddpmkit's"


@pytest.mark.parametrize("command", ["sample", "balance", "denoise", "downstream"])
def test_the_root_and_home_folders_are_never_outputs(run_dir, tmp_path, capsys, command):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    for out in ("/", str(Path.home())):
        args = {"sample": ["sample", run_dir, "-n", 1], "balance": ["balance", run_dir],
                "denoise": ["denoise", run_dir, tmp_path],
                "downstream": ["downstream", "--real", tmp_path, "--synthetic", tmp_path]}[command]
        one_line(capsys, *args, "--out", out, says="folder: choose a folder of its own")


def test_outputs_never_overlap_the_data_a_job_reads(run_dir, tmp_path, capsys):
    (tmp_path / "noisy").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "noisy" / "a.png")
    one_line(capsys, "denoise", run_dir, tmp_path / "noisy", "--sigma", 0.1, "--out",
             tmp_path / "noisy", says="overlaps the data this job reads")
    for out in (tmp_path / "noisy", tmp_path / "gen"):  # the synthetic set, the real data
        one_line(capsys, "downstream", "--real", tmp_path / "noisy", "--synthetic",
                 tmp_path / "gen", "--out", out, says="overlaps the data this job reads")
    one_line(capsys, "downstream", "--real", tmp_path / "noisy", "--synthetic", tmp_path / "gen",
             "--out", run_dir, says="is a training run")
    for out in (run_dir / "checkpoints", run_dir / "grids" / "mine"):  # what training keeps
        one_line(capsys, "sample", run_dir, "--num", 2, "--steps", 2, "--out", out, "--force",
                 says="that training keeps in run")
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(data / "train" / f"{i}.png")
    with pytest.raises(UserError, match="overlaps the data"):
        train(load_config(None, {**TINY, "data.path": str(data / "train"),
                                 "train.out_dir": str(data / "train" / "r")}),
              log=lambda *_: None, progress=False)


def test_training_leaves_out_folders_ddpmkit_generated(run_dir, tmp_path):
    data = tmp_path / "data"
    (data / "real").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(data / "real" / f"{i}.png")
    assert cli("sample", run_dir, "-n", 16, "--steps", 2, "--out",
               data / "generated", "--quiet") == 0
    said = []
    d = load_images(DataConfig(path=str(data), image_size=8), log=said.append)
    assert len(d) == 6 and any("generated" in m and "left out" in m for m in said)


def test_two_jobs_in_one_folder_at_once_the_second_is_refused_naming_the_first(run_dir, tmp_path):
    out = tmp_path / "o"
    env = {**__import__("os").environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "ddpmkit", "sample", str(run_dir), "-n", "3000",
                              "--steps", "3", "--batch-size", "8", "--out", str(out), "--quiet"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if (out / ".manifest-rank0.csv").exists():
                break
            __import__("time").sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "ddpmkit", "sample", str(run_dir), "-n",
                                 "10", "--seed", "1", "--out", str(out), "--quiet"], env=env,
                                capture_output=True, text=True)
    finally:
        first.kill()
        first.wait()
    err = second.stderr.strip().splitlines()
    assert (second.returncode == 2 and len(err) == 1
            and "another ddpmkit sample is writing to" in err[0]), err
    assert f"pid {first.pid}" in err[0]


# --- nothing run from a file ----------------------------------------------------------------------

def test_the_report_escapes_everything_a_run_folder_holds(run_dir, tmp_path):
    from ddpmkit.report import build_report

    run = copy_run(run_dir, tmp_path / "run")
    meta = json.loads((run / "meta.json").read_text())
    meta.update(data="<script>window.pwned=1</script>", parameters="<img src=x onerror=alert(1)>")
    meta["environment"].update(device="<script>x</script>", command=["<script>y</script>"])
    (run / "meta.json").write_text(json.dumps(meta))
    with open(run / "stats.jsonl", "a") as f:
        f.write(json.dumps({"step": 99, "loss": "<script>z</script>",
                            "images_seen": "<b>", "lr": None}) + "\n")
        f.write(json.dumps({"step": 100,
                            "eval": {"fd": "<script>", "features": "<script>w</script>"}}) + "\n")
    (run / "config.yaml").write_text((run / "config.yaml").read_text()
                                     + "# </pre><script>v</script>\n")
    (run / "grids" / "step_000000002 (copy).png").write_bytes(
        (run / "grids").glob("*.png").__next__().read_bytes())
    html = build_report(RunDir(run))
    assert "<script" not in html.lower() and "<img src=x" not in html
    (run / "report.html").write_text(html)
    try:  # and in a browser, where one is installed: nothing ran
        from test_report import render

        assert render(run / "report.html", tmp_path)["pwned"] is None
    except pytest.skip.Exception:
        pass
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in html


# --- memory checked before it is taken ------------------------------------------------------------

def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
        for p, c in zip("abcdefgh", "bcdefghi")]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    line = one_line(capsys, "train", tmp_path / "bomb.yaml", "--out", tmp_path / "r",
                    says="aliases")
    assert len(line) < 400 and not (tmp_path / "r").exists()


def test_array_files_that_declare_more_than_they_hold_or_than_memory_are_refused_at_once(tmp_path):
    # 785 GB over a few bytes
    header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 28, 28)}
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 128)
    with pytest.raises(UserError, match=r"declares an array of shape \(1000000000, 28, 28\)"):
        load_images(DataConfig(path=str(tmp_path / "huge.npy")))
    # an .npz member whose header declares 64 GiB: refused before numpy inflates a byte
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("train_images.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (2**26, 32, 32)})
            member.write(bytes(2**20))
    with pytest.raises(UserError, match=r"bomb.npz\[train_images\] declares an array of shape"):
        load_images(DataConfig(path=str(tmp_path / "bomb.npz")))
    # the same bomb behind a small decoy: numpy reads the member named `train_images` first
    decoy = tmp_path / "decoy.npz"
    with zipfile.ZipFile(tmp_path / "bomb.npz") as bomb, zipfile.ZipFile(decoy, "w") as z:
        small = io.BytesIO()
        np.save(small, np.zeros((4, 8, 8), np.uint8))
        z.writestr("train_images.npy", small.getvalue())
        z.writestr("train_images", bomb.read("train_images.npy"))
    with pytest.raises(UserError, match=r"decoy.npz\[train_images\] declares an array of shape"):
        load_images(DataConfig(path=str(decoy)))
    plain = tmp_path / "plain.npz"  # a member without the .npy suffix is read, and checked
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("train_images", small.getvalue())
    assert load_images(DataConfig(path=str(plain), image_size=8)).images.shape == (4, 1, 8, 8)


def test_a_statistics_file_is_checked_before_it_is_inflated(tmp_path, monkeypatch, capsys):
    """eval --ref STATS.npz: a sigma of zeros compresses to almost nothing; its header is read,
    against the memory there is, before numpy inflates it."""
    import ddpmkit.limits

    stats = tmp_path / "stats.npz"
    np.savez_compressed(stats, mu=np.zeros(2000), sigma=np.zeros((2000, 2000)))  # 32 MB, inflated
    assert stats.stat().st_size < 100_000
    (tmp_path / "gen" / "individual").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8), 9 * i, np.uint8)).save(tmp_path / "gen" / "individual"
                                                              / f"{i}.png")
    monkeypatch.setattr(ddpmkit.limits, "available_memory", lambda: 50_000_000)
    one_line(capsys, "eval", tmp_path / "gen", "--ref", stats, "--metrics", "fid",
             says="stats.npz[sigma] (shape (2000, 2000), float64) needs")


def test_idx_files_are_checked_before_they_are_inflated(tmp_path):
    # 64 GiB declared, 1 MB written
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBB3I", 0, 0, 0x08, 3, 2**26, 32, 32) + bytes(2**20))
    with pytest.raises(UserError, match="needs .* GiB of memory"):
        load_images(DataConfig(path=str(tmp_path / "train-images-idx3-ubyte.gz")))
    (tmp_path / "wrap-images-idx3-ubyte").write_bytes(struct.pack(">BBBB4I", 0, 0, 0x08, 4, 2**16,
                                                                  2**16, 2**16, 2**16))
    # the product of the dims wrapped to 0 in int64
    with pytest.raises(UserError, match="truncated|needs"):
        load_images(DataConfig(path=str(tmp_path / "wrap-images-idx3-ubyte")))


def test_an_image_declaring_a_huge_size_is_named_not_decoded(tmp_path):
    png = tmp_path / "big"
    png.mkdir()
    Image.new("L", (8, 8)).save(png / "ok.png")
    raw = bytearray((png / "ok.png").read_bytes())
    raw[16:24] = struct.pack(">II", 30000, 30000)  # the IHDR's width and height: 9x10^8 pixels
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))  # and its checksum
    (png / "huge.png").write_bytes(bytes(raw))
    d = load_images(DataConfig(path=str(png), image_size=8))
    assert len(d) == 1 and "huge.png" in d.skipped[0][0] and "30000x30000" in d.skipped[0][1]
    with pytest.raises(UserError, match=r"huge.png: .*30000x30000 pixels"):
        load_images(DataConfig(path=str(png), image_size=8, on_error="fail"))


def test_a_sampling_batch_is_checked_with_the_networks_activations(run_dir, tmp_path, capsys,
                                                                   monkeypatch):
    """The images alone of 20,000 8x8 samples take 15 MB; the network's activations for them
    hundreds of MB more, which the check counts (from the network measured on the meta device)."""
    import ddpmkit.limits
    from ddpmkit.run import RunDir
    from ddpmkit.unet import sampling_bytes

    model = RunDir(run_dir).config().model
    per_image = sampling_bytes(model, 8)
    assert sampling_bytes(model, 16) > 3 * per_image  # activations grow with the pixels
    monkeypatch.setattr(ddpmkit.limits, "available_memory", lambda: 20_000 * per_image // 2)
    one_line(capsys, "sample", run_dir, "--num", 20_000, "--batch-size", 20_000, "--out",
             tmp_path / "s", says="a batch of 20000 images of 8x8 through the network needs")
    assert cli("sample", run_dir, "--num", 4, "--batch-size", 4, "--steps", 2, "--out",
               tmp_path / "s", "--quiet") == 0


@pytest.mark.parametrize("args,says", [
    (["--num", 10**12], "sample.num=1,000,000,000,000 is more than"),
    (["--size", 100000], "sample.size=100,000 is more than"),
    (["--eta", 1e308, "--sampler", "ddim"], "sample.eta=1e+308: DDIM's eta runs from 0"),
    (["sample.guidance=1e308"], "sample.guidance=1e+308: use 0 to 100"),
])
def test_sampling_requests_beyond_reason_are_one_line(run_dir, tmp_path, capsys, args, says):
    one_line(capsys, "sample", run_dir, *args, "--out", tmp_path / "o", says=says)
    assert not (tmp_path / "o").exists()


def test_model_widths_beyond_the_machine_are_refused_before_anything_is_built(tmp_path, capsys):
    one_line(capsys, "train", *TINY_ARGS, "model.base_channels=65536", "model.norm_groups=1",
             "--out", tmp_path / "r", says="of memory and")
    assert not (tmp_path / "r").exists()
    # micro-batches of one image, but each step draws the global batch's noise whole
    one_line(capsys, "train", *TINY_ARGS, "train.batch_size=100000000",
             "train.grad_accum=100000000", "--out", tmp_path / "r",
             says="a step's noise and images of train.batch_size=100000000 needs")
    assert not (tmp_path / "r").exists()
    # a diffusers config asking for a 1 TiB network beside a small weights file
    folder = tmp_path / "hf"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({
        "sample_size": 32, "in_channels": 3, "out_channels": 3,
        "block_out_channels": [262144, 262144], "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"], "layers_per_block": 1,
        "downsample_padding": 0, "attention_head_dim": None, "norm_num_groups": 32}))
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(8, 3, 3, 3)},
              str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    one_line(capsys, "import", folder, "--out", tmp_path / "imp", says="do not fit")
    assert not (tmp_path / "imp").exists()


# --- honest results -------------------------------------------------------------------------------

def test_non_finite_weights_are_never_saved(tmp_path, capsys):
    out = tmp_path / "r"
    one_line(capsys, "train", *TINY_ARGS, "train.lr=1e308", "train.grad_clip=0",
             "train.max_nonfinite=1000", "--steps", 6, "train.checkpoint_every=2",
             "train.warmup_steps=0", "--out", out, "--quiet", says="diverged")
    for entry in RunDir(out).read_state()["checkpoints"]:
        from ddpmkit.run import load_run

        net = load_run(out, str(entry["step"])).net
        assert all(torch.isfinite(p).all() for p in net.parameters())


def test_a_class_name_that_is_a_formula_is_written_so_spreadsheets_do_not_run_it(tmp_path):
    from ddpmkit.outputs import read_manifest, write_manifest

    write_manifest(tmp_path / "m.csv",
                   [["a.png", "=cmd|'/C calc'!A0"], ["b.png", "+1"], ["c.png", "dog"],
                    ["d.png", "'=quoted"]],
                   ["file", "label"])
    cells = [row[1] for row in csv.reader(open(tmp_path / "m.csv"))][1:]
    assert cells == ["'=cmd|'/C calc'!A0", "'+1", "dog", "''=quoted"]
    assert ([row[1] for row in read_manifest(tmp_path / "m.csv")]
            == ["=cmd|'/C calc'!A0", "+1", "dog", "'=quoted"])  # each name as it was


@pytest.mark.parametrize("stream", [False, True])
def test_a_class_named_with_control_characters_is_refused(tmp_path, capsys, stream):
    """Class names are printed and written into reports: one that drives the terminal is not
    taken (a labels CSV's, a class folder's)."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(data / f"{i}.png")
    (data / "labels.csv").write_text("image,label\n0.png,cat\n1.png,\"dog\x1b]0;pwned\x07\"\n")
    one_line(capsys, "train", "--data", data, f"data.labels={data / 'labels.csv'}",
             f"data.stream={stream}",
             "--out", tmp_path / "run", *TINY_ARGS,
             says="has a class named 'dog\\x1b]0;pwned\\x07', which holds control characters")
    assert not (tmp_path / "run").exists()
    folders = os.fsencode(tmp_path / "folders")  # a class folder whose name is not UTF-8
    for name in (b"cat", b"bad\xff"):
        os.makedirs(os.path.join(folders, name))
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.fsdecode(os.path.join(folders, name,
                                                                                  b"0.png")))
    one_line(capsys, "train", "--data", os.fsdecode(folders), "model.class_conditional=true",
             f"data.stream={stream}", "--out", tmp_path / "run", *TINY_ARGS,
             says="bad\\udcff/0.png: this path is not valid UTF-8: rename it")
    assert not (tmp_path / "run").exists()
    os.rename(os.path.join(folders, b"bad\xff"), os.path.join(folders, b"dog"))  # a file, then
    os.rename(os.path.join(folders, b"dog", b"0.png"), os.path.join(folders, b"dog", b"\xff.png"))
    one_line(capsys, "train", "--data", os.fsdecode(folders), f"data.stream={stream}",
             "--out", tmp_path / "run", *TINY_ARGS,
             says="\\udcff.png: this path is not valid UTF-8: rename it")
    assert not (tmp_path / "run").exists()


def test_kid_has_no_spread_when_every_subset_is_the_whole_set():
    from ddpmkit.metrics.stats import kid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    mean, std = kid(a, b, subset_size=1000)
    assert np.isfinite(mean) and np.isnan(std)
    assert np.isfinite(kid(a, b, subset_size=20)[1])


# --- no litter ------------------------------------------------------------------------------------

def test_export_removes_what_a_killed_export_left(run_dir, tmp_path):
    out = tmp_path / "hf"
    orphan = tmp_path / ".hf.deadbeef.partial"
    orphan.mkdir()
    (orphan / ".ddpmkit-staging").write_text("123")
    (orphan / "weights").write_bytes(bytes(1000))
    foreign = tmp_path / ".hf.mine.partial"  # no staging mark: not ddpmkit's
    foreign.mkdir()
    assert cli("export", run_dir, "--out", out) == 0
    assert not orphan.exists() and foreign.exists() and (out / "model_index.json").is_file()


def test_a_sampling_job_that_makes_non_finite_images_fails_and_does_not_block_the_next(
        run_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from ddpmkit.checkpoint import file_sha256, save_checkpoint
    from ddpmkit.unet import UNet

    broken = copy_run(run_dir, tmp_path / "broken")
    run = RunDir(broken)
    entry = run.read_state()["checkpoints"][-1]
    path = run.checkpoint_file(entry["step"])
    tensors = load_file(str(path))
    net, ema = UNet(run.config().model, 8), UNet(run.config().model, 8)
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    ema.load_state_dict({k[4:]: v.fill_(float("nan")) for k, v in tensors.items()
                         if k.startswith("ema/")})
    save_checkpoint(path, net, ema, None, entry["step"])
    state = run.read_state()
    state["checkpoints"][-1]["sha256"] = file_sha256(path)  # as someone who edited it would
    run.write_state(state)
    out = tmp_path / "o"
    one_line(capsys, "sample", broken, "-n", 4, "--steps", 2, "--out", out, "--quiet",
             says="non-finite values")
    assert not list((out / "individual").glob("*.png"))  # no black images
    noisy, restored = _noisy(tmp_path / "noisy"), tmp_path / "d"
    one_line(capsys, "denoise", broken, noisy, "--sigma", 0.2, "--out", restored,
             says="non-finite values")
    assert not list(restored.glob("individual/*.png"))
    # not blocked by the failed job's record
    assert cli("sample", run_dir, "-n", 4, "--steps", 2, "--out", out, "--quiet") == 0
    assert len(list((out / "individual").glob("*.png"))) == 4


def test_sample_never_writes_into_a_split_or_class_folder_of_the_runs_data(tmp_path, capsys):
    data = tmp_path / "data"
    for split, cls, i in [(s, c, i) for s in ("train", "val") for c in ("a", "b") for i in (0, 1)]:
        (data / split / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 * i + (cls == "b") * 100, np.uint8)).save(
            data / split / cls / f"{i}.png")
    run = tmp_path / "run"
    assert cli("train", *TINY_ARGS, "--data", data, "data.split=train", "--steps", 2,
               "--out", run, "--quiet") == 0
    for out in (data / "train", data / "train" / "b", data / "val"):
        one_line(capsys, "sample", run, "-n", 2, "--steps", 2, "--out", out, "--force",
                 says=f"--out {out} holds 2 of the images in {run}'s data folder (e.g. 0.png)"
                 if out.name == "b" else "of the images in")
        assert not (out / ".ddpmkit.json").exists()
    assert cli("sample", run, "-n", 2, "--steps", 2, "--out", data / "train" / "gen", "--quiet",
               "--force") == 0
    # inside a folder of ddpmkit's own, no image of the data: written into
    assert cli("sample", run, "-n", 2, "--steps", 2, "--out", data / "train" / "gen" / "individual",
               "--quiet", "--force") == 0
    # a class folder linked in from elsewhere is the data's too
    store = tmp_path / "store" / "c"
    store.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(store / "linked.png")
    (data / "train" / "c").symlink_to(store, target_is_directory=True)
    one_line(capsys, "sample", run, "-n", 2, "--steps", 2, "--out", store, "--force",
             says="holds 1 of the images in")
    (data / "train" / "c").unlink()
    assert cli("train", *TINY_ARGS, "--data", data, "data.split=train", "--steps", 3,
               "--out", run, "--quiet") == 0  # resumes on the same four images


def test_sample_never_writes_into_the_runs_data_and_gif_replaces_only_a_gif(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(data / f"{i}.png")
    run = tmp_path / "run"
    assert cli("train", *TINY_ARGS, "--data", data, "--steps", 2, "train.sample_every=2",
               "--out", run, "--quiet") == 0
    for out in (data, tmp_path):
        one_line(capsys, "sample", run, "-n", 2, "--steps", 2, "--out", out, "--force",
                 says="training data: write the images into a folder of their own")
    inputs = tmp_path / "in"  # nor does a restoration (its record would hide the data)
    inputs.mkdir()
    Image.fromarray(np.full((8, 8), 99, np.uint8)).save(inputs / "x.png")
    one_line(capsys, "denoise", run, inputs, "--sigma", 0.1, "--out", data, "--force",
             says="training data: write the images into a folder of their own")
    assert not (data / ".ddpmkit.json").exists()
    assert cli("sample", run, "-n", 2, "--steps", 2, "--out", data / "generated", "--quiet") == 0
    photo = data / "0.png"
    before = photo.read_bytes()
    one_line(capsys, "gif", run, "--out", photo, says="a GIF's name ends in .gif")
    (tmp_path / "photo.gif").write_bytes(before)  # a PNG under a GIF's name
    one_line(capsys, "gif", run, "--out", tmp_path / "photo.gif", says="is not a GIF")
    assert photo.read_bytes() == before == (tmp_path / "photo.gif").read_bytes()
    for _ in range(2):  # its own GIF it replaces
        assert cli("gif", run, "--out", tmp_path / "learning.gif") == 0
    for folder in ("checkpoints", "grids"):  # the run's own folders, which it prunes
        said = one_line(capsys, "gif", run, "--out", run / folder / "x.gif",
                        says=f"is inside the {folder}/ folder that training keeps in run")
        assert said.endswith(f"e.g. --out {run.resolve() / 'learning.gif'}"), said
    assert cli("gif", run) == 0 and (run / "learning.gif").is_file()


def test_a_huge_stats_file_is_read_in_bounded_memory_and_thinned_for_the_report(
        run_dir, tmp_path):
    """A run's stats.jsonl of 100,000 rows (or a crafted one of any length): the report plots at
    most 20,000 evenly spaced rows, and a line longer than any row ddpmkit writes is left out."""
    run = copy_run(run_dir, tmp_path / "run")
    rows = "".join(f'{{"step": {i}, "loss": {1 / (i + 1)}}}\n' for i in range(1, 100_001))
    (run / "stats.jsonl").write_text('{"step": 0, "loss": "' + "x" * 3_000_000 + '"}\n' + rows)
    kept = RunDir(run).read_stats()
    steps = [r["step"] for r in kept]
    assert len(kept) == 12_500 and steps == list(range(1, 100_001, 8))  # thinned by 8, evenly
    assert cli("report", run) == 0 and (run / "report.html").stat().st_size < 5_000_000
    RunDir(run).truncate_stats(50)
    assert [r["step"] for r in RunDir(run).read_stats()] == list(range(1, 51))


def test_large_photos_are_resized_as_they_are_read_and_full_size_reads_are_checked(
        tmp_path, monkeypatch, capsys):
    """A folder of 3000x3000 photos (27 MB each decoded) trained at 8x8: each is resized before
    the next is decoded, so the set is never held at full size; a command that keeps them at full
    size (eval) checks the size their headers declare against memory first."""
    import ddpmkit.data
    import ddpmkit.limits
    import ddpmkit.pixels

    (tmp_path / "photos" / "individual").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (3000, 3000), (40 * i, 0, 0)).save(
            tmp_path / "photos" / "individual" / f"{i}.png")
    events, read, resize = [], ddpmkit.pixels.read_pixels, ddpmkit.data.resize_center_crop
    monkeypatch.setattr(ddpmkit.pixels, "read_pixels", lambda p: events.append("read") or read(p))
    monkeypatch.setattr(ddpmkit.data, "resize_center_crop",
                        lambda x, s: events.append("fit") or resize(x, s))
    monkeypatch.setattr(ddpmkit.limits, "available_memory", lambda: 100_000_000)
    data = load_images(DataConfig(path=str(tmp_path / "photos"), image_size=8))
    assert data.images.shape == (6, 3, 8, 8) and events[:12] == ["read", "fit"] * 6
    one_line(capsys, "eval", tmp_path / "photos", "--ref", tmp_path / "photos",
             "--features", "classifier", says="decoding the images in")


@pytest.mark.parametrize("files", [{"memory.max": "500000000\n", "memory.current": "300000000\n"},
                                   {"memory/memory.limit_in_bytes": "500000000\n",
                                    "memory/memory.usage_in_bytes": "300000000\n"}])
def test_a_containers_memory_limit_bounds_what_is_available(tmp_path, monkeypatch, files):
    """In a container (a memory cgroup, v2 or v1) of 500 MB with 300 MB used, 200 MB is left,
    whatever the host has: every memory check counts against that."""
    import ddpmkit.limits

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(ddpmkit.limits, "CGROUP", tmp_path)
    assert ddpmkit.limits.available_memory() == 200_000_000
    with pytest.raises(UserError, match="needs 0.2 GiB of memory and 0.2 GiB is available"):
        ddpmkit.limits.check_memory(200_000_001, "x", "y")
    (tmp_path / "memory.max").write_text("max\n")  # v2 without a limit: the host's memory
    assert ddpmkit.limits.available_memory() == ddpmkit.limits._system_memory()


@pytest.mark.parametrize("metadata, command", [
    ({"step": "abc"}, "sample"), ({"extra": "[1, 2"}, "sample"), ({"step": "-5"}, "export"),
    ({"optimizer": '{"param_groups": [], "scalars": {"x/y/z": 1}}'}, "train"),
])
def test_a_checkpoint_with_crafted_metadata_is_one_line(run_dir, tmp_path, capsys, metadata,
                                                        command):
    """A received run whose checkpoint's metadata was changed and whose state.json was re-signed
    to match: sample, export and a resume each say which file, in one line."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ddpmkit.checkpoint import file_sha256

    run = copy_run(run_dir, tmp_path / "run")
    path = next((run / "checkpoints").glob("step_*.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(path), metadata=meta | metadata)
    state = json.loads((run / "state.json").read_text())
    for entry in state["checkpoints"]:
        entry["sha256"] = file_sha256(run / entry["file"])
    (run / "state.json").write_text(json.dumps(state))
    args = {"sample": ["sample", run, "-n", 1, "--steps", 2, "--out", tmp_path / "s"],
            "export": ["export", run, "--out", tmp_path / "e"],
            "train": ["train", *TINY_ARGS, "--steps", 6, "train.checkpoint_every=2",
                      "train.keep_last=1", "--out", run]}[command]
    one_line(capsys, *args, says=f"{path.name}")


@pytest.mark.parametrize("env, says", [
    ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE='abc' is no number"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "environment variable LOCAL_RANK='x' is no number"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but MASTER_ADDR is not: start the job with"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "WORLD_SIZE=2 is set but MASTER_PORT is not"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"},
     "environment variable MASTER_PORT='http' is no number"),
])
def test_torchrun_variables_left_in_the_environment_are_one_line(run_dir, tmp_path, capsys,
                                                                 monkeypatch, env, says):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    one_line(capsys, "sample", run_dir, "-n", 1, "--steps", 2, "--out", tmp_path / "s",
             says=says)


def test_control_characters_in_a_named_path_cannot_reach_the_terminal(tmp_path, capsys):
    """A crafted folder name could recolour the terminal, move its cursor or split the one-line
    error; errors show such characters as escapes."""
    crafted = tmp_path / "runs\x1b[2J\x1b]0;pwned\x07\nnext\u202e"
    assert main(["sample", str(crafted), "-n", "1", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\u202e" not in err, err
    assert "runs\\x1b[2J\\x1b]0;pwned\\x07\\x0anext\\u202e" in err


def test_torchrun_variables_naming_no_peer_say_so_and_fail_in_one_line(tmp_path, capsys,
                                                                       monkeypatch):
    """WORLD_SIZE and MASTER_ADDR left from another job: the wait is announced, bounded by
    train.dist_timeout_minutes, and ends in one line rather than a traceback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    assert cli("train", *TINY_ARGS, "--steps", 2, "--out", tmp_path / "run",
               "train.dist_timeout_minutes=0.02") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(
        f"ddpmkit: process 0 of 2 joining at 127.0.0.1:{port}"), err
    assert err[1].startswith("ddpmkit: error: the 2 processes did not all join"), err
    assert not (tmp_path / "run").exists()


def test_a_reader_that_stops_reading_is_no_error():
    """`ddpmkit info RUN --json | head`: the closed pipe ends the command quietly."""
    code = ("import sys, ddpmkit.cli as c\n"
            "def stopped(ns):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
            "c.COMMANDS['info'] = stopped\nsys.exit(c.main(['info']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stderr == "", done.stderr


def test_one_huge_grid_cannot_make_the_learning_gif_take_every_frame_that_size(
        run_dir, tmp_path, capsys, monkeypatch):
    """Every frame is padded to the largest grid: one planted 3000x3000 grid (a 30 KB file) made
    a GIF of a few dozen small grids take gigabytes. gif refuses in one line; the report leaves
    its animation out and says why."""
    import shutil

    import ddpmkit.limits

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    Image.new("RGB", (3000, 3000), (10, 20, 30)).save(run / "grids" / "step_000000001.png")
    monkeypatch.setattr(ddpmkit.limits, "available_memory", lambda: 100_000_000)
    one_line(capsys, "gif", run, "--out", tmp_path / "l.gif",
             says="training grids of 3000x3000 needs")
    assert not (tmp_path / "l.gif").exists()
    assert cli("report", run) == 0
    assert "no learning GIF in the report" in capsys.readouterr().err
    assert "alt='learning GIF'" not in (run / "report.html").read_text()


def test_a_restoration_is_checked_against_memory_before_its_folder_is_claimed(
        run_dir, tmp_path, capsys, monkeypatch):
    """Only the decoding of the inputs was checked: a large image's float working set and a huge
    --batch-size of tiles per network call took many times that."""
    import ddpmkit.limits

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((1000, 1000), 99, np.uint8)).save(inputs / "big.png")
    monkeypatch.setattr(ddpmkit.limits, "available_memory", lambda: 40_000_000)
    one_line(capsys, "denoise", run_dir, inputs, "--sigma", 0.1, "--out", tmp_path / "a",
             says="a batch of 1 image(s) of 1000x1000 and 64 images or tiles per network call")
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(ddpmkit.limits, "available_memory", lambda: 500_000_000)
    one_line(capsys, "denoise", run_dir, inputs, "--sigma", 0.1, "--out", tmp_path / "a",
             "--batch-size", 10_000_000, says="27889 images or tiles per network call")
    monkeypatch.setattr(ddpmkit.limits, "available_memory", lambda: 4_000_000_000)
    # one image of the model's size is one image per call, whatever --batch-size allows
    import ddpmkit.restoration

    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.full((8, 8), 99, np.uint8)).save(small / "x.png")
    monkeypatch.setattr(ddpmkit.restoration, "sampling_bytes", lambda *_: 1_000_000_000)
    assert cli("denoise", run_dir, small, "--sigma", 0.1, "--out", tmp_path / "b",
               "--quiet") == 0


def test_training_with_activation_checkpointing_still_counts_the_optimizer_state(monkeypatch):
    """Checkpointing leaves activations out of the estimate, not the gradients, AdamW's moments
    and the EMA: memory for the weights alone is not enough to train."""
    import ddpmkit.limits
    from ddpmkit.config import ModelConfig
    from ddpmkit.unet import BYTES_PER_PARAMETER, check_fits, count_parameters, measure

    cfg = ModelConfig(in_channels=1,
                      **{k.split(".")[1]: v for k, v in TINY.items() if k.startswith("model.")})
    params = count_parameters(measure(cfg, 8)[0])
    monkeypatch.setattr(ddpmkit.limits, "available_memory",
                        lambda: params * BYTES_PER_PARAMETER // 2)
    check_fits(cfg, 8, torch.device("cpu"))  # sampling: the weights fit
    with pytest.raises(UserError, match=f"the UNet \\({params:,} parameters\\) needs"):
        check_fits(cfg, 8, torch.device("cpu"), batch=0)


def test_an_edited_manifest_row_is_not_a_finished_image(tmp_path):
    """An index of "²" passes str.isdigit and fails int(); a nearest distance that is no number."""
    from ddpmkit.generation import MANIFEST_COLUMNS, finished_rows

    (tmp_path / "individual").mkdir()
    (tmp_path / "individual" / "000002.png").write_bytes(b"")
    rows = [MANIFEST_COLUMNS, ["individual/000002.png", "²", "0", "ddim", "3", "c", "", "true"],
            ["individual/000002.png", "2", "0", "ddim", "3", "c", "", "true"]]
    (tmp_path / "manifest.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    assert list(finished_rows(tmp_path)) == [2]
    # with --drop-copies, a nearest distance that is not a number: the image is drawn again
    for nearest, finished in (("0.25", [2]), ("abc", []), ("nan", []), ("", [])):
        row = ["individual/000002.png", "2", "0", "ddim", "3", "c", "", "true", nearest]
        (tmp_path / "manifest.csv").write_text(",".join([*MANIFEST_COLUMNS, "nearest"]) + "\n"
                                               + ",".join(row) + "\n")
        assert list(finished_rows(tmp_path)) == finished, nearest
