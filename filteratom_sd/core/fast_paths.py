"""Custom autograd paths of an adapted conv / linear layer, and the choice between them.

`RebuiltWeightOp` rebuilds W_eff in the backward instead of keeping it; `TapConvOp` and `BlockLinearOp`
never build it, sending the update through the activations (`activation_op` picks them). The ops take
the layer as an argument and read its base layer, updates and scales, so this module needs no import
of the layer class.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype active for `x`'s device, or None when autocast is off."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


_COMPILER_IS_COMPILING = getattr(torch.compiler, "is_compiling", None)  # torch 2.3+


def is_compiling() -> bool:
    """True while torch.compile traces the caller (torch.compiler.is_compiling is torch 2.3+; dynamo's before)."""
    if _COMPILER_IS_COMPILING is not None:
        return _COMPILER_IS_COMPILING()
    return bool(torch._dynamo.is_compiling())


def prepare_compile() -> None:
    """Let torch.compile trace the adapted layers whole; call it before compiling a UNet that holds them.

    `RebuiltWeightOp`'s backward takes the rebuilt weight's gradient with `torch.autograd.grad`, which dynamo
    otherwise leaves to eager Python with a graph break in every adapted layer.
    """
    torch._dynamo.config.trace_autograd_ops = True


def compiled(module: nn.Module, mode: str, backend: str = "inductor") -> nn.Module:
    """`module` under torch.compile, its adapted layers traced whole; `mode` "default" is torch's own default."""
    prepare_compile()
    return torch.compile(module, backend=backend, mode=None if mode == "default" else mode)


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


def tap_matrix(layer: Any, names: list[str]) -> Tensor:
    """M = I + sum_n s_n T_n, shape (1 or c_in, d, d), in the updates' dtype: rows(W_eff) = rows(W) M."""
    total = sum(layer.scales[n] * layer.deltas[n].tap_transform() for n in names)
    return total + torch.eye(total.shape[-1], dtype=total.dtype, device=total.device)


def _columns(x: Tensor, conv: nn.Conv2d) -> Tensor:
    # im2col: (B, c_in, d, P), the d = k*k taps of every output position
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols.view(x.shape[0], x.shape[1], -1, cols.shape[-1])


def _mix_taps(matrix: Tensor, cols: Tensor) -> Tensor:
    # (matrix cols) per input channel, contiguous; for a few positions one GEMM over permuted columns beats
    # thousands of tiny batched ones (measured on the CPU: 16 positions is where they break even)
    if matrix.shape[0] == 1 and cols.shape[-1] < 16:
        return torch.einsum("st,bitp->bisp", matrix[0], cols).contiguous()
    return torch.matmul(matrix, cols)


def _conv_gemm(weight: Tensor, taps: Tensor) -> Tensor:
    # W (c_out, K) times the mixed columns (B, K, P): one GEMM per image, a plain mm for one image
    return (weight @ taps[0]).unsqueeze(0) if taps.shape[0] == 1 else torch.matmul(weight, taps)


class TapConvOp(torch.autograd.Function):
    """A k x k conv whose updates transform every filter's taps: rows(W_eff) = rows(W) M, M = I + sum s T.

    conv(x, W_eff) = W as c_out x (c_in k^2) times (M applied to the im2col columns of x): the frozen W
    is used as it is, so training never builds W_eff and never computes W's gradient; M's gradient
    comes from the columns, whose size is the activations' times k^2. Only x and the small M are kept
    for the backward (the columns are rebuilt); autograd takes M's gradient on to the updates.
    """

    @staticmethod
    def forward(ctx, x: Tensor, matrix: Tensor, layer: Any) -> Tensor:
        base = layer.base_layer
        dtype = autocast_dtype(x)
        c_out = base.weight.shape[0]
        x, weight, bias = _cast(dtype, x, base.weight.reshape(c_out, -1), base.bias)
        with torch.autocast(x.device.type, enabled=False):
            cols = _columns(x, base)
            out = _conv_gemm(weight, _mix_taps(matrix.to(x.dtype), cols).reshape(x.shape[0], weight.shape[1], -1))
            if bias is not None:
                out += bias[:, None]
        ctx.layer = layer
        ctx.save_for_backward(x, matrix)
        height = (x.shape[2] + 2 * base.padding[0] - base.dilation[0] * (base.kernel_size[0] - 1) - 1) // base.stride[0] + 1
        return out.view(x.shape[0], c_out, height, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, matrix = ctx.saved_tensors
        base = ctx.layer.base_layer
        c_out = base.weight.shape[0]
        cols = _columns(x, base)
        grad = grad_out.to(x.dtype).reshape(x.shape[0], c_out, -1)
        grad_taps = _conv_gemm(base.weight.reshape(c_out, -1).to(x.dtype).t(), grad).view(cols.shape)
        shared = matrix.shape[0] == 1
        grad_matrix = torch.einsum("bisp,bitp->st" if shared else "bisp,bitp->ist", grad_taps, cols)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_cols = _mix_taps(matrix.to(x.dtype).mT, grad_taps)
            grad_x = F.fold(grad_cols.reshape(x.shape[0], -1, cols.shape[-1]), x.shape[2:], base.kernel_size,
                            base.dilation, base.padding, base.stride)
        return grad_x, grad_matrix.reshape(matrix.shape).to(matrix.dtype), None


def tap_conv(x: Tensor, layer: Any, names: list[str]) -> Tensor:
    """The layer's conv with its tap-transform updates, through `TapConvOp`.

    M is built in the updates' dtype (fp32) and only cast to the autocast dtype inside the op, so its
    identity part does not round away a small update.
    """
    with torch.autocast(x.device.type, enabled=False):
        matrix = tap_matrix(layer, names)
    return TapConvOp.apply(x, matrix, layer)


def _tokens(x: Tensor, layer: Any) -> Tensor:
    # (n, c_in) contiguous rows: a linear's input as it is, a 1x1 conv's channels moved last
    if isinstance(layer.base_layer, nn.Conv2d):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).contiguous()
    return x.reshape(-1, x.shape[-1]).contiguous()


def _by_block(rows: Tensor, b: int) -> Tensor:
    # (n, b * q) rows -> (b * n, q): each input block's rows together
    return rows.view(rows.shape[0], b, -1).transpose(0, 1).reshape(-1, rows.shape[1] // b)


class BlockLinearOp(torch.autograd.Function):
    """A linear / 1x1 conv whose updates are Kronecker sums dW = sum_l alpha_l kron dD_l, alpha frozen.

    dW x is computed from the activations: every input block times every dD_l (one batched GEMM over
    the m atoms), then alpha mixes blocks and atoms in one GEMM, so training never builds dW nor
    computes W's gradient. For n rows of x that costs about n m / kc multiply-adds per weight entry for
    alpha's mixing and n m kc_out / c_out for the blocks times the atoms, in the forward and about as much
    again in the backward (against 2 m + n for building dW and its gradient), so it pays for few rows:
    small latents, the time embedding, wide layers. Inputs after x: the layer, the scales, then (alpha as
    (a, m b), dD) per update.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: Any, scales: tuple[float, ...], *factors: Tensor) -> Tensor:
        base = layer.base_layer
        dtype = autocast_dtype(x)
        c_out = base.weight.shape[0]
        rows, weight, bias = _cast(dtype, _tokens(x, layer), base.weight.reshape(c_out, -1), base.bias)
        n = rows.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(rows, weight, bias)
            for scale, mixing, atoms in zip(scales, factors[::2], factors[1::2]):
                a, (m, p) = mixing.shape[0], atoms.shape[:2]
                b = mixing.shape[1] // m
                mixed = torch.matmul(_by_block(rows, b), atoms.to(rows.dtype).mT)  # (m, b n, p)
                update = mixing.to(rows.dtype) @ mixed.view(m * b, n * p)  # (a, n p)
                out.view(n, a, p).add_(update.view(a, n, p).transpose(0, 1), alpha=scale)
        ctx.layer, ctx.scales, ctx.input_shape = layer, scales, x.shape
        ctx.save_for_backward(rows, *factors)
        if isinstance(base, nn.Conv2d):
            return out.view(x.shape[0], x.shape[2], x.shape[3], c_out).permute(0, 3, 1, 2)
        return out.view(*x.shape[:-1], c_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        rows, *factors = ctx.saved_tensors
        base = ctx.layer.base_layer
        n, c_out = rows.shape[0], base.weight.shape[0]
        grad = _tokens(grad_out.to(rows.dtype), ctx.layer)
        need_x = ctx.needs_input_grad[0]
        grad_x = grad @ base.weight.reshape(c_out, -1).to(rows.dtype) if need_x else None
        grads: list[Tensor | None] = []
        for scale, mixing, atoms in zip(ctx.scales, factors[::2], factors[1::2]):
            a, (m, p) = mixing.shape[0], atoms.shape[:2]
            b = mixing.shape[1] // m
            by_output = grad.view(n, a, p).transpose(0, 1).reshape(a, n * p)
            grad_mixed = (mixing.to(rows.dtype).t() @ by_output).view(m, b * n, p)
            by_block = _by_block(rows, b)
            grads += [None, (grad_mixed.mT @ by_block).mul_(scale).to(atoms.dtype)]  # scaled once it is small
            if need_x:
                grad_blocks = (grad_mixed @ atoms.to(rows.dtype)).sum(0)  # (b n, q)
                grad_x.view(n, b, -1).add_(grad_blocks.view(b, n, -1).transpose(0, 1), alpha=scale)
        if grad_x is not None:
            shape = ctx.input_shape
            grad_x = (grad_x.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
                      if isinstance(base, nn.Conv2d) else grad_x.view(shape))
        return (grad_x, None, None, *grads)


def block_linear(x: Tensor, layer: Any, names: list[str]) -> Tensor:
    """The layer's linear / 1x1 conv with its Kronecker-block updates, through `BlockLinearOp`."""
    factors = [t for n in names for t in layer.deltas[n].block_factors()]
    return BlockLinearOp.apply(x, layer, tuple(layer.scales[n] for n in names), *factors)


TRAIN_PATHS = ("auto", "activations", "weight")
# Weight-sized memory passes of the weight path (build dW, keep W_eff, its gradient), in multiply-adds per entry.
_WEIGHT_PASSES = 16
# Below this many weight entries the activation paths' extra kernel calls cost more than they save (CPU, measured:
# on the bundled model, whose largest layer has 37k entries, the weight path trains 1.2x faster).
MIN_ACTIVATION_PATH_ENTRIES = 1 << 18


def weight_path_only(layer: Any) -> bool:
    """True when `activation_op` returns None for every input: the "weight" path, or "auto" on a small layer."""
    path = layer.train_path
    return path == "weight" or (path == "auto" and layer.weight.numel() < MIN_ACTIVATION_PATH_ENTRIES)


def activation_op(layer: Any, x: Tensor, names: list[str]) -> Callable[[Tensor, Any, list[str]], Tensor] | None:
    """The function that trains `layer` through its activations (`tap_conv`, `block_linear`), or None.

    None means the weight path (build W_eff, let autograd take W_eff's gradient): the layer's
    `train_path` asks for it, an update does not have the needed form, or under "auto" it costs less
    (small layers, or many activation rows).
    """
    if weight_path_only(layer):
        return None
    base, path = layer.base_layer, layer.train_path
    deltas = [layer.deltas[n] for n in names]
    conv = isinstance(base, nn.Conv2d)
    if conv and base.groups == 1 and all(getattr(d, "supports_taps", False) for d in deltas):
        taps = base.kernel_size[0] * base.kernel_size[1]
        cheap = x.numel() * taps <= base.weight.numel() * base.stride[0] * base.stride[1]
        return tap_conv if cheap or path == "activations" else None
    pointwise = not conv or (base.kernel_size == (1, 1) and base.stride == (1, 1) and base.padding == (0, 0)
                             and base.groups == 1)
    if pointwise and all(getattr(d, "supports_blocks", False) for d in deltas):
        rows, c_out = x.numel() // base.weight.shape[1], base.weight.shape[0]
        sizes = [atoms.shape for _, atoms in (d.block_factors() for d in deltas)]  # (m, kc_out, kc) each
        # twice the forward's multiply-adds per weight entry, alpha's mixing and the blocks times the atoms: fitted
        # to SD v1.4's layers on a 2-core CPU, where wide layers pay at 77 rows and narrow ones lose at 64
        through = sum(2 * (rows * m / q + rows * m * p / c_out) for m, p, q in sizes)
        cheap = through <= rows + _WEIGHT_PASSES + sum(2 * m for m, _, _ in sizes)
        return block_linear if cheap or path == "activations" else None
    return None


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

