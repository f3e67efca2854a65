"""Sweep plots: files, sizes, one line per method, reference line, error bars, determinism, input errors."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from eval.plots import _colours, figure_size, plot_sweep


def _sweep(ci: bool = False) -> pd.DataFrame:
    rows = []
    for bench, base in (("tiny", 50.0), ("videomme", 58.0)):
        rows.append(dict(model="tiny_llava_ov", benchmark=bench, prune="none", ratio=1.0, accuracy=base))
        for method, drop in (("prunevid", 1.0), ("hieravid", 0.5), ("fastv", 2.0)):
            for ratio in (0.5, 0.1, 0.3):  # unsorted on purpose
                rows.append(
                    dict(
                        model="tiny_llava_ov",
                        benchmark=bench,
                        prune=method,
                        ratio=ratio,
                        accuracy=base - drop / ratio,
                        ttft_speedup=1 / ratio**0.5,
                        flops_ratio=ratio,
                    )
                )
    df = pd.DataFrame(rows)  # none's ttft_speedup is NaN, as eval.tables leaves it
    df.loc[df.prune == "none", "flops_ratio"] = 1.0
    if ci:
        df["ci_low"], df["ci_high"] = df.accuracy - 2.0, df.accuracy + 3.0
    return df


def _svg_ids(text: str, prefix: str) -> set[str]:
    return set(re.findall(rf'id="({re.escape(prefix)}[^"]*)"', text))


def test_writes_png_and_svg_of_both_metrics(tmp_path):
    paths = plot_sweep(_sweep(), tmp_path / "plots", "sweep")
    names = [p.name for p in paths]
    assert names == ["sweep_accuracy.png", "sweep_accuracy.svg", "sweep_ttft_speedup.png", "sweep_ttft_speedup.svg"]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 1000
    for png in paths[0::2]:
        with Image.open(png) as image:
            image.load()
            assert image.format == "PNG"
            assert image.size == figure_size(1, 2) == (800, 360)  # 1 model row x 2 benchmark columns


def test_svg_has_one_line_per_method_and_panel_and_the_reference(tmp_path):
    paths = plot_sweep(_sweep(), tmp_path, "s")
    svg = paths[1].read_text()
    for bench in ("tiny", "videomme"):
        ids = _svg_ids(svg, f"accuracy-tiny_llava_ov-{bench}-")
        assert ids == {f"accuracy-tiny_llava_ov-{bench}-{m}" for m in ("prunevid", "hieravid", "fastv", "none")}
    # legend: each method once, plus none
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    for name in ("prunevid", "hieravid", "fastv", "none"):
        assert texts.count(name) == 1, (name, texts)
    assert "tiny_llava_ov · videomme" in texts
    speed = paths[3].read_text()
    assert len(_svg_ids(speed, "ttft_speedup-tiny_llava_ov-")) == 8  # speed-up has the 1x reference too


def test_lines_are_sorted_by_ratio_and_reference_is_nones_accuracy(tmp_path):
    import matplotlib.pyplot as plt

    import eval.plots as plots

    figures = []
    real_close = plt.close
    plots.plt.close = figures.append  # keep the figures open to inspect them
    try:
        plot_sweep(_sweep(), tmp_path, "s")
    finally:
        plots.plt.close = real_close
    fig = figures[0]  # accuracy
    ax = fig.axes[0]  # tiny
    lines = {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}
    xs, ys = lines["accuracy-tiny_llava_ov-tiny-prunevid"].get_data()
    assert list(xs) == [0.1, 0.3, 0.5]
    assert list(ys) == pytest.approx([50 - 10, 50 - 1 / 0.3, 50 - 2])
    assert list(lines["accuracy-tiny_llava_ov-tiny-none"].get_ydata()) == [50.0, 50.0]
    speed_ax = figures[1].axes[1]  # videomme
    ref = [line for line in speed_ax.get_lines() if line.get_gid() == "ttft_speedup-tiny_llava_ov-videomme-none"]
    assert list(ref[0].get_ydata()) == [1.0, 1.0]
    for f in figures:
        real_close(f)


def test_error_bars_from_ci_columns(tmp_path):
    plain = plot_sweep(_sweep(), tmp_path / "a", "s")[1].read_text()
    with_ci = plot_sweep(_sweep(ci=True), tmp_path / "b", "s")[1].read_text()
    assert not re.search(r'id="[^"]*-ci"', plain)
    ids = set(re.findall(r'id="(accuracy-[^"]*-ci)"', with_ci))
    assert ids == {
        f"accuracy-tiny_llava_ov-{b}-{m}-ci" for b in ("tiny", "videomme") for m in ("prunevid", "hieravid", "fastv")
    }
    # each bar group holds one vertical segment per ratio: 3 path elements inside the group
    group = re.search(r'<g id="accuracy-tiny_llava_ov-tiny-fastv-ci">(.*?)</g>', with_ci, re.S).group(1)
    assert group.count("<path") == 3


def test_output_is_deterministic(tmp_path):
    a = plot_sweep(_sweep(), tmp_path / "a", "s")
    b = plot_sweep(_sweep(), tmp_path / "b", "s")
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert "<dc:date>" not in a[1].read_text()


def test_several_models_make_rows(tmp_path):
    df = pd.concat([_sweep(), _sweep().assign(model="tiny_llava_video")])
    png = plot_sweep(df, tmp_path, "s")[0]
    with Image.open(png) as image:
        assert image.size == figure_size(2, 2)


def test_missing_column_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['ttft_speedup'\]"):
        plot_sweep(_sweep().drop(columns="ttft_speedup"), tmp_path, "s")
    with pytest.raises(ValueError, match="final_retained_pct"):
        plot_sweep(_sweep(), tmp_path, "s", x="final_retained_pct")
    with pytest.raises(ValueError, match="ci_low and ci_high"):
        plot_sweep(_sweep(ci=True).drop(columns="ci_high"), tmp_path, "s")
    with pytest.raises(ValueError, match="no rows"):
        plot_sweep(_sweep().iloc[:0], tmp_path, "s")


def test_x_is_the_achieved_budget_and_the_knob_is_only_in_the_legend(tmp_path):
    df = _sweep()
    df["flops_ratio"] = df.ratio * 0.8  # achieved FLOPs differ from the nominal ratio
    df.loc[df.prune == "none", "flops_ratio"] = 1.0
    df["legend"] = df.prune + " (ratio 0.1–0.5)"
    svg = plot_sweep(df, tmp_path, "s")[1].read_text()
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert texts.count("achieved prefill FLOPs ratio vs none") == 2  # one x label per panel
    assert "prunevid (ratio 0.1–0.5)" in texts and "prunevid" not in texts
    assert not any("knob" in t for t in texts)


def test_long_legend_entries_wrap_into_more_rows():
    """Entries with their nominal settings (``prunevid (layer_avg 10–30 %)``) need more room than method names."""
    from eval.plots import legend_columns

    assert legend_columns(8, 1) == 3 and legend_columns(8, 1, longest=5) == 3
    assert legend_columns(8, 1, longest=28) == 1 and legend_columns(8, 2, longest=28) == 2
    assert figure_size(1, 1, n_legend=8, longest=28)[1] > figure_size(1, 1, n_legend=8, longest=5)[1]
    assert figure_size(1, 2) == figure_size(1, 2, longest=28)  # no legend rows asked for: unchanged


def test_every_strategy_gets_its_own_colour():
    """The probe sweep plots all 12 strategies of configs/prune on one axis: no two may share a colour."""
    strategies = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "prune").glob("*.yaml"))
    colours = _colours([s for s in strategies if s != "none"])
    assert len(set(colours.values())) == len(colours) == len(strategies) - 1, colours
