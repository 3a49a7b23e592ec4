"""The operators: each module holds one op's reference, kernel registration and public function."""

from dfkd_fast.ops.kd_div import js_div, kd_div, kd_div_reference
from dfkd_fast.ops.reparameterize import reparameterize, reparameterize_reference, sample_prior

__all__ = [
    "js_div",
    "kd_div",
    "kd_div_reference",
    "reparameterize",
    "reparameterize_reference",
    "sample_prior",
]
