"""taps_fast: Task Adaptive Parameter Sharing (TAPS, CVPR 2022) for PyTorch.

Drop-in gated layers (:class:`TAPSLinear`, :class:`TAPSConv2d`), whole-model conversion
(:func:`convert`), the training helpers (:func:`sparsity_penalty`, :func:`freeze_gates`,
:func:`summary`), task checkpoints (:func:`save_task`, :func:`load_task`), :func:`merge`, and
:class:`MultiTaskModel` (many tasks on one base in one mixed batch), the import of the TAPS
authors' checkpoints (:func:`import_authors_checkpoint`, :func:`convert_authors_checkpoint`), and
figures of the results (:func:`plot_gate_map`, :func:`plot_lambda_sweep`, :func:`gate_matrix`;
matplotlib is imported only when a figure is drawn).
"""
import logging as _logging

from ._version import __version__
from .authors import AuthorsCheckpointError, convert_authors_checkpoint, import_authors_checkpoint
from .checkpoint import TaskFileError, TaskFileNotFoundError, base_fingerprint, load_task, save_task
from .convert import convert, is_norm, merge, taps_layers
from .dispatch import NoBackendError, backend_names, use_backend
from .modules import DEFAULT_INIT_SCORE, DEFAULT_THRESHOLD, TAPSConv2d, TAPSLinear
from .multitask import MultiTaskModel
from .ops import (
    taps_conv2d,
    taps_conv2d_ref,
    taps_linear,
    taps_linear_ref,
    taps_mt_conv2d,
    taps_mt_conv2d_ref,
    taps_mt_linear,
    taps_mt_linear_ref,
)
from .plot import gate_matrix, plot_gate_map, plot_lambda_sweep  # imports matplotlib only when called
from .training import Summary, freeze_gates, sparsity_penalty, summary

_logging.getLogger("taps_fast").addHandler(_logging.NullHandler())

__all__ = [
    "__version__", "TAPSLinear", "TAPSConv2d", "taps_linear", "taps_conv2d", "taps_linear_ref",
    "taps_conv2d_ref", "convert", "merge", "taps_layers", "is_norm", "sparsity_penalty",
    "freeze_gates", "summary", "Summary", "save_task", "load_task", "base_fingerprint",
    "TaskFileError", "TaskFileNotFoundError", "use_backend", "backend_names", "NoBackendError", "DEFAULT_THRESHOLD",
    "DEFAULT_INIT_SCORE", "MultiTaskModel", "taps_mt_linear", "taps_mt_conv2d", "taps_mt_linear_ref",
    "taps_mt_conv2d_ref", "plot_gate_map", "plot_lambda_sweep", "gate_matrix",
    "import_authors_checkpoint", "convert_authors_checkpoint", "AuthorsCheckpointError",
]
