"""Networks: classifiers (teachers and students) and the image generator."""

from dfkd_fast.models.small import Generator, small_cnn

__all__ = ["Generator", "small_cnn"]
