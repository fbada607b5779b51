"""The benchmark and info entry points: a tiny end-to-end run, the timing helper, the table."""
import json

import pytest
import torch

from taps_fast import bench, cli, info


def test_time_interleaved_round_robin_and_stats():
    calls = []
    ticks = []
    clock = iter(range(0, 1000, 1)).__next__  # every clock read advances 1 s
    st = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                repeats=3, warmup=1, tick=lambda: ticks.append(1), clock=clock)
    assert calls == ["a", "b"] * 4  # warmup then repeats, one of each in turn
    assert len(ticks) == 8
    assert st["a"].times_ms == [1000.0] * 3 and st["b"].median == 1000.0
    s = bench.Stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s.median, s.q1, s.q3, s.iqr, s.min, s.max) == (3.0, 2.0, 4.0, 2.0, 1.0, 100.0)
    assert bench.Stats([5.0]).iqr == 0.0
    with pytest.raises(ValueError):
        bench.time_fn(lambda: None, repeats=0)


def test_rows_ratios_and_table():
    rows = [bench.make_row("models", "m", "train", p, 4, 32, bench.Stats([t]))
            for p, t in (("plain", 10.0), ("taps", 15.0))]
    bench.add_ratios(rows)
    assert [r.ratio for r in rows] == [1.0, 1.5]
    assert rows[0].img_per_s == pytest.approx(400.0)
    table = bench.format_table(rows)
    assert "1.50x" in table and "taps" in table and "median ms" in table


def test_bench_main_tiny(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = bench.main(["--models", "resnet18", "--batch", "2", "--resolution", "64", "--repeats", "1",
                     "--warmup", "0", "--open-fraction", "0.5", "--out", str(out), "--quiet"])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["environment"]["torch"] and rec["arguments"]["batch"] == 2
    got = {(r["mode"], r["provider"]): r for r in rec["rows"]}
    assert set(got) == {("train", "plain"), ("train", "authors"), ("train", "taps"), ("infer", "plain"),
                        ("infer", "authors"), ("infer", "taps"), ("infer", "taps-merged")}
    for r in rec["rows"]:
        assert r["model"] == "resnet18" and r["median_ms"] > 0 and r["ratio"] > 0 and r["img_per_s"] > 0
    assert got[("train", "plain")]["ratio"] == 1.0
    extra = got[("infer", "taps")]["extra"]
    assert extra["open_layers"] == round(0.5 * extra["gated_layers"])
    printed = capsys.readouterr().out
    assert "taps-merged" in printed and "authors" in printed and "backend=" in printed


def test_info_main(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "linear_fwd" in out and "compiled extension" in out


def test_cli_forwards(capsys):
    assert cli.main(["info"]) == 0
    assert "reference" in capsys.readouterr().out
    assert cli.main([]) == 0
    assert cli.main(["nope"]) == 2


def test_kernels_suite_quick(tmp_path):
    """taps-fast bench --suite kernels: every group and provider, ratios to the floor, ceilings."""
    import json

    from taps_fast import bench

    out = tmp_path / "k.json"
    assert bench.main(["--suite", "kernels", "--quick", "--quiet", "--repeats", "1", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    rows = rec["rows"]
    assert {r["group"] for r in rows} == {"vit-b", "small-M", "resnet50-conv"}
    assert {r["provider"] for r in rows} == {"floor", "authors", "taps"}
    assert all(r["ratio_to_floor"] > 0 and r["GBps"] > 0 for r in rows)
    assert all(r["ratio_to_floor"] == 1.0 for r in rows if r["provider"] == "floor")
    assert rec["ceilings"]["bandwidth_GBps"] > 0 and rec["ceilings"]["matmul_TFLOPs"] > 0


def test_multitask_suite_tiny(tmp_path, capsys):
    """taps-fast bench --suite multitask end to end on a tiny model: every provider agrees with
    the merged copies (checked inside the suite), ratios, weight bytes and a peak-RSS probe."""
    out = tmp_path / "mt.json"
    from taps_fast.bench import multitask as bm

    rc = cli.main(["bench", "--suite", "multitask", "--models", "test_resnet", "--resolution", "32",
                   "--batch", "6", "--tasks", "3", "--repeats", "1", "--warmup", "0", "--no-rss",
                   "--out", str(out)])
    assert rc == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"peft", "merged", "base", "taps"}
    assert rows["merged"]["time_vs_merged"] == 1.0
    # the weights held: the merged copies hold T models; taps the base plus the open deltas
    assert rows["taps"]["weight_bytes"] < rows["merged"]["weight_bytes"]
    assert "taps" in capsys.readouterr().out
    # the peak-RSS probe: a fresh process building one provider (one probe keeps the test short)
    paths = bm.write_tasks("test_resnet", 2, 0.25, str(tmp_path))
    assert bm.rss_probe("taps", "test_resnet", paths, 2, "cpu", "float32") > 50 * 2**20


def test_small_suite_tiny(tmp_path, capsys):
    """taps-fast bench --suite small end to end on tiny layers: the providers agree with float64
    (checked inside the suite), the copy floor is measured, ratios are to the kernel."""
    from taps_fast import _ext

    out = tmp_path / "small.json"
    rc = cli.main(["bench", "--suite", "small", "--m", "1,3", "--nk", "40", "--t", "1,2", "--repeats", "1",
                   "--cache-mib", "1", "--quiet", "--out", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    provs = {r["provider"] for r in rec["rows"]}
    want = {"copy", "taps", "authors", "torch-best", "mm-W"}
    if _ext.load()[0] is not None:
        want |= {"kernel", "kernel-1task"}
    assert provs == want
    for r in rec["rows"]:
        assert r["median_ms"] > 0 and r["x_floor"] > 0
    assert "x floor" in capsys.readouterr().out


def test_small_suite_refuses_a_wrong_provider(monkeypatch):
    from taps_fast.bench import small as bench_small

    lay = bench_small.Layers(2, 16, 16, 2, torch.float32, torch.device("cpu"), 1 << 16)
    provs = bench_small.providers(lay, torch.device("cpu"))
    provs["authors"] = lambda i: torch.zeros(2, 16)
    with pytest.raises(RuntimeError, match="provider 'authors' disagrees"):
        bench_small.check_agree(lay, provs)


def test_small_suite_providers_never_read_the_ids_on_the_host(monkeypatch):
    """On CUDA the small suite's rounds are captured in a CUDA graph, where a host read of the
    task ids (the range check of taps_mt_linear) fails the capture: the providers that go
    through taps_mt_linear pass check_ids=False, as MultiTaskModel does."""
    from taps_fast.bench import small as bench_small

    lay = bench_small.Layers(3, 16, 16, 2, torch.float32, torch.device("cpu"), 1 << 16)
    provs = bench_small.providers(lay, torch.device("cpu"))

    def host_read(*a, **k):
        raise AssertionError("the task ids were range-checked on the host")

    monkeypatch.setattr("taps_fast.ops._mt_common.check_task_ids", host_read)
    for name in ("taps", "triton"):
        if name in provs:
            provs[name](0)
    bench_small.check_agree(lay, provs)
