"""Evaluation: the FID network, extractors, the eval command, and real-data sanity."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA
from ddpmkit.cli import main
from ddpmkit.errors import UserError
from ddpmkit.metrics import features as fx
from ddpmkit.metrics.evaluate import evaluate, read_generated
from ddpmkit.metrics.inception import FIDInceptionV3, load_fid_inception
from ddpmkit.run import RunDir


def _made_by(gen, run):
    """A sample folder's record naming the run that made it."""
    from ddpmkit.outputs import FORMAT, RECORD

    (gen / RECORD).write_text(json.dumps({"format": FORMAT, "kind": "sample",
                                          "job": {"run": str(run.resolve())}}))
    images = sorted(p.relative_to(gen).as_posix() for p in gen.glob("individual/*.png"))
    if not (gen / "manifest.csv").exists():  # a finished job has one
        (gen / "manifest.csv").write_text("".join(f"{f}\n" for f in ["file", *images]))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def write_pngs(folder, images_u8):
    (folder / "individual").mkdir(parents=True)
    for i, img in enumerate(images_u8):
        Image.fromarray(img[0].numpy()).save(folder / "individual" / f"{i:06d}.png")
    return folder


def digits(n=None):
    from sklearn.datasets import load_digits

    d = load_digits()
    return (torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:n, None],
            [str(t) for t in d.target[:n]])


def test_fid_inception_shapes_and_grayscale_handling():
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        feats, logits = net(fx.to_rgb(gray))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.equal(fx.to_rgb(gray)[:, 0], fx.to_rgb(gray)[:, 2])  # replicated, never tinted


def test_wrong_weights_hash_is_refused(tmp_path):
    fake = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(FIDInceptionV3().state_dict(), fake)
    with pytest.raises(UserError, match="is not the FID Inception weights file"):
        load_fid_inception(fake)


def test_offline_without_weights_says_how_to_get_them():
    with pytest.raises(UserError, match="download https://github.com/mseitzer/pytorch-fid"):
        load_fid_inception(None, download=False)


def test_a_download_onto_a_fresh_machine_is_checked_not_called_offline(tmp_path, monkeypatch):
    """The hub cache folder does not exist yet on a fresh machine (the download needs it), and a
    file that is not the weights is named as such, not as being offline."""
    from ddpmkit.metrics import inception

    (tmp_path / "page.html").write_text("<html>a proxy's login page</html>")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "fresh"))
    monkeypatch.setattr(inception, "WEIGHTS_URL", (tmp_path / "page.html").as_uri())
    with pytest.raises(UserError, match="is not the Inception weights .* --inception-weights"):
        load_fid_inception(None)
    assert (tmp_path / "fresh" / "hub" / "checkpoints").is_dir()
    monkeypatch.setattr(inception, "WEIGHTS_URL", (tmp_path / "nowhere.pth").as_uri())
    with pytest.raises(UserError, match="this machine is offline"):
        load_fid_inception(None)


def test_matches_pytorch_fid_with_the_same_random_weights(monkeypatch):
    pytest.importorskip("torchvision", reason="torchvision does not import beside this torch "
                        "(needs torch 2.14.1 + torchvision 0.29.1, or a GPU machine)")
    fid_inception = pytest.importorskip("pytorch_fid.inception",
                                        reason="pytorch-fid not installed")
    from pytorch_fid.fid_score import calculate_frechet_distance

    from ddpmkit.metrics.stats import FeatureStats, frechet_distance

    torch.manual_seed(0)
    ours = FIDInceptionV3().eval()
    with torch.no_grad():  # random BatchNorm statistics too, so the comparison covers them
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    # pytorch-fid's FID network, given our random weights instead of its download (loaded strictly:
    # every parameter name must match)
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url",
                        lambda *a, **k: ours.state_dict())
    theirs = fid_inception.InceptionV3([3]).eval()
    g = torch.Generator().manual_seed(1)
    sets = [torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 128, (24, 3, 28, 28), dtype=torch.uint8, generator=g)]
    with torch.no_grad():
        f_theirs = [theirs(x.float() / 255)[0].flatten(1).double().numpy() for x in sets]
        f_ours = [ours(x)[0].double().numpy() for x in sets]
    for a, b in zip(f_ours, f_theirs):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    s_theirs = [(f.mean(0), np.cov(f, rowvar=False)) for f in f_theirs]
    s_ours = [FeatureStats.from_features(f) for f in f_ours]
    fid_theirs = calculate_frechet_distance(*s_theirs[0], *s_theirs[1])
    fid_ours = frechet_distance(s_ours[0].mu, s_ours[0].sigma, s_ours[1].mu, s_ours[1].sigma)
    assert fid_ours == pytest.approx(fid_theirs, abs=1e-4, rel=1e-6)


def test_features_do_not_depend_on_batch_size(monkeypatch):
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    ext = fx.efficientnet(torch.device("cpu"))
    monkeypatch.setattr(fx, "BATCH", 5)
    a, _ = ext(images)
    monkeypatch.setattr(fx, "BATCH", 64)
    b, _ = ext(images)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_eval_command_with_the_classifier_on_real_and_noisy_digits(tmp_path, capsys, monkeypatch):
    # the test needs a decent classifier, not the best
    monkeypatch.setitem(fx.CLASSIFIER_RECIPE, "epochs", 6)
    images, _ = digits()
    real = write_pngs(tmp_path / "real", images[1200:1500])
    noise = write_pngs(tmp_path / "noise", torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8))
    ref = ["--ref", "data.path=null", "--features", "classifier", "--metrics", "fid,kid,pr"]
    assert main(["eval", str(real), *ref]) == 0
    out = capsys.readouterr().out
    assert "training the evaluation classifier" in out and "wrote" in out
    good = json.loads((real / "eval_classifier.json").read_text())
    # one metric again, of the same images, reference and extractor: the others stay in the file
    assert main(["eval", str(real), "--ref", "data.path=null", "--features", "classifier",
                 "--metrics", "kid", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again == json.loads((real / "eval_classifier.json").read_text())
    assert set(again["metrics"]) == set(good["metrics"]) == {"fd", "kid", "kid_std", "precision",
                                                             "recall"}
    assert again["metrics"]["fd"] == good["metrics"]["fd"]
    assert main(["eval", str(noise), *ref, "--json"]) == 0
    bad = json.loads(capsys.readouterr().out)
    assert "training the evaluation classifier" not in json.dumps(bad)  # cached
    assert good["metrics"]["fd"] * 10 < bad["metrics"]["fd"]
    # a CNN is often confidently wrong on noise, so confidence alone does not separate them; FD does
    assert (good["classifier"]["confident_share"] > 0.85
            and good["classifier"]["class_entropy"] > 0.95)
    assert (good["metrics"]["precision"] > 0.8
            and bad["metrics"]["precision"] < 0.5 * good["metrics"]["precision"])
    assert abs(good["metrics"]["kid"]) < 0.1 * bad["metrics"]["kid"]
    assert (good["num_gen"] == 300 and good["num_ref"] == 1797
            and not good["comparable_with_published_fid"])
    assert set(good["classifier"]["class_shares"]) == {str(i) for i in range(10)}


def test_statistics_reference_and_its_limits(tmp_path):
    images, _ = digits(200)
    gen = write_pngs(tmp_path / "g", images[:100])
    feats, _ = fx.efficientnet(torch.device("cpu"))(images[100:])
    from ddpmkit.metrics.stats import FeatureStats

    FeatureStats.from_features(feats).save(tmp_path / "stats.npz")
    said = []
    result = evaluate(gen, [str(tmp_path / "stats.npz")], ("fid",), "efficientnet",
                      log=said.append)
    assert result["metrics"]["fd"] > 0 and result["num_ref"] == 100
    assert any("note: 100 generated images for 1280-dimensional features: their "
               "covariance is rank-deficient" in m
               for m in said)  # a number not to compare with one made from more images
    assert any(m.startswith("note: 100 reference images for 1280-dimensional") for m in said)
    ten, said = write_pngs(tmp_path / "ten", images[:10]), []
    scored = evaluate(ten, [str(tmp_path / "stats.npz")], ("is",), "efficientnet",
                      log=said.append)["metrics"]
    assert scored["inception_score"] > 1.05  # not the 1.0 that splits of one image give
    assert any("an Inception Score from 10 images (5 splits) is lower" in m for m in said)
    one = write_pngs(tmp_path / "one", images[:1])
    with pytest.raises(UserError,
                       match="holds 1 image: the metrics compare distributions, so generate more"):
        evaluate(one, [str(tmp_path / "stats.npz")], ("fid",), "efficientnet")
    with pytest.raises(UserError, match="KID and precision/recall need reference features"):
        evaluate(gen, [str(tmp_path / "stats.npz")], ("fid", "kid"), "efficientnet")
    with pytest.raises(UserError, match="labelled reference images"):
        evaluate(gen, [str(tmp_path / "stats.npz")], ("fid",), "classifier")
    # what was asked for is computed or refused, never dropped (before any feature is extracted)
    with pytest.raises(UserError, match="--metrics is: the Inception Score needs ImageNet classes"):
        evaluate(gen, [str(tmp_path / "stats.npz")], ("fid", "is"), "classifier")
    with pytest.raises(UserError, match="--metrics names no metric"):
        evaluate(gen, [str(tmp_path / "stats.npz")], (), "efficientnet")


def test_the_classifier_against_an_unlabelled_run_is_refused_in_one_line(tmp_path, capsys):
    from conftest import write_images
    from test_cli import TINY_ARGS

    write_images(tmp_path / "plain", n=8, size=(8, 8))  # no labels: no CSV, no class subfolders
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--data", str(tmp_path / "plain"), "--steps", "2",
                 "--out", str(run), "--quiet"]) == 0
    gen = write_pngs(tmp_path / "gen", digits(8)[0])
    capsys.readouterr()
    assert main(["eval", str(gen), "--ref", str(run), "--features", "classifier"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"(training data of {run}), has no labels" in err[0], err
    assert "use --features inception or efficientnet" in err[0] and "statistics" not in err[0]
    # the run's data edited since it trained: not the reference it names any more
    edited = sorted((tmp_path / "plain").iterdir())[0]
    Image.fromarray(255 - np.asarray(Image.open(edited))).save(edited)
    assert main(["eval", str(gen), "--ref", str(run), "--features", "efficientnet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data has changed since it trained (1 image(s)" in err[0], err


def test_reading_generated_images_never_takes_the_grids(tmp_path):
    folder = write_pngs(tmp_path / "s", torch.zeros(3, 1, 8, 8, dtype=torch.uint8))
    (folder / "grids").mkdir()
    Image.new("L", (40, 40)).save(folder / "grids" / "grid_4x4.png")
    images, files = read_generated(folder)
    assert images.shape == (3, 1, 8, 8) and all("grids" not in f for f in files)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        read_generated(tmp_path / "empty")
    # a folder named grids above the folder does not hide it
    below = write_pngs(tmp_path / "grids" / "mine", torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    assert read_generated(below)[0].shape == (2, 1, 8, 8)
    # images of two sizes are not cropped to one: eval refuses them as audit does
    Image.new("L", (8, 16)).save(folder / "individual" / "wide.png")
    with pytest.raises(UserError, match="holds images of 2 sizes"):
        read_generated(folder)
    # a ddpmkit job's folder without its manifest is a job that did not finish
    _made_by(below, tmp_path)
    (below / "manifest.csv").unlink()
    with pytest.raises(UserError, match="holds a ddpmkit job that did not finish .* rerun"):
        read_generated(below)


def test_references_are_read_at_the_generated_resolution(tmp_path):
    from conftest import write_images
    from ddpmkit.config import DataConfig, load_config
    from ddpmkit.data import image_digests, load_images
    from ddpmkit.metrics.evaluate import resolve_reference

    # no UNet could train at 75: none is asked to
    write_images(tmp_path / "photos", n=3, size=(75, 75))
    assert (resolve_reference([f"data.path={tmp_path / 'photos'}"], 75).images.shape
            == (3, 1, 75, 75))
    with pytest.raises(UserError,
                       match="only data.* keys describe a dataset here, got model.base_channels"):
        resolve_reference([f"data.path={tmp_path / 'photos'}", "model.base_channels=8"], 75)
    run = tmp_path / "run"  # trained on the 8x8 digits; samples written at 32x32 (--size 32)
    RunDir(run).start(load_config(None, {}), {}, step=0)
    digits8 = load_images(DataConfig(), log=lambda *_: None).images  # what it trained on
    RunDir(run).record_training_images(image_digests(digits8), log=print)
    assert resolve_reference([str(run)], 32).images.shape == (1797, 1, 32, 32)
    # an .npz of images is data, as data.path takes it; one of mu and sigma is statistics
    np.savez(tmp_path / "imgs.npz", train_images=np.zeros((5, 8, 8), np.uint8))
    assert resolve_reference([str(tmp_path / "imgs.npz")], 8).images.shape == (5, 1, 8, 8)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    assert resolve_reference([str(tmp_path / "stats.npz")], 8).images is None


def test_reading_a_balanced_set_or_a_restoration_takes_only_generated_outputs(tmp_path):
    from ddpmkit.generation import MANIFEST_COLUMNS
    from ddpmkit.outputs import write_manifest
    from ddpmkit.restoration import MANIFEST_COLUMNS as RESTORED_COLUMNS

    real = write_pngs(tmp_path / "real", torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    balanced = write_pngs(tmp_path / "balanced", torch.full((3, 1, 8, 8), 200, dtype=torch.uint8))
    rows = [[str(real / "individual" / f"{i:06d}.png"), i, "", "", "", "", "0", "false"]
            for i in range(2)]
    rows += [[f"individual/{i:06d}.png", i, 0, "ddim", 5, "x", "0", "true"] for i in range(3)]
    write_manifest(balanced / "manifest.csv", rows, MANIFEST_COLUMNS)
    images, files = read_generated(balanced)
    # the real images the set lists are not "generated"
    assert len(files) == 3 and (images == 200).all()
    restored = write_pngs(tmp_path / "clean", torch.full((2, 1, 8, 8), 9, dtype=torch.uint8))
    write_manifest(restored / "manifest.csv",
                   [[f"in/{i}.png", f"individual/{i:06d}.png", "denoise", 0, "0.1", "{}"]
                    for i in range(2)], RESTORED_COLUMNS)
    images, files = read_generated(restored)
    assert len(files) == 2 and (images == 9).all()


@pytest.mark.skipif(not (SHARED_DATA / "mnist-test").is_dir(),
                    reason="../shared/data/mnist-test not present")
def test_real_mnist_halves_are_closer_than_blur_or_noise(tmp_path):
    from ddpmkit.config import DataConfig
    from ddpmkit.data import load_images

    d = load_images(DataConfig(path=str(SHARED_DATA / "mnist-test" / "t10k-images-idx3-ubyte.gz"),
                               image_size=28))
    a, b = d.images[:400], d.images[5000:5400]
    blurred = (torch.nn.functional.avg_pool2d(b.float(), 3, stride=1, padding=1)
               .round().to(torch.uint8))
    noise = torch.randint(0, 256, b.shape, dtype=torch.uint8)
    ext = fx.efficientnet(torch.device("cpu"))
    from ddpmkit.metrics.stats import FeatureStats, frechet_distance

    stats = {k: FeatureStats.from_features(ext(v)[0])
             for k, v in {"a": a, "b": b, "blur": blurred, "noise": noise}.items()}

    def fd(x, y):
        return frechet_distance(stats[x].mu, stats[x].sigma, stats[y].mu, stats[y].sigma)

    assert fd("a", "b") < fd("a", "blur") < fd("a", "noise")
    assert fd("a", "b") * 3 < fd("a", "noise")


def test_saved_reference_features_serve_every_metric_and_refuse_other_weights(tmp_path, capsys):
    images, _ = digits(140)
    gen = write_pngs(tmp_path / "g", images[:40])
    np.save(tmp_path / "ref.npy", images[40:, 0].numpy())
    ref_file = tmp_path / "stats" / "digits.npz"
    args = ["eval", str(gen), "--features", "efficientnet", "--metrics", "fid,kid,pr", "--json"]
    assert main([*args, "--ref", f"data.path={tmp_path / 'ref.npy'}", "--save-ref",
                 str(ref_file)]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert main([*args, "--ref", str(ref_file)]) == 0
    from_file = json.loads(capsys.readouterr().out)
    # --save-ref replaces only a features file it wrote: never the data, nor a folder
    for target, says in ((tmp_path / "ref.npy", "a file ddpmkit did not write"),
                         (tmp_path / "stats", "a folder")):
        before = sorted(p.stat().st_mtime_ns for p in target.parent.rglob("*"))
        assert main([*args, "--ref", f"data.path={tmp_path / 'ref.npy'}", "--save-ref",
                     str(target)]) == 2
        assert f"--save-ref {target}: is {says}, which it would replace" in \
            capsys.readouterr().err
        assert sorted(p.stat().st_mtime_ns for p in target.parent.rglob("*")) == before
    assert main([*args, "--ref", f"data.path={tmp_path / 'ref.npy'}", "--save-ref",
                 str(ref_file)]) == 0  # its own file again
    capsys.readouterr()
    for key in ("fd", "kid", "precision", "recall"):
        assert (from_file["metrics"][key]
                == pytest.approx(direct["metrics"][key], rel=1e-9, abs=1e-12))
    # without --features, the file's extractor is named (not Inception's missing weights)
    assert main(["eval", str(gen), "--ref", str(ref_file), "--metrics", "fid"]) == 2
    assert "holds efficientnet features: add --features efficientnet" in capsys.readouterr().err
    # a one-image reference is one line, whichever metric
    write_pngs(tmp_path / "one", images[:1])
    assert main(["eval", str(gen), "--ref", str(tmp_path / "one"), "--metrics", "kid"]) == 2
    assert "holds 1 image: the metrics compare distributions" in capsys.readouterr().err
    with np.load(ref_file) as z:  # the same file as if made with other weights
        arrays = {k: z[k] for k in z.files}
    identity = json.loads(str(arrays["extractor"]))
    arrays["extractor"] = np.asarray(json.dumps({**identity, "weights_sha256": "0" * 64}))
    np.savez(ref_file, **arrays)
    assert main([*args, "--ref", str(ref_file)]) == 2
    assert "other weights or preprocessing" in capsys.readouterr().err
    # features of references read at 8x8 are no reference for 16x16 images
    arrays["extractor"] = np.asarray(json.dumps(identity))
    np.savez(ref_file, **arrays)
    big = write_pngs(tmp_path / "big", images[:40].repeat_interleave(2, -1)
                     .repeat_interleave(2, -2))
    assert main(["eval", str(big), *args[2:], "--ref", str(ref_file)]) == 2
    assert "read at 8x8, and" in capsys.readouterr().err
    np.savez(ref_file, **arrays | {"feats": arrays["feats"][:, :5]})  # damaged or forged
    assert main([*args, "--ref", str(ref_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not fit its mu" in err[0], err
    dim = len(arrays["mu"])
    forged = {"extractor": np.asarray("{x"), "read_at": np.array([1, 2]), "n": np.array([1, 2]),
              "feats": arrays["feats"] * 0 + 5, "mu": np.full(dim, np.nan),
              "sigma": -np.eye(dim)}
    for key, value in forged.items():  # each a traceback or a wrong number once
        np.savez(ref_file, **arrays | {key: value})
        assert main([*args, "--ref", str(ref_file)]) == 2, key
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(ref_file) in err[0], (key, err)
        assert not (gen / "eval_efficientnet.json").exists() or json.loads(
            (gen / "eval_efficientnet.json").read_text())["metrics"] == from_file["metrics"]


def test_wide_generated_images_are_read_at_one_scale_for_the_set(tmp_path):
    from PIL import Image

    for i, top in enumerate((900, 4000)):
        a = np.full((8, 8), 900, dtype=np.uint16)
        a[0, 0] = top
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    images, _ = read_generated(tmp_path)
    # not per image: 56 and 224
    assert images[0, 0, 4, 4] == images[1, 0, 4, 4] == round(900 * 255 / 4095)


def test_reference_data_is_read_at_the_generators_bit_depth(tmp_path):
    """Samples of a run trained on 12-bit data, compared with data.path=...: its wide pixels are
    read at 12 bits, as the generator's training images were, not at the 10 bits their own
    largest value needs."""
    from ddpmkit.config import load_config

    run = tmp_path / "run"
    RunDir(run).start(load_config(None, {"data.bit_depth": 12}), {}, step=0)
    images, _ = digits(20)
    gen = write_pngs(tmp_path / "g", images)
    _made_by(gen, run)
    (tmp_path / "real").mkdir()
    for i, img in enumerate(images.numpy()):
        # 16-bit, largest 765
        Image.fromarray(img[0].astype(np.uint16) * 3).save(tmp_path / "real" / f"{i}.png")
    result = evaluate(gen, [f"data.path={tmp_path / 'real'}"], ("fid",), "efficientnet")
    assert "12-bit values (largest 765" in result["ref"]
    result = evaluate(gen, [f"data.path={tmp_path / 'real'}", "data.bit_depth=null"], ("fid",),
                      "efficientnet")
    assert "10-bit values (largest 765" in result["ref"]  # the user's own choice wins


def test_gray_samples_against_colour_references_are_compared_in_colour_unless_asked(tmp_path):
    """A gray generator's images against a colour folder: the references are not grayed behind
    the user's back (that hid the colour the model cannot make), as pytorch-fid and clean-fid do
    not; data.channels=1 compares in gray."""
    images, _ = digits(20)
    gen = write_pngs(tmp_path / "g", images)
    (tmp_path / "real").mkdir()
    for i, img in enumerate(images.numpy()):  # the same digits, tinted orange
        g = img[0].astype(np.uint8)
        Image.fromarray(np.stack([g, g // 2, g // 8], -1)).save(tmp_path / "real" / f"{i}.png")
    said = []
    colour = evaluate(gen, [str(tmp_path / "real")], ("fid",), "efficientnet", log=said.append)
    assert any("gray images compared with colour references, both as RGB" in s for s in said)
    gray = evaluate(gen, [f"data.path={tmp_path / 'real'}", "data.channels=1"], ("fid",),
                    "efficientnet")
    assert gray["metrics"]["fd"] < colour["metrics"]["fd"] / 2


def test_a_data_override_without_a_path_changes_the_data_of_the_run_that_made_gen(tmp_path):
    """--ref data.split=test means the generator's own test split, as --holdout data.split=val
    does in sample and audit; never the bundled digits a missing data.path would read."""
    from ddpmkit.config import load_config
    from ddpmkit.metrics.evaluate import resolve_reference

    images, _ = digits(30)
    data = tmp_path / "d.npz"
    np.savez(data, train_images=images[:20, 0].numpy(), test_images=images[20:, 0].numpy())
    run = tmp_path / "run"
    RunDir(run).start(load_config(None, {"data.path": str(data)}), {}, step=0)
    gen = write_pngs(tmp_path / "g", images[:4])
    plain = write_pngs(tmp_path / "plain", images[:4])
    _made_by(gen, run)
    assert resolve_reference(["data.split=test"], 8, gen).images.shape == (10, 1, 8, 8)
    with pytest.raises(UserError, match="no data.path, and .* was not made by one run"):
        resolve_reference(["data.split=test"], 8, plain)
    # an imported model has no data of its own: not the bundled digits a missing data.path reads
    imported = tmp_path / "imported"
    RunDir(imported).start(load_config(None, {}), {"imported_from": "hub"}, step=0)
    _made_by(gen, imported)
    with pytest.raises(UserError, match="is an imported model, which has no training data"):
        resolve_reference(["data.split=train"], 8, gen)
    # a folder whose name holds '=' is a folder, not an override
    odd = write_pngs(tmp_path / "lr=1e-4", images[:5]) / "individual"
    assert resolve_reference([str(odd)], 8, plain).images.shape == (5, 1, 8, 8)


def test_one_class_of_samples_against_every_class_is_noted_and_the_class_can_be_chosen(tmp_path):
    """`sample --class 3` against the run's data of ten digits: the distance would count the gap
    between threes and the other digits; the note says so and names the reference that fits."""
    from ddpmkit.config import load_config
    from ddpmkit.data import image_digests

    images, labels = digits(200)
    data = tmp_path / "d.npz"
    np.savez(data, train_images=images[:, 0].numpy(), train_labels=np.array(labels, dtype=int))
    run = tmp_path / "run"
    RunDir(run).start(load_config(None, {"data.path": str(data)}), {}, step=0)
    RunDir(run).record_training_images(image_digests(images), log=print)
    threes = images[[i for i, c in enumerate(labels) if c == "3"]]
    gen = write_pngs(tmp_path / "g", threes)
    (gen / "manifest.csv").write_text("file,label\n" + "".join(
        f"individual/{i:06d}.png,3\n" for i in range(len(threes))))
    _made_by(gen, run)
    said = []
    every = evaluate(gen, [str(run)], ("fid",), "efficientnet", log=said.append)
    assert any("every generated image is of class 3, and the reference holds 10 classes" in s
               and "--ref data.filter_label=3" in s for s in said), said
    said.clear()
    own = evaluate(gen, ["data.filter_label=3"], ("fid",), "efficientnet", log=said.append)
    assert not any("every generated image" in s for s in said)
    assert own["metrics"]["fd"] < every["metrics"]["fd"] / 2


def test_the_classifier_features_do_not_depend_on_the_reference_images_order(tmp_path):
    """A folder and the run that trained on it list the same images in other orders: the
    evaluation classifier, and so every FD it gives, must be the same."""
    images, labels = digits(96)
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    one = fx.classifier(images, labels, tmp_path, log=lambda *_: None)
    other = fx.classifier(images[order], [labels[i] for i in order], tmp_path / "b",
                          log=lambda *_: None)
    assert one.identity() == other.identity()
    assert np.array_equal(one(images[:8])[0], other(images[:8])[0])
