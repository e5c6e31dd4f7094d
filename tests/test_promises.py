"""What the README and a resume promise, held to the letter: the keys a resume accepts, refuses or
records, a failed start that writes nothing, a refused --save-ref, the Makefile's PyTorch choice,
and the configuration table's defaults."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ddpmkit.cli import main
from ddpmkit.errors import UserError
from ddpmkit.training import train

ROOT = Path(__file__).resolve().parents[1]


def quiet(*_):
    pass


@pytest.mark.parametrize("key,value,recorded", [
    # another summation order: equal to float rounding, not bit for bit
    ("train.grad_accum", 2, True),
    ("train.activation_checkpointing", True, True),
    ("train.channels_last", False, True),
    ("train.dist_timeout_minutes", 5.0, False),  # how long processes wait: nothing computed changes
])
def test_a_resume_records_what_it_changed_and_from_which_step(tiny, key, value, recorded):
    run = train(tiny(**{"train.max_steps": 4, "train.checkpoint_every": 2}), log=quiet,
                progress=False)
    said = []
    train(tiny(**{"train.max_steps": 6, "train.checkpoint_every": 2, key: value}), log=said.append,
          progress=False)
    section, name = key.split(".")
    # the run says what it now is
    assert yaml.safe_load(run.config_path.read_text())[section][name] == value
    changes = json.loads(run.meta_path.read_text()).get("changes", [])
    if recorded:
        assert changes == [{"step": 4, "key": key,
                            "from": not value if isinstance(value, bool) else 1, "to": value}]
        assert any(f"note: {key} changes from" in m and "float rounding" in m for m in said)
    else:
        assert changes == [] and not any("note:" in m for m in said)


def test_a_resume_that_would_compute_something_else_is_refused(tiny):
    train(tiny(**{"train.max_steps": 2}), log=quiet, progress=False)
    with pytest.raises(UserError,
                       match=r"trained with a different config \(train.lr: 0.002 -> 0.5\)"):
        train(tiny(**{"train.max_steps": 4, "train.lr": 0.5}), log=quiet, progress=False)
    with pytest.raises(UserError, match=r"; train.augment: \[\] -> \[hflip\]; "):  # as typed
        train(tiny(**{"train.max_steps": 4, "train.augment": ["hflip"], "train.augment_p": 0.5}),
              log=quiet, progress=False)
    said = []  # refused before the audit's threshold and the evaluation classifier are computed
    with pytest.raises(UserError, match="trained with a different config"):
        train(tiny(**{"train.max_steps": 4, "train.lr": 0.5, "train.audit_every": 2,
                      "train.eval_every": 2, "train.eval_features": "classifier"}),
              log=said.append, progress=False)
    assert not any("near-copy threshold" in m or "evaluation classifier" in m for m in said), said


def test_a_fresh_start_whose_monitors_cannot_be_built_leaves_the_run_as_it_was(tiny, monkeypatch):
    run = train(tiny(**{"train.max_steps": 2}), log=quiet, progress=False)
    before = sorted(p.relative_to(run.path) for p in run.path.rglob("*"))
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # as if not installed
    with pytest.raises(UserError, match="--features efficientnet needs"):
        train(tiny(**{"train.max_steps": 4, "train.eval_every": 2,
                      "train.eval_features": "efficientnet"}), fresh=True, log=quiet,
              progress=False)
    assert sorted(p.relative_to(run.path) for p in run.path.rglob("*")) == before


def test_a_failed_start_writes_nothing(tiny, tmp_path, monkeypatch):
    """train.tensorboard=true without the package used to leave config.yaml, meta.json, the digests
    and the lock in --out."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    cfg = tiny(**{"train.tensorboard": True, "train.max_steps": 2})
    with pytest.raises(UserError, match="train.tensorboard=true needs the tensorboard package"):
        train(cfg, log=quiet, progress=False)
    assert not Path(cfg.train.out_dir).exists()


def test_save_ref_with_the_classifier_is_refused_in_one_line(tmp_path, capsys):
    gen = tmp_path / "gen"
    gen.mkdir()
    assert main(["eval", str(gen), "--ref", "data.path=null", "--features", "classifier",
                 "--save-ref", str(tmp_path / "ref.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--save-ref with --features classifier" in err[0]
    assert not (tmp_path / "ref.npz").exists()


def test_the_makefile_takes_pytorchs_cpu_index_as_an_option():
    def dry_run(*args):
        return subprocess.run(["make", "-n", "-B", "install", *args], cwd=ROOT,
                              capture_output=True, text=True).stdout

    default = dry_run()
    assert 'pip install -q torch==2.13.0' in default and "download.pytorch.org" not in default
    cpu = dry_run("TORCH=torch --index-url https://download.pytorch.org/whl/cpu")
    assert "pip install -q torch --index-url https://download.pytorch.org/whl/cpu" in cpu


def test_a_kill_between_the_first_checkpoint_and_its_record_leaves_a_run_that_resumes(
        tiny, monkeypatch):
    from ddpmkit.run import RunDir

    cfg = tiny(**{"train.max_steps": 4, "train.checkpoint_every": 2})
    with monkeypatch.context() as m:  # killed once the checkpoint file is in place
        m.setattr(RunDir, "add_checkpoint", lambda *_: (_ for _ in ()).throw(SystemExit(137)))
        with pytest.raises(SystemExit):
            train(cfg, log=quiet, progress=False)
    run = RunDir(cfg.train.out_dir)
    assert run.checkpoint_file(2).is_file() and run.read_state()["checkpoints"] == []
    said = []
    train(cfg, log=said.append, progress=False)  # the same command: no refusal
    straight = train(tiny(**{"train.max_steps": 4, "train.checkpoint_every": 2,
                             "train.out_dir": cfg.train.out_dir + "_straight"}), log=quiet,
                     progress=False)
    from ddpmkit.run import load_run

    resumed, whole = load_run(run.path).net.state_dict(), load_run(straight.path).net.state_dict()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # restarted: bitwise the same
    # rerun once more with a rounding-only change: the run is finished, so nothing is recorded
    said.clear()
    train(tiny(**{"train.max_steps": 4, "train.checkpoint_every": 2, "train.grad_accum": 2}),
          log=said.append, progress=False)
    assert "nothing was recorded, the changes noted above included" in said[-1]
    assert "changes" not in json.loads(run.meta_path.read_text())


@pytest.mark.parametrize("call, says", [
    (lambda d: __import__("ddpmkit").sample(str(d), num=2), "sample() takes a run loaded by"),
    (lambda d: __import__("ddpmkit").train({"train": {}}), "train() takes a Config"),
    (lambda d: __import__("ddpmkit").load_config(None, ["train.lr=1"]),
     "load_config()'s overrides are a dict"),
])
def test_the_python_api_names_an_argument_of_the_wrong_kind(tmp_path, call, says):
    with pytest.raises(UserError, match=re.escape(says)):
        call(tmp_path)


def test_a_run_stopped_between_log_steps_records_the_losses_an_uninterrupted_one_does(
        tiny, tmp_path, monkeypatch):
    """The losses of the steps before the stop are in the checkpoint, so the resumed run's log
    lines and checkpoint losses (which choose `best`) are the uninterrupted run's."""
    import ddpmkit.training as training

    steps = {"train.max_steps": 20, "train.log_every": 5, "train.checkpoint_every": 10}
    straight = train(tiny(**steps, **{"train.out_dir": str(tmp_path / "straight")}), log=quiet,
                     progress=False)
    stopping = training._stopping
    with monkeypatch.context() as m:  # a signal at step 7, between two log lines
        m.setattr(training, "_stopping", lambda job, state, *rest: (
            (True, True) if state.step == 7 else stopping(job, state, *rest)))
        with pytest.raises(KeyboardInterrupt):  # as a signal ends training
            train(tiny(**steps), log=quiet, progress=False)
    from ddpmkit.run import RunDir

    assert [e["step"] for e in RunDir(tmp_path / "run").read_state()["checkpoints"]] == [7]
    resumed = train(tiny(**steps), log=quiet, progress=False)

    def losses(run):
        return ([(r["step"], r["loss"]) for r in run.read_stats()],
                [(e["step"], e["loss"]) for e in run.read_state()["checkpoints"]])

    assert losses(resumed)[0] == losses(straight)[0]
    assert [c for c in losses(resumed)[1] if c[0] != 7] == losses(straight)[1]


def _split_top_level(text: str) -> list[str]:
    """'32, [1, 2], 2' -> ['32', '[1, 2]', '2']."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in [*parts, current]]


def test_the_readmes_configuration_table_gives_the_defaults_a_config_has():
    from ddpmkit.config import load_config

    cfg = load_config(None, {})
    rows = re.findall(r"^\| (`[a-z]+\.[a-z_0-9]+`(?:, `[a-z]+\.[a-z_0-9]+`)*) \| ([^|]*) \|",
                      (ROOT / "README.md").read_text(), re.M)
    checked = set()
    for keys, defaults in rows:
        keys, defaults = re.findall(r"`([^`]+)`", keys), _split_top_level(defaults)
        assert len(keys) == len(defaults), (keys, defaults)
        for key, text in zip(keys, defaults):
            said = yaml.safe_load(text.strip("`"))
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            value = list(value) if isinstance(value, tuple) else value
            if isinstance(said, str) and isinstance(value, float):
                said = float(said)  # YAML 1.1 reads 1e-3 as text
            assert said == value, f"README says {key} is {text}, a Config has {value!r}"
            checked.add(key)
    every = {f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
             for f in dataclasses.fields(getattr(cfg, section.name))}
    assert every <= checked, f"not in the README's table: {sorted(every - checked)}"


def test_the_readmes_sampler_table_names_every_sampler_and_its_default_steps():
    from ddpmkit.samplers import SAMPLERS

    said = {}
    for names, steps in re.findall(r"^\| (`[a-z0-9-]+`(?:, `[a-z0-9-]+`)*) \| ([^|]*) \|",
                                   (ROOT / "README.md").read_text(), re.M):
        names = re.findall(r"`([^`]+)`", names)
        if names[0] in SAMPLERS:  # the sampler table's rows
            for name, count in zip(names, _split_top_level(steps)):
                said[name] = None if count == "all T" else int(count)
    assert said == {name: sampler.default_steps for name, sampler in SAMPLERS.items()}
