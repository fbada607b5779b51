"""The static GPU check (no GPU needed: every Triton kernel config compiled for sm_90, no spills,
HGMMA on every matmul) and the package without triton installed."""
import subprocess
import sys

def test_static_gpu_check_passes():
    """python -m taps_fast.info --kernels: every kernel at every autotune config, compiled for
    sm_90, spill-free and (matmuls) using wgmma. Runs without a GPU."""

    # sm_90 only here, to keep `make test` inside its budget on 2 cores (384 compiles: every
    # config in the generic and the run-time specialisations); `make check-kernels` runs sm_80
    # too, and its full tables are committed under benchmarks/results/.
    r = subprocess.run([sys.executable, "-m", "taps_fast.info", "--kernels", "--archs", "90"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("_taps_")]
    assert len(rows) >= 350 and all(ln.rstrip().endswith("ok") for ln in rows)
    assert any("sm_90" in ln and " yes " in ln for ln in rows)


def test_static_check_flags_a_spill():
    """The check can fail: a row with local memory or a sm_90 matmul without HGMMA is a problem."""
    from taps_fast.checks import triton_sass as kernel_check

    row = dict(kernel="k", dtype="fp16", arch="sm_90", matmul=True, config="c", regs=255, smem=0,
               local=24, hgmma=False, error=None)
    p = kernel_check.problems(row)
    assert any("spills" in x for x in p) and any("HGMMA" in x for x in p)
    assert kernel_check.problems(dict(row, local=0, hgmma=True)) == []


def test_imports_and_falls_back_without_triton():
    """Without triton the package imports, the reference path serves, and the triton backend says
    why it cannot."""

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, taps_fast\n"
            "from taps_fast import dispatch\n"
            "r = dispatch.reasons('linear_fwd', device=torch.device('cpu'), dtype=torch.float32)\n"
            "print(r['triton']); m = taps_fast.TAPSLinear(3, 2); m(torch.randn(1, 3)).sum().backward()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "triton is not installed" in r.stdout
