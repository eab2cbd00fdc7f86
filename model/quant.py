"""Int8 user parts (``ModelConfig.user_dtype == "int8"``): symmetric fake quantisation with a per-branch scale.

A shared K (or V) branch caches its d_u-dim user part ``u`` as int8 codes and one fp32 scale ``s`` per branch:

    code  = clamp(round(u / s), -127, 127)      int8, what the store holds (part kind ``q8``)
    value = code · s                            fp32, what the model's forward and every decode use

Training runs the forward on ``value`` with a straight-through estimator (the gradient of ``u`` passes where
``|u / s| <= 127.5``, zero where the code clamps) while ``s`` follows ``max|u| / 127`` of the batches as an
exponential moving average (momentum :data:`SCALE_MOMENTUM`; the first training batch sets it) — PyTorch's
moving-average min/max observer, symmetric. In eval ``s`` is frozen; it is a buffer, so the checkpoint holds it
and serving reads it from there. The decode computes ``code · s`` in fp32, so a served score equals the eval
forward up to fp32 summation order.
"""

from __future__ import annotations

import torch

QMAX = 127
SCALE_MOMENTUM = 0.01


def _scale(scale: torch.Tensor | float, device: torch.device) -> torch.Tensor | float:
    """A Python float as it is (an fp32 op takes it as an fp32 scalar: no host→device copy per call, and
    capturable in a CUDA graph); a tensor scale as fp32 on ``device``."""
    return scale if isinstance(scale, float) else torch.as_tensor(scale, dtype=torch.float32, device=device)


def int8_codes(u: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """(...) float user values → (...) int8 codes ``clamp(round(u / s), -127, 127)`` (computed in fp32)."""
    return torch.clamp(torch.round(u.float() / _scale(scale, u.device)), -QMAX, QMAX).to(torch.int8)


def dequantise(codes: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """(...) int8 (or integer-valued) codes → (...) fp32 ``code · s``."""
    return codes.to(torch.float32) * _scale(scale, codes.device)


class _FakeQuant(torch.autograd.Function):
    """``dequantise(int8_codes(u, s), s)`` forward; straight-through gradient inside the code range."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = u.float() / scale  # (...)
        ctx.save_for_backward(x.abs() <= QMAX + 0.5)
        ctx.dtype = u.dtype
        out = torch.clamp(torch.round(x), -QMAX, QMAX) * scale  # (...) fp32
        return out.to(torch.promote_types(u.dtype, torch.float32))  # fp64 models: exact widening

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return (grad * inside).to(ctx.dtype), None


def fake_quant(u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(...) float user values → (...) ``code · s`` computed in fp32 (fp64 for an fp64 ``u``, exactly the fp32
    value widened) with a straight-through gradient (module docstring)."""
    return _FakeQuant.apply(u, scale.to(torch.float32))


@torch.no_grad()
def observe_scale(scale: torch.Tensor, u: torch.Tensor) -> None:
    """Update the scale buffer (a 0-dim fp32 tensor; 0 = not observed yet) in place from a training batch ``u``:
    ``max|u| / 127`` the first time, then its moving average. A batch whose ``max|u|`` is 0 or not finite (all-zero
    values, a diverging step) tells nothing and leaves the scale as it was (no host sync either way)."""
    if u.numel() == 0:
        return
    seen = u.detach().abs().max().float() / QMAX
    useful = torch.isfinite(seen) & (seen > 0)
    scale.copy_(torch.where(useful, torch.where(scale > 0, scale + SCALE_MOMENTUM * (seen - scale), seen), scale))


def check_scale(scale: torch.Tensor, name: str) -> None:
    """ValueError unless an int8 branch's scale was observed (a model in eval needs a trained scale) and is finite."""
    if not bool(torch.isfinite(scale)):
        raise ValueError(f"{name}: the int8 user-part scale is {float(scale)}: the checkpoint's training diverged")
    if not bool(scale > 0):
        raise ValueError(f"{name}: the int8 user-part scale was never observed: train the model (at least one "
                         "training-mode forward) or load a trained checkpoint before evaluating or serving it")
