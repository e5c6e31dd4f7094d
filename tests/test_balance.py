"""ddpmkit balance: how many images each class needs, and the balanced dataset it writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path


import pytest
import torch

from ddpmkit.balance import class_folders, parse_proportions, plan
from ddpmkit.cli import main
from ddpmkit.data import batch_to_model
from ddpmkit.errors import UserError
from ddpmkit.generation import Anchors, SamplingSpec, sample_batch
from ddpmkit.pixels import read_image
from ddpmkit.restoration import img2img_tensor
from ddpmkit.run import load_run
from ddpmkit.samplers import Denoiser
from conftest import TINY, write_images


def test_plan_tops_every_class_up_to_the_largest():
    assert (plan({"benign": 5900, "malignant": 374, "other": 10})
            == {"benign": 0, "malignant": 5526, "other": 5890})


def test_plan_target_sets_one_class_final_count():
    assert (plan({"benign": 5900, "malignant": 374}, target=6274, class_labels=["malignant"])
            == {"benign": 0, "malignant": 5900})
    with pytest.raises(UserError, match="below the 374 real images"):
        plan({"benign": 5900, "malignant": 374}, target=100, class_labels=["malignant"])
    with pytest.raises(UserError, match="go together"):
        plan({"a": 1}, target=10)
    # several rare classes, each up to the same count
    assert (plan({"a": 500, "b": 40, "c": 120}, target=300, class_labels=["b", "c"])
            == {"a": 0, "b": 260, "c": 180})
    with pytest.raises(UserError, match="below the 500 real images of a"):
        plan({"a": 500, "b": 40}, target=300, class_labels=["b", "a"])


def test_plan_proportions_keep_every_real_image():
    counts = {"normal": 388, "pneumonia": 3494}
    need = plan(counts, proportions={"normal": 0.5, "pneumonia": 0.5})
    assert need == {"normal": 3106, "pneumonia": 0}
    need = plan({"a": 30, "b": 10, "c": 0}, proportions={"a": 0.5, "b": 0.25, "c": 0.25})
    final = {"a": 30 + need["a"], "b": 10 + need["b"], "c": need["c"]}
    assert final == {"a": 30, "b": 15, "c": 15} and min(need.values()) >= 0
    with pytest.raises(UserError, match="sum to 1"):
        plan(counts, proportions={"normal": 0.5, "pneumonia": 0.2})
    with pytest.raises(UserError, match="--proportions normal=-1: a share must not be negative"):
        plan(counts, proportions={"normal": -1.0, "pneumonia": 2.0})  # which sums to 1
    # thirds as people write them: taken as equal shares
    assert plan({"a": 30, "b": 10, "c": 3}, proportions={"a": 0.333, "b": 0.333, "c": 0.333}) == {
        "a": 0, "b": 20, "c": 27}
    with pytest.raises(UserError, match="never removes"):
        plan(counts, proportions={"normal": 1.0})
    assert parse_proportions("benign=0.5, malignant=0.5") == {"benign": 0.5, "malignant": 0.5}
    # class names holding "," or "=" (a CSV label may): a pair ends at "=number" then "," or the end
    assert parse_proportions("nevus, atypical=0.25,a=b=0.75") == {"nevus, atypical": 0.25,
                                                                  "a=b": 0.75}
    with pytest.raises(UserError, match="class=share"):
        parse_proportions("benign:0.5")
    with pytest.raises(UserError, match="names benign twice"):
        parse_proportions("benign=0.5,malignant=0.5,benign=0.5")


def test_balance_writes_real_and_synthetic_images_in_one_manifest(tmp_path, capsys):
    for name, n in (("cat", 6), ("dog", 2)):
        write_images(tmp_path / "pets" / name, n=n, size=(8, 8), seed=len(name) + n)
    run = tmp_path / "run"
    args = [f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(map(str, v))}]"
            for k, v in TINY.items()]
    assert main(["train", f"--data={tmp_path / 'pets'}", "model.class_conditional=true",
                 "train.max_steps=4", f"--out={run}", "--quiet", *args]) == 0
    out = tmp_path / "balanced"
    assert main(["balance", str(run), "--out", str(out), "--by-class-folders", "--quiet",
                 "sample.steps=3"]) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    real = [r for r in rows if r["synthetic"] == "false"]
    fake = [r for r in rows if r["synthetic"] == "true"]
    # dog: 2 real + 4 = 6
    assert len(real) == 8 and {r["label"] for r in fake} == {"dog"} and len(fake) == 4
    assert (all((out / r["file"]).is_file() for r in fake)
            and all(r["file"].startswith(str(tmp_path)) for r in real))
    assert (len(list((out / "by_class" / "dog").iterdir())) == 6
            and len(list((out / "by_class" / "cat").iterdir())) == 6)
    assert (out / "classes" / "dog" / "manifest.csv").is_file()
    # rerunning the same command finds the images done and writes the same manifest
    before = (out / "manifest.csv").read_text()
    assert main(["balance", str(run), "--out", str(out), "--by-class-folders", "--quiet",
                 "sample.steps=3"]) == 0
    assert (out / "manifest.csv").read_text() == before
    mine = out / "by_class" / "mine" / "real_favourite.png"  # a link of the user's: kept
    mine.parent.mkdir()
    mine.symlink_to(real[0]["file"])
    assert main(["balance", str(run), "--out", str(out), "--by-class-folders", "--quiet",
                 "sample.steps=3"]) == 0
    assert mine.is_symlink()
    mine.unlink()
    # a link replaced by a file of the user's: refused by name before any link is touched
    links = sorted(p.name for p in (out / "by_class").rglob("*"))
    theirs = next((out / "by_class" / "dog").iterdir())
    theirs.unlink()
    theirs.write_text("precious")
    capsys.readouterr()
    assert main(["balance", str(run), "--out", str(out), "--by-class-folders", "--quiet",
                 "sample.steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{theirs} is not a file ddpmkit wrote" in err[0], err
    assert sorted(p.name for p in (out / "by_class").rglob("*")) == links
    theirs.unlink()
    # a smaller target: the class folders follow the new manifest, no stale link is left
    assert main(["balance", str(run), "--out", str(out), "--target", "3", "--class", "dog",
                 "--by-class-folders", "--quiet", "sample.steps=3"]) == 0
    assert len(list((out / "by_class" / "dog").iterdir())) == 3
    # --class repeated: each named class up to --target
    assert main(["balance", str(run), "--out", str(out), "--target", "7", "--class", "dog",
                 "--class", "cat", "--by-class-folders", "--quiet", "sample.steps=3"]) == 0
    assert (len(list((out / "by_class" / "dog").iterdir())) == 7
            and len(list((out / "by_class" / "cat").iterdir())) == 7)
    # another plan that leaves the generated cat out says so; its image stays on disk
    capsys.readouterr()
    assert main(["balance", str(run), "--out", str(out), "--target", "7", "--class", "dog",
                 "--by-class-folders", "--quiet", "sample.steps=3"]) == 0
    assert "holds 1 generated cat images of an earlier plan" in capsys.readouterr().out
    assert (len(list((out / "by_class" / "cat").iterdir())) == 6
            and len(list((out / "classes" / "cat" / "individual").iterdir())) == 1)
    # another seed is another set of images: refused, naming the --seed the user set (not the
    # per-class seeds derived from it, which the classes' sampling jobs record), then replaced
    # with --fresh
    balance = ["balance", str(run), "--out", str(out), "--quiet", "sample.steps=3", "--seed", "5"]
    capsys.readouterr()
    assert main(balance) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{out} holds the balanced set of another balance job (seed: 0 -> 5)" in err[0]
    assert main([*balance, "--fresh"]) == 0 and not (out / "by_class").exists()
    # the balanced set's root is not a sampling job's folder
    assert main(["sample", str(run), "-n", "2", "--steps", "2", "--out", str(out), "--quiet"]) == 2
    assert main(["balance", str(run), "--out", str(out), "--proportions", "cat=0.5,dog=0.5",
                 "--target", "9", "--class", "dog"]) == 2
    # balance decides the counts
    assert main(["balance", str(run), "--out", str(out), "sample.num=100"]) == 2
    # a plan beyond the limit of one job is refused before any class is generated
    capsys.readouterr()
    huge = tmp_path / "huge"
    assert main(["balance", str(run), "--out", str(huge), "--proportions",
                 "cat=0.0000005,dog=0.9999995", "sample.steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "balance would generate 11,999,992 dog images" in err[0], err
    assert not huge.exists()
    # nor is anything else a balanced set's root: a sampling job, a training run, someone's manifest
    job = tmp_path / "job"
    assert main(["sample", str(run), "-n", "2", "--steps", "2", "--out", str(job), "--quiet"]) == 0
    before = (job / "manifest.csv").read_text()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.csv").write_text("file,label\n")
    for target, says in ((job, "sampling job"), (run, "training run"),
                         (foreign, "no ddpmkit balance wrote")):
        capsys.readouterr()
        assert main(["balance", str(run), "--out", str(target), "--quiet", "sample.steps=3"]) == 2
        assert says in capsys.readouterr().err and not (target / "classes").exists()
    assert ((job / "manifest.csv").read_text() == before
            and (foreign / "manifest.csv").read_text() == "file,label\n")
    # a class the generator never learned, added to the data since: refused, not passed through
    write_images(tmp_path / "pets" / "owl", n=2, size=(8, 8), seed=9)
    capsys.readouterr()
    assert main(["balance", str(run), "--out", str(tmp_path / "b2"), "--quiet"]) == 2
    assert "now has class(es) owl that" in capsys.readouterr().err


def test_balance_refuses_an_unconditional_run(tmp_path, capsys):
    run = tmp_path / "run"
    args = [f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(map(str, v))}]"
            for k, v in TINY.items()]
    assert main(["train", "train.max_steps=2", f"--out={run}", "--quiet", *args]) == 0
    assert main(["balance", str(run), "--out", str(tmp_path / "b")]) == 2
    assert "not class-conditional" in capsys.readouterr().err



def test_class_names_that_clean_to_one_folder_name_get_distinct_folders():
    folders = class_folders(["x y", "x_y", "X_Y", "../up", "x_y-1"])
    assert folders == {"x y": "x_y", "x_y": "x_y-1", "X_Y": "X_Y-2", "../up": "_up",
                       "x_y-1": "x_y-1-4"}
    # distinct on case-insensitive file systems too
    assert len({f.lower() for f in folders.values()}) == 5
    # the usual case keeps its names
    assert class_folders(["cat", "dog"]) == {"cat": "cat", "dog": "dog"}
    # folders an earlier balance made are kept (on Linux an older ddpmkit gave 'Cat' and 'cat'
    # one each)
    assert class_folders(["Cat", "cat", "dog"], {"cat": "cat", "Cat": "Cat", "bird": "bird"}) == \
        {"Cat": "Cat", "cat": "cat", "dog": "dog"}
    assert class_folders(["Cat", "cat"], {"cat": "cat"}) == {"Cat": "Cat-0", "cat": "cat"}
    # names longer than a file system takes: cut, and told apart by their digest
    long = class_folders(["x" * 300, "x" * 299, "ж" * 130])
    assert len(set(long.values())) == 3
    assert all(len(f.encode()) <= 100 for f in long.values()), long


def test_balance_keeps_classes_apart_whose_names_make_one_folder_name(tmp_path):
    import numpy as np
    from PIL import Image

    rng, rows = np.random.default_rng(0), ["image,label"]
    (tmp_path / "imgs").mkdir()
    for i, label in enumerate(["a"] * 6 + ["x y"] * 2 + ["x_y"] * 3):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(
            tmp_path / "imgs" / f"im{i}.png")
        rows.append(f"im{i}.png,{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    args = [f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(map(str, v))}]"
            for k, v in TINY.items()]
    assert main(["train", f"--data={tmp_path / 'imgs'}", f"data.labels={tmp_path / 'labels.csv'}",
                 "model.class_conditional=true", "train.max_steps=2", f"--out={run}", "--quiet",
                 *args]) == 0
    out = tmp_path / "balanced"
    assert main(["balance", str(run), "--out", str(out), "--by-class-folders", "--quiet",
                 "sample.steps=2"]) == 0
    fake = [r for r in csv.DictReader(open(out / "manifest.csv")) if r["synthetic"] == "true"]
    assert sorted(r["label"] for r in fake) == ["x y"] * 4 + ["x_y"] * 3
    # no image listed twice, none overwritten by the other class
    assert len({r["file"] for r in fake}) == 7
    assert {r["file"].split("/")[1] for r in fake} == {"x_y", "x_y-2"}  # 'x y' first in class order
    assert (len(list((out / "by_class" / "x_y").iterdir())) == 6
            and len(list((out / "by_class" / "x_y-2").iterdir())) == 6)


def test_files_of_the_user_in_a_class_folder_are_refused_before_anything_is_deleted(tmp_path,
                                                                                   capsys):
    for name, n in (("cat", 6), ("dog", 2)):
        write_images(tmp_path / "pets" / name, n=n, size=(8, 8), seed=len(name) + n)
    run, out = tmp_path / "run", tmp_path / "balanced"
    args = [f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(map(str, v))}]"
            for k, v in TINY.items()]
    assert main(["train", f"--data={tmp_path / 'pets'}", "model.class_conditional=true",
                 "train.max_steps=4", f"--out={run}", "--quiet", *args]) == 0
    balance = ["balance", str(run), "--out", str(out), "--quiet", "sample.steps=3"]
    assert main(balance) == 0
    mine = out / "classes" / "dog" / "individual" / "mine.png"
    mine.write_bytes(b"the user's")
    before = (out / "manifest.csv").read_text()
    capsys.readouterr()
    # --fresh would remove the class's record, then its job would refuse the file halfway
    assert main([*balance, "--seed", "1", "--fresh"]) == 2
    assert f"{mine} is not a file ddpmkit wrote" in capsys.readouterr().err
    assert (out / "manifest.csv").read_text() == before
    # --force reaches the class jobs: written beside the file, which stays
    assert main([*balance, "--seed", "1", "--fresh", "--force"]) == 0
    assert mine.read_bytes() == b"the user's"
    # folders holding nothing but folders (what removing the user's files leaves) are nobody's
    (tmp_path / "emptied" / "classes" / "dog" / "individual").mkdir(parents=True)
    assert main([*balance[:3], str(tmp_path / "emptied"), *balance[4:]]) == 0
    # a file where a class's job writes: --force cannot help, so it is not offered, and nothing
    # (not the balance job's record either) is written
    theirs = tmp_path / "theirs"
    (theirs / "classes" / "dog" / "individual").mkdir(parents=True)
    (theirs / "classes" / "dog" / "individual" / "000000.png").write_bytes(b"the user's")
    for force in ([], ["--force"]):
        capsys.readouterr()
        assert main([*balance[:3], str(theirs), *balance[4:], *force]) == 2
        err = capsys.readouterr().err
        assert "this balance job would write over it" in err and "--force" not in err, err
        assert sorted(p.name for p in theirs.rglob("*")) == ["000000.png", "classes", "dog",
                                                             "individual"]


def test_class_names_typed_decomposed_name_the_composed_class():
    decomposed, composed = "n\u0303andu\u0301", "\u00f1and\u00fa"
    counts = {"cat": 10, composed: 2}
    assert plan(counts, target=10, class_labels=[decomposed]) == {"cat": 0, composed: 8}
    # spaces around a name, which reading the labels strips
    assert plan(counts, target=10, class_labels=[" cat "]) == {"cat": 0, composed: 0}
    assert parse_proportions(f"cat=0.5,{decomposed}=0.5") == {"cat": 0.5, composed: 0.5}


def _class_run(tmp_path, counts: dict, *train_args) -> Path:
    """A 2-step class-conditional run on class folders of `counts` images each."""
    for name, n in counts.items():
        write_images(tmp_path / "data" / name, n=n, size=(8, 8), seed=n)
    args = [f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(map(str, v))}]"
            for k, v in TINY.items()]
    assert main(["train", f"--data={tmp_path / 'data'}", "model.class_conditional=true",
                 "train.max_steps=2", f"--out={tmp_path / 'run'}", *args, *train_args]) == 0
    return tmp_path / "run"


def test_real_images_whose_path_holds_a_hash_are_linked_by_class(tmp_path):
    run, out = _class_run(tmp_path, {"plain": 6, "type #1": 2}, "--quiet"), tmp_path / "balanced"
    assert main(["balance", str(run), "--out", str(out), "--by-class-folders", "--quiet",
                 "sample.steps=2"]) == 0
    rare = [f for f in (out / "by_class").iterdir() if f.name != "plain"]
    assert len(rare) == 1 and sorted(p.name[:4] for p in rare[0].iterdir()) == (
        ["real"] * 2 + ["synt"] * 4)


def test_a_class_no_training_image_has_is_warned_of_in_training_and_balance(tmp_path, capsys):
    run = _class_run(tmp_path, {"cat": 4, "dog": 2}, "data.class_names=[cat,dog,fox]")
    assert ("warning: data.class_names names fox, which no training image has"
            in capsys.readouterr().out)
    assert main(["balance", str(run), "--out", str(tmp_path / "b"), "sample.steps=2"]) == 0
    assert "trained on no image of fox" in capsys.readouterr().out


def test_balance_counts_the_images_the_run_trained_on_not_new_ones(tmp_path, capsys):
    run = _class_run(tmp_path, {"cat": 4, "dog": 2}, "--quiet")
    write_images(tmp_path / "more", n=3, size=(8, 8), seed=9)
    for f in (tmp_path / "more").iterdir():
        f.rename(tmp_path / "data" / "dog" / f"new_{f.name}")
    assert main(["balance", str(run), "--out", str(tmp_path / "b"), "sample.steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data has changed since it trained (3 image(s)" in err[0], err


def test_balance_refuses_labels_changed_since_training(tmp_path, capsys):
    """The same images under other labels: digests cannot tell, the recorded class counts can."""
    run = _class_run(tmp_path, {"cat": 4, "dog": 2}, "--quiet")
    moved = sorted((tmp_path / "data" / "cat").iterdir())[0]
    moved.rename(tmp_path / "data" / "dog" / f"moved_{moved.name}")
    assert main(["balance", str(run), "--out", str(tmp_path / "b"), "sample.steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "now gives 3 image(s) of cat, and" in err[0], err
    assert "trained on 4: its labels changed since training" in err[0]
    assert not (tmp_path / "b").exists()
    # trained on from here: said, as a resume on changed images is, and recorded
    args = [f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(map(str, v))}]"
            for k, v in TINY.items()]
    assert main(["train", f"--data={tmp_path / 'data'}", "model.class_conditional=true",
                 "train.max_steps=4", f"--out={run}", *args, "--quiet"]) == 0
    assert ("warning: the labels changed since " + str(run) + " started (images per class cat: "
            "4 -> 3, dog: 2 -> 3)") in capsys.readouterr().out
    assert json.loads((run / "meta.json").read_text())["class_counts"] == {"cat": 3, "dog": 3}


def test_labels_swapped_with_the_counts_unchanged_are_refused_by_balance_and_said_by_train(
        tmp_path, capsys):
    run = _class_run(tmp_path, {"cat": 4, "dog": 2}, "--quiet")  # other seeds: other images
    cat, dog = (sorted((tmp_path / "data" / c).iterdir())[0] for c in ("cat", "dog"))
    cat.rename(tmp_path / "data" / "dog" / f"was_cat_{cat.name}")
    dog.rename(tmp_path / "data" / "cat" / f"was_dog_{dog.name}")
    assert main(["balance", str(run), "--out", str(tmp_path / "b"), "sample.steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "now gives some images other labels than" in err[0], err
    assert not (tmp_path / "b").exists()
    args = [f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(map(str, v))}]"
            for k, v in TINY.items()]
    assert main(["train", f"--data={tmp_path / 'data'}", "model.class_conditional=true",
                 "train.max_steps=4", f"--out={run}", *args, "--quiet"]) == 0
    assert (f"warning: the labels changed since {run} started (the same counts per class, other "
            f"images in them)") in capsys.readouterr().out
    assert main(["balance", str(run), "--out", str(tmp_path / "b"), "sample.steps=2",
                 "--quiet"]) == 0  # trained on them now


def test_images_added_before_a_resume_are_counted_in_the_runs_classes(tmp_path, capsys):
    """Training resumed on more images records their classes too, so balance takes them as the
    run's own and tops up the classes as they are now."""
    run = _class_run(tmp_path, {"cat": 4, "dog": 2}, "--quiet")
    write_images(tmp_path / "more", n=3, size=(8, 8), seed=9)
    for f in (tmp_path / "more").iterdir():
        f.rename(tmp_path / "data" / "dog" / f"new_{f.name}")
    args = [f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(map(str, v))}]"
            for k, v in TINY.items()]
    assert main(["train", f"--data={tmp_path / 'data'}", "model.class_conditional=true",
                 "train.max_steps=4", f"--out={run}", *args, "--quiet"]) == 0
    assert json.loads((run / "meta.json").read_text())["class_counts"] == {"cat": 4, "dog": 5}
    said = capsys.readouterr().out  # new images, not new labels
    assert "the data changed since" in said and "the labels changed" not in said
    assert main(["balance", str(run), "--out", str(tmp_path / "b"), "sample.steps=2"]) == 0
    assert "cat: 4 real + 1 generated; dog: 5 real + 0 generated" in capsys.readouterr().out


def _generated(out: Path, label: str) -> list[dict]:
    rows = csv.DictReader(open(out / "manifest.csv"))
    return sorted((r for r in rows if r["synthetic"] == "true" and r["label"] == label),
                  key=lambda r: int(r["index"]))


def test_from_real_varies_each_real_image_of_the_class_in_turn(tmp_path, capsys):
    run, out = _class_run(tmp_path, {"cat": 6, "dog": 2}, "--quiet"), tmp_path / "balanced"
    assert main(["balance", str(run), "--out", str(out), "--from-real", "0.05", "--quiet",
                 "sample.steps=3"]) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    real = [r for r in rows if r["synthetic"] == "false"]
    real_images = torch.stack([read_image(Path(r["file"])) for r in real]).float()
    dogs = [i for i, r in enumerate(real) if r["label"] == "dog"]
    generated = _generated(out, "dog")
    assert len(generated) == 4
    for k, row in enumerate(generated):  # image k stays nearest real dog k mod 2, of all 8
        image = read_image(out / row["file"]).float()
        distances = ((real_images - image) ** 2).flatten(1).sum(1)
        assert int(distances.argmin()) == dogs[k % 2]
        assert not torch.equal(image, real_images[dogs[k % 2]])  # varied, not copied
        assert row["varies"] == real[dogs[k % 2]]["file"]  # the manifest names it
    assert {r["varies"] for r in real} == {""}
    assert {r["steps"] for r in generated} == {"3"}
    # the same job at another strength is another job: refused, not mixed in
    assert main(["balance", str(run), "--out", str(out), "--from-real", "0.5", "--quiet",
                 "sample.steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another balance job (from_real: 0.05 -> 0.5)" in err[0], err


def test_from_real_is_img2img_of_the_real_image_towards_its_class(tmp_path):
    """Known answer: balance's image k is SDEdit (restoration.img2img_tensor) of real image
    k mod n with the class label, from the same noise stream."""
    run_path = _class_run(tmp_path, {"cat": 6, "dog": 3}, "--quiet")
    run = load_run(run_path)
    anchors = Anchors(torch.stack([read_image(p) for p in sorted(
        (tmp_path / "data" / "dog").iterdir())]), strength=0.3)
    spec = SamplingSpec(sampler="ddim", steps=4, class_label="dog").checked(run)
    ours = sample_batch(run, [0, 1, 2, 3, 4], 7, spec, anchors=anchors)
    label = torch.full((5,), run.config.data.class_names.index("dog"))
    denoiser = Denoiser(run.net, run.schedule, run.config.diffusion.prediction, True, labels=label)
    x0 = batch_to_model(anchors.images[[0, 1, 2, 0, 1]])
    theirs = img2img_tensor(denoiser, x0, 0.3, 7, indices=[0, 1, 2, 3, 4], sampler="ddim",
                            steps=4)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("args, message", [
    (["--from-real", "0"], "--from-real 0.0: use a strength above 0"),
    (["--from-real", "1.5"], "--from-real 1.5: use a strength above 0"),
    (["--from-real", "0.3", "sample.spacing=karras"], "sample.spacing=karras does not apply"),
    (["--from-real", "0.3", "--class", "fox", "--target", "3"], "trained on no fox image to vary"),
])
def test_from_real_bad_inputs_get_one_line(tmp_path, capsys, args, message):
    run = _class_run(tmp_path, {"cat": 4, "dog": 2}, "--quiet", "data.class_names=[cat,dog,fox]")
    out = tmp_path / "b"
    assert main(["balance", str(run), "--out", str(out), "--quiet", "sample.steps=2",
                 *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (out / "manifest.csv").exists()


def test_from_real_records_the_steps_its_strength_leaves(tmp_path):
    """At strength 0.05 of 100 timesteps, t = 4.95: five integer timesteps lie below it, so
    sample.steps=50 takes six network calls, and the manifest says six."""
    run, out = _class_run(tmp_path, {"cat": 3, "dog": 1}, "--quiet"), tmp_path / "balanced"
    assert main(["balance", str(run), "--out", str(out), "--from-real", "0.05", "--quiet",
                 "sample.steps=50"]) == 0
    assert {r["steps"] for r in _generated(out, "dog")} == {"6"}
    # steps=40 makes the same images: the same job, not another
    assert main(["balance", str(run), "--out", str(out), "--from-real", "0.05", "--quiet",
                 "sample.steps=40"]) == 0
