"""Effective weights of same-shaped filter-atom layers, built together while training on the weight path.

Each layer on the weight path builds W_eff = W + s dW every step with its own short chain of small kernels and
autograd nodes. Where layers are small (the bundled model; any model on a GPU, whose step the host bounds) that
chain costs more than its arithmetic. The layers of one adapter with the same weight and atom shapes form a
`WeightGroup`: the first member that needs its weight in a forward pass builds the weights of every member that
asked in an earlier pass, under one autograd node for the group, and each member takes its own weight once. Each
member's weight and gradient go through the ops of the per-layer build (`AtomDelta.add_to`, and autograd's formulas
through it), so the bits are the same; what the group saves is the autograd nodes and the Python around them (the
bundled model's step at batch 1: about 7 % of it, docs/performance.md).
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..core.fast_paths import autocast_dtype
from ..core.layer import AdaptedLayer
from .delta import AtomDelta


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor if dtype is None else tensor.to(dtype)


def _scaled(tensor: Tensor, scale: float) -> Tensor:
    # what autograd's backward of `alpha=scale` does: a product only where the scale is not 1
    return tensor if scale == 1.0 else tensor * scale


def _taps_weight(weight: Tensor, scale: float, projector: Tensor, delta: Tensor, cast: torch.dtype | None) -> Tensor:
    # rows(W) + s rows(W) (P dD): `AtomDelta.add_to`'s derived k x k build, op for op (autocast's casts by hand)
    d = projector.shape[0]
    transform = _cast(projector, cast).mm(_cast(delta.reshape(delta.shape[0], d), cast)).to(weight.dtype)
    rows = _cast(weight.reshape(-1, d), cast)
    built = torch.empty(weight.shape, dtype=rows.dtype, device=rows.device)  # an output that is no view
    torch.addmm(rows, rows, _cast(transform, cast), alpha=scale, out=built.view(-1, d))
    return built


def _taps_grad(weight: Tensor, scale: float, projector: Tensor, grad: Tensor, cast: torch.dtype | None) -> Tensor:
    # autograd's formulas through `_taps_weight`: addmm's for its second matrix, then mm's
    d = projector.shape[0]
    grad_transform = _scaled(_cast(weight.reshape(-1, d), cast).t().mm(grad.reshape(-1, d)), scale)
    return _cast(projector, cast).t().mm(grad_transform)


def _blocks_weight(weight: Tensor, scale: float, coefficients: tuple[int, int, Tensor], delta: Tensor,
                   cast: torch.dtype | None) -> Tensor:
    # W + s sum_l alpha_l kron dD_l: `AtomDelta.add_to`'s Kronecker build, op for op (alpha folded to (a b, m))
    (a, b, folded), (m, p, q) = coefficients, delta.shape
    update = _cast(folded, cast).mm(_cast(delta.reshape(m, p * q), cast))
    update = update.to(weight.dtype).view(a, b, p, q).permute(0, 2, 1, 3)
    built = torch.empty(weight.shape, dtype=update.dtype, device=update.device)  # an output that is no view
    torch.add(weight.view(a, p, b, q), update, alpha=scale, out=built.view(a, p, b, q))
    return built


def _blocks_grad(weight: Tensor, scale: float, coefficients: tuple[int, int, Tensor], grad: Tensor,
                 cast: torch.dtype | None) -> Tensor:
    # autograd's formulas through `_blocks_weight`: add's for its scaled input, the permute's, then mm's
    a, b, folded = coefficients
    p, q = grad.shape[0] // a, grad.shape[1] // b
    grad_update = _scaled(grad.view(a, p, b, q), scale).permute(0, 2, 1, 3).reshape(a * b, p * q)
    return _cast(folded, cast).t().mm(_cast(grad_update, cast))


_KINDS = {"taps": (_taps_weight, _taps_grad), "blocks": (_blocks_weight, _blocks_grad)}


class _GroupBuild(torch.autograd.Function):
    """Every member's W + s dW as one autograd node: each member through the per-layer build's own ops and gradient
    formulas (`_KINDS`), so the bits are the per-layer build's."""

    @staticmethod
    def forward(ctx, group: "WeightGroup", weights: tuple[Tensor, ...], scales: tuple[float, ...], factors: tuple,
                *atoms: Tensor) -> tuple[Tensor, ...]:
        build = _KINDS[group.kind][0]
        cast = autocast_dtype(weights[0])
        with torch.autocast(weights[0].device.type, enabled=False):
            out = tuple(build(*member, cast) for member in zip(weights, scales, factors, atoms))
        ctx.group, ctx.members, ctx.cast = group, (weights, scales, factors), cast
        ctx.atom_shapes = [(delta.shape, delta.dtype) for delta in atoms]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        ctx.group.generation += 1  # this build's graph is spent
        grad_of = _KINDS[ctx.group.kind][1]
        out = [grad_of(*member, grad, ctx.cast).to(dtype).view(shape)
               for *member, grad, (shape, dtype) in zip(*ctx.members, grads, ctx.atom_shapes)]
        return (None, None, None, None, *out)


class WeightGroup:
    """Same-shaped layers of one adapter whose effective weights are built together (see the module docstring).

    Per-member state lives here, in lists indexed by the member's slot, not on the updates: writing an attribute
    of an `nn.Module` costs microseconds, and a step makes hundreds of these writes.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "taps": derived k x k convs; "blocks": Kronecker linear / 1x1 layers
        self.deltas: list[weakref.ref] = []
        self.names: list[str] = []  # each member's adapter name on its layer
        self.asks: list[bool] = []  # the member took its weight from the group before
        self.taken: list[int] = []  # the generation in which the member last took its weight
        self.built: list[tuple[tuple, Tensor] | None] = []  # (key, W_eff) built for the member and not taken yet
        # blocks: each member's alpha as the contiguous (a b, m) matrix the per-layer build copies it into every step
        self.folded: list[tuple[tuple, Tensor] | None] = []
        # Bumped by a build's backward, which ends a pass: weights built before are not handed out, and a member that
        # took one in an earlier generation is built for again.
        self.generation = 0
        self.builds = 0  # group builds so far (read by tests and benchmarks)

    def add(self, delta: AtomDelta, name: str) -> None:
        """Make `delta` (the update named `name` on its layer) a member."""
        delta.join_group(self, len(self.deltas))
        self.deltas.append(weakref.ref(delta))
        self.names.append(name)
        self.asks.append(False)
        self.taken.append(-1)
        self.built.append(None)
        self.folded.append(None)

    def _key(self, delta: AtomDelta, weight: Tensor, scale: float) -> tuple:
        # what the built weight depends on (and the generation whose graph it belongs to)
        atoms = delta._parameters["delta_atoms"]
        return atoms.data_ptr(), atoms._version, weight.data_ptr(), weight._version, scale, self.generation

    def _partner(self, slot: int, like: Tensor) -> tuple[AtomDelta, Tensor, float] | None:
        # (update, frozen weight, scale) of a member whose next forward will ask for a weight like `like`, else None
        delta = self.deltas[slot]()
        layer = None if delta is None or delta._layer is None else delta._layer()
        if layer is None or layer.recompute_weights or layer._active() != [self.names[slot]] or \
                layer.deltas._modules.get(self.names[slot]) is not delta or \
                not delta._parameters["delta_atoms"].requires_grad:  # a frozen update's forward builds no weight
            return None
        weight = layer._modules["base_layer"]._parameters["weight"]
        if weight is None or weight.shape != like.shape or weight.dtype != like.dtype or weight.device != like.device \
                or weight.requires_grad or not weight.is_contiguous():
            return None
        return delta, weight, layer.scales[self.names[slot]]

    def weight_for(self, slot: int, layer: AdaptedLayer) -> Tensor | None:
        """The W + s dW of the member in `slot` (on `layer`), from this pass's build; None where it cannot be built here.

        Builds for every member that asked before and has not taken its weight in this generation.
        """
        weight = layer._modules["base_layer"]._parameters["weight"]
        if weight.requires_grad or not weight.is_contiguous():
            return None
        delta = self.deltas[slot]()
        scale = layer.scales[self.names[slot]]
        key = self._key(delta, weight, scale)
        built, self.built[slot] = self.built[slot], None
        self.asks[slot], self.taken[slot] = True, self.generation
        if built is not None and built[0] == key:
            return built[1]
        members = [(slot, delta, weight, scale)]
        for other in range(len(self.deltas)):
            if other != slot and self.asks[other] and self.taken[other] != self.generation:
                partner = self._partner(other, weight)
                if partner is not None:
                    members.append((other, *partner))
        weights = self._build(members)
        for (other, other_delta, other_weight, other_scale), other_built in zip(members[1:], weights[1:]):
            self.built[other] = (self._key(other_delta, other_weight, other_scale), other_built)
        return weights[0]

    def _folded(self, slot: int, delta: AtomDelta) -> tuple[int, int, Tensor]:
        alpha = delta._alpha  # (a, b, m), stored in (a, m, b) order
        key = (alpha.data_ptr(), alpha._version, alpha.dtype, alpha.device)
        found = self.folded[slot]
        if found is None or found[0] != key:
            found = self.folded[slot] = (key, alpha.reshape(-1, alpha.shape[-1]))
        return alpha.shape[0], alpha.shape[1], found[1]

    def _build(self, members: list[tuple[int, AtomDelta, Tensor, float]]) -> tuple[Tensor, ...]:
        weights = tuple(member[2] for member in members)
        scales = tuple(member[3] for member in members)
        atoms = [member[1]._parameters["delta_atoms"] for member in members]
        if self.kind == "taps":
            factors = tuple(member[1]._projector() for member in members)
        else:
            factors = tuple(self._folded(slot, delta) for slot, delta, _, _ in members)
        self.builds += 1
        return _GroupBuild.apply(self, weights, scales, factors, *atoms)


def group_kind(delta: AtomDelta) -> str | None:
    """"taps" or "blocks" when `delta`'s weight can be built in a group, else None."""
    if delta.supports_taps and not delta.overcomplete:  # one shared tap transform, not one per input channel
        return "taps"
    return "blocks" if delta.supports_blocks else None


def form_groups(members: list[tuple[AtomDelta, str]]) -> int:
    """Group the updates `members` (update, adapter name) by kind and shape; returns the number of groups.

    Updates with no same-shaped partner keep the per-layer build.
    """
    by_shape: dict[tuple, list[tuple[AtomDelta, str]]] = defaultdict(list)
    for delta, name in members:
        delta.forget_group()
        layer = delta._layer() if delta._layer is not None else None
        kind = group_kind(delta)
        if kind is not None and layer is not None:
            by_shape[(name, kind, tuple(layer.base_layer.weight.shape), tuple(delta.atoms0.shape))].append((delta, name))
    groups = 0
    for (_, kind, _, _), found in by_shape.items():
        if len(found) > 1:
            group = WeightGroup(kind)
            for delta, name in found:
                group.add(delta, name)
            groups += 1
    return groups


def set_grouped_builds(model: nn.Module, enabled: bool) -> int:
    """Build the training weights of `model`'s same-shaped filter-atom layers together (the default) or one by one.

    Returns the number of groups formed (0 when disabled).
    """
    members = [(delta, name) for layer in model.modules() if isinstance(layer, AdaptedLayer)
               for name, delta in layer.deltas.items() if isinstance(delta, AtomDelta)]
    if not enabled:
        for delta, _ in members:
            delta.forget_group()
        return 0
    return form_groups(members)


def weight_groups(model: nn.Module) -> list[WeightGroup]:
    """The groups `model`'s filter-atom layers build their training weights in (each once)."""
    found: dict[int, WeightGroup] = {}
    for module in model.modules():
        slot = module.__dict__.get("_group_slot") if isinstance(module, AtomDelta) else None
        if slot is not None:
            found.setdefault(id(slot[0]), slot[0])
    return list(found.values())
