"""scripts/flops_table.py reproduces PruneVid Table 1's PLLaVA FLOPs ratios from the paper's convention."""

from __future__ import annotations

import sys

import pytest

from eval.runner import REPO

sys.path.insert(0, str(REPO / "scripts"))
from flops_table import TEXT_TOKENS, main, markdown, rows  # noqa: E402


def _row(table, backbone, method):
    return next(r for r in table if (r["backbone"], r["method"]) == (backbone, method))


def test_pllava_rows_match_table_1():
    table = rows()
    assert TEXT_TOKENS == 50
    assert _row(table, "PLLaVA-7B", "none")["ratio"] == pytest.approx(1.0)
    assert _row(table, "PLLaVA-7B", "FastV")["ratio"] == pytest.approx(0.33, abs=0.01)
    assert 0.23 <= _row(table, "PLLaVA-7B", "PruneVid")["ratio"] <= 0.245


def test_every_backbone_has_the_three_methods_and_pruning_saves():
    table = rows()
    assert {(r["backbone"], r["method"]) for r in table} == {
        (b, m) for b in ("PLLaVA-7B", "ST-LLM-7B") for m in ("none", "FastV", "PruneVid")
    }
    for backbone in ("PLLaVA-7B", "ST-LLM-7B"):
        ratios = [_row(table, backbone, m)["ratio"] for m in ("none", "FastV", "PruneVid")]
        assert ratios == sorted(ratios, reverse=True)


def test_the_script_prints_the_markdown_table(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out.strip()
    assert out == markdown(rows())
    assert out.count("\n") == 1 + 6 and "| PLLaVA-7B | FastV |" in out
