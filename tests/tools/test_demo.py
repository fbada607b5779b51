"""taps_fast.demo: the quick end-to-end run (results, files, serving check), the data split, the
plots' interface and fallback, the CLI."""
import json
import logging
import os
import py_compile
import sys
from unittest import mock

import pytest
import torch

pytest.importorskip("sklearn")

import taps_fast  # noqa: E402
from taps_fast import cli, demo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_quick_run(tmp_path, capsys, caplog):
    """The whole demo in quick mode (~15 s): every task and method, sensible accuracies, TAPS
    between head-only and full FT in parameters, the mixed batch equal to the task models."""
    out = tmp_path / "demo"
    caplog.set_level(logging.WARNING, logger="taps_fast.demo")
    assert demo.main(["--quick", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())

    assert [t.name for t in demo.TASKS] == list(res["tasks"]) and len(res["tasks"]) >= 3
    assert res["pretrain"]["accuracy"] > 0.9
    good = 0
    for name, t in res["tasks"].items():
        assert name in printed and name in (out / "results.md").read_text()
        m = t["methods"]
        assert set(m) == set(demo.METHODS)
        chance = 1.0 / t["classes"]
        for meth, r in m.items():
            assert 0.0 <= r["accuracy"] <= 1.0
            assert r["accuracy"] > chance + 0.25, (name, meth, r["accuracy"])
            assert r["base_params"] == res["model"]["params"] + (demo.WIDTHS[-1] + 1) * (t["classes"] - 5)
        ft, ho, tp = (m[k]["task_fraction"] for k in demo.METHODS)
        assert ft == 1.0 and ho == pytest.approx((demo.WIDTHS[-1] + 1) * t["classes"] / m["head only"]["base_params"])
        n_layers = len(tp_rows := m["TAPS"]["summary"]["rows"])
        # TAPS stores its norms on top of what head-only stores; at most everything plus the scores
        assert ho < tp <= ft + n_layers / m["TAPS"]["base_params"]
        assert m["TAPS"]["open_layers"] == [r["name"] for r in tp_rows if r["open"]]
        assert tp == pytest.approx(m["TAPS"]["summary"]["totals"]["task_fraction"])
        good += m["TAPS"]["accuracy"] >= 0.85 and m["full FT"]["accuracy"] >= 0.85

    assert good >= 3  # pretrained features adapted, even at a third of the epochs

    sweep = res["lambda_sweep"]
    cfg = demo.quick_config()
    assert [(p["task"], p["lam"]) for p in sweep["points"]] == [(t, lam) for t in cfg.sweep_tasks
                                                                for lam in cfg.sweep_lams]
    assert {"full FT", "head only"} <= set(sweep["baselines"])
    fr = {p["lam"]: p["task_fraction"] for p in sweep["points"]}
    assert fr[0.0] > fr[max(fr)]  # a larger λ closes layers
    assert set(res["gate_map"]) == set(res["tasks"])

    sv = res["serving"]
    assert sv["predictions_equal"] is True and sv["max_abs_logit_diff"] < 1e-4
    assert sv["one_call"]["predictions_equal"] is True and sv["one_call"]["max_abs_logit_diff"] < 1e-4
    assert set(sv["one_call"]["tasks"]) == set(sv["tasks"]) == set(res["tasks"]) | {"base"}
    n_test = sum(t["test"] for t in res["tasks"].values()) + res["pretrain"]["test"]
    assert sv["batch_rows"] == n_test == sv["logits_shape"][0] and sv["logits_shape"][1] == 10
    assert all(t["predictions_equal"] and t["padding_is_-inf"] for t in sv["tasks"].values())
    for name, size in sv["task_file_bytes"].items():
        path = sv["tasks"][name]["task_file"]
        assert os.path.dirname(path) == str(out / "tasks") and os.path.getsize(path) == size
    assert os.path.getsize(out / "base.safetensors") == sv["base_file_bytes"]
    for name, t in res["tasks"].items():  # a task file: its float32 task parameters, BN statistics, header
        n = t["methods"]["TAPS"]["task_params"]
        assert 4 * n < sv["task_file_bytes"][name] < 4 * n + 8192, (name, n, sv["task_file_bytes"][name])

    if res["plots"]:  # taps_fast.plot and matplotlib present
        assert all(os.path.getsize(p) > 0 for p in res["plots"])
        assert {os.path.basename(p) for p in res["plots"]} == {"gate_map.png", "lambda_sweep.png"}
    else:
        assert "no plots" in caplog.text

    # main exits 1 when a row of the mixed batch predicts differently from its task model
    res["serving"]["predictions_equal"] = res["serving"]["tasks"]["parity"]["predictions_equal"] = False
    with mock.patch.object(demo, "run_demo", lambda cfg, out, quiet: res):
        assert demo.main(["--quick", "--quiet", "--no-plots", "--out", str(tmp_path / "again")]) == 1
    assert "['parity']" in capsys.readouterr().err


def test_split_disjoint_and_stratified():
    s = demo.load_split(seed=0)
    tr, te = set(s.idx_train.tolist()), set(s.idx_test.tolist())
    assert not tr & te and len(tr | te) == 1797 == len(s.y_train) + len(s.y_test)
    assert 0.0 <= float(s.x_train.min()) and float(s.x_train.max()) == 1.0 and s.x_train.shape[1:] == (1, 8, 8)
    for d in range(10):  # every digit split 70/30 (to within one image)
        n_tr, n_te = int((s.y_train == d).sum()), int((s.y_test == d).sum())
        assert abs(n_te - 0.3 * (n_tr + n_te)) <= 1, (d, n_tr, n_te)
    assert torch.equal(demo.load_split(seed=0).idx_test, s.idx_test)
    assert not torch.equal(demo.load_split(seed=1).idx_test, s.idx_test)

    for task in (demo.PRETRAIN,) + demo.TASKS:  # train only from the train split, test from the test split
        d = demo.task_data(s, task)
        mask = torch.isin(s.y_train, torch.tensor(task.digits))
        assert torch.equal(d.x_train, task.transform(s.x_train[mask]))
        assert torch.equal(d.x_test, task.transform(s.x_test[torch.isin(s.y_test, torch.tensor(task.digits))]))
        assert set(d.y_train.tolist()) == set(d.y_test.tolist()) == set(range(task.num_classes))
    inv = demo.task_data(s, demo.TASKS_BY_NAME["inverted"])
    assert torch.equal(inv.x_test, 1 - s.x_test)


def test_model_head_stays_plain():
    model = taps_fast.convert(demo.build_model(5), head=demo.HEAD)
    assert [n for n, _ in taps_fast.taps_layers(model)] == ["conv1", "conv2", "conv3", "conv4"]
    assert type(model.get_submodule(demo.HEAD)) is torch.nn.Linear
    assert 20_000 < demo.count_params(demo.build_model(5)) < 100_000


def test_missing_sklearn_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        demo.load_split()


def _plot_input():
    model = taps_fast.convert(demo.build_model(2), head=demo.HEAD)
    s = taps_fast.summary(model).to_dict()
    return {"gate_map": {"a": s, "b": s},
            "lambda_sweep": {"points": [{"task": "a", "lam": 1.0, "accuracy": 0.9, "task_fraction": 0.5}],
                             "baselines": {"full FT": {"accuracy": 0.95, "task_fraction": 1.0}}}}


def test_plots_interface(monkeypatch, tmp_path):
    """make_plots passes the results' data to taps_fast.plot's two functions (recorded here)."""
    from matplotlib.figure import Figure

    calls = {}

    def fake(name):
        def f(data, path=None, **kw):
            calls[name] = (data, path, kw)
            return Figure()
        return f

    monkeypatch.setattr(taps_fast, "plot_gate_map", fake("gate_map"), raising=False)
    monkeypatch.setattr(taps_fast, "plot_lambda_sweep", fake("sweep"), raising=False)
    res = _plot_input()
    paths = demo.make_plots(res, str(tmp_path))
    assert paths == [str(tmp_path / "gate_map.png"), str(tmp_path / "lambda_sweep.png")]
    assert calls["gate_map"][:2] == (res["gate_map"], paths[0])
    data, path, kw = calls["sweep"]
    assert data == res["lambda_sweep"]["points"] and path == paths[1]
    assert kw["baselines"] == res["lambda_sweep"]["baselines"]


def test_plots_missing_module_warns(monkeypatch, tmp_path, caplog):
    monkeypatch.delattr(taps_fast, "plot_gate_map", raising=False)
    monkeypatch.setitem(sys.modules, "taps_fast.plot", None)
    monkeypatch.setitem(sys.modules, "taps_fast.plot_gate_map", None)
    with caplog.at_level(logging.WARNING, logger="taps_fast.demo"):
        assert demo.make_plots(_plot_input(), str(tmp_path)) == []
    assert len([r for r in caplog.records if "no plots" in r.getMessage()]) == 1
    assert not os.listdir(tmp_path)


def test_cli_demo_help(capsys):
    assert "demo" in cli.usage()
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(o in out for o in ("--quick", "--epochs", "--out", "--seed", "--no-plots", "--quiet"))
    with pytest.raises(SystemExit) as e:
        demo.main(["--epochs", "0"])
    assert e.value.code == 2


def test_examples_compile():
    for name in os.listdir(os.path.join(ROOT, "examples")):
        if name.endswith(".py"):
            py_compile.compile(os.path.join(ROOT, "examples", name), doraise=True)
