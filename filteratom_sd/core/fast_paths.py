"""Custom autograd paths of an adapted conv / linear layer: memory-saving forward/backward pairs.

Each op takes the layer as an argument and calls its public methods (`effective_weight_and_bias`,
`tap_kernels`, `run`), so this module needs no import of the layer class.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype active for `x`'s device, or None when autocast is off."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def is_compiling() -> bool:
    """True while torch.compile traces the caller (torch.compiler.is_compiling is torch 2.3+; dynamo's before)."""
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


def _cast(dtype: torch.dtype | None, x: Tensor, weight: Tensor, bias: Tensor | None):
    # what F.conv2d / F.linear would do under autocast, done by hand so forward and backward agree
    if dtype is None:
        return x, weight, bias
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _keep_for_backward(ctx: Any, layer: Any, names: tuple[str, ...], dtype: torch.dtype | None, x: Tensor,
                       params: tuple[Tensor, ...]) -> None:
    # only the input and the updates' parameters: the weight is rebuilt from them in the backward
    ctx.layer, ctx.names, ctx.dtype = layer, names, dtype
    ctx.save_for_backward(x, *params)


class RebuiltWeightOp(torch.autograd.Function):
    """y = conv / linear(x, W_eff) where W_eff is built in forward, dropped, and rebuilt in backward.

    Plain autograd would save every adapted layer's W_eff from forward to backward (a second
    copy of all adapted weights); this saves only x and the update's parameters, and returns
    their gradients from the rebuilt W_eff's graph. Autocast is applied by hand, as F.conv2d
    would apply it, so the backward runs in the same dtype as the forward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: Any, names: tuple[str, ...], *params: Tensor) -> Tensor:
        weight, bias = layer.effective_weight_and_bias(list(names))
        dtype = autocast_dtype(x)
        x, weight, bias = _cast(dtype, x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            out = layer.run(x, weight, bias)
        _keep_for_backward(ctx, layer, names, dtype, x, params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, *params = ctx.saved_tensors
        layer = ctx.layer
        # rebuilt under the forward's autocast state, so it is the very weight the forward used
        autocast = torch.autocast(x.device.type, dtype=ctx.dtype, enabled=ctx.dtype is not None)
        with torch.enable_grad(), autocast:
            weight, bias = layer.effective_weight_and_bias(list(ctx.names))
        used = weight.detach() if ctx.dtype is None else weight.detach().to(ctx.dtype)
        bias_grad = bias is not None and bias.requires_grad
        grad_x, grad_w, grad_b = _op_backward(layer.base_layer, grad_out.to(used.dtype), x, used,
                                              ctx.needs_input_grad[0], bias_grad)
        outputs, grads = [], []
        if weight.requires_grad:  # bias-only updates (BitFit) leave the weight constant
            outputs.append(weight)
            grads.append(grad_w.to(weight.dtype))
        if bias_grad:
            outputs.append(bias)
            grads.append(grad_b.to(bias.dtype))
        wanted = ctx.needs_input_grad[3:]
        found = iter(torch.autograd.grad(outputs, [p for p, w in zip(params, wanted) if w], grads, allow_unused=True))
        return (grad_x, None, None, *[next(found) if w else None for w in wanted])


class TapConvOp(torch.autograd.Function):
    """A k x k conv whose updates transform every filter's taps: rows(W_eff) = rows(W) M, M = I + sum s T.

    conv(x, W_eff) = conv1x1(depthwise(x, M), W as c_out x (c_in k^2)): the frozen W is used as
    it is, so training never builds W_eff and never computes W's gradient; M's gradient comes
    from the depthwise part, whose cost scales with the activations (c_in k^4 per position).
    The kernels are built in the updates' dtype (fp32) and only then cast to the autocast dtype,
    so the identity part of M does not round away a small update.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: Any, names: tuple[str, ...], *params: Tensor) -> Tensor:
        base = layer.base_layer
        with torch.autocast(x.device.type, enabled=False):
            kernels = layer.tap_kernels(list(names))
        dtype = autocast_dtype(x)
        c_out, c_in = base.weight.shape[:2]
        x, pointwise, bias = _cast(dtype, x, base.weight.reshape(c_out, -1, 1, 1), base.bias)
        with torch.autocast(x.device.type, enabled=False):
            taps = F.conv2d(x, kernels.to(x.dtype), None, base.stride, base.padding, base.dilation, c_in)
            out = F.conv2d(taps, pointwise, bias)
        _keep_for_backward(ctx, layer, names, dtype, x, params)
        ctx.taps_shape = taps.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, *params = ctx.saved_tensors
        base = ctx.layer.base_layer
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            kernels = ctx.layer.tap_kernels(list(ctx.names))
        c_out, c_in = base.weight.shape[:2]
        pointwise = base.weight.reshape(c_out, -1, 1, 1).to(x.dtype)
        grad_out = grad_out.to(x.dtype)
        placeholder = grad_out.new_empty(1).expand(ctx.taps_shape)  # only its shape is read
        grad_taps = torch.ops.aten.convolution_backward(
            grad_out, placeholder, pointwise, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
        )[0]
        grad_x, grad_kernels, _ = torch.ops.aten.convolution_backward(
            grad_taps, x, kernels.detach().to(x.dtype), None, list(base.stride), list(base.padding),
            list(base.dilation), False, [0, 0], c_in, [ctx.needs_input_grad[0], True, False],
        )
        wanted = ctx.needs_input_grad[3:]
        found = iter(torch.autograd.grad([kernels], [p for p, w in zip(params, wanted) if w],
                                         [grad_kernels.to(kernels.dtype)], allow_unused=True))
        return (grad_x, None, None, *[next(found) if w else None for w in wanted])


def _op_backward(base: nn.Module, grad_out: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_b: bool):
    """(grad_x, grad_weight, grad_bias) of conv2d / linear, computed in one call each."""
    if isinstance(base, nn.Conv2d):
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if need_b else None, list(base.stride), list(base.padding),
            list(base.dilation), False, [0, 0], base.groups, [need_x, True, need_b],
        )
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_out @ weight if need_x else None
    grad_w = grad_2d.mT @ x.reshape(-1, x.shape[-1])
    return grad_x, grad_w, grad_2d.sum(0) if need_b else None

