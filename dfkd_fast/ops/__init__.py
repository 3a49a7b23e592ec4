"""The operators: each module holds one op's reference, kernel registration and public function."""

from dfkd_fast.ops.bn_stats import batch_norm_with_stat_loss, bn_stat_loss, bn_stats
from dfkd_fast.ops.few_channel_conv import few_channel_conv2d, few_channel_conv2d_reference
from dfkd_fast.ops.max_pool import max_pool2x2, max_pool2x2_reference
from dfkd_fast.ops.kd_div import js_div, kd_div, kd_div_reference
from dfkd_fast.ops.reparameterize import reparameterize, reparameterize_reference, sample_prior
from dfkd_fast.ops.upsample_conv import upsample_conv2d, upsample_conv2d_reference

__all__ = [
    "batch_norm_with_stat_loss",
    "bn_stat_loss",
    "bn_stats",
    "few_channel_conv2d",
    "few_channel_conv2d_reference",
    "js_div",
    "kd_div",
    "kd_div_reference",
    "max_pool2x2",
    "max_pool2x2_reference",
    "reparameterize",
    "reparameterize_reference",
    "sample_prior",
    "upsample_conv2d",
    "upsample_conv2d_reference",
]
