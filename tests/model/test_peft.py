"""PEFT users: why there is no TAPSConfig, and what works instead (taps_fast on a HF model).

PEFT (0.21.2, pinned) exposes ``peft.utils.register_peft_method``, but it only registers methods
already named in its closed ``PeftType`` enum: any other name raises "Unknown PEFT type ... please
add an entry to peft.utils.peft_types.PeftType". A Python Enum cannot gain members through a public
API, so a third-party package cannot make ``get_peft_model(model, TAPSConfig(...))`` work without
patching PEFT's internals. The first test pins that reason down: it fails the day a PEFT release
accepts an outside method, which is the day to write TAPSConfig.
"""
import pytest
import torch
import torch.nn as nn

import taps_fast

peft = pytest.importorskip("peft")


def test_peft_refuses_third_party_methods():
    from peft.utils import register_peft_method
    from peft.utils.peft_types import PeftType

    assert "TAPS" not in PeftType.__members__
    with pytest.raises(ValueError, match="Unknown PEFT type TAPS"):
        register_peft_method(name="taps", config_cls=object, model_cls=nn.Module)


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()  # random weights: nothing downloaded


def test_taps_on_a_transformers_model(tmp_path):
    """What a PEFT user does instead: convert the HF model itself, train, export a task file."""
    model = _tiny_bert()
    n_linear = sum(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "classifier")
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    taps_fast.convert(model, head="classifier")
    layers = dict(taps_fast.taps_layers(model))
    assert len(layers) == n_linear and "classifier" not in layers
    with torch.no_grad():  # open gates with zero deltas compute W + 0 = W
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=1e-6, atol=1e-6)

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 2]))
    (loss + taps_fast.sparsity_penalty(model, 0.1)).backward()
    opt.step()
    assert any(float(m.delta.detach().abs().sum()) > 0 for m in layers.values())
    model.eval()
    path = tmp_path / "task.safetensors"
    taps_fast.save_task(model, path)

    fresh = _tiny_bert()  # same seed: the same base
    taps_fast.convert(fresh, head="classifier")
    taps_fast.load_task(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
