"""The memorization audit: known answers on real digits, and the command with its bad inputs."""

import csv
import io
import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY
from ddpmkit.cli import main
from ddpmkit.config import DataConfig, load_config
from ddpmkit.data import load_images
from ddpmkit.errors import UserError
from ddpmkit.metrics.memorization import audit, nearest, nearest_features
from ddpmkit.training import train


@pytest.fixture(scope="module")
def digits():
    """16x16 digits split into 1,000 training images and 797 held out, in a fixed random order."""
    images = load_images(DataConfig(image_size=16), log=lambda *_: None).images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order[:1000]], images[order[1000:]]


def _jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[0].numpy()).save(buf, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(buf)))[None])
    return torch.stack(out)


def _perturbed(kind: str, images: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "noise":  # 8/255 Gaussian noise
        return (images.float() + 8 * torch.randn(images.shape, generator=g)).round().clamp(0, 255) \
            .to(torch.uint8)
    if kind == "shift":  # one pixel right, the edge filled with black
        return F.pad(images, (1, 0, 0, 0))[..., :, :-1]
    return _jpeg(images)


@pytest.mark.parametrize("kind", ["noise", "shift", "jpeg"])
def test_training_images_slightly_perturbed_are_flagged(digits, kind):
    train, held = digits
    result = audit(_perturbed(kind, train[:300]), train, held[:400], share=0.01)
    assert result.copy_rate >= 0.95 and result.calibration.on == "held-out"
    assert (result.neighbours.index[result.copies] == np.arange(300)[result.copies]).mean() > 0.95


def test_held_out_images_are_flagged_at_no_more_than_the_share(digits):
    train, held = digits
    share, n = 0.01, 397
    result = audit(held[400:], train, held[:400], share=share)  # new images; calibrated on others
    assert result.copy_rate <= share + 3 * (share * (1 - share) / n) ** 0.5
    loo = audit(held[400:], train, None, share=share)  # calibrated on the training set itself
    assert loo.calibration.on == "leave-one-out" and loo.copy_rate <= share + 3 * (share / n) ** 0.5


def test_duplicates_among_the_calibration_images_do_not_blind_the_audit(digits):
    """An image saved twice in the training set, or a held-out image re-encoded from a training
    one, is no new image: left in the calibration, a few of them pull the threshold to 0 and
    every copy passes. They are set aside, and the threshold is the clean set's."""
    train, held = digits
    copies = _perturbed("jpeg", train[100:400])
    clean = audit(copies, train, None)
    twice = torch.cat([train, train[:30]])  # 3% of the training images saved twice
    loo = audit(copies, twice, None)
    assert loo.calibration.set_aside >= 60 and clean.calibration.set_aside == 0
    assert loo.calibration.threshold == pytest.approx(clean.calibration.threshold, rel=0.1)
    assert loo.copy_rate >= 0.95
    held_clean = audit(copies, train, held[:400])
    leaky = audit(copies, train, torch.cat([held[:400], _jpeg(train[:12], quality=95)]))
    assert leaky.calibration.set_aside >= 12 and held_clean.calibration.set_aside == 0
    assert leaky.calibration.threshold == pytest.approx(held_clean.calibration.threshold, rel=0.1)
    assert leaky.copy_rate >= 0.95
    # duplicates the majority: still set aside (the scale is the distance to the k-th nearest
    # training image, which a duplicate leaves as it is)
    mostly = audit(copies, train, torch.cat([held[:40], _jpeg(train[:60], quality=95)]))
    assert mostly.calibration.set_aside >= 60 and mostly.copy_rate >= 0.95
    with pytest.raises(UserError, match="after setting aside 30 held-out images that are a "
                                        "training image over again, 10 are left"):
        audit(copies, train, torch.cat([held[:10], _jpeg(train[:30], quality=95)]))


@pytest.mark.parametrize("view, made", [("hflip", lambda x: x.flip(-1)),
                                         ("rot90", lambda x: x.rot90(3, (-2, -1)))])
def test_copies_in_a_view_the_run_trained_on_are_flagged_and_new_images_are_not(digits, view, made):
    train, held = digits
    planted = made(train[:300])
    assert audit(planted, train, held[:400]).copy_rate < 0.05  # unseen views: far apart
    seen = partial(nearest, views=(view,))
    found = audit(planted, train, held[:400], search=seen)
    assert found.copy_rate == 1 and (found.neighbours.index == np.arange(300)).all()
    share, n = 0.01, 397  # calibrated in the same views, new images stay within the share
    assert audit(held[400:], train, held[:400], search=seen).copy_rate <= share + 3 * (
        share * (1 - share) / n) ** 0.5


def test_the_views_searched_are_those_the_run_trained_on():
    from ddpmkit.metrics.memorization import seen_views

    cfg = load_config(None, {"data.hflip": True, "train.augment": ["rot90", "translate"],
                             "train.augment_p": 0.5})
    assert (seen_views(cfg) == ("hflip", "rot90", "translate")  # translations reach farther
            and seen_views(load_config(None, {})) == ())


@pytest.mark.parametrize("k", [0, 1, 7])
def test_the_copy_count_of_a_set_with_k_planted_copies_is_k(digits, k):
    train, held = digits
    g = torch.Generator().manual_seed(2)
    novel = torch.randint(0, 256, (60, 1, 16, 16), generator=g, dtype=torch.uint8)  # like nothing
    planted = torch.cat([novel, train[100:100 + k]])
    assert int(audit(planted, train, held[:400]).copies.sum()) == k


def test_nearest_leaves_itself_out_and_tolerates_a_shift(digits):
    train, _ = digits
    found = nearest(train[:50], train[:200], exclude=torch.arange(50))
    assert not (found.index == np.arange(50)).any()
    moved = F.pad(train[:20], (0, 0, 1, 0))[..., :-1, :]
    tolerant, strict = nearest(moved, train[:200], shift=1), nearest(moved, train[:200], shift=0)
    assert (tolerant.index == np.arange(20)).all() and tolerant.d1.max() < strict.d1.mean()


def test_feature_space_search_is_cosine_and_finds_scaled_copies():
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(300, 64, generator=g).relu()
    query = torch.cat([3 * ref[:10], torch.randn(5, 64, generator=g).relu()])
    found = nearest_features(query, ref)
    assert (found.index[:10] == np.arange(10)).all() and found.d1[:10].max() < 1e-5
    assert found.d1[10:].min() > 0.05 and (found.ratio[:10] < 1e-3).all()
    alone = nearest_features(ref[:20], ref, exclude=torch.arange(20))
    assert not (alone.index == np.arange(20)).any()


def test_efficientnet_features_flag_shifted_copies_and_spare_new_images(digits):
    from ddpmkit.audit import add_feature_view
    from ddpmkit.metrics import features as fx

    train, held = digits[0][:120], digits[1]
    # shifted: ImageNet features of an upsampled 16x16 image move a long way under pixel noise,
    # so noisy copies are the pixel view's to catch
    gen = torch.cat([_perturbed("shift", train[:10]), held[100:110]])  # 10 copies, 10 new
    pixels = audit(gen, train, held[:80])
    summary = {"share": 0.01, "nearest": [{} for _ in gen]}
    add_feature_view(summary, fx.efficientnet(torch.device("cpu")), (gen, train, held[:80]),
                     pixels, log=lambda *_: None)
    f = summary["features"]
    assert f["extractor"] == "efficientnet" and f["calibrated_on"] == "held-out"
    flagged = [row["feature_distance"] < f["threshold"] for row in summary["nearest"]]
    assert sum(flagged[:10]) >= 9 and sum(flagged[10:]) <= 1
    assert [row["feature_training_image"] for row in summary["nearest"][:10]] == list(range(10))


# --- the command -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    cfg = load_config(None, {**TINY, "train.max_steps": 4, "train.out_dir": str(tmp / "run")})
    return train(cfg, log=lambda *_: None, progress=False).path


def _pngs(folder, images):
    (folder / "individual").mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy()).save(folder / "individual" / f"{i:06d}.png")
    return folder


def test_the_audit_command_reports_planted_copies(run, tmp_path, capsys):
    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images  # the run's data
    g = torch.Generator().manual_seed(3)
    gen = _pngs(tmp_path / "gen", torch.cat([digits8[:5], torch.randint(0, 256, (45, 1, 8, 8),
                                                                        generator=g,
                                                                        dtype=torch.uint8)]))
    assert main(["audit", str(gen), "--ref", str(run), "--json", "--features", "classifier"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((gen / "audit.json").read_text())
    assert printed == saved and saved["copies"] == 5 and saved["calibrated_on"] == "leave-one-out"
    features = saved["features"]
    assert features["extractor"] == "classifier" and features["calibrated_on"] == "leave-one-out"
    assert features["copies_in_both"] <= min(features["copies"], 5)
    assert [r["feature_training_image"] for r in saved["nearest"][:5]] == list(range(5))
    assert [r["copy"] for r in saved["nearest"][:5]] == [True] * 5
    assert saved["training_images_copied"] == 5 and "most_copied" in saved
    # each pair names its files, so a flagged image can be found
    assert [(r["file"], r["training_file"]) for r in saved["nearest"][:2]] == [
        ("individual/000000.png", "sklearn.datasets.load_digits#0"),
        ("individual/000001.png", "sklearn.datasets.load_digits#1")]
    page = (gen / "audit.html").read_text()
    assert "individual/000003.png · training sklearn.datasets.load_digits#3" in page
    assert "closer to a training image than 99% of leave-one-out real images are" in page
    assert page.count("data:image/png;base64,") == 24 and "<script" not in page


def test_copies_in_a_larger_sample_folder_are_found_as_exactly_as_at_the_runs_size(run, tmp_path):
    from ddpmkit.audit import run_audit
    from ddpmkit.images import to_uint8, upsample

    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    new = torch.randint(0, 256, (24, 1, 8, 8), generator=torch.Generator().manual_seed(5),
                        dtype=torch.uint8)
    # what `sample --size 32` writes of a sample that is a training image, and of new images
    big = to_uint8(upsample(torch.cat([digits8[:8], new]).float() / 127.5 - 1, 32))
    found = run_audit(_pngs(tmp_path / "gen", big), run, features="none", log=lambda *_: None)
    assert found["copies"] == 8 and all(row["distance"] < 1e-3 for row in found["nearest"][:8])


def test_copies_in_a_smaller_folder_are_found_at_its_size(run, tmp_path):
    from ddpmkit.audit import run_audit

    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    new = torch.randint(0, 256, (24, 1, 8, 8), generator=torch.Generator().manual_seed(5),
                        dtype=torch.uint8)
    small = torch.stack([torch.from_numpy(np.array(  # as a user's image editor shrinks them
        Image.fromarray(img[0].numpy()).resize((6, 6), Image.BICUBIC)))[None]
        for img in torch.cat([digits8[:8], new])])
    found = run_audit(_pngs(tmp_path / "gen", small), run, features="none", log=lambda *_: None)
    assert found["copies"] == 8, [row["distance"] for row in found["nearest"][:8]]
    assert [row["training_image"] for row in found["nearest"][:8]] == list(range(8))


def test_the_audit_page_renders_in_headless_chromium(run, tmp_path):
    from test_report import _browser

    _browser()  # skips, saying why, where there is no browser
    from ddpmkit.audit import run_audit

    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    gen = _pngs(tmp_path / "gen", digits8[:30])
    run_audit(gen, run, features="none", log=lambda *_: None)
    from test_report import render

    shown = render(gen / "audit.html", tmp_path)
    assert shown["images"] == 24 and len(shown["plots"]) == 1


def test_the_threshold_flags_at_most_its_share_of_reference_images_and_ties_at_zero_only_copies():
    from ddpmkit.metrics.memorization import is_copy, threshold

    for n in (100, 150, 199, 250, 397, 1000):
        d = np.random.default_rng(n).random(n)
        for share in (0.01, 0.05, 0.2):
            # a new image ranks anywhere among n + 1 alike: below the threshold with this chance
            flagged_new = (is_copy(d, threshold(d, share)).sum() + 1) / (n + 1)
            assert share - 1 / (n + 1) < flagged_new <= share + 1e-12, (n, share)
    # a training set with exact duplicates has leave-one-out distance 0: only exact copies then
    assert is_copy(np.array([0.0, 1e-7, 0.001, 0.01]), 0.0).tolist() == [True, True, False, False]


def test_a_streamed_run_is_audited_against_its_data_as_it_is_now(tmp_path):
    """A streamed run never holds its data whole, so it records no digests: its data, read again,
    stands in, and the audit says so."""
    from ddpmkit.audit import run_audit

    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    np.save(tmp_path / "d.npy", digits8[:200].numpy())
    ref = train(load_config(None, {**TINY, "train.max_steps": 2, "data.stream": True,
                                   "data.workers": 0, "data.path": str(tmp_path / "d.npy"),
                                   "train.out_dir": str(tmp_path / "streamed")}),
                log=lambda *_: None, progress=False).path
    new = torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(5),
                        dtype=torch.uint8)
    said = []
    found = run_audit(_pngs(tmp_path / "gen", torch.cat([digits8[:6], new])), ref,
                      features="none", log=said.append)
    assert found["copies"] == 6
    assert any("streamed its data, so it recorded no training images" in m for m in said)


@pytest.mark.parametrize("case", ["unrecorded", "empty", "overlap", "mixed", "channels"])
def test_bad_inputs_get_one_clear_line(run, tmp_path, capsys, case):
    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    gen, args = _pngs(tmp_path / "gen", digits8[:30]), []
    ref = run
    if case == "unrecorded":  # its record deleted
        ref = shutil.copytree(run, tmp_path / "unrecorded")
        (ref / "training_images.sha256").unlink()
        says = "recorded no training images"
    elif case == "empty":
        gen = tmp_path / "nothing"
        gen.mkdir()
        says = "no images in"
    elif case == "overlap":
        (tmp_path / "held").mkdir()
        for i, img in enumerate(digits8[:40]):
            Image.fromarray(img[0].numpy()).save(tmp_path / "held" / f"{i}.png")
        args, says = ["--holdout", str(tmp_path / "held")], "40 of its images are training images"
    elif case == "mixed":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(gen / "individual" / "big.png")
        says = "holds images of 2 sizes"
    else:
        gen = tmp_path / "rgb"
        gen.mkdir()
        for i in range(3):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(gen / f"{i}.png")
        says = "holds 3-channel images and"
    assert main(["audit", str(gen), "--ref", str(ref), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_every_user_of_a_threshold_is_told_when_its_share_is_finer_than_its_images(digits):
    """audit, --drop-copies and train.audit_every calibrate alike, so all three say it."""
    from ddpmkit.metrics.memorization import CopyFilter

    train, _ = digits
    said = []
    CopyFilter.calibrated(train[:24]).calibration.warn("--drop-copies", said.append)
    assert len(said) == 1 and said[0].startswith("--drop-copies: warning: a share of 0.01 of 24")
    assert "about 1/25 (4.0%) of new real images would be flagged" in said[0]
    assert said[0].endswith("give more held-out images (--holdout)")  # no --share here
    said.clear()
    CopyFilter.calibrated(train[:200], share=0.01).calibration.warn("audit", said.append)
    assert said == []


def test_drop_overlap_leaves_training_images_out_of_the_holdout(run, tmp_path, capsys):
    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    gen, held = _pngs(tmp_path / "gen", digits8[:30]), tmp_path / "held"
    held.mkdir()
    # 40 training images and 30 the generator never saw (mirrored digits)
    for i, img in enumerate(torch.cat([digits8[:40], digits8[40:70].flip(-1)])):
        Image.fromarray(img[0].numpy()).save(held / f"{i}.png")
    assert main(["audit", str(gen), "--ref", str(run), "--holdout", str(held), "--drop-overlap",
                 "--features", "none"]) == 0
    said = capsys.readouterr().out
    assert "holdout: left out 40 of 70 images that are training images" in said
    # 30 calibration images cannot resolve a 1% quantile: the rate it gives instead is said
    assert "a share of 0.01 of 30 calibration images is less than one: " in said
    assert "about 1/31 (3.2%) of new real images would be flagged, not 1.0%" in said
    assert "give more held-out images (--holdout) or a larger --share" in said
    saved = json.loads((gen / "audit.json").read_text())
    assert saved["calibrated_on"] == "held-out" and sum(saved["distances"]["reference"]) == 30
    assert saved["copies"] == 30  # every generated image is a training image
    # --json: stdout holds the JSON alone; the warnings still reach the user, on stderr
    assert main(["audit", str(gen), "--ref", str(run), "--holdout", str(held), "--drop-overlap",
                 "--features", "none", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["copies"] == 30
    assert "a share of 0.01 of 30 calibration images is less than one" in err
    assert main(["audit", str(gen), "--ref", str(run), "--drop-overlap"]) == 2
    assert "add --holdout DATA" in capsys.readouterr().err


def test_drop_copies_draws_flagged_images_again_with_seeds_the_manifest_records(run, tmp_path):
    import csv

    from ddpmkit.config import SampleConfig
    from ddpmkit.generation import generate
    from ddpmkit.metrics.memorization import Calibration, CopyFilter
    from ddpmkit.run import RunDir, load_run

    loaded, train_images = load_run(run), RunDir(run).training_images(log=lambda *_: None)
    first = tmp_path / "plain"
    generate(loaded, SampleConfig(out_dir=str(first), num=40, steps=3), log=lambda *_: None,
             progress=False)
    files = [first / "individual" / f"{i:06d}.png" for i in range(40)]
    plain = torch.stack([torch.from_numpy(np.array(Image.open(f))) for f in files])[:, None]
    d1 = CopyFilter(train_images, Calibration(1.0, "test", np.ones(0), 0)).distances(plain)
    limit = float(np.median(d1))  # half the images count as "copies" under this threshold
    said = []
    out = tmp_path / "dropped"
    flag_half = CopyFilter(train_images, Calibration(limit, "test", np.ones(0), 0), redraws=10)
    generate(loaded, SampleConfig(out_dir=str(out), num=40, steps=3), log=said.append,
             progress=False, copies=flag_half)
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert list(rows[0])[-1] == "nearest" and len(rows) == 40
    redrawn = [r for r in rows if r["seed"] != "0"]
    assert 15 <= len(redrawn) <= 25  # the flagged half, drawn again with a seed of their own
    assert sum(float(r["nearest"]) < limit for r in rows) <= 2  # 0.5^10 chance each to stay
    kept = [r for r in rows if r["seed"] == "0"]
    assert all(float(r["nearest"]) >= limit for r in kept)
    left = sum(float(r["nearest"]) < limit for r in rows)
    outcome = (f"{left} still closer than {limit:.4f} to a training image after 10 redraws "
               f"(its nearest column)" if left
               else f"none left (threshold {limit:.4f}, calibrated test)")
    assert [m for m in said if m.startswith("near-copies")] == [
        f"near-copies: {len(redrawn)} of 40 image(s) drawn again (the manifest's seed column); "
        f"{outcome}"]
    # an image is its (seed, index): the recorded seed regenerates it
    from ddpmkit.generation import SamplingSpec, sample_batch
    from ddpmkit.images import to_uint8

    r = redrawn[0]
    again = to_uint8(sample_batch(loaded, [int(r["index"])], int(r["seed"]),
                                  SamplingSpec(steps=3).checked(loaded)))[0]
    assert torch.equal(again, torch.from_numpy(np.array(Image.open(out / r["file"])))[None])


def test_sample_drop_copies_from_the_command_line(run, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(run), "-n", "8", "--steps", "2", "--out", str(out), "--drop-copies",
                 "--quiet"]) == 0
    header = (out / "manifest.csv").read_text().splitlines()[0]
    assert header.endswith(",nearest") and "near-copies" in capsys.readouterr().out
    assert main(["sample", str(run), "-n", "8", "--out", str(tmp_path / "t"), "--holdout",
                 str(tmp_path)]) == 2
    assert "--holdout and --drop-overlap calibrate --drop-copies" in capsys.readouterr().err
    assert main(["sample", str(run), "-n", "8", "--out", str(tmp_path / "t"), "--max-redraws",
                 "-5"]) == 2
    assert "--max-redraws limits --drop-copies: add --drop-copies" in capsys.readouterr().err


def test_downstream_counts_copies_at_the_threshold_drop_copies_used(run, tmp_path):
    """The study's copy rate of a set --drop-copies made agrees with that filter (its threshold may
    have been calibrated on --holdout images the study does not know of)."""
    from ddpmkit.downstream import Pool, copy_rate, recorded_copy_threshold
    from ddpmkit.pixels import read_image

    out = tmp_path / "s"
    assert main(["sample", str(run), "-n", "8", "--steps", "2", "--out", str(out), "--drop-copies",
                 "--quiet"]) == 0
    threshold = recorded_copy_threshold(out)
    record = json.loads((out / ".ddpmkit.json").read_text())
    assert threshold == record["job"]["drop_copies"]["threshold"]
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    left = sum(float(r["nearest"]) < threshold for r in rows)
    images = torch.stack([read_image(out / r["file"]) for r in rows])
    pool = Pool(images, np.zeros(len(rows), dtype=int))
    assert copy_rate(pool, [run], threshold).startswith(f"{left / 8:.1%} ({left} of 8; threshold "
                                                        f"{threshold:.4f}, the one --drop-copies")
    assert "calibrated leave-one-out" in copy_rate(pool, [run])
    assert recorded_copy_threshold(tmp_path / "nothing") is None


def test_audit_without_ref_audits_against_the_run_the_folder_names(run, tmp_path, capsys):
    gen = tmp_path / "s"
    assert main(["sample", str(run), "-n", "4", "--steps", "2", "--out", str(gen), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["audit", str(gen), "--features", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"] == str(Path(run).resolve())
    plain = _pngs(tmp_path / "plain", torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    assert main(["audit", str(plain), "--features", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names no run that made it: give the run" in err[0], err
    assert not (plain / "audit.json").exists()
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    assert main(["sample", str(moved), "-n", "2", "--steps", "2", "--out", str(tmp_path / "m"),
                 "--quiet"]) == 0
    shutil.rmtree(moved)
    capsys.readouterr()
    assert main(["audit", str(tmp_path / "m"), "--features", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"names the run {moved}, which is not there" in err[0], err


def _tiny_run(out, **overrides):
    cfg = load_config(None, {**TINY, "train.max_steps": 2, "train.out_dir": str(out), **overrides})
    return train(cfg, fresh=True, log=lambda *_: None, progress=False).path


def test_images_made_before_the_run_trained_again_on_other_images_are_refused(tmp_path, capsys):
    run = _tiny_run(tmp_path / "run")
    gen = tmp_path / "gen"
    assert main(["sample", str(run), "-n", "4", "--steps", "2", "--out", str(gen), "--quiet"]) == 0
    assert main(["audit", str(gen), "--ref", str(run), "--features", "none"]) == 0
    np.save(tmp_path / "other.npy", np.random.default_rng(0).integers(0, 255, (64, 8, 8),
                                                                       dtype=np.uint8))
    _tiny_run(tmp_path / "run", **{"data.path": str(tmp_path / "other.npy")})
    capsys.readouterr()
    assert main(["audit", str(gen), "--ref", str(run), "--features", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "before it was trained again on other images" in err[0], err


def test_a_run_trained_on_mirrored_images_is_audited_for_mirrored_copies(tmp_path, capsys):
    run = _tiny_run(tmp_path / "run", **{"data.hflip": True})
    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    new = torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(6),
                        dtype=torch.uint8)
    gen = _pngs(tmp_path / "gen", torch.cat([digits8[:10].flip(-1), new]))
    assert main(["audit", str(gen), "--ref", str(run), "--features", "none", "--json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["training_views"] == ["as trained", "hflip"] and saved["copies"] == 10
    assert [r["training_image"] for r in saved["nearest"][:10]] == list(range(10))
    # the page shows each mirrored copy's training image mirrored, as it matched
    from ddpmkit.metrics.memorization import as_matched

    shown, turned = as_matched(digits8[3].flip(-1), digits8[3], ("hflip",))
    assert turned and torch.equal(shown, digits8[3].flip(-1))
    shown, turned = as_matched(digits8[3], digits8[3], ("hflip",))
    assert not turned and torch.equal(shown, digits8[3])
    copies = [f for f in (gen / "audit.html").read_text().split("<figure>") if "· copy<" in f]
    assert len(copies) == 10 and all("(shown as matched: flipped or turned)" in f for f in copies)


def test_a_holdout_is_read_at_the_runs_size_and_the_data_folder_is_no_generated_folder(
        tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    for i, img in enumerate(digits8[:40]):
        Image.fromarray(img[0].numpy()).save(data / f"{i}.png")
    run = _tiny_run(tmp_path / "run", **{"data.path": str(data)})
    gen = _pngs(tmp_path / "gen", digits8[40:60])
    for command in (["audit", str(gen), "--ref", str(run)],
                    ["sample", str(run), "-n", "2", "--out", str(tmp_path / "s"), "--drop-copies"]):
        for key in ("data.image_size=4", "data.channels=3"):
            assert main([*command, "--holdout", key]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "compared with the run's at its" in err[0], err
    # another file's split: several data.key=value words in one --holdout, a path with spaces
    other = tmp_path / "held out" / "other.npz"
    other.parent.mkdir()
    np.savez(other, train_images=digits8[:5, 0].numpy(), val_images=digits8[60:85, 0].numpy())
    from ddpmkit.run import RunDir
    for where in (f"data.path={other} data.split=val", f"data.path='{other}'  data.split=val"):
        assert len(RunDir(run).other_data(where)) == 25
    named = _pngs(tmp_path / "held=2", digits8[60:63])  # a folder whose name holds "="
    assert len(RunDir(run).other_data(str(named))) == 3
    assert main(["audit", str(data), "--ref", str(run)]) == 2
    assert "holds " in capsys.readouterr().err and not (data / "audit.json").exists()
    # a holdout that is not there names the flag; a run whose data moved says where it was
    audit = ["audit", str(gen), "--ref", str(run), "--features", "none"]
    assert main([*audit, "--holdout", str(tmp_path / "nope")]) == 2
    assert f"--holdout {tmp_path / 'nope'}: data path not found" in capsys.readouterr().err
    (tmp_path / "val.csv").write_text("image,label\n0.png,a\n")
    assert main([*audit, "--holdout", str(tmp_path / "val.csv")]) == 2
    assert (f"--holdout {tmp_path / 'val.csv'}: data path {tmp_path / 'val.csv'} is a CSV, not "
            f"images: a labels CSV is given as data.labels=" in capsys.readouterr().err)
    data.rename(tmp_path / "moved")
    assert main(audit) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run} trained on {data}, which is no longer there: put it" in err[0]
    assert err[0].endswith("and checked against training_images.sha256)")


def test_sample_drop_copies_json_says_what_was_drawn_again(run, tmp_path, capsys):
    assert main(["sample", str(run), "-n", "6", "--steps", "2", "--out", str(tmp_path / "s"),
                 "--drop-copies", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)["drop_copies"]
    rows = list(csv.DictReader(open(tmp_path / "s" / "manifest.csv")))
    assert said["images"] == 6 and said["redrawn"] == sum(r["seed"] != "0" for r in rows)
    assert said["copies_left"] == sum(float(r["nearest"]) < said["threshold"] for r in rows)
    assert said["calibrated_on"] == "leave-one-out" and said["max_redraws"] == 10


def test_a_holdout_smaller_than_the_runs_images_is_warned_of(run, tmp_path):
    from ddpmkit.audit import run_audit

    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    small = F.avg_pool2d(digits8[100:160].float(), 2).round().to(torch.uint8)  # 4x4
    np.save(tmp_path / "small.npy", small[:, 0].numpy())
    said = []
    run_audit(_pngs(tmp_path / "gen", digits8[:20]), run, holdout=str(tmp_path / "small.npy"),
              features="none", log=said.append)
    assert any("60 of its 60 images are smaller than the run's 8x8" in m for m in said), said


def test_downstream_counts_mirrored_copies_of_a_run_that_trained_on_mirrored_images(tmp_path):
    """The study searches the views the run trained in, as --drop-copies and audit do: a mirrored
    training image is a copy of what such a run saw."""
    from ddpmkit.downstream import Pool, copy_rate
    from ddpmkit.run import RunDir

    cfg = load_config(None, {**TINY, "train.max_steps": 2, "data.hflip": True,
                             "train.out_dir": str(tmp_path / "run")})
    run = train(cfg, log=lambda *_: None, progress=False).path
    mirrored = RunDir(run).training_images(log=lambda *_: None)[:8].flip(-1)
    pool = Pool(mirrored, np.zeros(8, dtype=int))
    assert copy_rate(pool, [run], 0.01).startswith("100.0% (8 of 8; threshold 0.0100")
    assert copy_rate(pool, [run]).startswith("100.0% (8 of 8;")


def test_exact_copies_are_copies_whatever_the_rounding_and_few_images_are_refused():
    """A duplicated training image puts the leave-one-out threshold at float rounding above 0:
    an exact copy is still one. A leave-one-out threshold of fewer than 20 images is refused."""
    from ddpmkit.metrics.memorization import audit

    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    train = digits8[:40].clone()
    train[39] = train[27]
    found = audit(train, train)
    assert found.copies.all(), found.neighbours.d1[~found.copies]
    with pytest.raises(UserError, match="2 training image.s. are too few to calibrate a copy "
                                        "threshold .* \\(--holdout\\)"):
        audit(digits8[:5], digits8[:2])


def test_the_summary_counts_copies_per_class_and_the_most_copied_training_images():
    from ddpmkit.audit import summarise
    from ddpmkit.metrics.memorization import Audit, Calibration, Neighbours

    index = np.array([4, 4, 7, 1, 2, 3])  # generated images 0-2 copy training images 4, 4 and 7
    d1 = np.array([0.0, 0.001, 0.002, 0.5, 0.6, 0.7])
    result = Audit(Neighbours(index, d1, np.ones(6)), Calibration(0.01, "held-out", np.ones(10), 0),
                   d1 < 0.01)
    summary = summarise(result, ["a", "a", "b", "b", "b", ""], train_count=10)
    assert summary["per_class"] == {"(none)": {"generated": 1, "copy_rate": 0.0},
                                    "a": {"generated": 2, "copy_rate": 1.0},
                                    "b": {"generated": 3, "copy_rate": pytest.approx(1 / 3)}}
    assert summary["most_copied"] == [{"training_image": 4, "times": 2},
                                      {"training_image": 7, "times": 1}]
    assert summary["training_images_copied"] == 2 and summary["training_share_copied"] == 0.2
    assert sum(summary["distances"]["generated"]) == 6


def test_a_blank_copy_of_a_blank_training_image_is_a_copy():
    """A constant image's normalised correlation is undefined (it was distance 1 to everything,
    with an arbitrary nearest image): it copies a constant training image of its own value."""
    from ddpmkit.metrics.memorization import nearest

    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    train = digits8[:40].clone()
    train[38], train[39] = 0, 200
    gen = torch.stack([train[38], train[39], torch.full_like(train[0], 100), digits8[100]])
    found = nearest(gen, train)
    assert found.index[:2].tolist() == [38, 39] and found.d1[:2].tolist() == [0.0, 0.0]
    assert found.d1[2] > 0.5  # blank, but of no training image's value


def test_a_run_trained_with_translations_has_its_copies_searched_as_far_as_they_reach():
    """train.augment=[translate] shifts by up to 1/8 of the side: a copy moved 2 pixels on 16x16
    images is found for such a run (the search otherwise covers one pixel)."""
    from ddpmkit.config import load_config
    from ddpmkit.data import resize_center_crop
    from ddpmkit.metrics.memorization import nearest, seen_views

    train = resize_center_crop(load_images(DataConfig(image_size=8), lambda *_: 0).images[:40], 16)
    moved = torch.roll(train[5:10], 2, dims=-1)
    views = seen_views(load_config(None, {"train.augment": ["translate"], "train.augment_p": 0.5}))
    assert views == ("translate",)
    assert nearest(moved, train).d1.min() > 0.05  # one pixel is not enough
    found = nearest(moved, train, views=views)
    assert found.index.tolist() == [5, 6, 7, 8, 9] and found.d1.max() < 1e-6


def test_a_holdout_of_classes_the_run_never_saw_is_refused(tmp_path, capsys):
    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    for folder, classes in (("data", ("a", "b")), ("held", ("a", "c"))):
        for k, name in enumerate(classes):
            (tmp_path / folder / name).mkdir(parents=True)
            for i, img in enumerate(digits8[k * 40 + 200 * (folder == "held"):][:25]):
                Image.fromarray(img[0].numpy()).save(tmp_path / folder / name / f"{i}.png")
    run = _tiny_run(tmp_path / "run", **{"data.path": str(tmp_path / "data"),
                                         "model.class_conditional": True})
    gen = _pngs(tmp_path / "gen", digits8[400:420])
    assert main(["audit", str(gen), "--ref", str(run), "--features", "none",
                 "--holdout", str(tmp_path / "held")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds classes" in err[0] and "(c)" in err[0] and "(a, b)" in err[0]
    assert not (gen / "audit.json").exists()


def test_drop_copies_at_size_applies_the_audits_test(run, tmp_path, capsys):
    """Images written at --size: --drop-copies judges each as the audit will read it back (taken
    to the run's size again, against training images taken up and down alike), so both give the
    same threshold and the same distances."""
    out = tmp_path / "big"
    assert main(["sample", str(run), "-n", "6", "--steps", "2", "--size", "16", "--out", str(out),
                 "--drop-copies", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)["drop_copies"]
    assert main(["audit", str(out), "--features", "none", "--json"]) == 0
    audited = json.loads(capsys.readouterr().out)
    assert audited["threshold"] == pytest.approx(said["threshold"], abs=1e-7)
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [float(r["nearest"]) for r in rows] == pytest.approx(
        [n["distance"] for n in audited["nearest"]], abs=2e-6)
    # downstream measures the set it is given the same way, at the threshold --drop-copies used
    from types import SimpleNamespace

    from ddpmkit.downstream import copy_rate, recorded_copy_threshold
    from ddpmkit.metrics.evaluate import read_generated

    pool = SimpleNamespace(images=read_generated(out)[0])
    assert copy_rate(pool, [run], recorded_copy_threshold(out)) == (
        f"{audited['copy_rate']:.1%} ({audited['copies']} of 6; threshold "
        f"{said['threshold']:.4f}, the one --drop-copies used)")


def test_a_holdout_folders_unreadable_and_generated_images_are_said(run, tmp_path):
    """As training says what it leaves out of a folder, so does --holdout."""
    from ddpmkit.audit import run_audit

    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    held = tmp_path / "held"
    held.mkdir()
    for i, img in enumerate(digits8[300:340].flip(-1)):  # digits the run never saw
        Image.fromarray(img[0].numpy()).save(held / f"{i}.png")
    (held / "broken.png").write_bytes(b"not a png")
    assert main(["sample", str(run), "-n", "3", "--steps", "2", "--out", str(held / "gen"),
                 "--quiet"]) == 0
    said = []
    run_audit(_pngs(tmp_path / "gen", digits8[:20]), run,
              holdout=f"data.path={held} data.on_error=skip", features="none", log=said.append)
    assert any(m.startswith("--holdout: warning: skipped 1 unreadable image(s), e.g.")
               and "broken.png" in m for m in said), said
    assert any(m.startswith("--holdout: left out 3 image(s) under") for m in said), said


def test_image_files_the_audit_does_not_read_are_named(run, tmp_path):
    """A copy a user put into a sample's individual/ (in no manifest), or beside a folder's
    individual/, is not audited: it would go unreported, so the audit says so."""
    from ddpmkit.audit import run_audit

    digits8 = load_images(DataConfig(image_size=8), log=lambda *_: None).images
    out = tmp_path / "s"
    assert main(["sample", str(run), "-n", "4", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    said = []
    run_audit(out, run, features="none", log=said.append)
    assert not [m for m in said if "not audited" in m], said  # its own files, grids included
    Image.fromarray(digits8[5, 0].numpy()).save(out / "individual" / "999999.png")
    said.clear()
    run_audit(out, run, features="none", log=said.append)
    assert any(m.startswith(f"audit: warning: 1 image file(s) under {out} are not audited")
               and "999999.png" in m for m in said), said
    plain = _pngs(tmp_path / "plain", digits8[:3])
    Image.fromarray(digits8[5, 0].numpy()).save(plain / "beside.png")
    said.clear()
    run_audit(plain, run, features="none", log=said.append)
    assert any("1 image file(s)" in m and "beside.png" in m for m in said), said


def test_the_feature_view_sets_aside_the_images_the_pixels_found_to_be_duplicates(digits):
    """A coarse feature space maps distinct digits onto one another; those held-out images are
    new images all the same, and stay in the feature threshold's calibration. Re-saved training
    images are set aside in both views alike."""
    from ddpmkit.audit import add_feature_view
    from ddpmkit.metrics import features as fx

    def coarse(images_u8):  # four numbers per image, in eight levels: many digits coincide
        pooled = F.avg_pool2d(images_u8.float(), 8).flatten(1)
        return (pooled / 32).floor() + 1, None

    extractor = fx.Extractor("coarse", "2x2 mean, 8 levels", "none", coarse)
    train, held = digits[0][:300], digits[1][:200]
    for calibration, aside in ((held, 0), (torch.cat([held, _jpeg(train[:6], 95)]), 6)):
        pixels = audit(held[:20], train, calibration)
        assert pixels.calibration.set_aside == aside
        summary = {"share": 0.01, "nearest": [{} for _ in range(20)]}
        add_feature_view(summary, extractor, (held[:20], train, calibration), pixels,
                         log=lambda *_: None)
        assert summary["features"]["duplicates_set_aside"] == aside


def test_the_feature_view_sets_aside_the_very_images_the_pixels_did(digits):
    """The same rows, not only as many: held out, and leave-one-out over more images than a
    calibration takes (a fixed subset of them, the same in both views)."""
    from ddpmkit.metrics.memorization import REFERENCE_MAX

    train, held = digits[0][:300], digits[1][:200]
    calibration = torch.cat([held, _jpeg(train[:6], 95)])
    pixels = audit(held[:5], train, calibration)
    assert pixels.calibration.aside_rows.tolist() == list(range(200, 206))

    def features(images):
        return images.flatten(1).float()

    found = audit(features(held[:5]), features(train), features(calibration),
                  search=nearest_features, aside_rows=pixels.calibration.aside_rows)
    assert found.calibration.aside_rows.tolist() == list(range(200, 206))
    many = torch.cat([digits[0], digits[1], _jpeg(digits[0][:300], 95)])
    assert len(many) > REFERENCE_MAX
    loo = audit(many[:5], many, None)
    rows = loo.calibration.aside_rows
    assert len(rows) > 0
    again = audit(features(many[:5]), features(many), None, search=nearest_features,
                  aside_rows=rows)
    assert np.array_equal(again.calibration.aside_rows, rows)
