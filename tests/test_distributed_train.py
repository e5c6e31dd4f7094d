"""Training under torchrun (2 CPU processes, gloo) against one process: same weights, resumable,
rank 0 writes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
from processes import process_tree

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not built")

# dropout 0: dropout masks are drawn per process, so only a dropout-free model is comparable bitwise
ARGS = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in TINY.items()] + [
    "model.dropout=0.0", "train.checkpoint_every=10", "train.sample_every=10", "data.hflip=true"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(nproc: int, out: Path, *extra: str) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
              "--master-port", str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    return [*launch, "-m", "ddpmkit", "train", *ARGS, f"train.out_dir={out}", "--quiet", *extra]


def _train(nproc: int, out: Path, *extra: str) -> None:
    done = subprocess.run(_cmd(nproc, out, *extra), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{step:09d}.safetensors")


def _diff(a: dict, b: dict, prefix: str) -> tuple[float, float]:
    """(largest, mean) absolute difference over the tensors under prefix.

    Adam divides each gradient by its own running RMS, so a weight whose gradient is nearly zero
    turns rounding noise into a visible step: a few elements may differ by ~1e-5 while the mean
    difference stays at rounding level (~1e-8). An attention key bias has an exactly-zero gradient
    (softmax ignores a constant shift), so it is pure noise and skipped."""
    keys = [k for k in a if k.startswith(prefix) and not k.endswith("to_k.bias")]
    assert keys and a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in keys])
    return diffs.max().item(), diffs.mean().item()


def _assert_same_to_fp32(a: dict, b: dict, prefix: str) -> None:
    largest, mean = _diff(a, b, prefix)
    assert largest < 1e-4 and mean < 1e-7, (largest, mean)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _train(1, root / "one", "train.max_steps=20")
    _train(2, root / "two", "train.max_steps=20")
    return root


def test_two_processes_equal_one_with_the_same_global_batch(runs):
    one, two = _weights(runs / "one", 20), _weights(runs / "two", 20)
    # Same images, timesteps and noise per step; only the order of float sums differs
    # (the all-reduce).
    _assert_same_to_fp32(one, two, "model/")
    _assert_same_to_fp32(one, two, "ema/")
    # not vacuous: the weights moved
    assert _diff(one, _weights(runs / "one", 10), "model/")[1] > 1e-4


def test_gradient_accumulation_equals_one_big_batch(runs, tmp_path):
    _train(1, tmp_path / "accum", "train.max_steps=10", "train.grad_accum=4")
    _assert_same_to_fp32(_weights(runs / "one", 10), _weights(tmp_path / "accum", 10), "model/")


def test_a_resume_on_another_number_of_processes_is_noted_and_recorded(runs, tmp_path):
    import shutil

    run = shutil.copytree(runs / "one", tmp_path / "grown")
    done = subprocess.run(_cmd(2, run, "train.max_steps=25"), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "note: processes changes from 1 to 2" in done.stdout
    changes = json.loads((run / "meta.json").read_text())["changes"]
    assert changes == [{"step": 20, "key": "processes", "from": 1, "to": 2}]
    # the record says 2 from here, so a later resume on 2 notes nothing again
    assert json.loads((run / "meta.json").read_text())["processes"] == 2


def _listing(run: Path) -> list[str]:
    return sorted(str(f.relative_to(run)) for f in run.rglob("*") if f.is_file())


def test_only_rank_zero_writes_and_logs_once(runs):
    assert _listing(runs / "one") == _listing(runs / "two")
    lines = [json.loads(x) for x in (runs / "two" / "stats.jsonl").read_text().splitlines()]
    # one line per interval, not one per process
    assert [r["step"] for r in lines] == [5, 10, 15, 20]
    meta = json.loads((runs / "two" / "meta.json").read_text())
    assert meta["processes"] == 2 and lines[-1]["images_seen"] == 20 * TINY["train.batch_size"]


def test_two_nodes_of_one_process_each_equal_one_process(runs, tmp_path):
    """Two torchrun launchers joined as two "nodes" (static rendezvous, --master-addr/--master-port,
    on this machine; the run directory on a shared filesystem): each worker has LOCAL_RANK 0, so
    only code that uses the global rank for "who writes" gets one writer and the one-process
    weights."""
    with socket.socket() as s:  # a free port for node 0's rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "nodes"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                               "--nproc-per-node", "1", "--node-rank", str(node),
                               "--master-addr", "127.0.0.1", "--master-port", port,
                               "-m", "ddpmkit", "train", *ARGS, f"train.out_dir={out}",
                               "train.max_steps=20", "--quiet"],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for node in (0, 1)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:  # one node failing leaves the other waiting at the rendezvous
        for p in nodes:
            for pid in process_tree(p.pid) if p.poll() is None else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert [p.returncode for p in nodes] == [0, 0], logs
    _assert_same_to_fp32(_weights(runs / "one", 20), _weights(out, 20), "model/")
    assert _listing(out) == _listing(runs / "two")
    assert json.loads((out / "meta.json").read_text())["processes"] == 2
    # written once, by global rank 0
    assert len((out / "stats.jsonl").read_text().splitlines()) == 4


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_killed_two_process_run_resumes_to_the_same_weights(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(2, out, "train.max_steps=100000"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "state.json"
    deadline = time.time() + 240
    while (time.time() < deadline
           and not (state.exists() and json.loads(state.read_text())["checkpoints"])):
        time.sleep(0.05)
    for pid in process_tree(proc.pid):  # the launcher and both workers, mid-step
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    saved = max(e["step"] for e in json.loads(state.read_text())["checkpoints"])
    final = saved + 10
    _train(2, out, f"train.max_steps={final}")  # the same command resumes
    _train(2, tmp_path / "straight", f"train.max_steps={final}")
    a, b = _weights(tmp_path / "straight", final), _weights(out, final)
    assert all(torch.equal(a[k], b[k]) for k in a)  # resume is exact under DDP too


def test_indivisible_global_batch_is_refused(tmp_path):
    done = subprocess.run(_cmd(1, tmp_path / "bad", "train.max_steps=2", "train.grad_accum=3"),
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert ("train.batch_size=32 does not split into 1 process(es) x train.grad_accum=3"
            in done.stderr)


def test_batch_probe_search_finds_the_limit_with_a_simulated_out_of_memory():
    from ddpmkit.batchprobe import largest_fitting

    for limit in (1, 2, 37, 64, 1000, 1953):
        tried = []

        def fits(b, limit=limit):
            tried.append(b)
            return b <= limit  # what a CUDA out-of-memory error decides on a GPU

        assert largest_fitting(fits) == limit
        assert len(tried) <= 2 * limit.bit_length() + 1  # doubling, then bisection
    assert largest_fitting(lambda b: False) == 0
    assert largest_fitting(lambda b: True, ceiling=512) == 512


def test_batch_probe_needs_a_gpu(tmp_path, capsys):
    from ddpmkit.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["train", "--max-batch", "--device", "cpu"]) == 2
    assert "--max-batch measures GPU memory" in capsys.readouterr().err


def test_a_command_that_runs_as_one_process_refuses_torchrun(monkeypatch, tmp_path, capsys):
    from ddpmkit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each of its processes
    assert main(["denoise", str(tmp_path), str(tmp_path), "--sigma", "0.1", "--out",
                 str(tmp_path / "o")]) == 2
    assert ("ddpmkit denoise runs as one process (only train and sample share work under "
            "torchrun): run it without torchrun") in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
