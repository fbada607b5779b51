"""TAPS on handwritten digits in ~80 lines: adapt one pretrained CNN to two tasks, save each task as
a small file, and serve both tasks and the base in ONE mixed batch.

    python examples/digits_multitask.py    # ~20-30 s on 2 CPU cores; needs scikit-learn

The data, model and pretraining come from taps_fast.demo (``python -m taps_fast.demo`` runs the
full comparison with full fine-tuning and head-only training); the TAPS part is written out here.
"""
import os
import tempfile

import torch
import torch.nn.functional as F

import taps_fast
from taps_fast.demo import (HEAD, PRETRAIN, TASKS_BY_NAME, DemoConfig, evaluate, load_split, pretrain, task_data,
                            with_new_head)

torch.manual_seed(0)
torch.set_num_threads(1)  # 8×8 images: the convs are too small to gain much from threads
cfg = DemoConfig()
split = load_split(seed=0)  # one stratified 70/30 split of sklearn's 1797 digit images
base, acc = pretrain(split, cfg)  # a 28k-parameter CNN, digits 0-4
print(f"base model (digits 0-4): {acc:.1%} test accuracy")

out = tempfile.mkdtemp(prefix="taps_digits_")
models, files, data = {}, {}, {}
for name in ("mirrored", "parity"):
    task = TASKS_BY_NAME[name]
    d = data[name] = task_data(split, task)
    # 1. convert a copy (fresh head): every conv gets a zero delta and a score 0.15 (open, τ = 0.1)
    model = taps_fast.convert(with_new_head(base, task.num_classes, seed=1), head=HEAD)
    scores = [m.score for _, m in taps_fast.taps_layers(model)]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not s for s in scores)]
    # deltas, BatchNorm and head with Adam; the scores with SGD, so that λ sets the trade-off
    opts = [torch.optim.Adam(rest, lr=3e-3), torch.optim.SGD(scores, lr=1e-2)]

    def epochs(n, opts, lam=0.0):
        model.train()
        for _ in range(n):
            for b in torch.randperm(len(d.y_train)).split(64):
                loss = F.cross_entropy(model(d.x_train[b]), d.y_train[b])
                if lam:  # + λ·mean|s|: pushes the scores below τ, closing layers back to the base
                    loss = loss + taps_fast.sparsity_penalty(model, lam)
                for o in opts:
                    o.zero_grad()
                loss.backward()
                for o in opts:
                    o.step()

    epochs(2, opts)  # 2. warm-up without the penalty: the deltas grow from zero first
    epochs(6, opts, lam=1.0)  # 3. task loss + sparsity penalty
    taps_fast.freeze_gates(model)  # 4. gates fixed, closed deltas dropped ...
    epochs(4, [torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)])  # ... tune the rest
    s = taps_fast.summary(model)
    print(f"\n{name}: {evaluate(model, d.x_test, d.y_test):.1%} test accuracy\n{s}")
    files[name] = os.path.join(out, name + ".safetensors")
    size = taps_fast.save_task(model, files[name])  # 5. the task file: scores, open deltas, norms, head
    print(f"task file {files[name]}: {size:,} bytes")
    models[name] = model

# 6. serving: the base once, every task from its file; one batch mixing the tasks and the base
mt = taps_fast.MultiTaskModel(base, head=HEAD)  # converts the base in place (use a copy to keep it)
for name, path in files.items():
    mt.add_task(name, path)
mt.eval()
pre = task_data(split, PRETRAIN)
x = torch.cat([data["mirrored"].x_test[:4], data["parity"].x_test[:4], pre.x_test[:4]])
ids = ["mirrored"] * 4 + ["parity"] * 4 + ["base"] * 4  # names, or an int tensor (-1 = base)
with torch.no_grad():
    logits = mt(x, ids)  # [12, 10]: each row its task's logits, -inf past its head's width
print(f"\nmixed batch: logits {tuple(logits.shape)}, predictions {logits.argmax(-1).tolist()}")
for name in files:
    rows = [i for i, t in enumerate(ids) if t == name]
    with torch.no_grad():
        alone = models[name].eval()(x[rows])
    assert torch.equal(logits[rows, :alone.shape[1]].argmax(-1), alone.argmax(-1)), name
print("each row predicts what its task model predicts alone")
