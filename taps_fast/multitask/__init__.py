r"""One base model serving, and jointly training, many TAPS tasks in one mixed batch.

    mt = taps_fast.MultiTaskModel(base)            # base: a model (converted, or plain: converted here)
    mt.add_task("cars", "cars.safetensors")         # a task file (save_task) ...
    mt.add_task("cub", cub_model)                   # ... or a converted model of the same base
    logits = mt(x, task_ids)                        # task_ids: [B] ints (-1 = base) or names

    p = mt.prepare_task("dogs", "dogs.safetensors") # a server: read and check in a loader thread ...
    mt.add_prepared(p)                              # ... then write it in place (model thread)

What it holds: the base model once, plus per task only what the task changes. Each task has an
internal *row*, stable while it lives (public ids are positions in ``mt.tasks`` and shift when an
earlier task is removed; ``mt._row_of`` maps them to rows, and the forward maps ids to rows on
the device). Every gated layer becomes a multi-task layer holding the base W (shared), a slot
pool of the deltas of the tasks that opened it (``deltas[S_cap, *W.shape]``), an index map
``slot[R_cap]`` (row -> slot, -1: none) and the rows' scores and thresholds; every norm layer
holds the rows' affine parameters and running statistics in tables ``[R_cap, C]``; each row of
the head holds its task's own head module (a placeholder on a free row). No per-task copy of the
model, and no W + ΔW kept per task.

Pools: rows are allocated ``pool_chunk`` (default 8) at a time, each layer's delta slots a
quarter of the pool at a time (at least one: at most a quarter spare); neither shrinks; ``add_prepared`` / ``add_task`` copy a task into a free row and free slots in place,
``remove_task`` zeroes and frees them, so adding or removing costs time and memory in proportion
to that task's bytes only (no re-stacking of the other tasks). ``task_bytes``, ``pool_stats``
and ``task_labels`` report a task's bytes, the pools' use and a task's class names.

Forward: each sample is computed with its own task's open deltas, norm layers and head
(``taps_mt_linear`` / ``taps_mt_conv2d`` for the gated layers: the Triton kernels on a GPU, a
loop over the tasks present, never over samples, on the CPU). Rows of the base (-1) use the
base model as it is.

Output: when every head is an nn.Linear (timm classifiers), a tensor [B, C_max] with C_max the
largest output size over the base and all tasks (not just those in the batch, so the shape does
not depend on the batch): row i holds its task's C_t logits in columns [0, C_t) and -inf after
them, so argmax, softmax and F.cross_entropy work on it directly; ``num_outputs`` gives C_t.
Other heads run per task present and are padded the same way to the widest output in the batch.

Training (TAPS' joint variant): in train mode one mixed batch trains every task present at once;
each task's deltas (its slot of each pool), scores, norm parameters and head get the
gradients its own model would get from its rows (tests/multitask/test_multitask.py checks this), and
train-mode BatchNorm computes statistics per task. The base stays frozen: base rows use the base
norms' running statistics in train mode too. ``task_tensors`` / ``save_task`` export a task as
the same file ``taps_fast.save_task`` writes. ``add_task`` / ``remove_task`` write the pools in
place, but a pool that grows (no free row or slot) is a new Parameter: build the optimizer after
adding the tasks.

Threads: several threads may call one model at once (a server's workers): each call's ids and
task live in the calling thread (``_Context`` is a threading.local), and serving reads the
model without writing it, so every call gets exactly its serial result. ``prepare_task`` reads
the model without writing it and may run beside the calls; ``add_prepared``, ``add_task`` and
``remove_task`` write the pools (and may grow them): make them while no call is running.

Layout: model.py (MultiTaskModel: building it, adding and removing tasks, forward), layers.py
(the gated layers), norms.py (the norm layers), heads.py (the head), _context.py (the per-thread
state of a call).
"""
from ._context import _Context  # noqa: F401  (a pickled MultiTaskModel names its context here)
from .heads import MultiTaskHead
from .layers import MultiTaskConv2d, MultiTaskLinear
from .model import BASE, MultiTaskModel, PreparedTask, Source, TaskPlan, storage_bytes  # noqa: F401
from .norms import MultiTaskBatchNorm, MultiTaskLayerNorm, MultiTaskNormFallback

__all__ = ["MultiTaskModel", "PreparedTask", "MultiTaskLinear", "MultiTaskConv2d", "MultiTaskBatchNorm",
           "MultiTaskLayerNorm", "MultiTaskNormFallback", "MultiTaskHead"]
