"""Task files as a careless or hostile sender makes them: wrong dtypes under a valid checksum,
changed or malformed metadata, NaN/inf values, huge claimed tensors, and a fuzzer (truncation,
byte flips, foreign bases, pickles). Both loaders, ``load_task`` and ``MultiTaskModel.add_task``,
use one checker and must refuse the same files with a TaskFileError, leaving the model unchanged;
a file that still loads after a byte flip must load exactly the saved task.

``TAPS_FUZZ_EXAMPLES`` raises the number of fuzzed files (default: a few seconds' worth).
"""
import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taps_fast import MultiTaskModel, TaskFileError, convert, load_task, save_task, taps_layers
from taps_fast.checkpoint import FORMAT_VERSION, TaskFileNotFoundError, _checksum

EXAMPLES = int(os.environ.get("TAPS_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def make_plain(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=5)


def make_task(seed=1):
    """A converted test_resnet with some gates closed and every task tensor changed."""
    m = convert(copy.deepcopy(_PLAIN))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, layer) in enumerate(taps_layers(m)):
            layer.score.fill_(0.02 if i % 3 == 0 else 0.3)
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * 0.05)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.add_(0.1)
                mod.running_var.add_(0.3)
        m.fc.weight.mul_(2)
    return m.eval()


_PLAIN = make_plain()
_TASK = make_task()


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "task.safetensors"
    save_task(_TASK, path)
    return path


def fresh_converted():
    return convert(copy.deepcopy(_PLAIN)).eval()


def fresh_mt():
    return MultiTaskModel(copy.deepcopy(_PLAIN)).eval()


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(before, after):
    return before.keys() == after.keys() and all(
        before[k].shape == after[k].shape and torch.equal(before[k], after[k]) for k in before)


def refused_by_both(path, match):
    """Both loaders refuse ``path`` with a TaskFileError matching ``match``; neither changes."""
    for model, load in ((fresh_converted(), load_task), (fresh_mt(), lambda m, p: m.add_task("t", p))):
        before = _state(model)
        with pytest.raises(TaskFileError, match=match):
            load(model, path)
        assert _same(before, model.state_dict()), f"{type(model).__name__} changed by a refused file"


def read(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def rewrite(src, dst, mutate, checksum=True):
    """A copy of a task file with ``mutate(tensors, meta)`` applied and, unless told otherwise, a
    freshly computed (valid) checksum: what only the content checks can catch."""
    from safetensors.torch import save_file
    tensors, meta = read(src)
    mutate(tensors, meta)
    if checksum:
        meta["checksum"] = _checksum(tensors.items(), meta if meta.get("format_version") != "1" else None)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def outputs_equal(model, x):
    with torch.no_grad():
        return torch.equal(model(x), _TASK(x))


# ----------------------------------------------------------------------------- dtypes
def first(tensors, prefix, suffix=""):
    return next(k for k in sorted(tensors) if k.startswith(prefix) and k.endswith(suffix))


@pytest.mark.parametrize("what", ["delta/", "score/", "state/bn1.weight", "state/bn1.running_var",
                                  "state/bn1.num_batches_tracked", "state/fc.weight"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32, torch.bool], ids=str)
def test_wrong_dtypes_are_refused_naming_the_key(task_file, tmp_path, what, dtype):
    """A tensor stored in another dtype than the model holds is refused (not cast), naming it."""
    key = None

    def mutate(t, m):
        nonlocal key
        key = first(t, what)
        if t[key].dtype == dtype:
            t[key] = t[key].to(torch.float32 if dtype != torch.float32 else torch.float64)
        else:
            t[key] = t[key].to(dtype)

    bad = rewrite(task_file, tmp_path / "dtype.safetensors", mutate)
    refused_by_both(bad, rf"{key}( is|:).*(torch\.\w+)")


# ----------------------------------------------------------------------------- metadata
def test_metadata_is_covered_by_the_checksum(task_file, tmp_path):
    """A closed layer's threshold 0.1 -> 0.9 (one changed metadata field, checksum kept) is
    detected as corruption; so is any other changed field."""
    def flip_threshold(t, m):
        th = json.loads(m["thresholds"])
        th["conv1.0"] = 0.9
        m["thresholds"] = json.dumps(th)

    refused_by_both(rewrite(task_file, tmp_path / "a.safetensors", flip_threshold, checksum=False), "corrupt")
    refused_by_both(rewrite(task_file, tmp_path / "b.safetensors",
                            lambda t, m: m.__setitem__("taps_fast_version", "9.9"), checksum=False), "corrupt")
    assert read(task_file)[1]["format_version"] == FORMAT_VERSION == "2"


@pytest.mark.parametrize("thresholds,msg", [
    ('{"conv1.0": NaN}', "finite real"), ('{"conv1.0": Infinity}', "finite real"), ('{"conv1.0": -Infinity}', "finite real"),
    ('{"conv1.0": true}', "finite real"), ('{"conv1.0": "0.1"}', "finite real"), ('{"conv1.0": null}', "finite real"),
    ('{"conv1.0": [0.1]}', "finite real"), ('{"conv1.0": 1e999}', "finite real"),
    ("[0.1]", "JSON object"), ('"0.1"', "JSON object"), ("0.1", "JSON object"), ("null", "JSON object"),
    ("{", "not valid JSON"), ("[" * 100000, "not valid JSON"), ('{"conv1.0": 0.1, "x": 1}', "does not have"),
    ("{}", "no threshold for layers"),
])
def test_malformed_thresholds_are_one_error_type(task_file, tmp_path, thresholds, msg):
    """Every malformed thresholds field (even one that makes json raise RecursionError or gives
    another type) is a TaskFileError naming the problem. A field that only changes conv1 keeps
    the other layers' values."""
    def mutate(t, m):
        if thresholds.startswith('{"conv1.0"'):
            th = json.loads(m["thresholds"])
            rest = json.dumps({k: v for k, v in th.items() if k != "conv1.0"})[1:]
            m["thresholds"] = thresholds[:-1] + ", " + rest if rest != "}" else thresholds
        else:
            m["thresholds"] = thresholds

    refused_by_both(rewrite(task_file, tmp_path / "t.safetensors", mutate), msg)


@pytest.mark.parametrize("mutate,msg", [
    (lambda t, m: m.pop("base_fingerprint"), "missing metadata field 'base_fingerprint'"),
    (lambda t, m: m.__setitem__("extra", "1"), "unknown metadata field 'extra'"),
    (lambda t, m: m.__setitem__("format_version", "3"), "format version '3'"),
    (lambda t, m: m.__setitem__("base_fingerprint", "zz"), "not a SHA-256"),
])
def test_metadata_fields_validated(task_file, tmp_path, mutate, msg):
    refused_by_both(rewrite(task_file, tmp_path / "m.safetensors", mutate), msg)


@pytest.mark.parametrize("mutate,msg", [
    (lambda t, m: t[first(t, "delta/")].view(-1).__setitem__(3, float("nan")), "NaN/inf"),
    (lambda t, m: t[first(t, "delta/")].view(-1).__setitem__(0, float("inf")), "NaN/inf"),
    (lambda t, m: t["state/bn1.weight"].__setitem__(0, float("-inf")), "state/bn1.weight holds 1 NaN/inf"),
    (lambda t, m: t["state/bn1.running_var"].__setitem__(1, -0.5), "negative variances"),
    (lambda t, m: t["score/conv1.0"].fill_(float("nan")), "score/conv1.0 is NaN"),
    (lambda t, m: t.__setitem__("junk/x", torch.zeros(1)), r"unexpected keys \['junk/x'\]"),
])
def test_bad_values_and_unknown_keys_refused(task_file, tmp_path, mutate, msg):
    refused_by_both(rewrite(task_file, tmp_path / "v.safetensors", mutate), msg)


def test_infinite_scores_are_gates_not_errors(task_file, tmp_path):
    """s = +inf opens a gate and -inf closes it (TAPS' gate at its edges): such a file loads."""
    def mutate(t, m):
        t["score/conv1.0"].fill_(float("-inf"))  # closed (it is closed already: no delta stored)
        t["score/" + first(t, "delta/")[6:]].fill_(float("inf"))  # an open layer

    path = rewrite(task_file, tmp_path / "inf.safetensors", mutate)
    model = load_task(fresh_converted(), path)
    layers = dict(taps_layers(model))
    assert not layers["conv1.0"].is_open and torch.isinf(layers["conv1.0"].score)
    fresh_mt().add_task("t", path)


def test_version_1_files_still_load(task_file, tmp_path):
    """A file of format version 1 (checksum over the tensors only) loads, validated alike."""
    path = rewrite(task_file, tmp_path / "v1.safetensors", lambda t, m: m.__setitem__("format_version", "1"))
    x = torch.randn(2, 3, 32, 32)
    assert outputs_equal(load_task(fresh_converted(), path), x)
    bad = rewrite(path, tmp_path / "v1nan.safetensors",
                  lambda t, m: m.__setitem__("thresholds", m["thresholds"].replace("0.1", "NaN", 1)))
    refused_by_both(bad, "finite real")


# ----------------------------------------------------------------------------- paths
def test_paths(task_file, tmp_path):
    with pytest.raises(TaskFileError, match="is a directory"):
        load_task(fresh_converted(), tmp_path)
    with pytest.raises(TaskFileNotFoundError, match="does not exist") as e:
        fresh_mt().add_task("t", tmp_path / "nope.safetensors")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, TaskFileError)
    x = torch.randn(2, 3, 32, 32)
    assert outputs_equal(load_task(fresh_converted(), os.fsencode(str(task_file))), x)
    mt = fresh_mt()
    mt.add_task("t", os.fsencode(str(task_file)))
    with torch.no_grad():
        assert torch.equal(mt(x, ["t", "t"]), _TASK(x))
    with pytest.raises(TypeError, match="task file path or a converted nn.Module"):
        mt.add_task("u", 3)


# ----------------------------------------------------------------------------- memory
def test_a_huge_claimed_tensor_is_refused_before_it_is_read(tmp_path):
    """A valid safetensors header claiming a 4 GiB delta (a sparse file: free on disk) is refused
    from the header alone: the peak memory of the load stays near the task's real size."""
    src = tmp_path / "src.safetensors"
    save_task(_TASK, src)
    tensors, meta = read(src)
    huge = first(tensors, "delta/")
    header, offset = {"__metadata__": meta}, 0
    names = {torch.float32: "F32", torch.int64: "I64"}
    for k, t in sorted(tensors.items()):
        shape = [1 << 15, 1 << 15] if k == huge else list(t.shape)
        n = (1 << 32) if k == huge else t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:  # a valid safetensors file whose data are a hole: free on disk
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    script = textwrap.dedent(f"""
        import copy, resource, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch, timm
        from taps_fast import TaskFileError, convert, load_task, MultiTaskModel
        torch.manual_seed(0)
        plain = timm.create_model("test_resnet", pretrained=False, num_classes=5)
        models = [convert(copy.deepcopy(plain)), MultiTaskModel(copy.deepcopy(plain))]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for m in models:
            try:
                load_task(m, {str(path)!r}) if not isinstance(m, MultiTaskModel) else m.add_task("t", {str(path)!r})
                print("LOADED")
            except TaskFileError as e:
                print("REFUSED", str(e)[-300:])
        print("PEAK_GROWTH_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("REFUSED") and "has shape (32768, 32768)" in line for line in lines) == 2, out.stdout
    growth = float(lines[-1].split()[-1])
    assert growth < 64, f"loading a refused file grew the peak memory by {growth:.0f} MB"


# ----------------------------------------------------------------------------- the fuzzer
@FUZZ
@given(data=st.data())
def test_fuzzed_files_load_exactly_or_are_refused(task_file, tmp_path_factory, data):
    """Truncation at any offset, byte flips anywhere (header, metadata, tensor data), a foreign
    base, a pickle: each file is refused with a TaskFileError (model unchanged) or, when the
    change was harmless (e.g. JSON whitespace), loads exactly the saved task."""
    raw = task_file.read_bytes()
    kind = data.draw(st.sampled_from(["truncate", "flip", "flip", "flip_header", "foreign", "pickle"]), label="kind")
    if kind == "truncate":
        cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
        blob = raw[:cut]
    elif kind in ("flip", "flip_header"):
        hlen = 8 + int.from_bytes(raw[:8], "little")
        hi = hlen - 1 if kind == "flip_header" else len(raw) - 1
        blob = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 3), label="flips")):
            at = data.draw(st.integers(0, hi), label="at")
            blob[at] ^= data.draw(st.integers(1, 255), label="xor")
        blob = bytes(blob)
    elif kind == "foreign":
        other = convert(make_plain(seed=data.draw(st.integers(1, 3), label="seed")))
        p = tmp_path_factory.mktemp("f") / "foreign.safetensors"
        save_task(other, p)
        blob = p.read_bytes()
    else:
        blob = pickle.dumps({"score/conv1.0": torch.zeros(())}) if data.draw(st.booleans()) else b"PK\x03\x04" + raw[4:]
    path = tmp_path_factory.mktemp("fz") / "fuzzed.safetensors"
    path.write_bytes(blob)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for model, load in ((fresh_converted(), load_task), (fresh_mt(), lambda m, p: m.add_task("t", p))):
        before = _state(model)
        try:
            load(model, path)
        except TaskFileError:
            assert _same(before, model.state_dict()), f"{kind}: a refused file changed the model"
            continue
        with torch.no_grad():
            got = model(x) if not isinstance(model, MultiTaskModel) else model(x, ["t", "t"])
            assert torch.equal(got, _TASK(x)), f"{kind}: a changed file loaded another task"
