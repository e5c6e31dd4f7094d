"""The run report: self-contained HTML, rendered in a real headless browser where one exists."""

import json
import re
import shutil

import pytest

from ddpmkit.cli import main
from ddpmkit.training import train


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from conftest import tiny_config

    tmp = tmp_path_factory.mktemp("report")
    run = train(tiny_config(tmp, **{"train.max_steps": 20, "train.sample_every": 5,
                                    "train.log_every": 2}),
                log=lambda *_: None, progress=False)
    return run.path / "report.html"


def test_training_writes_a_self_contained_report(report, capsys):
    text = report.read_text()
    assert text.count("<svg") == 4 and text.count("<polyline") == 4  # loss x2, lr, throughput
    # 4 grids + latest; the GIF is image/gif
    assert len(re.findall(r"src='data:image/png;base64,", text)) == 5
    assert "data:image/gif;base64," in text
    assert not re.findall(r"""(?:src|href)=["']?(?:https?:)?//""", text)  # no network fetches
    assert "<td>20</td>" in text and "best" in text and "train:" in text  # checkpoints, config
    assert main(["report", str(report.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(report.parent / "report.html")


def test_the_header_counts_the_steps_to_the_latest_checkpoint(report, tmp_path):
    """A run stopped between log intervals saved a checkpoint past its last logged step."""
    from ddpmkit.report import build_report
    from ddpmkit.run import RunDir

    run = tmp_path / "run"
    shutil.copytree(report.parent, run)
    stats = (run / "stats.jsonl").read_text().splitlines()
    (run / "stats.jsonl").write_text("".join(
        line + "\n" for line in stats if json.loads(line)["step"] <= 16))
    assert "<p class='muted'>20 steps · " in build_report(RunDir(run))


def test_a_checkpoint_whose_file_is_gone_is_marked_in_the_report(report, tmp_path):
    from ddpmkit.report import build_report
    from ddpmkit.run import RunDir

    run = RunDir(shutil.copytree(report.parent, tmp_path / "run"))
    assert "file missing" not in build_report(run)
    run.checkpoint_file(20).unlink()
    assert "<td>best, file missing</td>" in build_report(run)


def test_a_state_file_that_is_not_json_is_named_with_what_to_do(report, tmp_path, capsys):
    run = shutil.copytree(report.parent, tmp_path / "run")
    (run / "state.json").write_text("{not json")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "state.json (" in err[0] and err[0].endswith(
        "): restore it, or rerun with --fresh to start the run over"), err


def test_a_damaged_grid_is_left_out_of_the_gif_not_the_end_of_training(report, tmp_path, capsys):
    run = shutil.copytree(report.parent, tmp_path / "run")
    grids = sorted((run / "grids").glob("step_*.png"))
    grids[0].write_bytes(grids[0].read_bytes()[:50])  # truncated
    assert main(["report", str(run)]) == 0
    assert "data:image/gif;base64," in (run / "report.html").read_text()
    assert main(["gif", str(run)]) == 0
    told = capsys.readouterr()
    assert f"left out the damaged grid {grids[0]}" in told.err
    assert f"({len(grids) - 1} training grids)" in told.out
    assert (run / "learning.gif").read_bytes()[:4] == b"GIF8"


def test_a_damaged_grid_is_left_out_of_the_report_too(report, tmp_path, capsys):
    """Not embedded as a broken image (as the latest samples, even): left out, with a warning."""
    run = shutil.copytree(report.parent, tmp_path / "run")
    grids = sorted((run / "grids").glob("step_*.png"))
    grids[-1].write_bytes(b"junk\n")
    assert main(["report", str(run)]) == 0
    text = (run / "report.html").read_text()
    assert "anVuawo=" not in text  # "junk\n", base64
    assert len(re.findall(r"src='data:image/png;base64,", text)) == 4  # 3 grids + the latest
    assert f"warning: left out the damaged grid {grids[-1]}" in capsys.readouterr().err


def test_damaged_numbers_and_bytes_in_the_log_are_left_out_of_the_report(report, tmp_path):
    run = shutil.copytree(report.parent, tmp_path / "run")
    with open(run / "stats.jsonl", "ab") as f:
        f.write(b"\xff\xfe garbage\n")
        f.write(b'{"step": 21, "images_seen": Infinity, "loss": 0.5, "images_per_sec": 1}\n')
        f.write(b'{"step": 22, "images_seen": NaN, "loss": 0.5, "images_per_sec": 1}\n')
        f.write(b'{"step": 1' + b"0" * 400 + b', "images_seen": 5, "loss": 0.5}\n')
    assert main(["report", str(run)]) == 0
    assert not re.findall(r"points=\"[^\"]*(nan|inf)", (run / "report.html").read_text())


def test_frames_of_other_sizes_make_one_clean_gif():
    """A resume may change train.grid_images: a smaller frame is padded, not laid over the last."""
    import io

    import torch
    from PIL import Image

    from ddpmkit.images import gif_bytes

    frames = [torch.zeros(1, 12, 12, dtype=torch.uint8), torch.zeros(1, 8, 8, dtype=torch.uint8)]
    gif = Image.open(io.BytesIO(gif_bytes(frames)))
    gif.seek(1)
    last = gif.convert("L")
    assert last.size == (12, 12) and last.getpixel((10, 10)) == 255 and last.getpixel((2, 2)) == 0


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no browser: Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run does this on CI)")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (pip install selenium)")
    return chromium, driver, webdriver


def render(page, tmp_path) -> dict:
    """Open `page` in headless Chromium: no errors, nothing fetched from outside, every image
    loaded and shown. Returns what it shows: images, plots (their widths), and window.pwned."""
    chromium, driver_path, webdriver = _browser()
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1200,1800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        # drain the browser's own start-up (new tab page)
        browser.get_log("browser"), browser.get_log("performance")
        browser.get(page.as_uri())
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        # requests made for the page (the browser's own new-tab page runs alongside, ignored)
        events = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
        ours = [ev["params"] for ev in events if ev["method"] == "Network.requestWillBeSent"
                and ev["params"].get("documentURL") == page.as_uri()]
        ids = {p["requestId"] for p in ours}
        failed = [ev for ev in events if ev["method"] == "Network.loadingFailed"
                  and ev["params"]["requestId"] in ids]
        assert not failed, failed
        urls = [p["request"]["url"] for p in ours]
        # identical images load once; nothing comes from outside
        assert all(u.startswith(("file:", "data:")) for u in urls)
        plots = browser.find_elements(By.CSS_SELECTOR, "svg")
        images = browser.find_elements(By.TAG_NAME, "img")
        for img in images:
            browser.execute_script("arguments[0].scrollIntoView()", img)
            assert browser.execute_script("return arguments[0].complete && "
                                          "arguments[0].naturalWidth", img) > 0
            assert img.is_displayed()
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        return {"requests": len(urls), "images": len(images),
                "plots": [p.size["width"] for p in plots if p.is_displayed()],
                "pwned": browser.execute_script("return window.pwned")}
    finally:
        browser.quit()


def test_report_renders_in_headless_chromium(report, tmp_path):
    shown = render(report, tmp_path)
    assert shown["requests"] >= 5
    assert len(shown["plots"]) == 4 and all(w > 300 for w in shown["plots"])
    assert shown["images"] == 6


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard",
                        reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import tiny_config

    cfg = tiny_config(tmp_path,
                      **{"train.max_steps": 10, "train.sample_every": 5, "train.tensorboard": True})
    run = train(cfg, log=lambda *_: None, progress=False)
    events = EventAccumulator(str(run.path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10]
    assert {"train/lr", "train/images_per_sec", "train/memory_mb"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("samples")] == [5, 10]


def test_a_standalone_plot_carries_its_colours_and_legend():
    from ddpmkit.report import PALETTE, svg_plot

    series = [(f"run {i}", [0, 1, 2], [0.0, 0.5 * i, 1.0]) for i in range(3)]
    inline, alone = (svg_plot(series, "step", "rate", standalone=s) for s in (False, True))
    assert "<style>" not in inline and "run 0</text>" not in inline  # the page styles it
    style = re.search(r"<style>(.*?)</style>", alone)[1]
    for i in range(3):
        assert f".s{i}{{stroke:{PALETTE[i]}}}" in style
        assert f'<text class="s{i}" x="68" y="{24 + 14 * i}">run {i}</text>' in alone
        assert f'<polyline class="s{i}" fill="none"' in alone
    assert alone.startswith('<svg xmlns="http://www.w3.org/2000/svg"')


def _tick_labels(svg: str, anchor: str) -> list[str]:
    return re.findall(rf'text-anchor="{anchor}">([^<]*)</text>', svg)


@pytest.mark.parametrize("ys, logy", [([2.051, 2.054, 2.058], True), ([2.051, 2.054, 2.058], False),
                                      ([1000.1, 1000.3], False), ([0.0, 0.0, 0.0], False),
                                      ([3.5, 3.5], True)])
def test_every_tick_label_differs_and_a_flat_series_gets_a_readable_axis(ys, logy):
    from ddpmkit.report import svg_plot

    svg = svg_plot([("FD", list(range(len(ys))), ys)], "step", "FD", logy=logy)
    labels = _tick_labels(svg, "end")
    assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
    assert all("e-" not in label for label in labels), labels  # no 1e-10 axis for a flat zero
    assert all(float(label.replace(",", "")) >= 0 for label in labels), labels  # rates stay >= 0
