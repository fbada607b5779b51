"""Alias of the multi-task ops' former module: see mt_linear.py, mt_conv.py and _mt_common.py."""
from ._mt_common import ID_DTYPES, check_task_ids, check_task_ids_meta, kernel_ids  # noqa: F401
from .mt_conv import taps_mt_conv2d, taps_mt_conv2d_ref  # noqa: F401
from .mt_linear import taps_mt_linear, taps_mt_linear_ref  # noqa: F401

__all__ = ["taps_mt_linear", "taps_mt_conv2d", "taps_mt_linear_ref", "taps_mt_conv2d_ref"]
