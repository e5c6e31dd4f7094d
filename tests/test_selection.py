"""The rare class: a training sampler that draws classes in stated proportions, per-class guidance,
and balance --select, which keeps only candidates a classifier of the real images recognises."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from ddpmkit import selection
from ddpmkit.metrics import classifier
from ddpmkit.cli import main
from ddpmkit.errors import UserError
from ddpmkit.pixels import read_image
from ddpmkit.run import RunDir
from ddpmkit.resolve import prepare_training
from ddpmkit.training import BalancedOrder, batch_order
from test_downstream import TINY_ARGS, _digits01, _npz

QUIET = lambda *_: None  # noqa: E731


def _rare_npz(path, rare: int = 20):
    """Digits 0 (rare: `rare` training images) and 1 (120), with val (30 + 30) and test splits."""
    labels = _digits01()[1].ravel()
    zeros, ones = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    return _npz(path, np.concatenate([zeros[:rare], ones[:120]]),
                np.concatenate([zeros[rare + 30:], ones[150:]]),
                np.concatenate([zeros[rare:rare + 30], ones[120:150]]))


@pytest.fixture(autouse=True)
def _quick_selector(monkeypatch):
    monkeypatch.setitem(selection.RECIPE, "steps", 150)


@pytest.mark.parametrize("power, expected", [
    (0.0, [0.9, 0.09, 0.01]),  # the data's frequencies
    (0.5, np.sqrt([900, 90, 10]) / np.sqrt([900, 90, 10]).sum()),
    (1.0, [1 / 3, 1 / 3, 1 / 3]),  # every class equally often
])
def test_the_class_balanced_sampler_draws_classes_in_the_stated_proportions(power, expected):
    class_ids = torch.repeat_interleave(torch.arange(3), torch.tensor([900, 90, 10]))
    order = BalancedOrder(class_ids, power, batch_size=256, seed=0)
    drawn = torch.cat([order.indices(step) for step in range(400)])
    shares = torch.bincount(class_ids[drawn], minlength=3).double() / len(drawn)
    assert shares.numpy() == pytest.approx(np.asarray(expected), abs=0.006)
    assert torch.equal(order.indices(7), BalancedOrder(class_ids, power, 256, 0).indices(7))


def test_train_class_balance_reaches_the_training_batches(tmp_path):
    data = _rare_npz(tmp_path / "d.npz")
    cfg = tiny_config(tmp_path, **{"data.path": str(data), "model.class_conditional": True,
                                   "train.class_balance": 1.0})
    prep = prepare_training(cfg, fresh=True, log=QUIET)
    drawn = torch.cat([batch_order(prep).indices(step) for step in range(100)])
    rare = (prep.class_ids[drawn] == 0).double().mean()
    assert abs(rare - 0.5) < 0.03 and (prep.class_ids == 0).sum() == 20  # of 140
    with pytest.raises(UserError, match="model.class_conditional=true"):
        tiny_config(tmp_path, **{"train.class_balance": 0.5})


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """A class-conditional run on digits 0 and 1 (0 rare) whose data has a val split."""
    tmp = tmp_path_factory.mktemp("gen")
    data, run = _rare_npz(tmp / "d.npz", rare=30), tmp / "run"
    assert main(["train", f"--data={data}", "model.class_conditional=true", "train.max_steps=60",
                 "train.class_balance=1", f"--out={run}", "--quiet", *TINY_ARGS]) == 0
    return data, run


def test_the_run_records_and_reports_its_images_per_class(generator):
    run = generator[1]
    assert json.loads((run / "meta.json").read_text())["class_counts"] == {"0": 30, "1": 120}
    assert "0 30, 1 120 (drawn with train.class_balance=1)" in (run / "report.html").read_text()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_select_keeps_only_candidates_scored_above_the_threshold(generator, tmp_path):
    data, run = generator
    out = tmp_path / "bal"
    assert main(["balance", str(run), "--out", str(out), "--quiet", "sample.steps=3", "--select",
                 "--select-threshold", "0.6", "--max-candidates", "3", "--by-class-folders"]) == 0
    candidates = _rows(out / "selection.csv")
    assert candidates and {r["class"] for r in candidates} == {"0"}
    for r in candidates:
        assert (r["kept"] == "true") == (r["reason"].startswith("score")), r
        if float(r["score"]) < 0.6:
            assert r["kept"] == "false" and r["reason"] == "below the threshold"
    synthetic = [r for r in _rows(out / "manifest.csv") if r["synthetic"] == "true"]
    kept = [r for r in candidates if r["kept"] == "true"]
    assert [r["file"] for r in synthetic] == [r["file"] for r in kept]
    # the manifest's score columns follow `synthetic`: the class folder still links each kept image
    links = sorted((out / "by_class" / "0").iterdir())
    assert ([link.resolve() for link in links] == [(out / r["file"]).resolve() for r in synthetic]
            and all(link.name.startswith("synthetic_") for link in links))
    assert all(float(r["score"]) >= 0.6 and r["reason"].startswith("score") for r in synthetic)
    summary = json.loads((out / "selection.json").read_text())["classes"]["0"]
    assert summary["needed"] == 120 - 30 and summary["kept"] == len(kept) == min(90,
                                                                                  summary["passed"])
    # it stops drawing once 90 passed, or at the limit of 3 x 90 candidates
    assert summary["kept"] == 90 or summary["candidates"] == 3 * 90
    assert all(r["reason"] == "beyond the number needed" for r in candidates
               if float(r["score"]) >= 0.6 and r["kept"] == "false")
    assert sum(float(r["score"]) >= 0.6 for r in candidates) == summary["passed"]
    assert summary["candidates"] == len(candidates) <= 3 * 90
    assert summary["acceptance_rate"] == pytest.approx(summary["passed"] / summary["candidates"])
    # the recorded score is the selector's: scoring a kept image again gives it back
    selector = selection.build_selector(*_selector_inputs(run), selection.SelectOptions(
        threshold=0.6), log=QUIET)
    image = read_image(out / synthetic[0]["file"])[None]
    assert selector.scores(image, "0")[0] == pytest.approx(float(synthetic[0]["score"]), abs=1e-4)
    # the same set rebalanced without --select: no record of a selection it did not make is left
    # (downstream would take the manifest's images for selected ones)
    assert main(["balance", str(run), "--out", str(out), "--quiet", "sample.steps=3"]) == 0
    assert not (out / "selection.csv").exists() and not (out / "selection.json").exists()
    rows = _rows(out / "manifest.csv")
    assert sum(r["synthetic"] == "true" for r in rows) == 90 and "score" not in rows[0]
    # a user's file of that name is no record of balance's: refused, never deleted
    (out / "selection.json").write_text("my notes")
    assert main(["balance", str(run), "--out", str(out), "--quiet", "sample.steps=3"]) == 2
    assert (out / "selection.json").read_text() == "my notes"


def _selector_inputs(run):
    from ddpmkit.data import load_images
    from ddpmkit.run import RunDir

    cfg = RunDir(run).config()
    data = load_images(cfg.data, log=QUIET)
    return cfg.data, data.images, data.labels, cfg.data.class_names


def test_thresholds_come_from_the_val_split_when_the_data_has_one(generator):
    data_cfg, images, labels, names = _selector_inputs(generator[1])
    selector = selection.build_selector(data_cfg, images, labels, names,
                                        selection.SelectOptions(quantile=0.1), log=QUIET)
    assert "0.1 quantile of the validation split's own images (60)" in selector.calibrated_on
    val = np.load(generator[0])
    val_images = torch.from_numpy(val["val_images"])[:, None]
    for i, name in enumerate(names):
        own = selector.scores(val_images[val["val_labels"].ravel() == i], name)
        assert (own >= selector.thresholds[name]).mean() >= 0.9  # 90% of real images pass
        assert selector.thresholds[name] == pytest.approx(
            float(np.quantile(own, 0.1, method="lower")), abs=1e-6)  # exactly their quantile


def test_select_val_sets_the_thresholds_on_the_labelled_images_it_names(generator, tmp_path):
    """The data's own val split written to another file gives the same thresholds; training
    images in it are left out, and images without labels or of no class of the run are refused."""
    data, run = generator
    inputs = _selector_inputs(run)
    own = selection.build_selector(*inputs, selection.SelectOptions(), log=QUIET)
    split = np.load(data)
    elsewhere = tmp_path / "val.npz"  # the val images, and ten training images among them
    np.savez(elsewhere,
             train_images=np.concatenate([split["val_images"], split["train_images"][:10]]),
             train_labels=np.concatenate([split["val_labels"], split["train_labels"][:10]]))
    said = []
    val = selection.validation_images(RunDir(run), str(elsewhere), inputs[3], log=said.append)
    assert len(val[0]) == 60 and "60 of 70 (10 training images, 0 of other classes" in said[0]
    given = selection.build_selector(*inputs, selection.SelectOptions(), log=QUIET, val=val)
    assert given.thresholds == pytest.approx(own.thresholds)
    np.save(tmp_path / "plain.npy", split["val_images"])
    with pytest.raises(UserError, match="its images have no labels"):
        selection.validation_images(RunDir(run), str(tmp_path / "plain.npy"), inputs[3])
    np.savez(tmp_path / "other.npz", train_images=split["val_images"],
             train_labels=split["val_labels"] + 5)
    labels = split["val_labels"][:40].copy()
    labels[30:] += 7  # ten images of classes the run does not have
    np.savez(tmp_path / "mixed.npz", train_images=split["val_images"][:40], train_labels=labels)
    selection.validation_images(RunDir(run), str(tmp_path / "mixed.npz"), inputs[3],
                                log=said.append)
    foreign = sorted({str(int(v)) for v in split["val_labels"][30:40].ravel() + 7})
    assert said[-1].endswith(f"10 of other classes left out: {', '.join(foreign)})"), said[-1]
    with pytest.raises(UserError, match=r"none of its images is both a class of the run \(0, 1\)"):
        selection.validation_images(RunDir(run), str(tmp_path / "other.npz"), inputs[3])
    with pytest.raises(UserError, match=r"all \d+ of its images of the run's classes are training"):
        selection.validation_images(RunDir(run), "data.split=train", inputs[3])
    selection.validation_images(RunDir(run), "data.split=test", inputs[3], log=said.append)
    assert [m for m in said if "warning" in m] == [said[-2]]  # the test split's, alone
    assert "tunes the selection on the test split" in said[-2]
    out = tmp_path / "bal"  # the command takes it as data.key=value too
    assert main(["balance", str(run), "--out", str(out), "--quiet", "sample.steps=3", "--select",
                 "--select-val", "data.split=val", "--max-candidates", "1"]) == 0
    threshold = json.loads((out / "selection.json").read_text())["classes"]["0"]["threshold"]
    assert threshold == pytest.approx(own.thresholds["0"])


def test_the_selector_is_trained_once_then_loaded_from_the_cache(generator, monkeypatch,
                                                                 tmp_path):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path))
    inputs = _selector_inputs(generator[1])
    said = []
    first = selection.build_selector(*inputs, selection.SelectOptions(), log=said.append)
    assert any("training the selector" in line for line in said)
    assert len(list(tmp_path.glob("eval/classifier_*.safetensors"))) == 1

    def refit(*args, **kwargs):
        raise AssertionError("the cached selector was trained again")

    monkeypatch.setattr(classifier, "fit", refit)
    said.clear()
    again = selection.build_selector(*inputs, selection.SelectOptions(), log=said.append)
    assert not any("training" in line for line in said)
    assert again.thresholds == first.thresholds
    images = inputs[1][:16]
    assert np.array_equal(again.scores(images, "0"), first.scores(images, "0"))
    # other training images are another selector
    data_cfg, images, labels, names = inputs
    with pytest.raises(AssertionError, match="trained again"):
        selection.build_selector(data_cfg, images[1:], labels[1:], names,
                                 selection.SelectOptions(), log=QUIET)


def test_a_class_the_selector_barely_recognises_is_warned_of(generator, monkeypatch):
    """Real images of the class scored near 0 give a quantile threshold that keeps anything."""
    data_cfg, images, labels, names = _selector_inputs(generator[1])
    rare_scores_low = lambda net, x: np.tile([1e-4, 1 - 1e-4], (len(x), 1))  # noqa: E731
    monkeypatch.setattr(selection, "predict", rare_scores_low)
    said = []
    selector = selection.build_selector(data_cfg, images, labels, names,
                                        selection.SelectOptions(), log=said.append)
    assert selector.thresholds["0"] == pytest.approx(1e-4)
    warned = [line for line in said if "warning" in line]
    assert len(warned) == 1 and "real 0 images" in warned[0]
    assert "--select-threshold 0.5" in warned[0]
    said.clear()  # a fixed threshold is the user's choice: no warning
    selection.build_selector(data_cfg, images, labels, names,
                             selection.SelectOptions(threshold=0.5), log=said.append)
    assert not [line for line in said if "warning" in line]


def test_a_threshold_no_candidate_reaches_is_one_clear_line(generator, tmp_path, capsys):
    _, run = generator
    code = main(["balance", str(run), "--out", str(tmp_path / "bal"), "--quiet",
                 "sample.steps=3", "--select", "--select-threshold", "0.9999999",
                 "--max-candidates", "1.2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "none of" in err and "candidates of 0 scored 0.9999999 or more" in err


@pytest.mark.parametrize("argv, says", [
    (["--class-guidance", "2=3"], "--class-guidance names 2: not a class of the run"),
    (["--class-guidance", "0=0"], "guidance 0 would label"),
    (["--class-guidance", "0:3"], "class=scale pairs"),
    (["--select-threshold", "0.5"], "--select-threshold sets how --select keeps images"),
    (["--class-guidance", "auto"], "--class-guidance auto chooses each class's scale with the "
                                   "selector: add --select"),
    (["--select", "--select-quantile", "1.5"], "--select-quantile 1.5"),
    (["--select", "--max-candidates", "0.5"], "--max-candidates 0.5"),
    (["--select-val", "data.split=val"], "--select-val sets how --select keeps images"),
    (["--class", "7", "--target", "500"], "--class 7: not a class of the data"),
    # refused before any class is made, not at that class's turn or as a traceback
    (["--class-guidance", "0=1e9"], "--class-guidance 0=1e+09: use a scale above 0"),
    (["--class-guidance", "0=nan"], "class=scale pairs"),
    (["--proportions", "0=nan,1=0.5"], "--proportions takes class=share pairs"),
    (["--select", "--max-candidates", "inf"], "--max-candidates inf"),
])
def test_bad_balance_options_get_one_clear_line(generator, tmp_path, capsys, argv, says):
    code = main(["balance", str(generator[1]), "--out", str(tmp_path / "bal"), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bal").exists()


def test_class_guidance_sets_each_class_job_its_scale(generator, tmp_path, capsys):
    out = tmp_path / "bal"
    assert main(["balance", str(generator[1]), "--out", str(out), "--quiet", "sample.steps=3",
                 "--class-guidance", "0=2.5,1=3"]) == 0
    record = json.loads((out / "classes" / "0" / ".ddpmkit.json").read_text())
    assert record["job"]["guidance"] == 2.5
    # class 1, the largest, gets no image: its scale is said to be unused, not silently dropped
    assert ("warning: --class-guidance 1=... is not used: no 1 image is generated"
            in capsys.readouterr().out)


def test_downstream_adds_the_selected_arm_and_the_class_fidelity(generator, tmp_path):
    data, run = generator
    bal, study = tmp_path / "bal", tmp_path / "study"
    assert main(["balance", str(run), "--out", str(bal), "--quiet", "sample.steps=3", "--select",
                 "--select-threshold", "0.5", "--max-candidates", "3"]) == 0
    assert main(["downstream", "--real", str(data), "--synthetic", str(bal), "--out", str(study),
                 "--seeds", "2", "--steps", "15", "--calibration-split", "val"]) == 0
    summary = json.loads((study / "results.json").read_text())
    assert list(summary["table"]) == ["real", "real+synthetic", "real+selected", "oversampled"]
    kept = sum(r["synthetic"] == "true" for r in _rows(bal / "manifest.csv"))
    assert summary["train_counts"]["real+selected"] == summary["train_counts"]["real+synthetic"]
    assert summary["train_counts"]["real+selected"][0] == 30 + kept
    assert set(summary["paired_tests_tuned"]) == {"real+selected vs real",
                                                  "real+selected vs oversampled"}
    fidelity = summary["class_fidelity"]
    assert set(fidelity) == {"real+synthetic", "real+selected"}
    assert all(0 <= v <= 1 for shares in fidelity.values() for v in shares.values())
    assert "recall@tuned[0]" in summary["table"]["real"]
    report = (study / "report.md").read_text()
    assert "Class fidelity" in report and "| real+selected |" in report
    assert f" of {kept}; " in summary["synthetic_copies"]  # measured on the kept images, as said
    assert summary["synthetic_copies"].endswith(", among the selected images")


def test_auto_scale_takes_the_smallest_scale_close_to_the_real_fidelity():
    rates = {1.0: 0.5, 1.5: 0.7, 2.0: 0.88, 3.0: 0.95, 4.0: 0.97}
    assert selection.auto_scale(rates, real_fidelity=0.95) == 2.0  # 0.88 >= 0.9 * 0.95
    assert selection.auto_scale(rates, real_fidelity=1.0) == 3.0
    assert selection.auto_scale({1.0: 0.2, 2.0: 0.4, 3.0: 0.4}, real_fidelity=1.0) == 2.0


def test_auto_guidance_probes_each_scale_and_records_its_choice(generator, tmp_path, capsys,
                                                                monkeypatch):
    from ddpmkit import balance

    probes, real = [], balance.sample_batch
    monkeypatch.setattr(balance, "sample_batch",
                        lambda *a, **kw: probes.append(a) or real(*a, **kw))
    out = tmp_path / "bal"
    args = ["balance", str(generator[1]), "--out", str(out), "--quiet", "sample.steps=3",
            "--select", "--select-threshold", "0.5", "--class-guidance", "auto"]
    assert main(args) == 0 and len(probes) == 5  # one class to top up, five scales
    probe = json.loads((out / "selection.json").read_text())["classes"]["0"]["auto_guidance"]
    assert [float(s) for s in probe["fidelity"]] == [1.0, 1.5, 2.0, 3.0, 4.0]
    # two classes and a 0.5 threshold: a candidate assigned to its class passes
    assert all(r >= f for f, r in zip(probe["fidelity"].values(), probe["pass_rates"].values()))
    rates = {float(s): r for s, r in probe["fidelity"].items()}
    assert probe["chosen"] == selection.auto_scale(rates, probe["real_fidelity"])
    # a class the generator has not learnt at any scale is said so
    weak = rates[probe["chosen"]] < 0.9 * probe["real_fidelity"]
    assert ("the generator has not learnt this class" in capsys.readouterr().out) == weak
    record = json.loads((out / "classes" / "0" / ".ddpmkit.json").read_text())
    assert record["job"]["guidance"] == probe["chosen"]
    # an identical rerun takes the recorded choice; another selector threshold probes again
    assert main(args) == 0 and len(probes) == 5
    assert "guidance %g (the earlier run's probe" % probe["chosen"] in capsys.readouterr().out
    again = json.loads((out / "selection.json").read_text())["classes"]["0"]["auto_guidance"]
    assert again == probe
    args[args.index("0.5")] = "0.4"
    assert main(args) == 0 and len(probes) == 10


def test_auto_guidance_scores_probes_as_candidates_are_written_at_size(generator, tmp_path,
                                                                       monkeypatch):
    """With sample.size the candidates are written upsampled (to_uint8(upsample(x)), a lossless
    PNG) and scored read back at the run's size: the probes are scored on those pixels too, not
    on the native samples."""
    from ddpmkit import balance
    from ddpmkit.data import resize_center_crop
    from ddpmkit.images import to_uint8, upsample

    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scored, real = [], selection.Selector.fidelity
    monkeypatch.setattr(selection.Selector, "fidelity",
                        lambda self, images, name: scored.append(images) or real(self, images,
                                                                                 name))
    monkeypatch.setattr(balance, "sample_batch", lambda *_, **__: x)
    assert main(["balance", str(generator[1]), "--out", str(tmp_path / "bal"), "--quiet",
                 "sample.steps=3", "sample.size=16", "--select", "--select-threshold", "0.5",
                 "--class-guidance", "auto"]) == 0
    as_written = resize_center_crop(to_uint8(upsample(x, 16)), 8)
    assert len(scored) == 5 and all(torch.equal(images, as_written) for images in scored)
    assert not torch.equal(as_written, to_uint8(x))  # the two differ: the test can tell


def test_auto_guidance_probes_with_the_steps_the_candidates_use(generator, tmp_path, monkeypatch):
    from ddpmkit import generation

    steps, real = [], generation.make_timesteps
    monkeypatch.setattr(generation, "make_timesteps",
                        lambda n, *a, **kw: steps.append(n) or real(n, *a, **kw))
    out = tmp_path / "bal"
    assert main(["balance", str(generator[1]), "--out", str(out), "--quiet", "sample.steps=null",
                 "sample.sampler=ddim", "--select", "--select-threshold", "0.5",
                 "--class-guidance", "auto"]) == 0
    job = json.loads((out / "classes" / "0" / ".ddpmkit.json").read_text())["job"]
    assert job["sampler"] == "ddim" and job["steps"] == 50  # ddim's default on a 100-step model
    assert len(steps) > 5 and set(steps) == {50}  # the 5 probes, then the candidates


def test_training_images_in_the_val_split_are_left_out_and_a_class_without_val_images_is_named(
        tmp_path):
    from ddpmkit.config import DataConfig
    from ddpmkit.data import load_images

    labels = _digits01()[1].ravel()
    zeros, ones = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    # val holds 20 of the training zeros (so no zero the selector has not learnt) and 30 new ones
    data = _npz(tmp_path / "d.npz", np.concatenate([zeros[:20], ones[:120]]), ones[150:],
                np.concatenate([zeros[:20], ones[120:150]]))
    cfg = DataConfig(path=str(data), image_size=8)
    train = load_images(cfg, log=QUIET)
    said = []
    selector = selection.build_selector(cfg, train.images, train.labels, ["0", "1"],
                                        selection.SelectOptions(), log=said.append)
    assert "select: the validation split holds 20 training image(s): left out" in said
    assert selector.calibrated_on == ("the 0.05 quantile of the validation split's own images "
                                      "(30); 0.5 for 0, which it has none of")
    assert selector.thresholds["0"] == 0.5 and selector.thresholds["1"] < 0.5 + 0.5


def test_a_quantile_threshold_passes_its_share_of_real_images_however_few():
    """Six real images at the 0.05 quantile: all six reach the threshold (interpolating between
    the two lowest scores let only five through, 83% where 95% was promised)."""
    scores = np.array([0.30, 0.50, 0.60, 0.70, 0.80, 0.90])
    probs = np.stack([scores, 1 - scores], 1)
    limits, _ = selection.thresholds(["a", "b"], (probs, ["a"] * 6), 0.05, None)
    assert limits["a"] == 0.30 and (scores >= limits["a"]).all()
    many = np.linspace(0.01, 1, 100)
    limits, _ = selection.thresholds(["a", "b"], (np.stack([many, 1 - many], 1), ["a"] * 100),
                                     0.05, None)
    assert (many >= limits["a"]).mean() == 0.96  # at least 95%, never fewer


def test_a_split_folder_without_val_has_no_validation_split_and_no_advice_to_change_split(
        tmp_path):
    """The thresholds then say there was none and that --select-val sets them; the loader's
    'set data.split to one of them' would send the user to the train or test split."""
    from PIL import Image
    from ddpmkit.config import DataConfig

    images = _digits01()[0]
    for part in ("train", "test"):
        for c in ("0", "1"):
            (tmp_path / part / c).mkdir(parents=True)
            Image.fromarray(images[0]).save(tmp_path / part / c / "a.png")
    said = []
    cfg = DataConfig(path=str(tmp_path), image_size=8)
    assert selection._validation_split(cfg, torch.zeros(1, 1, 8, 8, dtype=torch.uint8),
                                       said.append) is None
    assert said == []


def test_auto_guidance_is_refused_for_a_run_without_an_unconditional_model(tmp_path, capsys):
    data, run = _rare_npz(tmp_path / "d.npz"), tmp_path / "run"
    assert main(["train", f"--data={data}", "model.class_conditional=true", "train.max_steps=2",
                 "train.label_dropout=0", f"--out={run}", "--quiet", *TINY_ARGS]) == 0
    assert main(["balance", str(run), "--out", str(tmp_path / "b"), "--select",
                 "--class-guidance", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.label_dropout=0" in err[0] and "--class-guidance auto" in err[0]
    assert not (tmp_path / "b").exists()


def test_scores_near_one_are_written_so_each_rows_comparison_reads_true(tmp_path):
    from ddpmkit.balance import TopUp
    from ddpmkit.config import SampleConfig

    top = TopUp(None, tmp_path, QUIET, None, None, fresh=False)
    folder = tmp_path / "classes" / "a"
    rows = {k: [f"individual/{k:06d}.png", str(k), "0", "", "", "", "a", "true"] for k in range(2)}
    threshold, scores = 0.9999632835, {0: 0.99996330, 1: 0.99996320}  # both print 0.999963 at 6
    kept = top._keep(SampleConfig(out_dir=str(folder), num=1, class_label="a"), threshold,
                     scores, [0], rows, near=set())
    assert float(kept[0][-2]) >= threshold and kept[0][-1].startswith("score 0.9999633")
    written = {row[2]: float(row[4]) for row in top.candidates}
    assert written["0"] >= threshold > written["1"]
    with pytest.raises(UserError, match=r"\(best 0.9999632\d*\)"):
        top._keep(SampleConfig(out_dir=str(folder), num=1, class_label="a"), threshold,
                  {0: 0.99996320}, [], rows, near=set())


def test_auto_guidance_says_its_choice_is_no_measurement_when_the_selector_misses_the_class():
    from types import SimpleNamespace

    from ddpmkit.balance import TopUp

    said = []
    top = TopUp(None, None, said.append, SimpleNamespace(real_fidelity={"a": 0.0}), None, False)
    assert top._say_choice("a", {1.0: 0.02, 2.0: 0.03}, 1.0, "") == 1.0
    assert any("assigns only 0% of real a images to a" in m and "not a measurement" in m
               for m in said), said


@pytest.mark.parametrize("name", ["val", "valid", "Validation"])
def test_the_validation_split_is_found_under_the_names_published_sets_use(tmp_path, name):
    from conftest import write_images
    from ddpmkit.config import DataConfig

    for split, seed in (("train", 1), (name, 2)):
        for cls in ("a", "b"):
            write_images(tmp_path / split / cls, n=3, size=(8, 8), seed=seed + len(cls))
    train = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)  # no image of the split is a training one
    found = selection._validation_split(DataConfig(path=str(tmp_path), image_size=8), train,
                                        log=lambda *_: None)
    assert found is not None and len(found[0]) == 6 and sorted(set(found[1])) == ["a", "b"]


def test_select_never_keeps_a_near_copy_that_drop_copies_left(generator, tmp_path, capsys,
                                                               monkeypatch):
    """--drop-copies redraws a near-copy a few times; one still a copy after them is no candidate,
    however well it scores. Here every image counts as a copy, so none is kept."""
    import numpy as np

    from ddpmkit.metrics import memorization

    monkeypatch.setattr(memorization, "calibrate", lambda *a, **k: memorization.Calibration(
        10.0, "leave-one-out", np.ones(100), 0))
    _, run = generator
    code = main(["balance", str(run), "--out", str(tmp_path / "bal"), "--quiet",
                 "sample.steps=2", "--select", "--select-threshold", "0.01", "--max-candidates",
                 "1", "--drop-copies", "--max-redraws", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "scored 0.01 or more (best" in err
    assert "that is not a near-copy of a training image (90 are)" in err
