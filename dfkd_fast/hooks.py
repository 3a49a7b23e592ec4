"""BatchNorm-statistic matching for a whole teacher, as it runs.

    with BNStatHooks(teacher, first_layer_weight=10.0) as bn_matching:
        logits = teacher(generator(latent))
        bn_loss = bn_matching.loss()   # sum_l w_l (||mean_l - running_mean_l|| + ||var_l - running_var_l||)

Inside the block, every BatchNorm layer of the teacher computes its DeepInversion loss on its
input with the fused kernels (dfkd_fast.ops.bn_stats). An eval-mode layer whose parameters need no
gradient runs ``batch_norm_with_stat_loss`` in place of its forward, so that its output and the
statistics come from one read of its input; other layers keep their forward and add the loss from
a forward pre-hook. Everything is restored when the block exits, also on an exception. Inside the
block the teacher is frozen (its BatchNorm parameters and statistics are read once, at entry) and
should not be copied: a copy would share the fused forwards of the original's layers.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import nn

from dfkd_fast.ops.bn_stats import (
    batch_norm_scale_shift,
    batch_norm_with_stat_loss,
    bn_stat_loss,
)

__all__ = ["BNStatHooks", "PenultimateFeatures", "batchnorm_layers"]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of `model` that track running statistics, in module order."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
    ]


class BNStatHooks:
    """Context manager that matches a teacher's BatchNorm statistics while it runs.

    Args:
        teacher: any module with BatchNorm layers (1d, 2d, 3d) that track running statistics;
            a ValueError says so when it has none.
        layer_weights: one weight per BatchNorm layer (module order); all 1 by default.
        first_layer_weight: multiplies the first layer's weight (DeepInversion uses 10).
        momentum: Fast-DFKD's blending of batch statistics with an exponential moving average
            of earlier batches' (0 disables it); call :meth:`update_ema` after each step.
        fuse: run eval-mode layers as one fused BatchNorm-and-statistics kernel.
    """

    def __init__(
        self,
        teacher: nn.Module,
        layer_weights: Sequence[float] | None = None,
        first_layer_weight: float = 1.0,
        momentum: float = 0.0,
        fuse: bool = True,
    ):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        self.layers = batchnorm_layers(teacher)
        if not self.layers:
            raise ValueError(
                "teacher has no BatchNorm layers with running statistics: there is nothing for "
                "BatchNorm-statistic matching to match"
            )
        if layer_weights is None:
            layer_weights = [1.0] * len(self.layers)
        layer_weights = [float(w) for w in layer_weights]
        if len(layer_weights) != len(self.layers):
            raise ValueError(
                f"layer_weights must hold one weight per BatchNorm layer ({len(self.layers)}), "
                f"got {len(layer_weights)}"
            )
        layer_weights[0] *= float(first_layer_weight)
        if not all(math.isfinite(w) and w >= 0 for w in layer_weights):
            raise ValueError(f"layer weights must be finite and >= 0, got {layer_weights}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.layer_weights = layer_weights
        self.momentum = float(momentum)
        self.fuse = bool(fuse)
        self._losses: list[torch.Tensor | None] = [None] * len(self.layers)
        self._batch_stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self._ema: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self._handles: list = []
        self._fused: list[nn.Module] = []
        self._weights_tensor: torch.Tensor | None = None

    # -- the block ---------------------------------------------------------------------------

    def __enter__(self) -> BNStatHooks:
        if self._handles or self._fused:
            raise RuntimeError("BNStatHooks is already active; it cannot be entered twice")
        try:
            for index, layer in enumerate(self.layers):
                if self.fuse and self._can_fuse(layer):
                    self._install_fused_forward(index, layer)
                else:
                    self._handles.append(layer.register_forward_pre_hook(self._hook(index)))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self._restore()

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        for layer in self._fused:
            del layer.forward  # the class's forward again
        self._handles, self._fused = [], []

    @staticmethod
    def _can_fuse(layer: nn.Module) -> bool:
        parameters = [p for p in (layer.weight, layer.bias) if p is not None]
        return not layer.training and not any(p.requires_grad for p in parameters)

    def _record(self, index: int, loss: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
        self._losses[index] = loss
        self._batch_stats[index] = (mean.detach(), var.detach())

    def _ema_arguments(self, index: int) -> dict:
        ema = self._ema[index]
        if self.momentum == 0.0 or ema is None:
            return {}
        return {"momentum": self.momentum, "ema_mean": ema[0], "ema_var": ema[1]}

    def _hook(self, index: int):
        # Before the layer runs: a train-mode BatchNorm updates its running statistics in place,
        # so they are matched as they were, and copied for backward.
        def record(layer, inputs):
            running_mean, running_var = layer.running_mean, layer.running_var
            if layer.training:
                running_mean, running_var = running_mean.clone(), running_var.clone()
            loss, mean, var = bn_stat_loss(
                inputs[0], running_mean, running_var, return_stats=True,
                **self._ema_arguments(index),
            )  # fmt: skip
            self._record(index, loss, mean, var)

        return record

    def _install_fused_forward(self, index: int, layer: nn.Module) -> None:
        # The teacher is frozen inside the block: its BatchNorm as x * scale + shift, once.
        scale_shift = batch_norm_scale_shift(
            layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps
        )

        def fused_forward(x: torch.Tensor) -> torch.Tensor:
            y, loss, mean, var = batch_norm_with_stat_loss(
                x, layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps,
                scale_shift=scale_shift, **self._ema_arguments(index),
            )  # fmt: skip
            self._record(index, loss, mean, var)
            return y

        layer.forward = fused_forward  # an instance attribute shadows the class's forward
        self._fused.append(layer)

    # -- results -----------------------------------------------------------------------------

    def layer_losses(self) -> list[torch.Tensor]:
        """Each layer's unweighted loss from its latest call (layers not run are left out)."""
        return [loss for loss in self._losses if loss is not None]

    def loss(self) -> torch.Tensor:
        """The weighted sum of the layers' losses from the teacher's latest forward pass: a 0-d
        tensor on the teacher's device (no host sync)."""
        ran = [(w, loss) for w, loss in zip(self.layer_weights, self._losses) if loss is not None]
        if not ran:
            raise RuntimeError(
                "no BatchNorm layer has run yet: call the teacher inside the `with` block first"
            )
        if len(ran) < len(self.layers):
            warnings.warn(
                f"only {len(ran)} of {len(self.layers)} BatchNorm layers ran; the loss sums those",
                RuntimeWarning,
                stacklevel=2,
            )
        weights, losses = zip(*ran)
        stacked = torch.stack(losses)
        return torch.dot(stacked, torch.tensor(weights, dtype=stacked.dtype, device=stacked.device))

    def update_ema(self) -> None:
        """ema <- momentum * ema + (1 - momentum) * batch statistics of the latest forward pass
        (the first call sets the ema to them)."""
        for index, stats in enumerate(self._batch_stats):
            if stats is None:
                continue
            ema = self._ema[index]
            if ema is None:
                self._ema[index] = (stats[0].clone(), stats[1].clone())
            else:
                for average, batch in zip(ema, stats):
                    average.lerp_(batch, 1.0 - self.momentum)


class PenultimateFeatures:
    """Context manager that keeps the input of a classifier's last ``nn.Linear`` (its penultimate
    features) while it runs, for DAFL's activation loss:

        with PenultimateFeatures(teacher) as features:
            logits = teacher(images)
        activation = features.value.abs().mean()
    """

    def __init__(self, classifier: nn.Module):
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
        linears = [module for module in classifier.modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise ValueError("classifier has no nn.Linear layer whose input could be read")
        self.layer = linears[-1]
        self.value: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> PenultimateFeatures:
        if self._handle is not None:
            raise RuntimeError("PenultimateFeatures is already active; it cannot be entered twice")
        self.value = None
        self._handle = self.layer.register_forward_pre_hook(self._record)
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self._handle.remove()
        self._handle = None

    def _record(self, layer, inputs) -> None:
        self.value = inputs[0]
