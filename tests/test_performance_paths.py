"""The fast paths stay exact: weight cache invalidation, rebuilt-weight backward, derived alpha,
batched decomposition and the fused path (timings live in scripts/benchmark.py, not here)."""

import copy
import pickle

import pytest
import torch
from torch import nn

from filteratom_sd import FilterAtomConfig, add_filter_atoms, fuse_adapter, set_adapter_scale, unfuse_adapter
from filteratom_sd.filter_atoms.functional import atoms_from_gram, gram_matrix, svd_atoms
from filteratom_sd.core.layer import AdaptedLayer, WeightDelta, set_train_path, set_weight_cache, set_weight_recompute
from filteratom_sd.filter_atoms.delta import AtomDelta
from filteratom_sd.filter_atoms.decomposition import decompose_layer, decompose_layers

from .tiny_unet import make_inputs, make_unet, run

CONV = "down_blocks.0.resnets.0.conv1"
LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def adapted_unet(preset="C2", seed=3):
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig.preset(preset))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return unet


def adapted_layers(unet):
    return [m for m in unet.modules() if isinstance(m, AdaptedLayer)]


def uncached(unet, inputs):
    """The same model's output with every cache bypassed (weights rebuilt from scratch)."""
    set_weight_cache(unet, False)
    try:
        return run(unet, inputs)
    finally:
        set_weight_cache(unet, True)


def count_weight_builds(monkeypatch):
    calls = []
    original = AdaptedLayer.effective_weight_and_bias

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AdaptedLayer, "effective_weight_and_bias", counting)
    return calls


# --------------------------------------------------------------------------- the eval-mode weight cache


def test_eval_forward_builds_each_weight_once(monkeypatch):
    unet, inputs = adapted_unet(), make_inputs()
    calls = count_weight_builds(monkeypatch)
    first = run(unet, inputs)
    built = len(calls)
    assert built == len(adapted_layers(unet))
    torch.testing.assert_close(run(unet, inputs), first, atol=0, rtol=0)
    assert len(calls) == built  # the second call reused every cached weight
    torch.testing.assert_close(first, uncached(unet, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("preset", ["C1", "C2", "C3", "C4"])
def test_cache_is_invalidated_by_an_optimizer_step(preset):
    unet, inputs = adapted_unet(preset), make_inputs()
    before = run(unet, inputs)  # fills the cache
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    unet.train()
    unet(*inputs).sample.pow(2).mean().backward()
    optimizer.step()
    unet.eval()
    after = run(unet, inputs)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, uncached(unet, inputs), atol=1e-6, rtol=0)


def test_cache_is_invalidated_by_in_place_edits_scale_and_dtype():
    unet, inputs = adapted_unet(), make_inputs()
    run(unet, inputs)
    delta = unet.get_submodule(CONV).deltas["default"]
    with torch.no_grad():
        delta.delta_atoms.mul_(3.0)
    edited = run(unet, inputs)
    torch.testing.assert_close(edited, uncached(unet, inputs), atol=0, rtol=0)
    set_adapter_scale(unet, 0.3)
    scaled = run(unet, inputs)
    assert (scaled - edited).abs().max() > 1e-4
    torch.testing.assert_close(scaled, uncached(unet, inputs), atol=0, rtol=0)
    unet.double()
    doubled = run(unet, tuple(t.double() if t.is_floating_point() else t for t in inputs))
    assert doubled.dtype == torch.float64
    torch.testing.assert_close(doubled.float(), scaled, atol=1e-5, rtol=0)


def test_cache_follows_a_replaced_update_and_new_base_storage():
    unet, inputs = adapted_unet(), make_inputs()
    first = run(unet, inputs)
    layer = unet.get_submodule(CONV)
    other = copy.deepcopy(layer.deltas["default"])
    with torch.no_grad():
        other.delta_atoms.mul_(-4.0)
    layer.deltas["default"] = other  # put in the ModuleDict directly, not through add_delta
    other.attach(layer)
    replaced = run(unet, inputs)
    assert (replaced - first).abs().max() > 1e-4
    torch.testing.assert_close(replaced, uncached(unet, inputs), atol=0, rtol=0)
    layer.base_layer.weight.data = 1.5 * layer.base_layer.weight.data  # new storage, same version counter
    rescaled = run(unet, inputs)
    assert (rescaled - replaced).abs().max() > 1e-4
    torch.testing.assert_close(rescaled, uncached(unet, inputs), atol=0, rtol=0)


def test_no_cache_is_kept_in_training():
    unet, inputs = adapted_unet(), make_inputs()
    run(unet, inputs)
    assert all(layer._cached is not None for layer in adapted_layers(unet))
    unet.train()
    unet(*inputs).sample.mean().backward()
    assert all(layer._cached is None for layer in adapted_layers(unet))
    with torch.no_grad():
        unet(*inputs)  # train mode without gradients (e.g. a first checkpointing pass) caches nothing
    assert all(layer._cached is None for layer in adapted_layers(unet))


# --------------------------------------------------------------------------- training: the rebuilt-weight backward


PATHS = {  # (training path, weight recompute): the fast training paths and plain autograd as the reference
    "activations": ("activations", True),
    "rebuilt": ("weight", True),
    "plain": ("weight", False),
}


def use_path(unet, path):
    train_path, recompute = PATHS[path]
    set_train_path(unet, train_path)
    set_weight_recompute(unet, recompute)


def gradients(unet, inputs, path, autocast_dtype=None):
    use_path(unet, path)
    unet.train()
    unet.zero_grad(set_to_none=True)
    sample = inputs[0].clone().requires_grad_(True)
    context = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with context:
        out = unet(sample, *inputs[1:]).sample
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    return out.detach(), grads, sample.grad.clone()


@pytest.mark.parametrize("path", ["activations", "rebuilt"])
@pytest.mark.parametrize("preset", ["C1", "C2", "C3", "C4"])
def test_fast_training_paths_match_plain_autograd(preset, path):
    unet, inputs = adapted_unet(preset), make_inputs()
    out, grads, input_grad = gradients(unet, inputs, path)
    ref_out, ref_grads, ref_input_grad = gradients(unet, inputs, "plain")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(input_grad, ref_input_grad, atol=1e-7, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("path", ["activations", "rebuilt"])
def test_fast_training_paths_under_autocast(path):
    unet, inputs = adapted_unet("C2"), make_inputs()
    out, grads, _ = gradients(unet, inputs, path, autocast_dtype=torch.bfloat16)
    ref_out, ref_grads, _ = gradients(unet, inputs, "plain", autocast_dtype=torch.bfloat16)
    assert out.dtype == ref_out.dtype
    torch.testing.assert_close(out.float(), ref_out.float(), atol=0.05, rtol=0.05)
    for name in grads:
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-3, rtol=0.1)


def saved_weight_shapes(unet, inputs):
    """Shapes of adapted layers' weights among the tensors autograd keeps for the backward."""
    unet.train()
    weight_shapes = {tuple(layer.base_layer.weight.shape) for layer in adapted_layers(unet)}
    saved = []

    def pack(t):
        if not isinstance(t, nn.Parameter):
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(*inputs).sample
    out.mean().backward()
    return weight_shapes & set(saved)


def inputs_unlike_weights():
    """make_inputs with 12 x 12 latents: no activation's rows (2 x 144, 2 x 36, 2 x 9, 2 x 7) match a weight's shape."""
    _, timesteps, text = make_inputs()
    return torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(5)), timesteps, text


@pytest.mark.parametrize("path", ["activations", "rebuilt"])
def test_training_keeps_no_weight_sized_tensor_for_backward(path):
    unet, inputs = adapted_unet("C2"), inputs_unlike_weights()
    use_path(unet, path)
    assert not saved_weight_shapes(unet, inputs)


def test_weight_recompute_is_off_by_default_and_switchable():
    unet, inputs = adapted_unet("C2"), inputs_unlike_weights()
    set_train_path(unet, "weight")
    assert saved_weight_shapes(unet, inputs)  # fast default: W_eff kept for the backward
    set_weight_recompute(unet, True)
    assert all(layer.recompute_weights for layer in adapted_layers(unet))
    assert not saved_weight_shapes(unet, inputs)


# --------------------------------------------------------------------------- derived alpha


@pytest.mark.parametrize("m1", [None, 2])
def test_derived_alpha_gives_the_stored_alpha_update(m1):
    torch.manual_seed(0)
    weight = torch.randn(6, 5, 3, 3)
    found = decompose_layer(weight, "conv", FilterAtomConfig(m=7))
    stored = AtomDelta(found.alpha, found.atoms0, "conv", m1=m1)
    derived = AtomDelta(None, found.atoms0, "conv", m1=m1, coefficient_shape=(6, 5))
    for param in stored.parameters():
        nn.init.normal_(param)
    derived.load_state_dict(stored.state_dict())
    torch.testing.assert_close(derived.coefficients(weight), stored.alpha)
    torch.testing.assert_close(derived.delta_weight(weight), stored.delta_weight(weight), atol=1e-5, rtol=1e-5)
    acc = torch.randn_like(weight)
    torch.testing.assert_close(derived.add_to(acc, weight, 0.7), stored.add_to(acc, weight, 0.7), atol=1e-5, rtol=1e-5)
    assert sum(b.numel() for b in derived.buffers()) < weight.numel() // 4


def test_c2_convolutions_store_no_alpha_and_survive_copies():
    unet = adapted_unet("C2")
    conv = unet.get_submodule(CONV)
    assert conv.deltas["default"].derived and not unet.get_submodule(LINEAR).deltas["default"].derived
    expected = conv.deltas["default"].alpha
    for clone in (copy.deepcopy(unet), pickle.loads(pickle.dumps(unet))):
        torch.testing.assert_close(clone.get_submodule(CONV).deltas["default"].alpha, expected, atol=0, rtol=0)
        torch.testing.assert_close(run(clone, make_inputs()), run(unet, make_inputs()), atol=0, rtol=0)


# --------------------------------------------------------------------------- batched decomposition


def test_batched_eigendecomposition_equals_one_by_one():
    torch.manual_seed(0)
    rows = [torch.randn(200, 9) for _ in range(3)]
    batched = atoms_from_gram(torch.stack([gram_matrix(r) for r in rows]), 6)
    for r, atoms in zip(rows, batched):
        torch.testing.assert_close(atoms, svd_atoms(r, 6), atol=1e-12, rtol=0)


@pytest.mark.parametrize("preset", ["C1", "C2"])
def test_batched_layer_decomposition_equals_per_layer(preset):
    unet, config = make_unet(), FilterAtomConfig.preset(preset)
    from filteratom_sd.filter_atoms.targets import select_targets

    targets, _ = select_targets(unet, config)
    weights = {t: (unet.get_submodule(t).weight, layout) for t, layout in targets.items()}
    batched = decompose_layers(weights, config)
    assert batched.keys() == weights.keys()
    for name, (weight, layout) in weights.items():
        single = decompose_layer(weight, layout, config)
        torch.testing.assert_close(batched[name].atoms0, single.atoms0, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched[name].alpha, single.alpha, atol=1e-6, rtol=0)
        assert batched[name].relative_error == pytest.approx(single.relative_error, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- fused path


def test_fused_forward_calls_the_base_layer_directly(monkeypatch):
    unet, inputs = adapted_unet("C2"), make_inputs()
    expected = run(unet, inputs)
    fuse_adapter(unet)

    def forbidden(*args, **kwargs):
        raise AssertionError("a fused layer built a weight")

    monkeypatch.setattr(WeightDelta, "add_to", forbidden)
    monkeypatch.setattr(AtomDelta, "add_to", forbidden)
    monkeypatch.setattr(AdaptedLayer, "effective_weight_and_bias", forbidden)
    base_calls = []
    for layer in adapted_layers(unet):
        layer.base_layer.register_forward_hook(lambda module, args, out: base_calls.append(module))
    torch.testing.assert_close(run(unet, inputs), expected, atol=1e-5, rtol=0)
    assert len(base_calls) == len(adapted_layers(unet))
    monkeypatch.undo()
    unfuse_adapter(unet)
    torch.testing.assert_close(run(unet, inputs), expected, atol=1e-5, rtol=0)


def test_fuse_unfuse_is_bit_exact_and_follows_dtype_moves():
    unet = adapted_unet("C2")
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in
                 ((n, m) for n, m in unet.named_modules() if isinstance(m, AdaptedLayer))}
    fuse_adapter(unet)
    assert any(not torch.equal(unet.get_submodule(n).base_layer.weight, w) for n, w in originals.items())
    unfuse_adapter(unet)
    assert all(torch.equal(unet.get_submodule(n).base_layer.weight, w) for n, w in originals.items())
    fuse_adapter(unet)
    unet.double()  # the exact copy of W moves with the fused weight
    unfuse_adapter(unet)
    assert all(torch.equal(unet.get_submodule(n).base_layer.weight, w.double()) for n, w in originals.items())
