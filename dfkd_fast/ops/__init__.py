"""The operators: each module holds one op's reference, kernel registration and public function."""

from dfkd_fast.ops.reparameterize import reparameterize, reparameterize_reference, sample_prior

__all__ = ["reparameterize", "reparameterize_reference", "sample_prior"]
