"""`ddpmkit report RUN`: one self-contained HTML page about a run (RUN/report.html).

Everything is inside the file (plots as inline SVG, images as data URIs), so it opens offline and
can be mailed. Written at the end of training and on demand. Colours follow the reader's light or
dark preference.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

from . import atomic
from .images import gif_bytes
from .limits import check_memory
from .errors import UserError, warn
from .pixels import ImageFiles, read_image_files
from .run import RunDir, fd_of

MAX_STRIP = 10  # grids shown in the "learning" strip, evenly spaced over the run
MAX_GRID_BYTES = 64 << 20  # a grid of 256 images of 256x256 pixels is about 50 MB

CSS = """
:root { color-scheme: light dark; --fg: #1d1d1f; --bg: #ffffff; --muted: #6e6e73; --grid: #d2d2d7;
        --s0: #d9480f; --s1: #1971c2; --card: #f5f5f7; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #f5f5f7; --bg: #161617; --muted: #a1a1a6; --grid: #3a3a3c; --s0: #ff922b;
          --s1: #4dabf7; --card: #232325; }
}
body { font: 15px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg);
       margin: 2rem auto; max-width: 1100px; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid var(--grid); padding-bottom: 0.3rem; }
.muted { color: var(--muted); } .plots { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; background: var(--card); border-radius: 8px; padding: 0.6rem; }
figcaption { font-size: 13px; color: var(--muted); text-align: center; }
svg text { fill: var(--fg); font-size: 11px; } svg .axis { stroke: var(--muted); }
svg .gridline { stroke: var(--grid); } svg .s0 { stroke: var(--s0); } svg .s1 { stroke: var(--s1); }
.strip { display: flex; gap: 0.5rem; overflow-x: auto; }
.strip img { height: 150px; image-rendering: pixelated; }
img.big { max-width: 480px; width: 100%; image-rendering: pixelated; }
table { border-collapse: collapse; }
td, th { padding: 0.25rem 0.8rem; border-bottom: 1px solid var(--grid); text-align: right; }
pre { background: var(--card); padding: 0.8rem; border-radius: 8px; overflow-x: auto; }
"""


PALETTE = ("#d9480f", "#1971c2", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#e03131")


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks at 1, 2 and 5 times powers of ten (in log10 units) within [lo, hi]; on a span too
    narrow for two of them, round values placed on the log scale."""
    ticks = [math.log10(m * 10**k) for k in range(math.floor(lo) - 1, math.ceil(hi) + 1)
             for m in (1, 2, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    return inside if len(inside) >= 2 else [math.log10(v) for v in _ticks(10**lo, 10**hi)]


def _labels(values: list[float]) -> list[str]:
    """Tick labels with as many digits as it takes to tell them apart."""
    for digits in range(3, 16):
        labels = [f"{v:,.0f}" if 10**digits <= abs(v) < 1e15 else f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(labels):
            break
    return labels


def svg_plot(series: list[tuple[str, list[float], list[float]]], xlabel: str, ylabel: str, *,
             logy: bool = False, width: int = 520, height: int = 250,
             standalone: bool = False) -> str:
    """A line plot as inline SVG: series of (label, x, y). Colours come from the page's CSS;
    `standalone` writes them in, with a legend, for an SVG file read on its own."""
    def shown(x, y):
        return (x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
                and (y > 0 or not logy))

    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if shown(x, y)]
    if not pts:
        return f'<p class="muted">no {ylabel} recorded yet</p>'
    f = (lambda v: math.log10(v)) if logy else (lambda v: v)  # noqa: E731
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(f(p[1]) for p in pts), max(f(p[1]) for p in pts)
    x1 = x1 if x1 > x0 else x0 + 1
    if y1 <= y0:  # a flat series: a span around it (a flat zero from zero up)
        pad = 0.05 if logy else abs(y0) * 0.05
        y0, y1 = (y0 - pad, y1 + pad) if pad else (y0, y0 + 1)
    left, right, top, bottom = 58, 26, 12, 38
    sx = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda v: height - bottom - (f(v) - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" '
           f'aria-label="{html.escape(ylabel)} against {html.escape(xlabel)}">']
    if standalone:
        out.append("<style>text{font:11px sans-serif}.gridline{stroke:#e5e5e5}.axis{stroke:#333}"
                   + "".join(f".s{i}{{stroke:{c}}}text.s{i}{{fill:{c};stroke:none}}"
                           for i, c in enumerate(PALETTE))
                   + "</style>")
    xticks = _ticks(x0, x1)
    for t, label in zip(xticks, _labels(xticks)):
        out.append(f'<line class="gridline" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" '
                   f'y2="{height - bottom}"/><text x="{sx(t):.1f}" y="{height - bottom + 14}" '
                   f'text-anchor="middle">{label}</text>')
    yticks = _log_ticks(y0, y1) if logy else _ticks(y0, y1)
    for t, label in zip(yticks, _labels([10**t for t in yticks] if logy else yticks)):
        y = height - bottom - (t - y0) / (y1 - y0) * (height - top - bottom)
        out.append(f'<line class="gridline" x1="{left}" x2="{width - right}" y1="{y:.1f}" '
                   f'y2="{y:.1f}"/><text x="{left - 6}" y="{y + 4:.1f}" '
                   f'text-anchor="end">{label}</text>')
    out.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}"/>'
               f'<line class="axis" x1="{left}" x2="{width - right}" y1="{height - bottom}" '
               f'y2="{height - bottom}"/><text x="{(left + width - right) / 2}" y="{height - 6}" '
               f'text-anchor="middle">{html.escape(xlabel)}</text>')
    for i, (label, xs, ys) in enumerate(series):
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys) if shown(x, y))
        colour = f"s{i % len(PALETTE)}" if standalone else f"s{i % 2}"
        out.append(f'<polyline class="{colour}" fill="none" stroke-width="1.8" points="{line}">'
                   f'<title>{html.escape(label)}</title></polyline>')
        if standalone:  # the legend: a page's figure caption names its series instead
            out.append(f'<text class="{colour}" x="{left + 10}" '
                       f'y="{top + 12 + 14 * i}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>"


def training_grids(run: RunDir) -> list[tuple[int, Path]]:
    """(step, file) of the grids training wrote, in step order; other files there (a copy a file
    manager made, a link, anything larger than a grid) are not ddpmkit's and are left out."""
    grids = []
    for p in run.grids.iterdir() if run.grids.is_dir() else []:
        match = re.fullmatch(r"step_(\d{9})\.png", p.name)
        if match and p.is_file() and not p.is_symlink() and p.stat().st_size <= MAX_GRID_BYTES:
            grids.append((int(match[1]), p))
    return sorted(grids)


def readable_grids(run: RunDir, warn) -> ImageFiles | None:
    """The training grids that decode, or None if none can be read; a damaged grid is left out
    with a warning, as it cannot change what training did."""
    files = [path for _, path in training_grids(run)]
    try:
        grids = read_image_files(files, f"the training grids in {run.grids}", on_error="skip")
    except UserError as exc:  # none readable, or none at all
        if files:
            warn(str(exc))
        return None
    for path, why in grids.skipped:
        warn(f"left out the damaged grid {path} ({why})")
    return grids


def learning_gif(run: RunDir, frame_ms: int = 200, warn=lambda message: None) -> bytes | None:
    """The periodic training grids as one animated GIF, or None if none can be read."""
    grids = readable_grids(run, warn)
    if grids is None:
        return None
    _check_gif_memory(run, grids)
    return gif_bytes(grids.images, frame_ms=frame_ms)


def _check_gif_memory(run: RunDir, grids: ImageFiles) -> None:
    """Every frame is padded to the largest grid and held as a picture and in the file built."""
    h, w = (max(g.shape[i] for g in grids.images) for i in (-2, -1))
    check_memory(4 * len(grids.images) * 3 * h * w, f"a GIF of {len(grids.images)} training "
                 f"grids of {w}x{h}", f"one grid far larger than the others in {run.grids} sets "
                 f"every frame's size: move it out")


def _number(value) -> float | None:
    """A number read from the run's files, or None: a value of another type (a damaged or crafted
    file) is left out of plots and tables, never passed on."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer past any float
        return None
    return value if math.isfinite(value) else None


def _series(rows: list[dict], key: str) -> list[float | None]:
    return [_number(r.get(key)) for r in rows]


def build_report(run: RunDir, warn=warn) -> str:
    balance = run.config().train.class_balance  # a run of this format, or one clear line
    meta, rows, e = run.meta(), run.read_stats(), html.escape
    logs = [r for r in rows if _number(r.get("loss")) is not None]
    env = meta.get("environment") if isinstance(meta.get("environment"), dict) else {}
    # a stop saves a checkpoint between log intervals: the run is as far as its latest one
    last_step = max([logs[-1]["step"] if logs else 0,
                     *(c["step"] for c in run.read_state()["checkpoints"])])
    parameters = _number(meta.get("parameters")) or 0
    counts = meta.get("class_counts") if isinstance(meta.get("class_counts"), dict) else {}
    shown = [f"{name} {count}" for name, count in list(counts.items())[:20]]
    classes = (" · " + ", ".join(shown + ["…"] * (len(counts) > 20))
               + (f" (drawn with train.class_balance={balance:g})" if balance else "")
               if counts else "")
    return "".join([
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ddpmkit report: "
        f"{e(run.path.name)}</title><meta name='viewport' content='width=device-width, "
        f"initial-scale=1'><style>{CSS}</style></head><body><h1>{e(run.path.name)}</h1>"
        f"<p class='muted'>{last_step:,} steps · {parameters:,.0f} parameters · "
        f"{e(str(meta.get('data', '')))}{e(classes)} · {e(str(env.get('device', '')))}</p>",
        _curves(logs, [r for r in rows if isinstance(r.get("eval"), dict)],
                [r for r in rows if isinstance(r.get("audit"), dict)]), _grids(run, warn),
        _checkpoints(run), _hardware(env, logs),
        f"<h2>Resolved config</h2><pre>{e(run.config_path.read_text())}</pre></body></html>"])


def _curves(logs: list[dict], evals: list[dict], audits: list[dict]) -> str:
    steps = [r["step"] for r in logs]
    parts = ["<h2>Training curves</h2><div class='plots'>",
             _figure(svg_plot([("loss", steps, _series(logs, "loss"))], "step", "loss", logy=True),
                     "loss against steps (log scale)"),
             _figure(svg_plot([("loss", _series(logs, "images_seen"), _series(logs, "loss"))],
                              "images seen", "loss", logy=True), "loss against images seen"),
             _figure(svg_plot([("lr", steps, _series(logs, "lr"))], "step", "learning rate"),
                     "learning rate"),
             _figure(svg_plot([("images/s", steps, _series(logs, "images_per_sec"))], "step",
                              "images/s"),
                     "throughput (images per second)")]
    if evals:  # those measured as the latest was: FDs of other features or counts do not compare
        latest = fd_of(evals[-1]["eval"])
        same = [r for r in evals if fd_of(r["eval"]) == latest]
        fd = [_number(r["eval"].get("fd")) for r in same]
        left_out = (f"; {len(evals) - len(same)} earlier evaluation(s) of other features or "
                    f"counts left out" if len(same) < len(evals) else "")
        parts.append(_figure(svg_plot([("FD", [r["step"] for r in same], fd)],
                                      "step", "Frechet distance"),
                             f"evaluation: Frechet distance ({latest}){left_out}"))
    if audits:
        rate = [_number(r["audit"].get("copy_rate")) for r in audits]
        parts.append(_figure(svg_plot([("copies", [r["step"] for r in audits], rate)], "step",
                                      "share of samples"),
                             "memorization: samples that are near-copies of training images"))
    return "".join(parts) + "</div>"


def _grids(run: RunDir, warn) -> str:
    readable = readable_grids(run, warn)
    if readable is None:
        return ("<h2>Samples while learning</h2><p class='muted'>no sample grids yet "
                "(train.sample_every)</p>")
    grids = [(step, p) for step, p in training_grids(run) if p in readable.files]
    count = min(MAX_STRIP, len(grids))
    shown = dict.fromkeys(grids[round(i * (len(grids) - 1) / max(1, count - 1))]
                          for i in range(count))
    strip = "".join(f"<figure><img alt='samples at step {step}' "
                    f"src='{data_uri(p.read_bytes(), 'image/png')}'>"
                    f"<figcaption>step {step:,}</figcaption></figure>" for step, p in shown)
    last_step, last = grids[-1]
    try:
        _check_gif_memory(run, readable)
        gif = data_uri(gif_bytes(readable.images, frame_ms=200), "image/gif")
        animation = (f"<figure><img class='big' alt='learning GIF' src='{gif}'><figcaption>the "
                     f"same noise at every grid, step by step</figcaption></figure>")
    except UserError as exc:  # the report goes on without its animation
        warn(f"no learning GIF in the report: {exc}")
        animation = ""
    return (f"<h2>Samples while learning</h2><div class='strip'>{strip}</div><div class='plots'>"
            f"{animation}<figure><img class='big' alt='latest "
            f"samples' src='{data_uri(last.read_bytes(), 'image/png')}'><figcaption>latest "
            f"samples (step {last_step:,}, EMA weights)</figcaption></figure></div>")


def _checkpoints(run: RunDir) -> str:
    state = run.read_state()  # checked entry by entry: steps are integers, digests hexadecimal
    rows = []
    for c in sorted(state["checkpoints"], key=lambda c: c["step"]):
        fd = f"{c['fd']:.4f}" if c.get("fd") is not None else ""
        loss = f"{c['loss']:.5f}" if c.get("loss") is not None else ""
        on = html.escape(str(c.get("fd_of") or "")) if fd else ""  # best: among the latest's
        notes = ["best"] * (c["step"] == state["best"]) + ["file missing"] * (
            not run.checkpoint_file(c["step"]).is_file())
        rows.append(f"<tr><td>{c['step']:,}</td><td>{loss}</td><td>{fd}</td><td>{on}</td><td>"
                    f"<code>{html.escape(c['sha256'][:12])}</code></td>"
                    f"<td>{', '.join(notes)}</td></tr>")
    return ("<h2>Checkpoints</h2><table><tr><th>step</th><th>mean loss</th><th>eval FD</th>"
            "<th>FD of</th><th>SHA-256</th><th></th></tr>" + "".join(rows) + "</table>")


def _hardware(env: dict, logs: list[dict]) -> str:
    elapsed = _number(logs[-1].get("elapsed_sec")) or 0 if logs else 0
    speeds = [v for v in _series(logs, "images_per_sec") if v is not None]
    memory = _number(logs[-1].get("memory_mb")) if logs else None
    command = env.get("command") if isinstance(env.get("command"), list) else []
    hw = {"device": env.get("gpu") or env.get("device"), "torch": env.get("torch"),
          "ddpmkit": env.get("ddpmkit"), "python": env.get("python"),
          "platform": env.get("platform"), "git": env.get("git"),
          "command": " ".join(map(str, command)),
          "training time (this session)": f"{elapsed / 60:.1f} min",
          "mean images/s": f"{sum(speeds) / len(speeds):,.0f}" if speeds else "",
          "peak memory": f"{memory:,.0f} MiB" if memory is not None else ""}
    return "<h2>Hardware and timing</h2><table>" + "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(str(v))}"
        f"</td></tr>" for k, v in hw.items() if v) + "</table>"


def write_report(run_dir: str | Path, warn=warn) -> Path:
    run = RunDir(run_dir)
    path = run.path / "report.html"
    atomic.write_text(path, build_report(run, warn))
    return path
