"""The overhead suite (taps-fast bench --suite overhead) and the authors' style provider it shares
with the models suite."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import taps_fast
from taps_fast import cli
from taps_fast.bench import models as bench_models
from taps_fast.bench import overhead


def test_overhead_suite_quick(tmp_path, capsys):
    """--quick end to end: every row group, each row with a ratio and a target, and the summary."""
    out = tmp_path / "overhead.json"
    assert cli.main(["bench", "--suite", "overhead", "--quick", "--quiet", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    rows = rec["rows"]
    assert {r["group"] for r in rows} == set(overhead.GROUPS)
    for r in rows:
        assert r["median"] > 0 and r["baseline_median"] > 0
        assert r["ratio"] == pytest.approx(r["median"] / r["baseline_median"])
        if r["target"] is not None:
            assert r["met"] == (r["ratio"] <= r["target"])
    targeted = [r for r in rows if r["target"] is not None]
    assert {r["group"] for r in targeted} == set(overhead.GROUPS)
    # per group: open and closed gates for both layers; both baselines of the train step at both
    # gate fractions, per model; time and weights of the mixed batch, per model
    by_group = {g: [r for r in targeted if r["group"] == g] for g in overhead.GROUPS}
    assert len(by_group["overhead"]) == len(by_group["fwdbwd"]) == 4
    assert {r["baseline"] for r in by_group["train"]} == {"authors", "plain"} and len(by_group["train"]) == 8
    assert {r["unit"] for r in by_group["mixed"]} == {"ms", "MiB"} and len(by_group["mixed"]) == 4
    assert len(by_group["infer"]) == 2
    assert by_group["serving"][0]["extra"]["floor_form"] in ("sum", "mv")
    assert rec["summary"]["targets"] == len(targeted)
    printed = capsys.readouterr().out
    assert f"{rec['summary']['met']} of {len(targeted)} targets met" in printed
    assert "target" in printed and "baseline" in printed


def test_overhead_suite_one_group_and_bad_group(tmp_path):
    out = tmp_path / "o.json"
    assert overhead.main(["--quick", "--quiet", "--rows", "overhead", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["group"] for r in rows} == {"overhead"} and all(r["unit"] == "µs" for r in rows)
    with pytest.raises(SystemExit):
        overhead.main(["--rows", "nope"])


def test_serving_layer_count_exceeds_four_caches():
    per_layer = 2 * 3072 * 3072 * 4
    assert overhead.serving_layer_count(3072, 8, 32 << 20, True) == 8
    n = overhead.serving_layer_count(3072, 8, 256 << 20, True)
    assert n * per_layer > 4 * (256 << 20) and (n - 1) * per_layer <= 4 * (256 << 20)
    assert overhead.serving_layer_count(3072, 8, 256 << 20, False) == 8


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    return bench_models.prepare_taps(plain, 0.5)  # some gates open, some closed


def test_authors_style_is_the_reference_formula_on_the_same_tensors():
    """The authors provider gives the taps model's output and the same gradients of ΔW and s (fp32
    tolerance), and its layers really run taps_linear_ref / taps_conv2d_ref."""
    taps = _small_model()
    authors = bench_models.authors_style(taps)
    layers = dict(taps_fast.taps_layers(taps))
    theirs = dict(taps_fast.taps_layers(authors))
    assert layers.keys() == theirs.keys()
    assert {m.is_open for m in layers.values()} == {True, False}
    for name, m in layers.items():
        a = theirs[name]
        assert type(a).__name__.startswith("_Authors") and isinstance(a, type(m))
        for p in ("weight", "delta", "score", "bias"):
            assert torch.equal(getattr(a, p), getattr(m, p)) and getattr(a, p) is not getattr(m, p)
        assert a.threshold == m.threshold

    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    outs = []
    for model in (taps, authors):
        model.train()
        out = model(x)
        (F.cross_entropy(out, y) + taps_fast.sparsity_penalty(model, 0.5)).backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for name, m in layers.items():
        a = theirs[name]
        for p in ("delta", "score", "bias"):
            torch.testing.assert_close(getattr(a, p).grad, getattr(m, p).grad, rtol=1e-4, atol=1e-6)
        assert a.weight.grad is None and m.weight.grad is None

    # the formula itself: the reference ops on the same tensors, in eval mode
    lin = theirs["6"]
    z = torch.randn(3, 8)
    with torch.no_grad():
        ref = taps_fast.taps_linear_ref(z, lin.weight, lin.delta, lin.score, lin.bias, lin.threshold)
        torch.testing.assert_close(lin(z), ref, rtol=0, atol=0)

