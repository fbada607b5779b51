"""sparsity_penalty, freeze_gates, summary."""
import pytest
import timm
import torch
import torch.nn as nn

from taps_fast import convert, freeze_gates, sparsity_penalty, summary, taps_layers


def small():
    torch.manual_seed(0)
    return convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                                 nn.Linear(4 * 4 * 4, 6), nn.Linear(6, 2)), head="4")


def test_penalty_uses_real_layer_count_and_params_weights():
    m = small()
    with torch.no_grad():
        m[0].score.fill_(0.3)
        m[3].score.fill_(-0.1)
    p = sparsity_penalty(m, 0.5)
    assert torch.allclose(p, torch.tensor(0.5 * (0.3 + 0.1) / 2))
    p.backward()
    assert torch.allclose(m[0].score.grad, torch.tensor(0.25))
    assert torch.allclose(m[3].score.grad, torch.tensor(-0.25))
    n0, n3 = m[0].weight.numel(), m[3].weight.numel()
    pp = sparsity_penalty(m, 1.0, normalize="params")
    assert torch.allclose(pp, torch.tensor((0.3 * n0 + 0.1 * n3) / (n0 + n3)))
    assert len(list(taps_layers(convert(timm.create_model("resnet50", pretrained=False))))) == 53
    with pytest.raises(ValueError, match="normalize"):
        sparsity_penalty(m, 1.0, normalize="bogus")
    with pytest.raises(ValueError, match="lam"):
        sparsity_penalty(m, -1.0)


def test_freeze_gates():
    m = small()
    with torch.no_grad():
        m[0].score.fill_(0.05)
        m[3].delta.normal_()
    out = freeze_gates(m)
    assert out == {"open": 1, "closed": 1}
    assert m[0].delta is None and not m[0].score.requires_grad
    assert m[3].delta.requires_grad and not m[3].score.requires_grad
    assert "0.delta" not in m.state_dict()
    x = torch.randn(2, 3, 6, 6)
    m(x).sum().backward()
    assert m[3].delta.grad is not None and m[3].score.grad is None
    y_ref = nn.functional.conv2d(x, m[0].weight, m[0].bias)
    assert torch.equal(m[0](x), y_ref)


def test_summary():
    m = small()
    with torch.no_grad():
        m[0].score.fill_(0.05)
    s = summary(m)
    assert [r.name for r in s.rows] == ["0", "3"] and [r.open for r in s.rows] == [False, True]
    t = s.totals
    assert t["layers"] == 2 and t["open_layers"] == 1
    assert t["open_delta_params"] == m[3].weight.numel()
    assert t["norm_params"] == 8 and t["head_params"] == 6 * 2 + 2
    base = sum(p.numel() for n, p in m.named_parameters() if not n.endswith((".delta", ".score")))
    assert t["base_params"] == base
    assert t["task_params"] == m[3].weight.numel() + 8 + 14 + 2
    assert abs(t["task_fraction"] - t["task_params"] / base) < 1e-12
    text = str(s)
    assert "closed" in text and "open layers: 1/2" in text
    assert s.to_dict()["totals"]["layers"] == 2


def test_helpers_refuse_unconverted_model():
    for f in (lambda m: sparsity_penalty(m, 1.0), freeze_gates, summary):
        with pytest.raises(ValueError, match="no TAPS layers"):
            f(nn.Linear(2, 2))


def test_penalty_of_scores_per_task_column():
    """The joint form ([L, T] scores) gives each column the single-task penalty."""
    from taps_fast.training import penalty_of_scores

    s = torch.tensor([[0.2, -0.5], [0.1, 0.3], [-0.4, 0.0]])
    sizes = [10, 30, 60]
    for norm in ("layers", "params"):
        per = penalty_of_scores(s, sizes, 0.7, norm)
        assert per.shape == (2,)
        for t in range(2):
            torch.testing.assert_close(per[t], penalty_of_scores(s[:, t], sizes, 0.7, norm))
    torch.testing.assert_close(penalty_of_scores(s, sizes, 1.0, "params")[0],
                               torch.tensor(0.2 * 0.1 + 0.1 * 0.3 + 0.4 * 0.6))
