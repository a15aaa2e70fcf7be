"""BatchNorm that follows its parameters' trainability: the semantics `ctta.Clip` installs at construction.

A CLIP with a convolutional image tower (open_clip's ``ModifiedResNet``, the RN50/RN101 family) normalises with
BatchNorm. Plain ``nn.BatchNorm2d`` decides between batch and running statistics by the module's ``training`` flag
alone, so a strategy that calls ``model.net.train()`` to train a LoRA or a prompt would silently (a) overwrite the
frozen tower's running statistics with those of its batches and (b) make every prediction depend on the rest of its
batch; a frozen-feature cache keyed on the tower's weights would be invalidated too. Here the rule is:

- ``batch_stats`` (set by `set_batch_statistics`; TENT): always normalise with the statistics of the current batch,
  in train and eval mode alike, and never touch the running buffers (TENT's reference drops them; we keep them,
  unused, so ``state_dict`` keys stay those of the checkpoint and a reset has nothing to rebuild);
- otherwise, batch statistics (and a running-statistics update) only when the module is training **and** its
  affine weight requires grad: full fine-tuning behaves as standard fine-tuning does (except that a batch with
  non-finite statistics is never folded into the running ones);
- otherwise (frozen affine parameters, or eval mode): the running statistics, never updated.

Only the class of each module changes (``module.__class__``), never its parameters or buffers, so open_clip
checkpoints load exactly as before and ``state_dict`` keys are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STATS = ("running_mean", "running_var", "num_batches_tracked")


def _trainable(m: nn.Module) -> bool:
    """Is the layer's affine weight or bias trainable (the test both the forward and the snapshots use)?"""
    return any(p.requires_grad for p in m.parameters(recurse=False))


def _forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    self._check_input_dim(x)
    if self.batch_stats:
        if x.numel() // x.shape[1] <= 1:  # F.batch_norm would fail with a message that names no layer
            raise ValueError(f"{type(self).__name__}({self.num_features}) normalises with batch statistics (TENT on "
                             f"a BatchNorm tower) but got input {tuple(x.shape)}: one value per channel; adapt and "
                             "predict on batches of at least 2 images")
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
    if self.running_mean is None:
        return self._base_forward(x)  # no running statistics to use: batch statistics, as torch does
    if self.training and _trainable(self):
        return _train_forward(self, x)
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _train_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Standard training BatchNorm (batch statistics, running statistics updated), except that a batch with
    non-finite statistics (an overflow upstream) leaves the running statistics as they were: the step that the
    non-finite loss makes `ctta.Strategy.step` skip must not corrupt them either. torch's own kernel updates copies
    of the buffers (autograd keeps those, so they must not be written afterwards), which are then copied back where
    finite; branch-free, so no device sync."""
    count = self.num_batches_tracked
    if self.momentum is None:  # cumulative moving average, as torch: factor 1 / (batches so far, this one included)
        factor = 1.0 / float(count + 1) if count is not None else 0.0
    else:
        factor = self.momentum
    with torch.no_grad():
        mean, var = self.running_mean.clone(), self.running_var.clone()
    out = F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)
    with torch.no_grad():
        ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
        self.running_mean.copy_(torch.where(ok, mean, self.running_mean))
        self.running_var.copy_(torch.where(ok, var, self.running_var))
        if count is not None:
            count.add_(ok.to(count.dtype))
    return out


def _make(base: type[nn.modules.batchnorm._BatchNorm]) -> type:
    doc = (f"``nn.{base.__name__}`` whose statistics follow its weight's trainability (`ctta.batchnorm`); "
           "``batch_stats`` forces batch statistics (TENT).")
    return type(f"Trainability{base.__name__}", (base,),
                {"batch_stats": False, "forward": _forward, "_base_forward": base.forward, "__doc__": doc,
                 "__module__": __name__})


TrainabilityBatchNorm1d = _make(nn.BatchNorm1d)
TrainabilityBatchNorm2d = _make(nn.BatchNorm2d)
TrainabilityBatchNorm3d = _make(nn.BatchNorm3d)
_SWAP = {nn.BatchNorm1d: TrainabilityBatchNorm1d, nn.BatchNorm2d: TrainabilityBatchNorm2d,
         nn.BatchNorm3d: TrainabilityBatchNorm3d}
BATCHNORMS = tuple(_SWAP.values())


def install(net: nn.Module) -> int:
    """Give every plain ``BatchNorm{1,2,3}d`` of ``net`` the trainability-aware class, in place (parameters,
    buffers and ``state_dict`` keys unchanged). Idempotent; subclasses of BatchNorm are left alone (their forward
    may differ). Returns the number of BatchNorm layers that now follow these semantics."""
    n = 0
    for m in net.modules():
        new = _SWAP.get(type(m))
        if new is not None:
            m.__class__ = new
            m.batch_stats = False
        n += isinstance(m, BATCHNORMS)
    return n


def set_batch_statistics(module: nn.Module, enabled: bool) -> list[str]:
    """Switch every installed BatchNorm below ``module`` to batch statistics (``enabled``) or back; returns their
    names."""
    names = []
    for name, m in module.named_modules():
        if isinstance(m, BATCHNORMS):
            m.batch_stats = bool(enabled)
            names.append(name)
    return names


def statistics_of_trainable(net: nn.Module) -> dict[str, Tensor]:
    """The live running-statistics buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) of every
    BatchNorm whose affine weight or bias is trainable, by their ``state_dict`` names."""
    out = {}
    for name, m in net.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if not _trainable(m):
            continue
        for b in STATS:
            t = getattr(m, b, None)
            if t is not None:
                out[f"{name}.{b}" if name else b] = t
    return out
