"""ddpmkit downstream: the three-arm study, its verdict, and the leakage guard."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
import torch

from ddpmkit.cli import main
from ddpmkit.downstream import Pool, _summarise, load_calibration, load_study_data
from ddpmkit.errors import UserError
from conftest import TINY

TINY_ARGS = [f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(map(str, v))}]"
             for k, v in TINY.items()]


def _digits01():
    """The 360 digits 0 and 1 as uint8 images, and their labels: a binary study, as in the real
    case."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, [0, 1])
    return np.round(digits.images[keep] * 255 / 16).astype(np.uint8), digits.target[keep][:, None]


def _npz(path, train_idx, test_idx, val_idx=()):
    """Digits as an .npz with train, test and (optional) val splits chosen by index, labels as
    MedMNIST stores them."""
    images, labels = _digits01()
    val_idx = np.asarray(val_idx, dtype=int)
    np.savez(path, train_images=images[train_idx], train_labels=labels[train_idx],
             test_images=images[test_idx], test_labels=labels[test_idx],
             **({"val_images": images[val_idx], "val_labels": labels[val_idx]}
                if len(val_idx) else {}))
    return path


def _balanced(tmp_path, data, name, *sample_args):
    run, out = tmp_path / f"run_{name}", tmp_path / f"bal_{name}"
    assert main(["train", f"--data={data}", "model.class_conditional=true", "train.max_steps=4",
                 f"--out={run}", "--quiet", *TINY_ARGS]) == 0
    assert main(["balance", str(run), "--out", str(out), "--quiet", "sample.steps=3",
                 *sample_args]) == 0
    return out


def test_the_study_runs_and_writes_its_report(tmp_path):
    labels = _digits01()[1].ravel()
    zeros, ones = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    # class 0 rare: 30 zeros against 120 ones
    data = _npz(tmp_path / "d.npz", np.concatenate([zeros[:30], ones[:120]]),
                np.concatenate([zeros[100:], ones[150:]]))
    out = tmp_path / "study"
    assert main(["downstream", "--real", str(data), "--synthetic",
                 str(_balanced(tmp_path, data, "ok")), "--out", str(out), "--seeds", "2",
                 "--steps", "15", "--synthetic-share", "0.5"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["synthetic_share"] == 0.5 and summary["augment"] is True
    assert set(summary["table"]) == {"real", "real+synthetic", "oversampled"}
    assert ({"accuracy", "balanced_accuracy", "macro_f1", "auroc", "recall[0]", "recall[1]"}
            <= set(summary["table"]["real"]))
    # topped up to the largest class, exactly
    assert summary["train_counts"]["real"] == [30, 120]
    assert summary["train_counts"]["real+synthetic"] == [120, 120]
    # the record says what was read
    assert summary["data"] == {"real": f"{data} (train)", "synthetic": str(tmp_path / "bal_ok"),
                               "test": f"{data} (test)"}
    report = (out / "report.md").read_text()
    assert ("Verdict:" in report and "| real+synthetic |" in report
            and "checked: no test image" in report)
    assert ("with generated images, they are 0.5 of a topped-up class's draws" in report
            and "random shifts and flips" in report)
    assert "oversampled [30, 120] (each class drawn equally often)" in report
    chart = (out / "balanced_accuracy.svg").read_text()
    assert chart.startswith("<svg") and chart.count("<rect") == 3  # one bar per arm
    assert f'>{summary["table"]["oversampled"]["balanced_accuracy"][0]:.3f}</text>' in chart

    # a class name is the user's: text in the report, never HTML a Markdown viewer runs
    from ddpmkit.downstream import _report

    name = "<img src=x onerror=alert(1)>|x"
    hostile = json.loads((out / "results.json").read_text().replace("recall[0]", f"recall[{name}]"))
    hostile["classes"][0] = name
    text = _report(hostile)
    assert "<img" not in text and "recall\\[&lt;img src=x onerror=alert(1)&gt;\\|x\\]" in text
    # nor a link or an image of Markdown's own: escaped wherever a class name or path is written
    name = "[click](javascript:alert(1)) ![t](https://example.org/p.png)"
    hostile = json.loads((out / "results.json").read_text().replace(
        "recall[0]", f"recall[{name}]".replace('"', '\\"')))
    hostile["classes"][0] = name
    hostile["data"]["real"] = f"/data/{name}"
    hostile["class_fidelity"] = {"real+synthetic": {name: 0.5}}
    text = _report(hostile)
    escaped = "\\[click\\](javascript:alert(1)) !\\[t\\](https://example.org/p.png)"
    assert not re.search(r"(?<!\\)\]\(", text.replace("![balanced accuracy per arm](", ""))
    assert text.count(escaped) == 5, text  # data, classes, table header, both fidelity lines

    # a study of other settings does not silently replace this one; --fresh does
    argv = ["downstream", "--real", str(data), "--synthetic", str(tmp_path / "bal_ok"), "--out",
            str(out), "--seeds", "2", "--steps", "16", "--synthetic-share", "0.5"]
    assert main(argv) == 2 and json.loads((out / "results.json").read_text())["steps"] == 15
    assert main([*argv, "--fresh"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 16


def test_a_calibration_split_scores_every_classifier_at_a_tuned_threshold_too(tmp_path,
                                                                            monkeypatch):
    import ddpmkit.downstream as downstream

    tuned_on = []  # the thresholds are tuned on the calibration images, never on the test split
    real_tuning = downstream.tuned_offsets
    monkeypatch.setattr(downstream, "tuned_offsets",
                        lambda probs, labels, **kw: tuned_on.append(len(labels))
                        or real_tuning(probs, labels, **kw))
    rng = np.random.default_rng(1)
    order = rng.permutation(360)
    train = np.concatenate([order[:40], order[60:200]])
    # 5 val images are copies of train ones, as in PneumoniaMNIST
    val = np.concatenate([order[200:260], train[:5]])
    data = _npz(tmp_path / "d.npz", train, order[260:], val)
    out = tmp_path / "study"
    assert main(["downstream", "--real", str(data), "--synthetic",
                 str(_balanced(tmp_path, data, "cal")), "--calibration-split", "val",
                 "--out", str(out), "--seeds", "2", "--steps", "15"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["calibration_images"] == 60  # the 5 the generator saw were dropped
    assert tuned_on == [60] * 6  # 3 arms x 2 seeds; the test split holds 100
    assert summary["leakage"].startswith("checked: no test image") and summary[
        "leakage"].endswith(" (5 calibration images a classifier or the generator trained on "
                            "were dropped)")
    tuned = {arm: [r["balanced_accuracy@tuned"] for r in runs]
             for arm, runs in summary["per_seed"].items()}
    assert (summary["table"]["real"]["balanced_accuracy@tuned"][0]
            == pytest.approx(np.mean(tuned["real"])))
    gain = np.mean(tuned["real+synthetic"]) - np.mean(tuned["oversampled"])
    assert (summary["paired_tests_tuned"]["real+synthetic vs oversampled"]["mean_gain"]
            == pytest.approx(gain))
    assert "tuned on the calibration split (60 images" in (out / "report.md").read_text()
    assert f"calibration {data} (val)" in (out / "report.md").read_text()
    chart = (out / "balanced_accuracy.svg").read_text()
    # default and tuned, per arm
    assert chart.count("<rect") == 6 and "lighter: at tuned thresholds" in chart
    assert (f'>{summary["table"]["real+synthetic"]["balanced_accuracy@tuned"][0]:.3f}</text>'
            in chart)


def test_the_real_datas_val_split_calibrates_by_default(tmp_path):
    """Thresholds are tuned wherever a calibration split exists; one the study cannot use (it
    shares images with the test split) is left out with the reason, as it was not asked for."""
    data = _npz(tmp_path / "d.npz", np.arange(0, 150), np.arange(150, 250), np.arange(250, 300))
    synthetic = _balanced(tmp_path, data, "auto")
    *_, calibration, leakage = load_study_data(str(data), str(synthetic))
    assert len(calibration.labels) == 50 and "not tuned" not in leakage
    # testing on the val split itself: nothing to calibrate on by default
    *_, calibration, _ = load_study_data(str(data), str(synthetic), test_split="val")
    assert calibration is None
    overlapping = _npz(tmp_path / "o.npz", np.arange(0, 150), np.arange(150, 250),
                       np.arange(240, 300))
    *_, calibration, leakage = load_study_data(str(overlapping), str(synthetic))
    assert calibration is None and leakage.endswith(
        f"(thresholds not tuned on {overlapping} (val): calibration data {overlapping} (val): 10 "
        f"of its images are in the test split; tune thresholds on images the test does not hold)")


def test_a_calibration_split_that_is_not_separate_is_refused(tmp_path, capsys):
    # 10 val in test
    data = _npz(tmp_path / "d.npz", np.arange(0, 150), np.arange(150, 250), np.arange(240, 300))
    synthetic = _balanced(tmp_path, data, "badcal")
    argv = ["downstream", "--real", str(data), "--synthetic", str(synthetic), "--seeds", "2",
            "--steps", "2"]
    assert main([*argv, "--calibration-split", "val", "--out", str(tmp_path / "a")]) == 2
    assert (f"calibration data {data} (val): 10 of its images are in the test split"
            in capsys.readouterr().err)
    # the training split itself: every image is dropped, nothing is left to tune on
    assert main([*argv, "--calibration-split", "train", "--out", str(tmp_path / "b")]) == 2
    assert ("150 images a classifier or the generator trained on, 0 images of fewer than 2 "
            "classes are left" in capsys.readouterr().err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_test_or_calibration_images_without_a_class_of_the_study_are_one_clear_line(tmp_path,
                                                                                    capsys):
    """Every class is scored: a test (or calibration) folder that lacks one is refused before any
    classifier trains, and the folder is named without a split it does not have."""
    from PIL import Image

    images, labels = _digits01()
    data = _npz(tmp_path / "d.npz", np.arange(0, 150), np.arange(150, 250))
    synthetic = str(_balanced(tmp_path, data, "lacking"))
    ones, csv = tmp_path / "ones", tmp_path / "ones.csv"  # 20 held-out ones, labelled by a CSV
    ones.mkdir()
    picked = np.flatnonzero(labels[250:, 0] == 1)[:20] + 250
    for i in picked:
        Image.fromarray(images[i]).save(ones / f"{i}.png")
    csv.write_text("image,label\n" + "".join(f"{i}.png,1\n" for i in picked))
    argv = ["downstream", "--real", str(data), "--synthetic", synthetic, "--seeds", "2",
            "--steps", "2"]
    assert main([*argv, "--test", str(ones), "--test-labels", str(csv),
                 "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{ones} (labelled by {csv}): no images of class 0; the study scores "
                        f"every class of the real data (0, 1): give labelled images of each")
    assert len(err.splitlines()) == 1 and not (tmp_path / "a").exists()
    assert main([*argv, "--calibration", str(ones), "--calibration-labels", str(csv),
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()  # two classes: fewer than 2 are left
    assert f"calibration data {ones} (labelled by {csv}): " in err and len(err.splitlines()) == 1
    three = Pool(torch.zeros(4, 1, 8, 8, dtype=torch.uint8) + torch.arange(4)[:, None, None, None],
                 np.array([0, 0, 1, 1]))  # three classes, none of c
    with pytest.raises(UserError, match="calibration data v: no images of class c; the study"):
        load_calibration(three, "v", Pool(three.images[:0], three.labels[:0]),
                         Pool(three.images[:0] + 9, three.labels[:0]), set(), ["a", "b", "c"])
    sevens = tmp_path / "classes"  # class subfolders, one of a class the study does not have
    for label, i in (("1", picked[0]), ("7", picked[1])):
        (sevens / label).mkdir(parents=True)
        Image.fromarray(images[i]).save(sevens / label / f"{i}.png")
    assert main([*argv, "--test", str(sevens), "--out", str(tmp_path / "c")]) == 2
    assert (f"error: {sevens}: labels 7 are not among the classes 0, 1"
            in capsys.readouterr().err)


def test_calibration_images_can_come_from_a_folder_of_class_subfolders(tmp_path):
    from PIL import Image

    images, labels = _digits01()
    data = _npz(tmp_path / "d.npz", np.arange(0, 150), np.arange(150, 250))
    folder = tmp_path / "calibration"
    for i in [*range(250, 290), 3, 7]:  # 40 held-out images and 2 the classifiers train on
        (folder / str(labels[i, 0])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / str(labels[i, 0]) / f"{i}.png")
    synthetic = str(_balanced(tmp_path, data, "folder"))
    *_, calibration, leakage = load_study_data(str(data), synthetic, calibration=str(folder))
    assert len(calibration.labels) == 40 and leakage.endswith(
        " (2 calibration images a classifier or the generator trained on were dropped)")
    assert sorted(np.bincount(calibration.labels)) == sorted(np.bincount(labels[250:290, 0]))
    # a split named for a source that has none is refused, not ignored
    from ddpmkit.errors import UserError

    with pytest.raises(UserError,
                       match=f"--calibration-split val: --calibration {folder} has no splits"):
        load_study_data(str(data), synthetic, calibration=str(folder), calibration_split="val")
    with pytest.raises(UserError, match=f"--test-split val: --test {folder} has no splits"):
        load_study_data(str(data), synthetic, test=str(folder), test_split="val")
    # an .npz of images and labels (no split names) is one set too, and labels stored as
    # floats name the same classes
    plain = tmp_path / "calibration.npz"
    np.savez(plain, images=images[250:290], labels=labels[250:290].astype(np.float32))
    *_, from_npz, _ = load_study_data(str(data), synthetic, calibration=str(plain))
    assert sorted(from_npz.labels.tolist()) == sorted(calibration.labels.tolist())
    # --real has splits, but not this one: the line says where else the images can come from
    with pytest.raises(UserError, match=r"has no 'val' split to take the calibration images "
                                        r"from: give them with --calibration"):
        load_study_data(str(data), synthetic, calibration_split="val")
    split = tmp_path / "split"  # train/ and test/ folders: the same line, not data.split's
    for part, i in (("train", 0), ("test", 1)):
        (split / part / "0").mkdir(parents=True)
        Image.fromarray(images[i]).save(split / part / "0" / f"{i}.png")
    with pytest.raises(UserError, match=f"--real {split} has no 'val' split to take the "
                                        f"calibration images from: give them with --calibration"):
        load_study_data(str(split), synthetic, calibration_split="val")


def test_a_csv_labelled_folder_is_real_and_test_data(tmp_path, capsys):
    """One folder of PNGs and a CSV per split, with their own column names (as ISIC ships them): the
    generator trains on it with data.labels, and the study reads it with --real-labels and
    --test-labels."""
    from PIL import Image

    images, labels = _digits01()
    folder, names = tmp_path / "scans", {0: "benign", 1: "malignant"}
    folder.mkdir()
    csvs = {"train": ["file,diagnosis"], "test": ["file,diagnosis"]}
    for i in range(100):
        Image.fromarray(images[i]).save(folder / f"scan_{i:03d}.png")
        csvs["train" if i < 60 else "test"].append(f"scan_{i:03d},{names[labels[i, 0]]}")
    for split, lines in csvs.items():
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    columns = ["data.image_column=file", "data.label_column=diagnosis"]
    run, synthetic = tmp_path / "run", tmp_path / "balanced"
    assert main(["train", f"--data={folder}", f"data.labels={tmp_path / 'train.csv'}", *columns,
                 "model.class_conditional=true", "train.max_steps=4", f"--out={run}", "--quiet",
                 *TINY_ARGS]) == 0
    assert main(["balance", str(run), "--out", str(synthetic), "--quiet", "sample.steps=3"]) == 0
    argv = ["downstream", "--real", str(folder), "--real-labels", str(tmp_path / "train.csv"),
            "--synthetic", str(synthetic), "--seeds", "2", "--steps", "2", *columns]
    out = tmp_path / "study"
    # tests in --real's folder
    assert main([*argv, "--test-labels", str(tmp_path / "test.csv"), "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    count = {split: [sum(line.endswith(n) for line in csvs[split]) for n in names.values()]
             for split in csvs}
    assert summary["classes"] == ["benign", "malignant"] and summary["test_counts"] == count["test"]
    assert (summary["train_counts"]["real"] == count["train"]
            and summary["leakage"].startswith("checked: no test image"))
    # a CSV names one set of images, so there is no test split to fall back on; other data keys
    # are the flags'
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert (f"--real {folder} has no 'test' split to take the test images from: give them with "
            f"--test (and --test-labels if a CSV names them)" in capsys.readouterr().err)
    assert main([*argv, "--test-labels", str(tmp_path / "test.csv"), "data.split=val",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert ("downstream takes only data.image_column, data.label_column, data.on_error, "
            "data.bit_depth as overrides" in err)
    assert "got data.split" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_tuned_threshold_finds_the_operating_point_the_default_misses():
    from ddpmkit.downstream import scores, tuned_offsets

    labels = np.array([0] * 50 + [1] * 50)
    # ranked perfectly, badly placed
    p1 = np.concatenate([np.linspace(0.55, 0.75, 50), np.linspace(0.85, 0.95, 50)])
    probs = np.stack([1 - p1, p1], 1)
    s = scores(probs, labels, ["0", "1"], tuned_offsets(probs, labels))
    assert 0.75 < s["tuned_threshold"] <= 0.85
    assert (s["balanced_accuracy"] == 0.5 and s["balanced_accuracy@tuned"] == 1.0
            and s["auroc"] == 1.0)


def test_two_class_offsets_reach_the_best_threshold_the_roc_curve_has():
    from sklearn.metrics import roc_curve

    from ddpmkit.downstream import scores, tuned_offsets

    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.2).astype(int)
    p1 = 1 / (1 + np.exp(-(rng.normal(size=400) + 1.2 * labels - 1.5)))
    fpr, tpr, _ = roc_curve(labels, p1)
    probs = np.stack([1 - p1, p1], 1)
    s = scores(probs, labels, ["0", "1"], tuned_offsets(probs, labels))
    assert s["balanced_accuracy@tuned"] == pytest.approx((1 + (tpr - fpr).max()) / 2)
    assert s["balanced_accuracy@tuned"] > s["balanced_accuracy"] + 0.1


def test_per_class_thresholds_find_the_decision_three_classes_need():
    """Three classes, each ranked first by its own score yet pulled toward class 0 by a prior
    the classifier learnt: the argmax misses the rare classes, the tuned offsets do not."""
    from ddpmkit.downstream import scores, tuned_offsets

    labels = np.repeat([0, 1, 2], [200, 20, 20])
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 0.3, (240, 3)) + np.eye(3)[labels] * 2.0 + np.array([3.0, 0.0, 0.0])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    s = scores(probs, labels, ["a", "b", "c"], tuned_offsets(probs, labels))
    assert s["balanced_accuracy"] < 0.5 and s["recall[b]"] < 0.2
    assert s["balanced_accuracy@tuned"] > 0.98 and s["recall@tuned[b]"] > 0.95
    assert "tuned_threshold" not in s  # one threshold names a two-class decision only


def test_a_generator_that_saw_the_test_images_is_refused(tmp_path, capsys):
    # 50 test images in train
    data = _npz(tmp_path / "leaky.npz", np.arange(0, 200), np.arange(150, 250))
    moved = tmp_path / "moved.npz"
    shutil.copy(data, moved)
    synthetic = _balanced(tmp_path, moved, "leaky")
    recorded = (tmp_path / "run_leaky" / "training_images.sha256").read_text().split()
    # every training image, once (digits has no duplicates here)
    assert len(recorded) == len(set(recorded)) == 200
    moved.unlink()  # the run's own record is what the guard reads: the data may have moved since
    code = main(["downstream", "--real", str(data), "--synthetic", str(synthetic),
                 "--out", str(tmp_path / "s"), "--seeds", "2", "--steps", "2"])
    assert code == 2 and "leakage: the generator" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    # for choosing on a validation split, the seen images can be dropped instead (and are counted)
    *_, test, _, leakage = load_study_data(str(data), str(synthetic), drop_seen=True)
    assert len(test.labels) == 50 and leakage.startswith("checked: no test image") and (
        leakage.endswith(" (50 test images the generator saw were dropped)"))
    # a generator moved away cannot vouch for its set
    (tmp_path / "run_leaky").rename(tmp_path / "elsewhere")
    assert main(["downstream", "--real", str(data), "--synthetic", str(synthetic),
                 "--out", str(tmp_path / "s"), "--seeds", "2", "--steps", "2"]) == 2
    assert ("run_leaky, which is no longer there: the leakage check reads its training data"
            in capsys.readouterr().err)


def test_test_images_the_classifiers_train_on_are_refused(tmp_path, capsys):
    """The generator trained on other images, so its guard passes; the real training split shares
    30 images with the test split, which every arm's classifier would be scored on."""
    synthetic = _balanced(tmp_path, _npz(tmp_path / "gen.npz", np.arange(0, 150),
                                         np.arange(150, 200)), "other")
    data = _npz(tmp_path / "overlap.npz", np.arange(200, 300), np.arange(270, 350))
    assert main(["downstream", "--real", str(data), "--synthetic", str(synthetic),
                 "--out", str(tmp_path / "s"), "--seeds", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "30 of its images are among the real training images" in err[0]
    assert not (tmp_path / "s").exists()
    *_, test, _, leakage = load_study_data(str(data), str(synthetic), drop_seen=True)
    assert len(test.labels) == 50 and leakage.endswith(
        " (0 test images the generator saw were dropped; 30 more that the classifiers train on)")


def test_real_images_are_read_at_the_bit_depth_the_generator_recorded(tmp_path):
    """12-bit-looking values in uint16 arrays, a generator told data.bit_depth=16: the study reads
    the real images at 16 bits too (unset, it would choose 12), so the leakage guard still
    recognises them."""
    small = np.load(_npz(tmp_path / "small.npz", np.arange(0, 200), np.arange(150, 250)))
    data = tmp_path / "wide.npz"
    np.savez(data, **{k: v.astype(np.uint16) * 16 if k.endswith("images") else v
                      for k, v in small.items()})
    run, synthetic = tmp_path / "run_wide", tmp_path / "bal_wide"
    assert main(["train", f"--data={data}", "data.bit_depth=16", "model.class_conditional=true",
                 "train.max_steps=4", f"--out={run}", "--quiet", *TINY_ARGS]) == 0
    assert main(["balance", str(run), "--out", str(synthetic), "--quiet", "sample.steps=3"]) == 0
    *_, test, _, leakage = load_study_data(str(data), str(synthetic), drop_seen=True)
    assert len(test.labels) == 50 and leakage.endswith(
        " (50 test images the generator saw were dropped)")


def test_the_leakage_guard_holds_when_the_synthetic_images_were_upsampled(tmp_path, capsys):
    """Images stored at 32x32; the generator trained at 8x8 on 50 test images, its samples written
    at 16x16, where the study runs: training images resampled 32 -> 8 -> 16 match no test image
    resampled 32 -> 16."""
    small = np.load(_npz(tmp_path / "small.npz", np.arange(0, 200), np.arange(150, 250)))
    data = tmp_path / "leaky.npz"
    np.savez(data, **{k: np.kron(v, np.ones((1, 4, 4), np.uint8)) if k.endswith("images") else v
                      for k, v in small.items()})
    synthetic = _balanced(tmp_path, data, "up", "sample.size=16")
    code = main(["downstream", "--real", str(data), "--synthetic", str(synthetic),
                 "--out", str(tmp_path / "s"), "--seeds", "2", "--steps", "2"])
    assert code == 2 and "was trained on 50 of the test images" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message",
                         [(["--seeds", "1"], "--seeds 1: a verdict needs at least 2 seeds"),
                          (["--steps", "0"], "--steps 0: each classifier needs at least 1")])
def test_a_study_that_cannot_give_a_verdict_is_refused_first(tmp_path, capsys, flags, message):
    code = main(["downstream", "--real", "nowhere.npz", "--synthetic", "nothing",
                 "--out", str(tmp_path / "s"), *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_the_leakage_check_follows_a_fine_tuned_generator_to_what_it_started_from(
        tmp_path, capsys):
    """A run fine-tuned from a run that trained on the test split leaks as that run does; weights
    whose training images are unknown (a hub model) are said to be unchecked, not clean."""
    import torch
    from ddpmkit.config import load_config
    from ddpmkit.downstream import Pool, check_no_leakage, generators_training_digests
    from ddpmkit.run import RunDir

    labels = _digits01()[1].ravel()
    zeros, ones = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    data = _npz(tmp_path / "d.npz", np.concatenate([zeros[:30], ones[:60]]),
                np.concatenate([zeros[100:], ones[150:]]))
    leaky = tmp_path / "leaky"
    assert main(["train", f"--data={data}", "data.split=test", "model.class_conditional=true",
                 "train.max_steps=2", f"--out={leaky}", "--quiet", *TINY_ARGS]) == 0
    assert main(["train", f"--data={data}", "model.class_conditional=true", f"--init-from={leaky}",
                 "train.max_steps=2", f"--out={tmp_path / 'from_leaky'}", "--quiet",
                 *TINY_ARGS]) == 0
    assert main(["balance", str(tmp_path / "from_leaky"), "--out", str(tmp_path / "bal_from"),
                 "--quiet", "sample.steps=3"]) == 0
    capsys.readouterr()
    assert main(["downstream", "--real", str(data), "--synthetic", str(tmp_path / "bal_from"),
                 "--out", str(tmp_path / "s"), "--seeds", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "(or a run it was fine-tuned from) was trained on" in err and "of the test images" in err
    # the source moved away, or trained again with --fresh: no longer what was fine-tuned from
    tuned = tmp_path / "from_leaky"
    leaky.rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="which is no longer there as it was"):
        generators_training_digests([tuned], 8, 1)
    assert generators_training_digests([tuned], 8, 1, verified=False).unchecked == [
        f"{leaky} (no longer the run fine-tuned from)"]
    (tmp_path / "elsewhere").rename(leaky)
    assert generators_training_digests([tuned], 8, 1).sources == [leaky]
    hub = tmp_path / "hub_tuned"  # the record of a run fine-tuned from a hub model
    RunDir(hub).start(load_config(None, {"train.init_from": "google/ddpm-cifar10-32"}), {}, step=0)
    test = Pool(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), np.array([0, 1]))
    note = check_no_leakage(test, [hub], generators_training_digests([hub], 8, 1), verified=True)
    assert note.startswith("checked:") and note.endswith(
        "; not checked against the pretrained weights it started from, whose training images are "
        "unknown: google/ddpm-cifar10-32")
    # a source run whose training data moved away is named as unchecked, not a reason to stop
    (tmp_path / "d.npz").rename(tmp_path / "moved.npz")
    (leaky / "training_images.sha256").unlink()  # so its data must be read again
    lineage = generators_training_digests([tmp_path / "from_leaky"], 8, 1)
    assert lineage.sources == [] and lineage.unchecked == [
        f"{leaky} (its training data cannot be read)"]


def test_the_verdict_says_no_improvement_unless_the_gain_beats_the_spread():
    def runs(values):
        return [{"balanced_accuracy": v, "accuracy": v} for v in values]

    flat = _summarise({"real": runs([0.80, 0.82, 0.78]), "real+synthetic": runs([0.81, 0.83, 0.79]),
                       "oversampled": runs([0.80, 0.81, 0.80])})
    assert flat["verdict"].startswith("no improvement")
    clear = _summarise({"real": runs([0.70, 0.72, 0.69]),
                        "real+synthetic": runs([0.85, 0.86, 0.86]),
                        "oversampled": runs([0.75, 0.74, 0.75])})
    assert (clear["verdict"].startswith("improvement")
            and clear["paired_tests"]["real+synthetic vs real"]["p_value"] < 0.01)
    assert clear["table"]["real"]["balanced_accuracy"][0] == pytest.approx(0.7033, abs=1e-4)
    from scipy.stats import ttest_rel

    assert clear["paired_tests"]["real+synthetic vs real"]["p_value"] == pytest.approx(
        ttest_rel([0.85, 0.86, 0.86], [0.70, 0.72, 0.69]).pvalue)
    # far above real-only, level with oversampling: both baselines must be beaten
    level = _summarise({"real": runs([0.70, 0.72, 0.69]),
                        "real+synthetic": runs([0.85, 0.86, 0.86]),
                        "oversampled": runs([0.85, 0.87, 0.86])})
    assert level["verdict"].startswith("no improvement")


def test_the_verdict_says_whether_a_gain_survives_tuned_thresholds():
    def runs(default, tuned):
        return [{"balanced_accuracy": d, "balanced_accuracy@tuned": t, "auroc": 0.98}
                for d, t in zip(default, tuned)]

    behind, ahead, level = [0.70, 0.72, 0.69], [0.85, 0.86, 0.86], [0.86, 0.87, 0.85]

    def verdict(synthetic_default, synthetic_tuned):
        return _summarise({"real": runs(behind, level),
                           "real+synthetic": runs(synthetic_default, synthetic_tuned),
                           "oversampled": runs(behind, level)})

    only_default = verdict(ahead, level)
    assert only_default["verdict"].startswith(
        "improvement at the default threshold only (not shown once")
    assert "AUROC, which no threshold moves, changes by +0.0000" in only_default["verdict"]
    assert verdict(ahead, [0.95, 0.96, 0.95])["verdict"].startswith(
        "improvement, at the default and at tuned")
    assert verdict(behind, [0.95, 0.96, 0.95])["verdict"].startswith(
        "no improvement at the default threshold, but")
    neither = verdict(behind, level)
    assert neither["verdict"].startswith("no improvement: ")
    assert (neither["paired_tests_tuned"]["real+synthetic vs oversampled"]["mean_gain"]
            == pytest.approx(0.0))


def test_the_arms_share_one_recipe_and_differ_only_in_their_data():
    """With equal class counts oversampling changes nothing, so the real and oversampled arms (the
    augmentation included) must train the very same classifier; turning augmentation off changes
    it."""
    import torch

    from ddpmkit.downstream import Pool, train_classifier

    g = torch.Generator().manual_seed(0)
    pool = Pool(torch.randint(0, 256, (40, 1, 8, 8), generator=g, dtype=torch.uint8),
                np.repeat([0, 1], 20))

    def weights(arm, augment=True):
        net = train_classifier(pool, 2, arm, seed=0, steps=3, batch=8, lr=1e-3, augment=augment)
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    assert torch.equal(weights("real"), weights("oversampled"))
    assert not torch.equal(weights("real"), weights("real", augment=False))


def test_draw_weights_keep_class_mass_and_give_synthetic_its_share():
    import torch

    from ddpmkit.downstream import Pool, combine, draw_weights

    real = Pool(torch.zeros(13, 1, 4, 4, dtype=torch.uint8), np.array([0] * 3 + [1] * 10))
    # class 0 topped up to 10
    synthetic = Pool(torch.zeros(7, 1, 4, 4, dtype=torch.uint8), np.array([0] * 7))
    pool = combine(real, synthetic)
    for share in (0.0, 0.3, 0.5, 1.0):
        w = draw_weights(pool, "real+synthetic", 2, synthetic_share=share).numpy()
        assert (w[pool.labels == 0].sum() == pytest.approx(10)
                and w[pool.labels == 1].sum() == pytest.approx(10))
        assert w[pool.synthetic].sum() / w[pool.labels == 0].sum() == pytest.approx(share)
        # a class without generated images is drawn as before
        assert np.allclose(w[pool.labels == 1], 1.0)
    assert torch.equal(draw_weights(pool, "real+synthetic", 2),
                       torch.ones(20, dtype=torch.float64))  # uniform
    over = draw_weights(real, "oversampled", 2).numpy()
    assert over[real.labels == 0].sum() == pytest.approx(over[real.labels == 1].sum())


def test_a_study_of_three_classes_is_also_scored_at_tuned_thresholds(tmp_path):
    import torch

    from ddpmkit.downstream import Pool, study

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [30, 6, 6])
    noise = rng.integers(0, 30, (42, 1, 8, 8))
    images = torch.from_numpy((labels[:, None, None, None] * 100 + noise).astype(np.uint8))
    pool = Pool(images, labels)
    summary = study(pool, Pool(images[30:], labels[30:]), pool, ["a", "b", "c"], tmp_path / "s",
                    seeds=2, steps=3, batch=8, calibration=pool, log=lambda *_: None)
    assert set(summary["paired_tests_tuned"]) == {"real+synthetic vs real",
                                                  "real+synthetic vs oversampled"}
    assert all("recall@tuned[c]" in run and "tuned_threshold" not in run
               for runs in summary["per_seed"].values() for run in runs)
    assert "tuned on the calibration split (42 images" in (tmp_path / "s" / "report.md").read_text()


def test_gains_equal_but_for_rounding_have_no_p_value_and_a_share_of_zero_is_refused(tmp_path,
                                                                                     capsys):
    from ddpmkit.downstream import _paired_tests

    def runs(values):
        return [{"m": v} for v in values]

    tests, _, _ = _paired_tests({"real": runs([0.83, 0.89]),
                                 "real+selected": runs([1.0, 0.9444444444444445]),
                                 "oversampled": runs([0.9444444444444445, 0.8888888888888888])},
                                "m")
    assert np.isnan(tests["real+selected vs oversampled"]["p_value"])
    data = _npz(tmp_path / "d.npz", np.arange(40), np.arange(40, 60))
    assert main(["downstream", "--real", str(data), "--synthetic", str(tmp_path),
                 "--synthetic-share", "0", "--out", str(tmp_path / "s")]) == 2
    assert "at 0 the arms would draw no generated image" in capsys.readouterr().err


def test_a_calibration_class_emptied_by_dropping_training_images_says_so():
    import torch

    from ddpmkit.downstream import load_calibration

    pool = Pool(torch.arange(6, dtype=torch.uint8)[:, None, None, None].expand(6, 1, 8, 8).clone(),
                np.array([0, 0, 1, 1, 2, 2]))
    trained = Pool(pool.images[4:], pool.labels[4:])  # class c's calibration images, trained on
    with pytest.raises(UserError, match=r"calibration data v \(after dropping 2 images a "
                                        r"classifier or the generator trained on\): no images of "
                                        r"class c"):
        load_calibration(pool, "v", trained, Pool(pool.images[:0] + 9, pool.labels[:0]), set(),
                         ["a", "b", "c"])


def test_a_balanced_sets_class_job_is_refused_as_the_synthetic_set(tmp_path, capsys):
    order = np.random.default_rng(2).permutation(360)
    data = _npz(tmp_path / "d.npz", np.concatenate([order[:40], order[60:200]]), order[200:])
    balanced = _balanced(tmp_path, data, "cls")
    job = next((balanced / "classes").iterdir())
    assert main(["downstream", "--real", str(data), "--synthetic", str(job), "--out",
                 str(tmp_path / "s"), "--seeds", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds one class's candidates of the balanced set" in err[0], err


def test_a_selection_tuned_on_the_test_images_is_refused(tmp_path, capsys):
    """balance --select-val on the test split (by any name) records the images that set its
    thresholds; a study testing on them would score the selected arm on what tuned it."""
    labels = _digits01()[1].ravel()
    zeros, ones = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    data = _npz(tmp_path / "d.npz", np.concatenate([zeros[:30], ones[:60]]),
                np.concatenate([zeros[100:], ones[150:]]), np.concatenate([zeros[90:100],
                                                                           ones[140:150]]))
    selected = _balanced(tmp_path, data, "sel", "--select", "--select-val", "data.split=test",
                         "--max-candidates", "200")
    tuned = json.loads((selected / "selection.json").read_text())["tuned_on_sha256"]
    assert len(tuned) == len(set(tuned)) > 0
    capsys.readouterr()
    assert main(["downstream", "--real", str(data), "--synthetic", str(selected), "--out",
                 str(tmp_path / "s"), "--seeds", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "of the test images set the thresholds that selected" in err[0], err
    # written above the generator's size: its tuning images are compared at the size they had
    sized = _balanced(tmp_path, data, "sized", "--select", "--select-val", "data.split=test",
                      "--max-candidates", "200", "sample.size=16")
    assert json.loads((sized / "selection.json").read_text())["tuned_on_size"] == 8
    assert main(["downstream", "--real", str(data), "--synthetic", str(sized), "--out",
                 str(tmp_path / "z"), "--seeds", "2", "--steps", "2"]) == 2
    assert "of the test images set the thresholds" in capsys.readouterr().err
    fair = _balanced(tmp_path, data, "fair", "--select", "--max-candidates", "200")  # its val split
    assert main(["downstream", "--real", str(data), "--synthetic", str(fair), "--out",
                 str(tmp_path / "f"), "--seeds", "2", "--steps", "2"]) == 0
    # choosing on the val split that tuned it (benchmarks/synthetic_selection.py): kept, counted
    *_, val, _, leakage = load_study_data(str(data), str(fair), None, "train", "val",
                                          drop_seen=True)
    assert len(val.labels) == 20 and leakage.endswith(
        "20 of those kept set the selection's thresholds, which favours selected sets here)")


def test_a_synthetic_set_edited_to_hold_test_images_or_other_sizes_is_refused(tmp_path, capsys):
    """Test images copied over generated ones would be trained on and scored on; an image of
    another size, or one the manifest does not list, must not set the study's size."""
    from PIL import Image

    labels = _digits01()[1].ravel()
    zeros, ones = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    data = _npz(tmp_path / "d.npz", np.concatenate([zeros[:30], ones[:60]]),
                np.concatenate([zeros[100:], ones[150:]]))
    balanced = _balanced(tmp_path, data, "edit")
    study = ["downstream", "--real", str(data), "--out", str(tmp_path / "s"), "--seeds", "2",
             "--steps", "2", "--synthetic"]
    stray = tmp_path / "stray"  # a PNG at 32x32 that no manifest lists, found first by a scan
    shutil.copytree(balanced, stray)
    (stray / "a" / "individual").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(stray / "a" / "individual" / "x.png")
    capsys.readouterr()
    assert main([*study, str(stray)]) == 0
    assert " images at 8x8; leakage checked" in capsys.readouterr().out
    rows = list(csv.DictReader(open(balanced / "manifest.csv")))
    first = balanced / next(r["file"] for r in rows if r["synthetic"] == "true")
    resized = tmp_path / "resized"
    shutil.copytree(balanced, resized)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(resized / first.relative_to(balanced))
    capsys.readouterr()
    assert main([*study, str(resized)]) == 2
    assert "lists images of 8x8, 16x16: the study runs at" in capsys.readouterr().err
    doubled = tmp_path / "doubled"  # a generated image listed twice would weigh twice
    shutil.copytree(balanced, doubled)
    lines = (doubled / "manifest.csv").read_text().splitlines()
    synthetic_line = next(line for line in lines if line.endswith(",true"))
    (doubled / "manifest.csv").write_text("\n".join([*lines, synthetic_line]) + "\n")
    assert main([*study, str(doubled)]) == 2
    assert "more than once" in capsys.readouterr().err
    test = np.load(data)["test_images"]  # a test image copied over a generated one
    Image.fromarray(test[0]).save(first)
    assert main([*study, str(balanced)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of the test images are among the synthetic images" in err[0], err


def test_samples_without_a_class_are_named_as_such(tmp_path, capsys):
    labels = _digits01()[1].ravel()
    zeros, ones = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    data = _npz(tmp_path / "d.npz", np.concatenate([zeros[:30], ones[:60]]),
                np.concatenate([zeros[100:], ones[150:]]))
    run, gen = tmp_path / "plain", tmp_path / "gen"
    assert main(["train", f"--data={data}", "train.max_steps=2", f"--out={run}", "--quiet",
                 *TINY_ARGS]) == 0
    assert main(["sample", str(run), "-n", "4", "--steps", "2", "--out", str(gen), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["downstream", "--real", str(data), "--synthetic", str(gen), "--out",
                 str(tmp_path / "s"), "--seeds", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "some images have no class label" in err[0], err


def test_a_synthetic_folder_whose_job_did_not_finish_is_refused_as_unfinished(tmp_path):
    from ddpmkit.downstream import load_synthetic
    from ddpmkit.errors import UserError
    from ddpmkit.outputs import FORMAT, RECORD

    folder = tmp_path / "balanced"
    folder.mkdir()
    (folder / RECORD).write_text(json.dumps({"format": FORMAT, "kind": "balance", "job": {}}))
    with pytest.raises(UserError, match="holds a ddpmkit job that did not finish .* rerun the "
                                        "command that made it"):
        load_synthetic(folder, ["a", "b"])


def test_an_edited_selection_record_is_refused_in_one_line(tmp_path):
    from ddpmkit.downstream import selection_tuned_on

    assert selection_tuned_on(tmp_path) == (set(), None)  # no selection
    for record, says in (({"tuned_on_sha256": 5}, "is not a list of digests"),
                         ({"tuned_on_sha256": ["ab", 3]}, "is not a list of digests"),
                         ({"tuned_on_sha256": ["ab"]}, "written by an earlier ddpmkit")):
        (tmp_path / "selection.json").write_text(json.dumps(record))
        with pytest.raises(UserError, match=says):
            selection_tuned_on(tmp_path)
    (tmp_path / "selection.json").write_text(json.dumps({"tuned_on_sha256": ["ab"],
                                                         "tuned_on_size": 8}))
    assert selection_tuned_on(tmp_path) == ({"ab"}, 8)


def test_a_study_the_machine_cannot_hold_is_refused_before_its_folder_is_made(
        tmp_path, capsys, monkeypatch):
    """A balance output written far above the generator's size (sample.size) sets the study's
    size: its classifiers' activations are checked against memory before anything is written."""
    import ddpmkit.limits

    labels = _digits01()[1].ravel()
    zeros, ones = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    data = _npz(tmp_path / "d.npz", np.concatenate([zeros[:30], ones[:60]]),
                np.concatenate([zeros[100:], ones[150:]]))
    balanced = _balanced(tmp_path, data, "mem")
    monkeypatch.setattr(ddpmkit.limits, "available_memory", lambda: 4_000_000)
    capsys.readouterr()
    assert main(["downstream", "--real", str(data), "--synthetic", str(balanced), "--out",
                 str(tmp_path / "s"), "--seeds", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a study at 8x8 (" in err[0] and "trained at batch 64) needs" \
        in err[0], err
    assert not (tmp_path / "s").exists()


def test_real_images_other_than_those_the_balance_topped_up_are_warned_of(tmp_path, capsys):
    labels = _digits01()[1].ravel()
    zeros, ones = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    # the balance tops up 30 zeros to 120; a val split of 20 and 20 is no set it planned for
    data = _npz(tmp_path / "d.npz", np.concatenate([zeros[:30], ones[:120]]),
                np.concatenate([zeros[100:], ones[150:]]),
                np.concatenate([zeros[60:80], ones[130:150]]))
    assert main(["downstream", "--real", str(data), "--real-split", "val", "--synthetic",
                 str(_balanced(tmp_path, data, "v")), "--out", str(tmp_path / "s"),
                 "--seeds", "2", "--steps", "2"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "tops up" in line]
    assert len(said) == 1 and said[0].startswith("warning: ") and said[0].endswith(
        "manifest.csv tops up 30 real 0 images, and --real " + f"{data} (val) has 20: the "
        "real+synthetic arm is not the balanced set; give --real the data the balance read"), said


def test_the_leakage_refusal_points_at_the_test_images_when_they_are_the_generators_own(
        tmp_path):
    """Testing on the generator's own training split is a wrong --test-split, not a reason to
    retrain the generator without its training data."""
    import torch
    from ddpmkit.downstream import Pool, TrainedOn, check_no_leakage

    test = Pool(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), np.array([0, 1]))
    trained = TrainedOn(set(test.digests), [], [])
    with pytest.raises(UserError) as refused:
        check_no_leakage(test, [tmp_path / "run"], trained, verified=True, split="train")
    message = str(refused.value)
    assert "was trained on 2 of the train images, which the study tests on" in message
    assert "(another --test or --test-split)" in message
    assert "retrain it without the train split" not in message
