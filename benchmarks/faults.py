"""Fault trials too long for the test suite. Prints JSON.

    python benchmarks/faults.py                 # all of the trials below
    python benchmarks/faults.py --train-kills 50 --ddp-train-kills 0

1. kill -9 a training run at a random moment, rerun the same command: the final weights must equal
   an uninterrupted run's bitwise, every checkpoint recorded in state.json must still verify
   (bytes lost = size of recorded files that are missing or damaged), and no temp file may remain.
2. The same for a 600-image sampling job: the final images must equal an uninterrupted job's.
3. Both again under torchrun (2 CPU processes, gloo), killing either the whole job (a lost machine)
   or one worker (the out-of-memory killer): the launcher must exit on its own, no worker may be
   left running, and rerunning the same command must end where an uninterrupted job ends.
4. Bad inputs: each must end with exit code 2 and a one-line `ddpmkit: error:` naming the problem
   (or, for unreadable images under data.on_error=skip, train and report them), never a traceback.
5. Hostile and careless inputs (hostile_trials): files a run or output folder was sent with, bombs
   that declare far more than they hold, requests beyond the machine. Each runs in its own process;
   handled means the expected exit and one line, nothing deleted outside what ddpmkit wrote,
   nothing executed, and a peak memory (the process's max RSS) far below what was declared.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.checkpoint import file_sha256  # noqa: E402
from ddpmkit.cli import main  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from processes import process_tree, worker_rank  # noqa: E402

TINY = ["model.base_channels=16", "model.norm_groups=8", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "diffusion.num_timesteps=100", "train.batch_size=32",
        "train.warmup_steps=5", "train.log_every=5", "train.sample_every=1000",
        "train.grid_steps=5", "train.grid_images=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def ddpmkit(*args) -> list[str]:
    return [sys.executable, "-m", "ddpmkit", *map(str, args)]


def kill_at_random(cmd: list[str], low: float, high: float, rng: random.Random) -> float:
    delay = rng.uniform(low, high)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return delay


def torchrun(*args) -> list[str]:
    """2 workers; --standalone picks a free port for every job,
    so trials (and a test run beside them) never collide."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "ddpmkit", *map(str, args)]


def start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat),
    which tells a pid from its reuse; None once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def kill_all(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_to_end(cmd: list[str], timeout: float = 600) -> tuple[int | None, str]:
    """(exit code, or None if it hung past the timeout and
    was killed with all its processes; stderr's tail)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        return proc.wait(timeout=timeout), proc.stderr.read()[-300:]
    except subprocess.TimeoutExpired:
        kill_all(process_tree(proc.pid))
        proc.wait()
        return None, f"hung for {timeout} s"


def crash_torchrun(cmd: list[str], low: float, high: float, rng: random.Random, progress) -> dict:
    """Start a torchrun job, then kill -9 either all of it or one worker at a random moment.
    progress() says how far the job had got just before the kill."""
    delay = rng.uniform(low, high)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    tree = {pid: start_time(pid) for pid in process_tree(proc.pid) if pid != proc.pid}
    done = progress()
    wanted = rng.choice(["whole job", 0, 1])
    victims = ([p for p in tree if worker_rank(p) == wanted] if wanted != "whole job"
               else [proc.pid, *tree])
    victim = wanted if victims else "whole job"  # that worker had not started yet
    kill_all(victims or [proc.pid, *tree])
    t0 = time.perf_counter()
    try:
        proc.wait(timeout=180)
        hung = False
    except subprocess.TimeoutExpired:  # the launcher waits on a worker that waits on a dead peer
        hung = True
        kill_all(process_tree(proc.pid))
        proc.wait()
    exit_s = time.perf_counter() - t0
    deadline = time.time() + 10  # a process killed mid-write may take a moment to go

    def still_running():  # the same processes, not later ones that reuse their pids
        return [p for p, started in tree.items() if started is not None
                and start_time(p) == started]

    while (left := still_running()) and time.time() < deadline:
        time.sleep(0.1)
    kill_all(left)
    return {"kill_s": round(delay, 2), "done_at_kill": done,
            "victim": f"rank {victim}" if victim != "whole job" else victim,
            "launcher_exit_s": round(exit_s, 1), "hung": hung, "workers_left": len(left)}


def saved_step(run: Path) -> int:
    state = run / "state.json"
    return (max((e["step"] for e in json.loads(state.read_text())["checkpoints"]), default=0)
            if state.exists() else 0)


def recorded_bytes_lost(run: Path) -> int:
    state_path = run / "state.json"
    if not state_path.exists():
        return 0
    lost = 0
    for entry in json.loads(state_path.read_text())["checkpoints"]:
        path = run / entry["file"]
        if not path.exists() or file_sha256(path) != entry["sha256"]:
            lost += path.stat().st_size if path.exists() else 1
    return lost


def temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*.tmp")]


def train_trials(n: int, work: Path, rng: random.Random) -> dict:
    args = [*TINY, "train.max_steps=80", "train.checkpoint_every=10", "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(ddpmkit("train", *args, "--out", work / "reference"), env=ENV, check=True,
                   capture_output=True)
    duration = time.perf_counter() - t0
    reference = load_file(work / "reference" / "checkpoints" / "step_000000080.safetensors")
    passed, lost, leftovers, delays = 0, 0, 0, []
    for i in range(n):
        out = work / f"killed{i}"
        delays.append(round(kill_at_random(ddpmkit("train", *args, "--out", out), 0.3,
                                           duration, rng), 2))
        lost += recorded_bytes_lost(out)
        code, _ = run_to_end(ddpmkit("train", *args, "--out", out))
        final = load_file(out / "checkpoints" / "step_000000080.safetensors") if code == 0 else {}
        same = bool(final) and all((final[k] == reference[k]).all().item() for k in reference)
        leftovers += len(temp_files(out))
        passed += same
    return {"trials": n, "passed": passed, "bytes_lost": lost, "temp_files_left": leftovers,
            "reference_seconds": round(duration, 1), "kill_times_s": delays}


def sample_trials(n: int, work: Path, rng: random.Random) -> dict:
    run = work / "reference"
    args = ["sample", run, "--num", 600, "--steps", 20, "--batch-size", 40, "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(ddpmkit(*args, "--out", work / "gen_ref"), env=ENV, check=True,
                   capture_output=True)
    duration = time.perf_counter() - t0
    passed, failures = 0, []
    ref = work / "gen_ref"
    for i in range(n):
        out = work / f"gen{i}"
        kill_at_random(ddpmkit(*args, "--out", out), 0.3, duration, rng)
        code, err = run_to_end(ddpmkit(*args, "--out", out))
        problems = [] if code == 0 else [f"rerun exit {code}: {err.strip()}"]
        if not problems:
            problems += [] if same_images(out, ref, 600) else ["images differ"]
            if (out / "manifest.csv").read_bytes() != (ref / "manifest.csv").read_bytes():
                problems.append("manifest differs")
            problems += [f"temp files left: {temp_files(out)}"] if temp_files(out) else []
        passed += not problems
        failures += [{"trial": i, "problems": problems}] if problems else []
    return {"trials": n, "passed": passed, "reference_seconds": round(duration, 1),
            "failures": failures}


def torchrun_trials(n: int, args: list, name: str, work: Path, rng: random.Random,
                    progress, same) -> dict:
    """n kill-and-rerun trials of a torchrun job against one uninterrupted run of it. progress(out)
    says how far a job got; same(out, reference) whether a rerun ended where the uninterrupted job
    did."""
    reference = work / f"{name}_reference"
    t0 = time.perf_counter()
    code, err = run_to_end(torchrun(*args, "--out", reference))
    if code != 0:
        raise SystemExit(f"faults.py: the uninterrupted {name} job failed: {err}")
    duration = time.perf_counter() - t0
    trials = []
    for i in range(n):
        out = work / f"{name}{i}"
        trial = crash_torchrun(torchrun(*args, "--out", out), 1.0, duration, rng,
                               lambda: progress(out))
        trial["bytes_lost"] = recorded_bytes_lost(out)  # checkpoints state.json names (training)
        code, err = run_to_end(torchrun(*args, "--out", out))
        trial["resumed_equal"] = code == 0 and same(out, reference)
        trial["temp_files_left"] = len(temp_files(out))
        if code != 0:
            trial["rerun_error"] = err
        trial["passed"] = (trial["resumed_equal"] and not trial["hung"]
                           and not trial["workers_left"]
                           and not trial["bytes_lost"] and not trial["temp_files_left"])
        trials.append(trial)
    return {"trials": n, "passed": sum(t["passed"] for t in trials),
            "reference_seconds": round(duration, 1), "details": trials}


def ddp_train_trials(n: int, work: Path, rng: random.Random) -> dict:
    final = "checkpoints/step_000000150.safetensors"

    def same(out: Path, reference: Path) -> bool:
        a, b = load_file(out / final), load_file(reference / final)
        return all(torch.equal(a[k], b[k]) for k in b)

    args = ["train", *TINY, "model.dropout=0.0", "train.max_steps=150", "train.checkpoint_every=10",
            "--quiet"]
    return torchrun_trials(n, args, "ddp_train", work, rng,
                           lambda out: f"step {saved_step(out)} saved", same)


def same_images(a: Path, b: Path, n: int) -> bool:
    return all((a / "individual" / f"{k:06d}.png").read_bytes()
               == (b / "individual" / f"{k:06d}.png").read_bytes()
               for k in range(n))


def ddp_sample_trials(n: int, work: Path, rng: random.Random) -> dict:
    """Samples from work/reference, the run train_trials trains
    (image k depends only on k, not on the world size)."""
    def same(out: Path, reference: Path) -> bool:
        return same_images(out, reference, 1200) and (out / "manifest.csv").read_bytes() == (
            reference / "manifest.csv").read_bytes()

    args = ["sample", work / "reference", "-n", 1200, "--steps", 20, "--batch-size", 40, "--quiet"]
    return torchrun_trials(n, args, "ddp_sample", work, rng,
                           lambda out: f"{len(list(out.glob('individual/*.png')))} images", same)


def bad_input_cases(work: Path) -> list[tuple[str, list, str]]:
    """(name, argv, expected): expected 'error' = exit 2 + one line; 'skip' = exit 0 + a report."""
    d = work / "bad"
    d.mkdir()
    rng = np.random.default_rng(0)

    def folder(name, files):
        f = d / name
        f.mkdir()
        for fname, writer in files.items():
            writer(f / fname)
        return f

    def img(mode="L", size=(9, 9), dtype=np.uint8, hi=255):
        shape = size + ((3,) if mode == "RGB" else (4,) if mode == "RGBA" else ())
        return lambda p: Image.fromarray(rng.integers(0, hi, shape, dtype=dtype)).save(p)

    def raw(data: bytes):
        return lambda p: p.write_bytes(data)

    good = {f"g{i}.png": img() for i in range(3)}
    png_bytes = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(png_bytes, "PNG")
    truncated = png_bytes.getvalue()[:60]

    def npy(name, arr, **kw):
        p = d / name
        np.save(p, arr, **kw)
        return p

    csv_dir = folder("csvimgs", dict(good))
    (d / "missing_col.csv").write_text("name,label\ng0.png,1\n")
    (d / "dup.csv").write_text("image,label\ng0.png,1\ng0.png,1\n")
    (d / "ghost.csv").write_text("image,label\nghost.png,1\n")
    (d / "escape.csv").write_text("image,label\n../../etc/passwd,1\n")
    (d / "absolute.csv").write_text("image,label\n/etc/passwd,1\n")
    (d / "nolabel.csv").write_text("image,label\ng0.png,0\n")
    (d / "bad.yaml").write_text("train: [unclosed\n")
    (d / "unknown.yaml").write_text("trian:\n  lr: 1\n")
    (d / "afile").write_text("not a folder")
    (d / "evil.bin").write_bytes(b"\x80\x04K\x01.")
    out = d / "never"
    t = ["train", *TINY, "--steps", 2, "--quiet"]
    cases = [
        ("missing data path", [*t, "--data", d / "nope", "--out", out], "error"),
        ("empty folder", [*t, "--data", folder("empty", {}), "--out", out], "error"),
        ("only non-image files",
         [*t, "--data", folder("txt", {"a.txt": lambda p: p.write_text("x")}), "--out", out],
         "error"),
        ("zero-byte image, skipped", [*t, "--data", folder("zero", {**good, "z.png": raw(b"")}),
                                      "--out", d / "r1"], "skip"),
        ("truncated image, skipped", [*t, "--data",
                                      folder("trunc", {**good, "t.png": raw(truncated)}),
                                      "--out", d / "r2"], "skip"),
        ("corrupt image, on_error=fail", [*t, "--data",
                                          folder("corrupt", {**good, "c.png": raw(b"\x89PNGxx")}),
                                          "data.on_error=fail", "--out", out], "error"),
        ("all images unreadable", [*t, "--data", folder("allbad", {"a.png": raw(b"x")}),
                                   "--out", out], "error"),
        ("mixed sizes and modes", [*t, "--data", folder("mixed", {
            "a.png": img("L", (5, 9)), "b.png": img("RGB", (12, 7)), "c.png": img("RGBA"),
            "d.png": img("L", dtype=np.uint16, hi=65535), "e.bmp": img("RGB", (30, 30))}),
                                   "--out", d / "r3"], "ok"),
        ("CSV missing column", [*t, "--data", csv_dir, f"data.labels={d / 'missing_col.csv'}",
                                "--out", out], "error"),
        ("CSV duplicate names", [*t, "--data", csv_dir, f"data.labels={d / 'dup.csv'}",
                                 "--out", out], "error"),
        ("CSV names missing file", [*t, "--data", csv_dir, f"data.labels={d / 'ghost.csv'}",
                                    "--out", out], "error"),
        ("CSV path escapes (..)", [*t, "--data", csv_dir, f"data.labels={d / 'escape.csv'}",
                                   "--out", out], "error"),
        ("CSV absolute path", [*t, "--data", csv_dir, f"data.labels={d / 'absolute.csv'}",
                               "--out", out], "error"),
        ("CSV filter matches nothing", [*t, "--data", csv_dir, f"data.labels={d / 'nolabel.csv'}",
                                        "data.filter_label=1", "--out", out], "error"),
        ("CSV file missing", [*t, "--data", csv_dir, f"data.labels={d / 'nope.csv'}",
                              "--out", out], "error"),
        (".npy with NaN", [*t, "--data", npy("nan.npy", np.full((4, 8, 8), np.nan, np.float32)),
                           "--out", out], "error"),
        (".npy wrong rank", [*t, "--data", npy("rank.npy", np.zeros((8, 8))),
                             "--out", out], "error"),
        (".npy 5-D", [*t, "--data", npy("rank5.npy", np.zeros((2, 2, 2, 8, 8))),
                      "--out", out], "error"),
        (".npy out-of-range floats", [*t, "--data",
                                      npy("range.npy", np.full((4, 8, 8), 1e4, np.float32)),
                                      "--out", out], "error"),
        (".npy pickled objects", [*t, "--data",
                                  npy("obj.npy", np.array([{}], dtype=object), allow_pickle=True),
                                  "--out", out], "error"),
        (".npy empty", [*t, "--data", npy("empty.npy", np.zeros((0, 8, 8), np.uint8)),
                        "--out", out], "error"),
        ("unsupported data file", [*t, "--data", d / "evil.bin", "--out", out], "error"),
        ("config unknown key", [*t, "train.learning_rate=1", "--out", out], "error"),
        ("config unknown section", ["train", d / "unknown.yaml", "--out", out], "error"),
        ("config invalid YAML", ["train", d / "bad.yaml", "--out", out], "error"),
        ("config missing file", ["train", d / "none.yaml", "--out", out], "error"),
        ("config wrong type", [*t, "train.batch_size=lots", "--out", out], "error"),
        ("config negative size", [*t, "data.image_size=-8", "--out", out], "error"),
        ("config zero batch", [*t, "train.batch_size=0", "--out", out], "error"),
        ("config size the UNet cannot take", [*t, "data.image_size=9", "--out", out], "error"),
        ("config bad choice", [*t, "diffusion.schedule=exp", "--out", out], "error"),
        ("config bad override syntax", [*t, "lr=1", "--out", out], "error"),
        ("train output is a file", [*t, "--out", d / "afile"], "error"),
        ("sample: not a run", ["sample", d / "empty", "--out", out], "error"),
        ("sample: --num 0", ["sample", work / "reference", "--num", 0, "--out", out], "error"),
        ("sample: output is a file", ["sample", work / "reference", "--num", 1,
                                      "--out", d / "afile"], "error"),
        ("sample: unknown checkpoint", ["sample", work / "reference", "--checkpoint", 7777,
                                        "--out", out], "error"),
        ("sample: bad checkpoint name", ["sample", work / "reference", "--checkpoint", "newest",
                                         "--out", out], "error"),
        ("sample: non-sample override", ["sample", work / "reference", "train.lr=1",
                                         "--out", out], "error"),
        ("sample: steps above T", ["sample", work / "reference", "--steps", 5000,
                                   "--out", out], "error"),
        ("gif: run without grids", ["gif", d / "empty"], "error"),
    ]
    return cases


def run_bad_inputs(work: Path) -> dict:
    results = []
    for name, argv, expected in bad_input_cases(work):
        err, outbuf = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outbuf):
                code = main([str(a) for a in argv])
            crash = None
        except SystemExit as exc:  # argparse usage errors
            code, crash = exc.code, None
        except Exception as exc:  # noqa: BLE001 - exactly what this trial looks for
            code, crash = None, f"{type(exc).__name__}: {exc}"
        lines = [line for line in err.getvalue().splitlines() if line.startswith("ddpmkit: error:")]
        if expected == "error":
            ok = code == 2 and len(lines) == 1 and crash is None
        elif expected == "skip":
            ok = code == 0 and "skipped" in outbuf.getvalue()
        else:
            ok = code == 0
        results.append({"case": name, "handled": bool(ok), "exit": code,
                        "message": lines[0][16:] if lines else (crash or "")[:120]})
    handled = sum(r["handled"] for r in results)
    return {"cases": len(results), "handled": handled, "details": results}


def _png_of(width: int, height: int) -> bytes:
    """An 8x8 PNG whose header declares width x height (checksum fixed), as a crafted file would."""
    import zlib

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def hostile_cases(work: Path) -> list[tuple[str, list, str, object]]:
    """(name, argv, expected: 'error' (exit 2, one line) or 'ok', check(stdout) -> problem)."""
    import shutil

    d, run = work / "hostile", work / "reference"
    d.mkdir()
    victim = d / "victim.txt"
    victim.write_text("someone's")

    def sent_run(name: str, edit) -> Path:
        copy = shutil.copytree(run, d / name)
        edit(copy)
        return copy

    def state(entries):
        return lambda r: (r / "state.json").write_text(json.dumps(entries))

    def outside(name):
        return lambda r: (r / "state.json").write_text(json.dumps({"checkpoints": [
            {"step": 1, "file": name, "sha256": "0" * 64, "loss": 0.5}], "best": 1}))

    def untouched(_out) -> str:
        return "" if victim.read_text() == "someone's" else "the victim file was changed"

    figures = d / "figures"
    (figures / "grids").mkdir(parents=True)
    (figures / "grids" / "grid_4x4.png").write_bytes(b"my figure")
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{c}: &{c} [" + ", ".join([f"*{p}"] * 10) + "]" for p, c in zip("abcdefgh", "bcdefghi")]
    (d / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    with open(d / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (10**9, 28, 28)})
        f.write(bytes(128))
    import gzip
    import zipfile

    with zipfile.ZipFile(d / "bomb.npz", "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("train_images.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (2**26, 32, 32)})
            member.write(bytes(2**22))
    (d / "idx").mkdir()
    with gzip.open(d / "idx" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBB3I", 0, 0, 0x08, 3, 2**26, 32, 32) + bytes(2**20))
    (d / "wrap").mkdir()
    (d / "wrap" / "train-images-idx3-ubyte").write_bytes(
        struct.pack(">BBBB4I", 0, 0, 0x08, 4, 2**16, 2**16, 2**16, 2**16))
    (d / "noisy").mkdir()
    Image.new("L", (8, 8)).save(d / "noisy" / "a.png")
    for name, (w, h) in (("px900m", (30000, 30000)), ("px140m", (11833, 11833))):
        (d / name).mkdir()
        (d / name / "big.png").write_bytes(_png_of(w, h))
    s = ["sample", run, "-n", 16, "--steps", 2, "--quiet"]
    t = ["train", *TINY, "--steps", 2, "--quiet"]
    return [
        ("state.json names a checkpoint by absolute path",
         ["train", *TINY, "--steps", 90, "--quiet", "--out", sent_run("abs", outside(str(victim)))],
         "error", untouched),
        ("state.json names a checkpoint ../../",
         ["train", *TINY, "--steps", 90, "--quiet", "--out",
          sent_run("rel", outside("../victim.txt"))], "error", untouched),
        ("state.json is {}", ["sample", sent_run("empty", state({})), "-n", 1, "--out", d / "o1"],
         "error", None),
        ("state.json is []", ["sample", sent_run("list", state([])), "-n", 1, "--out", d / "o2"],
         "error", None),
        ("state.json step is a string", ["sample", sent_run("str", state({"checkpoints": [
            {"step": "ten"}]})), "-n", 1, "--out", d / "o3"], "error", None),
        ("sample into someone's folder", [*s, "--out", figures], "error",
         lambda _: "" if (figures / "grids" / "grid_4x4.png").read_bytes() == b"my figure"
         else "overwritten"),
        ("sample --fresh into someone's folder", [*s, "--out", figures, "--fresh"], "error",
         lambda _: "" if (figures / "grids" / "grid_4x4.png").exists() else "deleted"),
        ("sample --out /", [*s, "--out", "/"], "error", None),
        ("denoise --out its own input folder",
         ["denoise", run, d / "noisy", "--sigma", 0.1, "--out", d / "noisy"], "error", None),
        ("YAML alias bomb", ["train", d / "bomb.yaml", "--out", d / "o4"], "error", None),
        (".npy header declaring 10^9 images", [*t, "--data", d / "huge.npy", "--out", d / "o5"],
         "error", None),
        (".npz member declaring 64 GiB", [*t, "--data", d / "bomb.npz", "--out", d / "o6"],
         "error", None),
        ("gzip IDX declaring 64 GiB", [*t, "--data", d / "idx", "--out", d / "o7"], "error", None),
        ("IDX dimensions whose product wraps", [*t, "--data", d / "wrap", "--out", d / "o8"],
         "error", None),
        ("PNG declaring 9x10^8 pixels", [*t, "--data", d / "px900m", "data.on_error=fail",
                                         "--out", d / "o9"], "error", None),
        ("PNG declaring 1.4x10^8 pixels", [*t, "--data", d / "px140m", "data.on_error=fail",
                                           "--out", d / "o10"], "error", None),
        ("--num 10^12", ["sample", run, "--num", 10**12, "--out", d / "o11"], "error", None),
        ("--size 100000", ["sample", run, "--size", 100000, "--out", d / "o12"], "error", None),
        ("model widths of terabytes", [*t, "model.base_channels=1048576", "model.norm_groups=1",
                                       "--out", d / "o13"], "error", None),
        ("--eta 1e308", ["sample", run, "--sampler", "ddim", "--eta", 1e308, "--out", d / "o14"],
         "error", None),
        ("--guidance 1e308", ["sample", run, "sample.guidance=1e308", "--out", d / "o15"],
         "error", None),
        ("train.lr=1e308", [*t, "train.lr=1e308", "train.warmup_steps=0", "train.grad_clip=0",
                            "--steps", 4, "train.checkpoint_every=2", "--out", d / "o16"], "error",
         lambda _: "" if not (d / "o16" / "checkpoints").exists() or not any(
             (d / "o16" / "checkpoints").iterdir()) else "a checkpoint was saved"),
    ]


# runs one command in a fresh process and prints, last, that process's peak memory (KiB on Linux)
_MEASURED = ("import json, resource, sys\nfrom ddpmkit.cli import main\ntry:\n"
             "    code = main(json.loads(sys.argv[1]))\n"
             "except SystemExit as exc:\n    code = exc.code\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)")


def hostile_trials(work: Path) -> dict:
    """Each case in its own process: its exit, its stderr's error lines and its peak memory."""
    results = []
    for name, argv, expected, check in hostile_cases(work):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _MEASURED, json.dumps([str(a) for a in argv])],
                              env=ENV, capture_output=True, text=True, timeout=900)
        last = proc.stdout.strip().splitlines()[-1:] or ["0"]
        rss_mb = round(int(last[0]) / 1024) if last[0].isdigit() else None
        err = proc.stderr.strip().splitlines()
        problem = (check(proc.stdout) if check else "") or ""
        ok = (proc.returncode == 2 and len(err) == 1 and err[0].startswith("ddpmkit: error:")
              if expected == "error" else proc.returncode == 0) and not problem
        results.append({"case": name, "handled": bool(ok), "exit": proc.returncode,
                        "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": rss_mb,
                        "message": (err[-1][16:] if err else "")[:200],
                        **({"problem": problem} if problem else {})})
    return {"cases": len(results), "handled": sum(r["handled"] for r in results),
            "details": results}


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-kills", type=int, default=20)
    ap.add_argument("--sample-kills", type=int, default=5)
    ap.add_argument("--ddp-train-kills", type=int, default=10)
    ap.add_argument("--ddp-sample-kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-bad-inputs", action="store_true")
    ap.add_argument("--skip-hostile", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {"date": time.strftime("%Y-%m-%d"),
                  "train_kill_resume": train_trials(args.train_kills, work, rng),
                  "sample_kill_resume": sample_trials(args.sample_kills, work, rng),
                  "torchrun_train_kill_resume": ddp_train_trials(args.ddp_train_kills, work, rng)
                  if args.ddp_train_kills else None,
                  "torchrun_sample_kill_resume": ddp_sample_trials(args.ddp_sample_kills, work, rng)
                  if args.ddp_sample_kills else None,
                  "bad_inputs": None if args.skip_bad_inputs else run_bad_inputs(work),
                  "hostile": None if args.skip_hostile else hostile_trials(work)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main_()
