"""Static check of the extension's CUDA kernels (no GPU needed): every _taps_small* kernel, on
every architecture it was built for, is free of stack/local memory (no register spills) and its
SASS has 128-bit global loads (the unaligned *_scalar_kernel fallbacks are exempt from the
latter by design). Skipped when the extension was built without its CUDA part or when cuobjdump
is not available."""
import pytest

from taps_fast.checks import ext_sass as ext_check


@pytest.fixture(scope="module")
def rows():
    try:
        from taps_fast import _C  # type: ignore[attr-defined]
    except ImportError as e:
        pytest.skip(f"taps_fast._C is not built ({e})")
    if not _C.build_info()["cuda"]:
        pytest.skip("taps_fast._C was built without its CUDA part")
    if ext_check.find_cuobjdump() is None:
        pytest.skip("cuobjdump not found (triton/backends/nvidia/bin, PATH, $CUDA_HOME/bin)")
    return ext_check.check(_C.__file__)


def test_both_ops_have_kernels_for_every_arch(rows):
    from taps_fast import _ext

    archs = {f"sm_{a}{b}" for a, b, _ in _ext.cuda_archs()}
    for kernel in ("_taps_small_linear_fwd_kernel", "_taps_small_mt_linear_fwd_kernel"):
        built = {r["arch"] for r in rows if kernel + "<" in r["name"]}
        assert built, f"{kernel} not found in the extension"
        # "8.0;9.0+PTX" -> sm_80, sm_90 (the PTX entry adds no SASS of its own)
        want = archs
        assert want <= built, f"{kernel}: SASS for {sorted(built)}, built for {sorted(want)}"


def test_no_spills(rows):
    bad = [f"{r['name']} {r['arch']}: STACK={r['stack']} LOCAL={r['local']}" for r in rows
           if r["stack"] or r["local"]]
    assert not bad, "kernels with local memory (spills):\n" + "\n".join(bad)


def test_128bit_loads(rows):
    bad = [f"{r['name']} {r['arch']}" for r in rows if r["needs_ldg128"] and not r["ldg128"]]
    assert not bad, "kernels without 128-bit global loads (LDG.E.128):\n" + "\n".join(bad)


def test_main_exit_status(rows, capsys, monkeypatch):
    from taps_fast import _C  # type: ignore[attr-defined]

    monkeypatch.setattr(ext_check, "check", lambda so=None: rows)  # the table, without a second cuobjdump
    assert ext_check.main([_C.__file__]) == 0
    assert "_taps_small_linear_fwd_kernel" in capsys.readouterr().out


def test_main_fails_on_a_spill_or_a_missing_vector_load(rows, capsys, monkeypatch):
    """The check can fail: a row with local memory, or a fast path without 128-bit loads, is exit 1."""
    for bad in ({"stack": 0, "local": 16}, {"ldg128": False}):
        broken = [dict(rows[0], **bad, needs_ldg128=True)] + rows[1:]
        monkeypatch.setattr(ext_check, "check", lambda so=None, b=broken: b)
        assert ext_check.main(["x.so"]) == 1
