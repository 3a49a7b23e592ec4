"""dfkd_fast: compress a trained classifier into a smaller one without its training data, fast.

Importing the package loads the compiled extension (if built) and registers its operators; it
initialises no CUDA context and compiles nothing.
"""

from dfkd_fast._extension import extension_loaded, extension_status
from dfkd_fast.backend import Backend, Implementation, choose_implementation, use_backend
from dfkd_fast.hooks import BNStatHooks
from dfkd_fast.host_memory import retain_freed_host_memory
from dfkd_fast.nn import FewChannelConv2d, JSDivLoss, KDLoss, UpsampleConv2d
from dfkd_fast.ops import (
    batch_norm_with_stat_loss,
    bn_stat_loss,
    bn_stats,
    few_channel_conv2d,
    few_channel_conv2d_reference,
    js_div,
    kd_div,
    kd_div_reference,
    max_pool2x2,
    max_pool2x2_reference,
    reparameterize,
    reparameterize_reference,
    sample_prior,
    upsample_conv2d,
    upsample_conv2d_reference,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    """``dfkd_fast.distill`` (callable: ``dfkd_fast.distill(teacher, student, config)``) is
    imported on first use, so that ``import dfkd_fast`` stays cheap."""
    if name == "distill":
        import dfkd_fast.distill

        return dfkd_fast.distill
    raise AttributeError(f"module 'dfkd_fast' has no attribute {name!r}")

__all__ = [
    "BNStatHooks",
    "Backend",
    "batch_norm_with_stat_loss",
    "bn_stat_loss",
    "bn_stats",
    "Implementation",
    "choose_implementation",
    "distill",
    "extension_loaded",
    "extension_status",
    "few_channel_conv2d",
    "few_channel_conv2d_reference",
    "FewChannelConv2d",
    "js_div",
    "JSDivLoss",
    "kd_div",
    "kd_div_reference",
    "KDLoss",
    "max_pool2x2",
    "max_pool2x2_reference",
    "reparameterize",
    "reparameterize_reference",
    "retain_freed_host_memory",
    "sample_prior",
    "upsample_conv2d",
    "upsample_conv2d_reference",
    "UpsampleConv2d",
    "use_backend",
]
