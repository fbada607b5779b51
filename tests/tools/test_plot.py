"""taps_fast.plot: the gate-map data (gate_matrix), the two figures, their input checks, and that
`import taps_fast` leaves matplotlib unimported."""
import copy
import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn

import taps_fast
from taps_fast import gate_matrix, plot_gate_map, plot_lambda_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_SIG = b"\x89PNG\r\n\x1a\n"
LAYERS = ["0", "3", "7"]  # the gated layers of _base(), in model order ("9" is the head)
EXPECTED = {"a": [True, True, True], "b": [True, False, True], "c": [False, True, True]}


def _base():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return taps_fast.convert(m, head="9")


def _set_score(model, name, value):
    with torch.no_grad():
        model.get_submodule(name).score.fill_(value)


@pytest.fixture(scope="module")
def summaries():
    """Three tasks on one base: a all open; b layer "3" closed by its score (delta kept);
    c layer "0" closed and its delta dropped by freeze_gates, then its score raised back above
    the threshold: the row says open, but the layer computes with the base weight alone."""
    base = _base()
    a, b, c = (copy.deepcopy(base) for _ in range(3))
    _set_score(b, "3", 0.05)
    _set_score(c, "0", 0.05)
    taps_fast.freeze_gates(c)
    _set_score(c, "0", 0.15)
    out = {name: taps_fast.summary(m) for name, m in zip("abc", (a, b, c))}
    row = out["c"].rows[0]
    assert row.name == "0" and row.open and not row.delta_kept  # the case the test is about
    assert out["b"].rows[1].open is False and out["b"].rows[1].delta_kept
    return out


def test_gate_matrix_rows(summaries):
    tasks, layers, matrix = gate_matrix(summaries)
    assert tasks == ["a", "b", "c"]
    assert layers == LAYERS
    assert matrix == [EXPECTED[t] for t in tasks]
    # Mapping order is task order.
    tasks2, _, matrix2 = gate_matrix({"c": summaries["c"], "a": summaries["a"]})
    assert tasks2 == ["c", "a"] and matrix2 == [EXPECTED["c"], EXPECTED["a"]]


def test_gate_matrix_dict_and_json_inputs(summaries):
    as_dict = {t: s.to_dict() for t, s in summaries.items()}
    from_json = json.loads(json.dumps(as_dict))
    mixed = {"a": summaries["a"], "b": from_json["b"], "c": as_dict["c"]}
    want = gate_matrix(summaries)
    assert gate_matrix(as_dict) == want
    assert gate_matrix(from_json) == want
    assert gate_matrix(mixed) == want


def test_gate_matrix_errors(summaries):
    other = _base()
    other = taps_fast.summary(taps_fast.convert(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 4)), head=None))
    # other's layers are "0", "1", "4": the first difference is position 1.
    with pytest.raises(ValueError, match=r"task 'x' has layer '1' at position 1 where task 'a' has '3'"):
        gate_matrix({"a": summaries["a"], "x": other})
    shorter = summaries["a"].to_dict()
    shorter["rows"] = shorter["rows"][:2]
    with pytest.raises(ValueError, match=r"task 's' has layer nothing at position 2 where task 'a' has '7'"):
        gate_matrix({"a": summaries["a"], "s": shorter})
    with pytest.raises(ValueError, match="non-empty mapping"):
        gate_matrix({})
    with pytest.raises(ValueError, match=r"task 'a': missing key 'rows'"):
        gate_matrix({"a": {"totals": {}}})
    bad = summaries["b"].to_dict()
    del bad["rows"][2]["delta_kept"]
    with pytest.raises(ValueError, match=r"task 'b', row 2: missing key 'delta_kept'"):
        gate_matrix({"b": bad})


def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIG, f"{path} is not a PNG: {data[:8]!r}"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _labels(texts):
    return [t.get_text() for t in texts]


def test_plot_gate_map_png(summaries, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "new" / "dir" / "gates.png"
    fig = plot_gate_map(summaries, path, title="three tasks")
    w, h = _png_size(path)
    assert w > 100 and h > 50
    (ax,) = fig.axes
    assert _labels(ax.get_xticklabels()) == LAYERS
    rows = _labels(ax.get_yticklabels())
    assert len(rows) == 3
    for label, (task, s) in zip(rows, summaries.items()):
        n_open = sum(EXPECTED[task])
        assert label == f"{task}  {100 * s.totals['task_fraction']:.2f}%  {n_open}/3"
    assert ax.get_title() == "three tasks"
    # The image drawn is the matrix: 1 where open.
    assert ax.images[0].get_array().tolist() == [[int(v) for v in EXPECTED[t]] for t in "abc"]
    # Dict input, no path: same figure data, no file; a path without suffix is still a PNG.
    fig2 = plot_gate_map({t: s.to_dict() for t, s in summaries.items()}, tmp_path / "gates_nosuffix")
    assert _labels(fig2.axes[0].get_yticklabels()) == rows
    assert _png_size(tmp_path / "gates_nosuffix")[0] > 0


def test_plot_gate_map_many_layers_and_threads(tmp_path):
    pytest.importorskip("matplotlib")
    names = [f"blocks.{i}.conv" for i in range(100)]

    def task(k):
        rows = [{"name": n, "open": i % k == 0, "delta_kept": True} for i, n in enumerate(names)]
        return {"rows": rows, "totals": {"task_fraction": 0.01 * k}}

    tasks = {f"t{k}": task(k) for k in (2, 3)}
    # Two figures at once in two threads: no pyplot state is shared.
    with ThreadPoolExecutor(2) as ex:
        figs = list(ex.map(lambda p: plot_gate_map(tasks, p), [tmp_path / "m1.png", tmp_path / "m2.png"]))
    assert _png_size(tmp_path / "m1.png") == _png_size(tmp_path / "m2.png")
    # 100 layers > 40: every ceil(100/40) = 3rd name is written.
    assert _labels(figs[0].axes[0].get_xticklabels()) == names[::3]
    assert _labels(figs[0].axes[0].get_yticklabels()) == ["t2  2.00%  50/100", "t3  3.00%  34/100"]


def test_plot_gate_map_needs_task_fraction(summaries):
    d = summaries["a"].to_dict()
    del d["totals"]["task_fraction"]
    with pytest.raises(ValueError, match=r"task 'a'.*'task_fraction'"):
        plot_gate_map({"a": d})


def test_plot_lambda_sweep_png_and_order(summaries, tmp_path):
    pytest.importorskip("matplotlib")
    s_b = summaries["b"]
    points = [
        {"lam": 0.1, "accuracy": 0.9, "task_fraction": 0.30},
        {"lam": 1.0, "accuracy": 0.7, "task_fraction": 0.05},
        {"lam": 0.5, "accuracy": 0.8, "summary": s_b.to_dict()},
    ]
    baselines = {"full fine-tuning": {"accuracy": 0.92, "task_fraction": 1.0},
                 "head only": {"accuracy": 0.6, "task_fraction": 0.01}}
    path = tmp_path / "sweep.png"
    fig = plot_lambda_sweep(points, path, baselines=baselines, title="sweep")
    w, h = _png_size(path)
    assert w > 100 and h > 100
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    (line,) = ax.lines
    by_frac = sorted([(0.30, 0.9, 0.1), (0.05, 0.7, 1.0), (s_b.totals["task_fraction"], 0.8, 0.5)])
    assert list(line.get_xdata()) == pytest.approx([100 * f for f, _, _ in by_frac])
    assert list(line.get_ydata()) == pytest.approx([100 * a for _, a, _ in by_frac])
    assert [t.get_text() for t in ax.texts] == [f"λ={lam:g}" for _, _, lam in by_frac]
    assert _labels(ax.get_legend().get_texts()) == ["full fine-tuning", "head only"]
    assert [c.get_offsets().tolist() for c in ax.collections] == [[[100.0, 92.0]], [[1.0, 60.0]]]
    # A Summary object gives the same x as its dict.
    fig2 = plot_lambda_sweep([dict(points[2], summary=s_b)])
    assert list(fig2.axes[0].lines[0].get_xdata()) == pytest.approx([100 * s_b.totals["task_fraction"]])


def test_plot_lambda_sweep_one_line_per_task():
    pytest.importorskip("matplotlib")
    points = [{"task": "cars", "lam": lam, "accuracy": acc, "task_fraction": f}
              for lam, acc, f in ((0.1, 0.8, 0.2), (1.0, 0.7, 0.1))]
    points += [{"task": "birds", "lam": 0.5, "accuracy": 0.6, "task_fraction": 0.15}]
    ax = plot_lambda_sweep(points).axes[0]
    assert len(ax.lines) == 2
    assert _labels(ax.get_legend().get_texts()) == ["cars", "birds"]
    assert list(ax.lines[0].get_xdata()) == pytest.approx([10.0, 20.0])


@pytest.mark.parametrize("points, match", [
    ([], "non-empty sequence"),
    ({"lam": 0.1, "accuracy": 0.5, "task_fraction": 0.1}, "non-empty sequence"),
    ([{"lam": 0.1, "accuracy": 0.5, "task_fraction": 0.1}, {"lam": 0.2, "task_fraction": 0.1}],
     r"point 1: missing key 'accuracy'"),
    ([{"accuracy": 0.5, "task_fraction": 0.1}], r"point 0: missing key 'lam'"),
    ([{"lam": 0.1, "accuracy": 0.5}], r"point 0: missing key 'task_fraction' \(or 'summary'\)"),
    ([{"lam": 0.1, "accuracy": 0.5, "task_fraction": 0.1}, {"lam": 0.2, "accuracy": 1.5, "task_fraction": 0.1}],
     r"point 1: key 'accuracy' must be a number in \[0, 1\], got 1.5"),
    ([{"lam": 0.1, "accuracy": -0.1, "task_fraction": 0.1}], r"point 0: key 'accuracy'"),
    ([{"lam": 0.1, "accuracy": 0.5, "task_fraction": -0.2}], r"point 0: key 'task_fraction' gives task fraction -0.2"),
    ([{"lam": 0.1, "accuracy": 0.5, "summary": {"rows": [], "totals": {"task_fraction": -1.0}}}],
     r"point 0: key 'summary' gives task fraction -1.0"),
    ([{"lam": 0.1, "accuracy": 0.5, "summary": {"rows": []}}], r"point 0, key 'summary': missing key 'totals'"),
    ([{"lam": -1, "accuracy": 0.5, "task_fraction": 0.1}], r"point 0: key 'lam' must be a finite number >= 0"),
    (["x"], r"point 0: expected a dict"),
])
def test_plot_lambda_sweep_bad_points(points, match):
    # Raised before matplotlib is needed.
    with pytest.raises(ValueError, match=match):
        plot_lambda_sweep(points)


def test_plot_lambda_sweep_bad_baseline():
    with pytest.raises(ValueError, match=r"baseline 'head only': key 'accuracy' must be a number in \[0, 1\], got 60"):
        plot_lambda_sweep([{"lam": 0.1, "accuracy": 0.5, "task_fraction": 0.1}],
                          baselines={"head only": {"accuracy": 60, "task_fraction": 0.01}})


def test_missing_matplotlib_message(monkeypatch, summaries):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes `import mod` raise ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_gate_map(summaries)


def test_import_does_not_import_matplotlib():
    """`import taps_fast` leaves matplotlib unimported; drawing imports it but never pyplot."""
    code = ("import sys, taps_fast\n"
            "assert 'matplotlib' not in sys.modules, 'import taps_fast imported matplotlib'\n"
            "try:\n"
            "    import matplotlib\n"
            "except ImportError:\n"
            "    sys.exit(0)\n"
            "s = {'t': {'rows': [{'name': 'l', 'open': True, 'delta_kept': True}], 'totals': {'task_fraction': 0.1}}}\n"
            "taps_fast.plot_gate_map(s)\n"
            "assert 'matplotlib.figure' in sys.modules\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'plot_gate_map imported pyplot'\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_plot_lambda_sweep_one_label_for_coincident_points():
    """Runs at several λ that end at the same point (same gates, same accuracy) share one label."""
    pytest.importorskip("matplotlib")
    points = [{"lam": lam, "accuracy": 0.9, "task_fraction": 0.3} for lam in (0.5, 1.0)]
    points.append({"lam": 4.0, "accuracy": 0.8, "task_fraction": 0.01})
    ax = plot_lambda_sweep(points).axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["λ=0.5, 1", "λ=4"]
