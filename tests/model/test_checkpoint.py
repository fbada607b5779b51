"""save_task / load_task: round trip, size bound, and every refusal."""
import json
import os
import pickle
import re

import pytest
import timm
import torch
import torch.nn as nn

from taps_fast import (TaskFileError, convert, freeze_gates, load_task, merge, save_task, summary,
                       taps_layers)


def make_base(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, num_classes=7)


def trained(seed=0):
    """A converted resnet18 with a third of its gates closed and every task tensor changed."""
    m = convert(make_base(seed))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, (_, layer) in enumerate(taps_layers(m)):
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * 0.01)
            layer.score.fill_(0.02 if i % 3 == 0 else 0.3)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.add_(0.1)
                mod.running_mean.add_(0.2)
        m.fc.weight.mul_(2)
    return m


@pytest.fixture
def saved(tmp_path):
    m = trained()
    path = tmp_path / "task.safetensors"
    size = save_task(m, path)
    return m, path, size


def test_round_trip_and_size_bound(saved):
    m, path, size = saved
    fresh = convert(make_base())
    load_task(fresh, path)
    x = torch.randn(2, 3, 64, 64)
    m.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
        assert torch.equal(merge(fresh)(x), m(x))
    # Only what the task adds: scores, open deltas, norms (params + buffers), head.
    layers = list(taps_layers(m))
    open_delta = sum(l.delta.numel() for _, l in layers if l.is_open)
    closed_delta = sum(l.delta.numel() for _, l in layers if not l.is_open)
    norm_bytes = sum(b.numel() * b.element_size() for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)
                     for b in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)))
    payload = 4 * (open_delta + len(layers)) + norm_bytes + 4 * (m.fc.weight.numel() + m.fc.bias.numel())
    assert payload <= size <= payload + 64 * 1024, (payload, size)
    assert size < payload + 4 * closed_delta  # no closed deltas
    base_bytes = sum(l.weight.numel() * 4 for _, l in layers)
    assert size < base_bytes  # no base weights


def test_load_zeroes_closed_deltas_and_restores_dropped_ones(saved):
    _, path, _ = saved
    other = trained(seed=0)
    with torch.no_grad():
        for _, l in taps_layers(other):
            l.score.fill_(-1.0)  # all closed
    freeze_gates(other)          # drops every delta
    load_task(other, path)
    for _, l in taps_layers(other):
        assert (l.delta is not None) == l.is_open
    fresh = trained(seed=0)
    with torch.no_grad():
        for _, l in taps_layers(fresh):
            l.delta.fill_(1.0)
    load_task(fresh, path)
    assert all(torch.count_nonzero(l.delta) == 0 for _, l in taps_layers(fresh) if not l.is_open)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m, before):
    after = m.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_refuses_another_base(saved):
    _, path, _ = saved
    other = convert(make_base(seed=1))
    before = _state(other)
    with pytest.raises(TaskFileError, match="different base model"):
        load_task(other, path)
    assert _unchanged(other, before)


def test_refuses_differently_converted_model(saved):
    _, path, _ = saved
    other = convert(make_base(), include="layer4.*")
    with pytest.raises(TaskFileError, match=r"gated layers differ \(missing scores for layers \[\]; extra scores"):
        load_task(other, path)


def test_refuses_truncated_file(saved, tmp_path):
    _, path, _ = saved
    data = path.read_bytes()
    fresh = convert(make_base())
    before = _state(fresh)
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(TaskFileError, match="not a valid safetensors file"):
            load_task(fresh, bad)
    assert _unchanged(fresh, before)


def test_refuses_corrupted_bytes(saved, tmp_path):
    _, path, _ = saved
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: safetensors' header checks cannot see it
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(TaskFileError, match="corrupt"):
        load_task(convert(make_base()), bad)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/taps_fast_pickle_ran",))


def test_refuses_pickle_payload_without_running_it(tmp_path):
    marker = "/tmp/taps_fast_pickle_ran"
    if os.path.exists(marker):
        os.remove(marker)
    fresh = convert(make_base())
    for name, writer in (("raw.pt", lambda f: pickle.dump(_Boom(), f)),
                         ("zip.pt", lambda f: torch.save({"x": _Boom()}, f))):
        bad = tmp_path / name
        with open(bad, "wb") as f:
            writer(f)
        with pytest.raises(TaskFileError, match="never unpickles"):
            load_task(fresh, bad)
    assert not os.path.exists(marker)


def _rewrite(path, dst, mutate):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from taps_fast.checkpoint import _checksum
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    mutate(tensors, meta)
    meta["checksum"] = _checksum(tensors.items(), meta)
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize("mutation,msg", [
    (lambda t, m: t.pop("state/fc.weight"), "missing key state/fc.weight"),
    (lambda t, m: t.pop(next(k for k in t if k.startswith("delta/"))), "missing key delta/"),
    (lambda t, m: t.pop("score/conv1"), r"missing scores for layers \['conv1'\]"),
    (lambda t, m: t.__setitem__("state/bogus.weight", torch.zeros(1)), "extra key state/bogus.weight"),
    (lambda t, m: t.__setitem__("delta/conv1", torch.zeros(64, 3, 7, 7)), "extra key delta/conv1"),
    (lambda t, m: t.__setitem__("junk", torch.zeros(1)), "unexpected keys"),
    (lambda t, m: t.__setitem__("state/fc.bias", torch.zeros(3)), "state/fc.bias has shape"),
    (lambda t, m: m.__setitem__("format", "other"), "not a taps_fast task"),
])
def test_refuses_missing_extra_and_misshapen_keys(saved, tmp_path, mutation, msg):
    _, path, _ = saved
    bad = tmp_path / "bad.safetensors"
    _rewrite(path, bad, mutation)
    fresh = convert(make_base())
    before = _state(fresh)
    with pytest.raises(TaskFileError, match=msg):
        load_task(fresh, bad)
    assert _unchanged(fresh, before)


def test_metadata(saved):
    from safetensors import safe_open
    m, path, _ = saved
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "taps_fast.task" and meta["taps_fast_version"]
    assert len(meta["base_fingerprint"]) == 64
    assert json.loads(meta["thresholds"])["conv1"] == 0.1
    assert not any(k.endswith(".weight") and k[6:-7] in dict(taps_layers(m)) for k in keys)
    assert summary(m).totals["open_layers"] == sum(k.startswith("delta/") for k in keys)


def test_no_unpickling_anywhere_in_the_package():
    import taps_fast
    root = os.path.dirname(taps_fast.__file__)
    for dirpath, _, files in os.walk(root):
        for fn in files:
            if fn.endswith(".py"):
                src = open(os.path.join(dirpath, fn)).read()
                assert not re.search(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib)\b", src, re.M), fn
                assert not re.search(r"\bpickle\.loads?\(|\.load_state_dict_from_url\(", src), fn
                for line in src.splitlines():
                    if "torch.load(" in line:
                        assert "weights_only=True" in line, (fn, line)


# ----------------------------------------------------------------------------- labels
LABELS = [f"class {i}" for i in range(7)]  # make_base has 7 classes


def _rewrite_meta(path, dst, **fields):
    """``path`` with metadata ``fields`` set (None: removed), checksum NOT recomputed."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for k, v in fields.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_file(tensors, str(dst), metadata=meta)


def test_labels_round_trip(tmp_path):
    from taps_fast.checkpoint import TaskFile
    m = trained()
    path = tmp_path / "lab.safetensors"
    save_task(m, path, labels=LABELS)
    tf = TaskFile(path)
    assert tf.labels == LABELS and json.loads(tf.meta["labels"]) == LABELS
    fresh = convert(make_base())
    load_task(fresh, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), m.eval()(x))
    assert TaskFile(tmp_path / "lab.safetensors").labels == LABELS
    plain = tmp_path / "plain.safetensors"
    save_task(m, plain)
    assert TaskFile(plain).labels is None


def test_labels_must_number_the_head_outputs(tmp_path):
    m = trained()
    with pytest.raises(ValueError, match="6 labels for the head 'fc', which has 7 outputs"):
        save_task(m, tmp_path / "x.safetensors", labels=LABELS[:6])
    assert not (tmp_path / "x.safetensors").exists()
    bad = tmp_path / "bad.safetensors"
    _rewrite(_saved(m, tmp_path), bad,
             lambda t, meta: meta.__setitem__("labels", json.dumps(LABELS + ["extra"])))
    fresh = convert(make_base())
    before = _state(fresh)
    with pytest.raises(TaskFileError, match="8 labels for the head 'fc', which has 7 outputs"):
        load_task(fresh, bad)
    assert _unchanged(fresh, before)


def _saved(m, tmp_path):
    path = tmp_path / "src.safetensors"
    save_task(m, path)
    return path


@pytest.mark.parametrize("value,msg", [
    ('{"a": "b"}', "must be a JSON list of strings, got a dict"),
    ('"cat"', "must be a JSON list of strings, got a str"),
    ('["a", 1, "c", "d", "e", "f", "g"]', "item 1 is a int"),
    ("[not json", "'labels' metadata is not valid JSON"),
])
def test_labels_that_are_not_a_list_of_str_are_refused(tmp_path, value, msg):
    bad = tmp_path / "bad.safetensors"
    _rewrite(_saved(trained(), tmp_path), bad, lambda t, meta: meta.__setitem__("labels", value))
    with pytest.raises(TaskFileError, match=re.escape(msg)):
        load_task(convert(make_base()), bad)


@pytest.mark.parametrize("labels,kind", [("abc", "str"), ([1, 2], "int"), ({"a": 1}, "dict")])
def test_save_task_refuses_labels_that_are_not_a_list_of_str(tmp_path, labels, kind):
    with pytest.raises(TypeError, match=f"labels must be a list of strings.*{kind}"):
        save_task(trained(), tmp_path / "x.safetensors", labels=labels)


def test_checksum_covers_labels(tmp_path):
    path = tmp_path / "lab.safetensors"
    save_task(trained(), path, labels=LABELS)
    for value in (json.dumps(LABELS[::-1]), None):  # changed, or removed
        bad = tmp_path / "bad.safetensors"
        _rewrite_meta(path, bad, labels=value)
        with pytest.raises(TaskFileError, match="corrupt"):
            load_task(convert(make_base()), bad)
    v1 = tmp_path / "v1.safetensors"
    _rewrite_meta(path, v1, format_version="1")
    with pytest.raises(TaskFileError, match="'labels' in a format version 1 file"):
        load_task(convert(make_base()), v1)


def _parts_of(path):
    """(header as parsed JSON, data bytes) of a safetensors file. safetensors writes the metadata
    fields in a random order (a Rust HashMap): two writes of one file differ in that order only,
    old code or new, so "the same file" is the same header content and the same data bytes."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return len(data), json.loads(data[8:8 + n]), data[8 + n:]


def test_a_file_without_labels_is_byte_identical_to_before(tmp_path):
    """labels=None writes exactly the file written before labels existed: the same metadata
    fields (no 'labels'), the same size, header content and data bytes as the old code path
    (reproduced here)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from taps_fast import __version__, base_fingerprint
    from taps_fast.checkpoint import FORMAT, FORMAT_VERSION, _checksum, task_tensors
    m = trained()
    a, b, old = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "old.safetensors"
    save_task(m, a)
    save_task(m, b, labels=None)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in task_tensors(m).items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "taps_fast_version": __version__,
            "base_fingerprint": base_fingerprint(m),
            "thresholds": json.dumps({n: float(l.threshold) for n, l in taps_layers(m)}, separators=(",", ":"))}
    meta["checksum"] = _checksum(tensors.items(), meta)
    save_file(tensors, str(old), metadata=meta)
    assert _parts_of(a) == _parts_of(b) == _parts_of(old)
    with safe_open(str(a), "pt") as f:
        assert "labels" not in f.metadata()
