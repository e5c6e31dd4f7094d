"""Generation jobs: resumable after kill -9, refusing to mix jobs, sharded under torchrun, GIFs."""

import csv
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.samplers import SAMPLERS
from test_cli import TINY_ARGS


def cli(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    assert cli("train", *TINY_ARGS, "--steps", 10, "train.sample_every=5", "--out",
               out, "--quiet") == 0
    return out


def rows(out):
    return list(csv.DictReader(open(out / "manifest.csv")))


def test_killed_job_resumes_to_the_same_complete_set(run_dir, tmp_path):
    """kill -9 a 2,000-image job mid-way, rerun it: complete, nothing truncated, same bytes as one
    uninterrupted run."""
    base = [sys.executable, "-m", "ddpmkit", "sample", str(run_dir), "--num", "2000", "--steps",
            "4", "--batch-size", "50", "--sampler", "dpmpp-2m", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(base + ["--out", str(tmp_path / "straight")], check=True, env=env,
                   capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(base + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = out / ".manifest-rank0.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not partial.exists() or partial.stat().st_size < 20_000):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.csv").exists()  # it really was interrupted
    rerun = subprocess.run(base + ["--out", str(out)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0 and "resuming:" in rerun.stdout
    assert len(rows(out)) == 2000 and rows(out) == rows(tmp_path / "straight")
    assert not list(out.glob(".manifest-rank*")) and not list((out / "individual").glob(".*tmp"))
    for i in range(2000):
        name = f"individual/{i:06d}.png"
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


@pytest.mark.parametrize("flags,message", [
    (["--sampler", "dpmpp-2m", "--eta", "0.5"],
     "sample.eta=0.5 applies to the ddim sampler only, not dpmpp-2m"),
    (["--sampler", "ddim", "sample.variance=large"],
     "sample.variance=large applies to the ddpm sampler only"),
    (["--guidance", "2"], "is not class-conditional, so there is nothing to guide"),
    (["--class", "3"], "--class 3: "),
])
def test_options_the_job_would_ignore_are_refused_before_anything_is_written(
        run_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    assert cli("sample", run_dir, "-n", 2, "--steps", 2, "--out", out, *flags) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_the_python_api_refuses_what_its_sampler_would_ignore_as_the_cli_does(run_dir):
    from ddpmkit import UserError, load_run, sample

    run = load_run(run_dir)
    for options, message in [({"sampler": "dpmpp-2m", "eta": 0.5},
                              "sample.eta=0.5 applies to the ddim sampler only"),
                             ({"sampler": "ddim", "eta": 0.5, "variance": "large"},
                              "sample.variance=large applies to the ddpm sampler only"),
                             ({"guidance": 2.0},
                              "is not class-conditional, so there is nothing to guide"),
                             # checked as the command line checks them, never read loosely
                             ({"sampler": "ddpm", "variance": "Small"}, "sample.variance: 'Small'"),
                             ({"clip_x0": "false"}, "sample.clip_x0: expected true or false"),
                             ({"spacing": "bogus"}, "sample.spacing: 'bogus'"),
                             ({"num": 0}, "sample.num: must be positive"),
                             ({"size": 4}, "sample.size (--size) 4 is below the model's 8x8"),
                             ({"steps": 2.5}, "sample.steps: expected an integer")]:
        with pytest.raises(UserError, match=re.escape(message)):
            sample(run, **{"num": 1, "steps": 2, **options})
    # what applies is taken
    assert sample(run, num=1, steps=2, sampler="ddpm", variance="large").shape[0] == 1
    assert sample(run, num=1, steps=2, sampler="ddim", eta=1.0).shape[0] == 1


def test_options_from_the_runs_own_config_are_not_refused(tmp_path):
    """An import of a fixed_large DDPM scheduler records
    sample.variance=large; other samplers just do not use it."""
    run = tmp_path / "run"
    assert cli("train", *TINY_ARGS, "sample.variance=large", "--steps", 2, "--out",
               run, "--quiet") == 0
    assert cli("sample", run, "-n", 2, "--steps", 2, "--sampler", "dpmpp-2m", "--out",
               tmp_path / "s", "--quiet") == 0


def test_a_torn_partial_manifest_line_is_dropped_on_resume(run_dir, tmp_path):
    """kill -9 in the middle of appending a row: the rerun completes in one go, the row redone."""
    straight, out = tmp_path / "straight", tmp_path / "torn"
    for folder in (straight, out):
        assert cli("sample", run_dir, "--num", 4, "--steps", 2, "--batch-size", 2, "--out",
                   folder, "--quiet") == 0
    lines = (out / "manifest.csv").read_text().splitlines(keepends=True)
    (out / "manifest.csv").unlink()
    # header dropped, as partials have none
    (out / ".manifest-rank0.csv").write_text("".join(lines[1:3]) + lines[3][:9])
    assert cli("sample", run_dir, "--num", 4, "--steps", 2, "--batch-size", 2, "--out",
               out, "--quiet") == 0
    assert rows(out) == rows(straight)


def test_another_job_in_the_same_folder_is_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli("sample", run_dir, "--num", 3, "--steps", 3, "--out", out) == 0
    assert cli("sample", run_dir, "--num", 3, "--steps", 3, "--seed", 5, "--out", out) == 2
    assert "seed: 0 -> 5" in capsys.readouterr().err
    for name, tool in (("audit.json", "audit"), ("eval_inception.json", "eval")):
        (out / name).write_text(f'{{\n "written_by": "ddpmkit {tool}"}}')  # as they write them
    assert cli("sample", run_dir, "--num", 3, "--steps", 3, "--seed", 5, "--out",
               out, "--fresh") == 0
    assert [r["seed"] for r in rows(out)] == ["5"] * 3
    # what described the replaced images went with them
    assert not (out / "audit.json").exists() and not (out / "eval_inception.json").exists()


def test_fresh_replaces_only_a_sampling_job(run_dir, tmp_path, capsys):
    grids = sorted((run_dir / "grids").iterdir())
    # the run's own folder
    assert cli("sample", run_dir, "--num", 2, "--out", run_dir, "--fresh") == 2
    assert (f"--out {run_dir} is a training run: write the images into a folder of their own"
            in capsys.readouterr().err)
    assert sorted((run_dir / "grids").iterdir()) == grids
    out = tmp_path / "photos"
    (out / "individual").mkdir(parents=True)
    (out / "individual" / "holiday.png").write_bytes(b"not ours")
    assert cli("sample", run_dir, "--num", 2, "--steps", 2, "--out", out, "--fresh") == 2
    assert "holds images no ddpmkit sampling job made there" in capsys.readouterr().err
    assert (out / "individual" / "holiday.png").read_bytes() == b"not ours"


def test_a_larger_num_extends_the_job(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli("sample", run_dir, "--num", 4, "--steps", 3, "--out", out) == 0
    first = (out / "individual" / "000002.png").read_bytes()
    assert cli("sample", run_dir, "--num", 9, "--steps", 3, "--out", out) == 0
    said = capsys.readouterr().out
    assert ("4 of 9 images already" in said
            and f"wrote 5 images to {out}/individual (4 were there)" in said)
    assert len(rows(out)) == 9 and (out / "individual" / "000002.png").read_bytes() == first
    # a smaller --num after a larger one: nothing to
    # make, and the summary says what the folder holds
    assert cli("sample", run_dir, "--num", 3, "--steps", 3, "--out", out) == 0
    said = capsys.readouterr().out
    assert (f"all 3 images were already in {out}/individual (it holds 9: an earlier run of this "
            f"job made more); no grid" in said)
    assert len(rows(out)) == 9


def test_results_about_a_jobs_images_go_when_its_manifest_changes(run_dir, tmp_path):
    """audit.json and eval_*.json describe the images a manifest listed: a rerun that lists the
    same keeps them, one that lists others removes them (stale), and nothing else goes."""
    out = tmp_path / "o"
    assert cli("sample", run_dir, "--num", 4, "--steps", 3, "--out", out) == 0
    from ddpmkit.outputs import PAGE_HEAD

    for name, text in (("audit.json", '{\n "written_by": "ddpmkit audit"}'),  # as they write them
                       ("audit.html", f"{PAGE_HEAD}audit</title>"),
                       ("eval_classifier.json", '{\n "written_by": "ddpmkit eval"}'),
                       ("notes.txt", "{}")):
        (out / name).write_text(text)
    assert cli("sample", run_dir, "--num", 4, "--steps", 3, "--out", out) == 0  # the same job
    assert (out / "audit.json").is_file() and (out / "eval_classifier.json").is_file()
    assert cli("sample", run_dir, "--num", 6, "--steps", 3, "--out", out, "--force") == 0
    assert not [p for p in ("audit.json", "audit.html", "eval_classifier.json")
                if (out / p).exists()]
    assert (out / "notes.txt").read_text() == "{}" and len(rows(out)) == 6


def test_results_about_a_job_still_writing_are_refused_or_removed(run_dir, tmp_path, capsys):
    """Audit or eval of a folder a job is writing would describe half its images: refused while
    the job holds the folder, and results left from an interrupted job's images go when it ends."""
    from ddpmkit import atomic

    out = tmp_path / "o"
    assert cli("sample", run_dir, "--num", 4, "--steps", 3, "--out", out) == 0
    (out / "manifest.csv").unlink()  # as an interrupted job leaves it: no manifest.csv yet
    (out / "audit.json").write_text('{\n "written_by": "ddpmkit audit"}')
    plain = tmp_path / "plain"  # a folder of images evaluated against the one being written
    plain.mkdir()
    for i in range(2):
        Image.new("L", (8, 8), 60 * i).save(plain / f"{i}.png")
    with atomic.FolderLock(out, "sample"):  # the folder, one inside it, and one holding it
        for command in (("audit", out, "--ref", run_dir, "--features", "none"),
                        ("audit", out / "individual", "--ref", run_dir, "--features", "none"),
                        ("audit", tmp_path, "--ref", run_dir, "--features", "none"),
                        ("eval", out, "--ref", run_dir, "--features", "classifier"),
                        ("eval", plain, "--ref", out / "individual", "--features",
                         "classifier")):
            capsys.readouterr()
            assert cli(*command) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"a ddpmkit sample (pid {os.getpid()}" in err[0], err
            assert "is writing to" in err[0] and "wait for it to finish" in err[0]
    assert cli("sample", run_dir, "--num", 4, "--steps", 3, "--out", out) == 0
    assert not (out / "audit.json").exists() and len(rows(out)) == 4


def test_a_folder_another_version_wrote_is_refused_until_its_record_goes(run_dir, tmp_path,
                                                                         capsys):
    """What another version's record says is not read (nor is it taken for no record, which would
    skip its provenance checks); without the record its images are a plain folder."""
    out = tmp_path / "o"
    assert cli("sample", run_dir, "--num", 4, "--steps", 3, "--out", out) == 0
    record = json.loads((out / ".ddpmkit.json").read_text())
    (out / ".ddpmkit.json").write_text(json.dumps({**record, "format": "ddpmkit-output/1"}))
    for command in (("sample", run_dir, "--num", 4, "--steps", 3, "--out", out),
                    ("sample", run_dir, "--num", 4, "--steps", 3, "--out", out, "--fresh"),
                    ("audit", out, "--ref", run_dir, "--features", "none"), ("audit", out)):
        capsys.readouterr()
        assert cli(*command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "was written by another version of ddpmkit" in err[0], err
        assert f"or delete {out / '.ddpmkit.json'} to use its images as a plain folder" in err[0]
    assert len(list((out / "individual").iterdir())) == 4
    (out / ".ddpmkit.json").unlink()
    assert cli("audit", out, "--ref", run_dir, "--features", "none") == 0


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_from_the_cli(run_dir, tmp_path, sampler):
    out = tmp_path / sampler
    assert cli("sample", run_dir, "--num", 2, "--sampler", sampler, "--steps", 3, "--spacing",
               "karras", "--out", out, "--gif") == 0
    assert len(rows(out)) == 2 and rows(out)[0]["sampler"] == sampler
    with Image.open(out / "trajectory.gif") as gif:  # noise and 3 steps (the image library
        durations = []                                # merges equal neighbours, adding durations)
        for k in range(gif.n_frames):
            gif.seek(k)
            durations.append(gif.info["duration"])
        assert sum(durations) == 3 * 80 + 1500


def test_a_sampler_default_longer_than_the_schedule_is_capped_at_T(tmp_path):
    run = tmp_path / "run"
    assert cli("train", *TINY_ARGS, "diffusion.num_timesteps=8", "sample.steps=null", "--steps", 2,
               "--out", run, "--quiet") == 0
    out = tmp_path / "gen"
    # dpmpp-2m's default 20 steps > T = 8
    assert cli("sample", run, "--num", 2, "--out", out, "--quiet") == 0
    assert {r["steps"] for r in rows(out)} == {"8"}


def test_torchrun_ranks_share_the_work_and_match_one_process(run_dir, tmp_path):
    # -n, not --num: torchrun's parser takes --num as an abbreviation of its own --numa-binding
    args = ["sample", str(run_dir), "-n", "10", "--steps", "3", "--batch-size", "3", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ddpmkit", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29517", "-m", "ddpmkit", *args, "--out",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert rows(tmp_path / "two") == rows(tmp_path / "one")
    for i in range(10):
        name = f"individual/{i:06d}.png"
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_learning_gif_from_training_grids(run_dir, capsys):
    assert cli("gif", run_dir) == 0
    with Image.open(run_dir / "learning.gif") as gif:
        assert gif.n_frames == 2  # grids at steps 5 and 10
    assert "learning.gif" in capsys.readouterr().out


def test_gif_of_a_folder_that_is_not_a_training_run_says_so(run_dir, tmp_path, capsys):
    images = tmp_path / "images"
    # a folder of images
    assert cli("sample", run_dir, "-n", 2, "--steps", 2, "--out", images, "--quiet") == 0
    capsys.readouterr()
    for folder, says in ((images, f"{images} is not a ddpmkit training run"),
                         (tmp_path / "nowhere", "not found")):
        assert cli("gif", folder) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and "grids" not in err[0], err
    assert not (images / "learning.gif").exists()
    for args, says in ((["--out", tmp_path],
                        f"--out {tmp_path} is a folder: give the GIF's file name"),
                       (["--frame-ms", 0], "--frame-ms 0: a GIF frame lasts 10 to 655350 ms"),
                       (["--frame-ms", 5], "--frame-ms 5: a GIF frame lasts 10 to 655350 ms"),
                       (["--frame-ms", 10**8], "a GIF frame lasts 10 to 655350 ms")):
        assert cli("gif", run_dir, *args) == 2 and says in capsys.readouterr().err
    other = tmp_path / "other"  # another run's learning.gif is not this run's to replace
    shutil.copytree(run_dir, other)
    assert cli("gif", other) == 0
    made = (other / "learning.gif").read_bytes()
    assert cli("gif", run_dir, "--out", other / "learning.gif") == 2
    assert f"is inside {other}, another training run" in capsys.readouterr().err
    assert (other / "learning.gif").read_bytes() == made
    assert cli("info", run_dir, "--batch-sizes", "8,0") == 2
    assert ("--batch-sizes takes comma-separated positive integers, got '8,0'"
            in capsys.readouterr().err)


def test_sampling_says_which_grids_it_wrote(run_dir, tmp_path, capsys):
    """Grids need 16 images or more: --num 2 used to say
    it wrote grids to OUT/grids, which did not exist."""
    assert cli("sample", run_dir, "--num", 2, "--steps", 2, "--out",
               tmp_path / "two", "--quiet") == 0
    out = capsys.readouterr().out
    assert "no grid (one needs at least 16 images)" in out and "grids to" not in out
    assert not (tmp_path / "two" / "grids").exists()
    assert cli("sample", run_dir, "--num", 16, "--steps", 2, "--out",
               tmp_path / "sixteen", "--quiet") == 0
    assert f"grids grid_4x4.png to {tmp_path / 'sixteen'}/grids;" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "sixteen" / "grids").iterdir()] == ["grid_4x4.png"]


def test_bf16_weights_sample_as_autocast_does(run_dir):
    """On a GPU `ddpmkit sample` loads the weights in bf16 (load_run's dtype) and feeds the network
    bf16 instead of autocasting fp32 weights on every call: images stay fp32 and agree with the
    autocast ones, and with fp32's, to bf16's precision."""
    import torch

    from ddpmkit.generation import SamplingSpec, sample_batch
    from ddpmkit.run import load_run
    from ddpmkit.samplers import Denoiser

    bf16, images = torch.bfloat16, list(range(16))
    fp32_run, bf16_run = load_run(run_dir), load_run(run_dir, dtype=bf16)
    assert {p.dtype for p in bf16_run.net.parameters()} == {bf16}
    ddim = SamplingSpec("ddim", 10)
    reference = sample_batch(fp32_run, images, 0, ddim)
    autocast = sample_batch(fp32_run, images, 0, ddim, amp_dtype=bf16)
    cast = sample_batch(bf16_run, images, 0, ddim, amp_dtype=bf16)
    assert cast.dtype == torch.float32 and cast.shape == reference.shape
    # bf16 rounding grows along 10 steps of a barely trained net: the two bf16 paths are equally
    # close to fp32 (mean 0.0021 and 0.0020 here; largest single values 0.066 and 0.058)
    fp32_gap, autocast_gap = (cast - reference).abs().mean(), (autocast - reference).abs().mean()
    assert (fp32_gap < 0.005 and fp32_gap < 1.5 * autocast_gap
            and (cast - autocast).abs().max() < 0.15)
    denoiser = Denoiser(bf16_run.net, bf16_run.schedule, "eps", amp_dtype=bf16)
    # no autocast around bf16 weights: the inputs are cast instead
    assert denoiser.input_dtype == bf16
    assert Denoiser(fp32_run.net, fp32_run.schedule, "eps", amp_dtype=bf16).input_dtype is None


def test_the_python_api_refuses_what_it_would_ignore_as_the_command_line_does(run_dir, tmp_path):
    import torch

    from ddpmkit import generate, load_run, sample
    from ddpmkit.config import updated
    from ddpmkit.errors import UserError
    from ddpmkit.run import RunDir

    run = load_run(run_dir)
    for option in ({"ema": False}, {"checkpoint": "5"}, {"device": "cpu"}):
        with pytest.raises(UserError, match=f"sample.. option {next(iter(option))}: not a "
                                            f"sampling option .* load_run's to choose"):
            sample(run, num=1, steps=2, **option)
    asked = updated(RunDir(run_dir).config(), {"sample.num": 1, "sample.steps": 2,
                                               "sample.out_dir": str(tmp_path / "o")}).sample
    for key, value, says in (("checkpoint", "5", "was loaded with checkpoint='latest'"),
                             ("ema", False, "was loaded with ema=True"),
                             ("guidance", 2.0, "is not class-conditional")):
        with pytest.raises(UserError, match=says):
            generate(run, updated_sample(asked, key, value), progress=False, log=lambda m: None)
    assert not (tmp_path / "o").exists()
    raw = load_run(run_dir, checkpoint=10, ema=False)
    out = generate(raw, updated_sample(updated_sample(asked, "checkpoint", "10"), "ema", False),
                   progress=False, log=lambda m: None)
    assert rows(out)[0]["checkpoint"] == "step_000000010.safetensors"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device cuda asked for, but this PyTorch sees no CUDA"):
            load_run(run_dir, device="cuda")


def updated_sample(section, key, value):
    import dataclasses

    return dataclasses.replace(section, **{key: value})

