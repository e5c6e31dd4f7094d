"""data.stream: batches read from disk give the same training as the data held in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpmkit.errors import UserError
from ddpmkit.streaming import FolderImages, NpyImages, open_stream
from ddpmkit.training import train
from conftest import write_images


def quiet(*_):
    pass


@pytest.fixture
def npy(tmp_path):
    path = tmp_path / "images.npy"
    rng = np.random.default_rng(0)
    # not the model size: resized per batch
    np.save(path, rng.integers(0, 256, (70, 12, 12), dtype=np.uint8))
    return path


def test_streamed_npy_trains_exactly_like_the_in_memory_array(npy, tiny, tmp_path):
    common = {"data.path": str(npy), "train.max_steps": 10, "data.hflip": True}
    a = train(tiny(**common, **{"train.out_dir": str(tmp_path / "mem")}), log=quiet, progress=False)
    b = train(tiny(**common, **{"train.out_dir": str(tmp_path / "stream"), "data.stream": True,
                                "data.workers": 2}),
              log=quiet, progress=False)
    wa, wb = load_file(a.checkpoint_file(10)), load_file(b.checkpoint_file(10))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stream_resumes_exactly(npy, tiny, tmp_path):
    common = {"data.path": str(npy), "data.stream": True, "data.workers": 0}
    straight = train(tiny(**common,
                          **{"train.max_steps": 20, "train.out_dir": str(tmp_path / "a")}),
                     log=quiet, progress=False)
    train(tiny(**common, **{"train.max_steps": 10, "train.out_dir": str(tmp_path / "b")}),
          log=quiet, progress=False)
    resumed = train(tiny(**common, **{"train.max_steps": 20, "train.out_dir": str(tmp_path / "b")}),
                    log=quiet, progress=False)
    wa, wb = load_file(straight.checkpoint_file(20)), load_file(resumed.checkpoint_file(20))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_npy_is_memory_mapped_and_reads_only_what_is_asked(npy, tiny):
    cfg = tiny(**{"data.path": str(npy)}).data
    source = open_stream(cfg)
    assert (isinstance(source, NpyImages) and isinstance(source.array, np.memmap)
            and len(source) == 70)
    batch = source.read(np.array([5, 1, 5]))
    assert (batch.shape == (3, 1, 8, 8) and batch.dtype == torch.uint8
            and torch.equal(batch[0], batch[2]))


def test_folder_stream_matches_the_loaded_folder_and_skips_unreadable_files(tmp_path, tiny):
    from ddpmkit.data import load_images

    write_images(tmp_path / "imgs", n=6, size=(10, 12), mode="RGB")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    cfg = tiny(**{"data.path": str(tmp_path / "imgs")}).data
    source = open_stream(cfg)
    assert isinstance(source, FolderImages) and len(source) == 6 and len(source.skipped) == 1
    loaded = load_images(cfg)
    assert torch.equal(source.read(np.arange(6)), loaded.images)


def test_a_truncated_image_is_skipped_before_streamed_training_as_in_memory(tmp_path, tiny):
    from ddpmkit.data import load_images

    write_images(tmp_path / "imgs", n=6, size=(10, 12), mode="RGB")
    first = sorted((tmp_path / "imgs").iterdir())[0]
    first.write_bytes(first.read_bytes()[:100])  # its header reads; its pixels do not
    cfg = tiny(**{"data.path": str(tmp_path / "imgs")}).data
    source, loaded = open_stream(cfg), load_images(cfg)
    assert len(source) == len(loaded.images) == 5 and [p for p, _ in source.skipped] == [str(first)]
    assert torch.equal(source.read(np.arange(5)), loaded.images)
    strict = open_stream(tiny(**{"data.path": str(tmp_path / "imgs"),
                                 "data.on_error": "fail"}).data)
    with pytest.raises(UserError, match="cannot decode image .*: image file is truncated; remove "
                                        "it or fix it, then rerun"):  # headers only: met when drawn
        strict.read(np.arange(6))


def test_stream_refuses_what_it_cannot_stream(tmp_path, tiny):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(UserError,
                       match=r"data.stream=true reads .npy files and image folders.*numpy.save"):
        open_stream(tiny(**{"data.path": str(tmp_path / "a.npz")}).data)
    with pytest.raises(UserError, match="needs data.path"):
        open_stream(tiny().data)
    # an .npy names no classes: a conditional model is refused as in memory, not a traceback
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(UserError, match="model.class_conditional=true needs labels"):
        train(tiny(**{"data.path": str(tmp_path / "a.npy"), "data.stream": True,
                      "data.workers": 0, "model.class_conditional": True}),
              log=lambda *_: None, progress=False)


def test_evaluation_during_training_works_on_streamed_data(npy, tiny, monkeypatch):
    from ddpmkit.metrics import features

    monkeypatch.setitem(features.CLASSIFIER_RECIPE, "epochs", 1)
    monkeypatch.setenv("DDPMKIT_CACHE", str(npy.parent / "cache"))
    run = train(tiny(**{"data.path": str(npy), "data.stream": True, "data.workers": 0,
                        "train.max_steps": 10, "train.eval_every": 10, "train.eval_num": 16,
                        "train.eval_features": "efficientnet"}),
                log=quiet, progress=False)
    assert "fd" in run.read_state()["checkpoints"][-1]


def test_streamed_wide_data_shares_one_scale_across_batches(tmp_path, tiny):
    """A batch of only dark 16-bit images is scaled like every other batch (a scale chosen per batch
    or per image would read it as 8-bit), for memory-mapped arrays and for image folders alike."""
    from PIL import Image

    from ddpmkit.data import load_images

    arr = np.zeros((4, 8, 8), dtype=np.uint16)
    arr[0], arr[1] = 4000, 150
    np.save(tmp_path / "wide.npy", arr)
    (tmp_path / "imgs").mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp_path / "imgs" / f"{i}.png")
    for path in (tmp_path / "wide.npy", tmp_path / "imgs"):
        cfg = tiny(**{"data.path": str(path)}).data
        source, loaded = open_stream(cfg), load_images(cfg)
        dark = source.read(np.array([1, 2]))
        # round(150 * 255 / 4095)
        assert torch.equal(dark, loaded.images[1:3]) and int(dark.max()) == 9
        assert torch.equal(source.read(np.arange(4)), loaded.images) and "12-bit" in source.source


def test_an_unreadable_wide_image_is_skipped_when_streamed_as_in_memory(tmp_path, tiny):
    from PIL import Image

    from ddpmkit.data import load_images

    for i in range(3):
        Image.fromarray(np.full((8, 8), 1000 * (i + 1), dtype=np.uint16)).save(
            tmp_path / f"{i}.png")
    whole = (tmp_path / "0.png").read_bytes()
    (tmp_path / "0.png").write_bytes(whole[: len(whole) // 2])  # truncated: its header still reads
    cfg = tiny(**{"data.path": str(tmp_path)}).data
    source, loaded = open_stream(cfg), load_images(cfg)
    assert (len(source) == len(loaded) == 2
            and [p for p, _ in source.skipped] == [p for p, _ in loaded.skipped])
    assert torch.equal(source.read(np.arange(2)), loaded.images)
    with pytest.raises(UserError, match="cannot read image"):
        open_stream(tiny(**{"data.path": str(tmp_path), "data.on_error": "fail"}).data)


def test_an_npy_with_idx_in_its_name_streams(tmp_path, tiny):
    np.save(tmp_path / "scans_idx.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    assert len(open_stream(tiny(**{"data.path": str(tmp_path / "scans_idx.npy")}).data)) == 4


def test_a_streamed_class_conditional_run_records_its_images_per_class(tmp_path, tiny):
    import json

    for name, n in (("cat", 3), ("dog", 2)):
        write_images(tmp_path / "imgs" / name, n=n, size=(8, 8), seed=n)
    run = train(tiny(**{"data.path": str(tmp_path / "imgs"), "data.stream": True,
                        "data.workers": 0, "model.class_conditional": True,
                        "train.max_steps": 2, "train.out_dir": str(tmp_path / "run")}),
                log=quiet, progress=False)
    assert json.loads((run.path / "meta.json").read_text())["class_counts"] == {"cat": 3, "dog": 2}


def test_a_streamed_runs_moved_data_is_named_without_the_record_it_never_wrote(npy, tiny, tmp_path):
    from ddpmkit.run import RunDir

    run = train(tiny(**{"data.path": str(npy), "data.stream": True, "data.workers": 0,
                        "train.max_steps": 2}),
                log=quiet, progress=False)
    npy.rename(tmp_path / "moved.npy")
    with pytest.raises(UserError, match=r"which is no longer there: put it back there \(the "
                                        r"images it trained on are needed\)$"):
        RunDir(run.path).training_set(log=quiet)
