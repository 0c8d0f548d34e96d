"""The decomposition cache: written once per base and config, used only for those weights."""

import pytest
import torch

from filteratom_sd import FilterAtomConfig, add_filter_atoms, decompose_unet, load_adapter, save_adapter
from filteratom_sd.filter_atoms.cache import CACHE_ENV, cached_decompositions
from filteratom_sd.filter_atoms.targets import select_targets

from .tiny_unet import make_inputs, make_unet, run


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_decompose_unet_reports_every_target_and_writes_one_entry(cache_dir):
    config = FilterAtomConfig.preset("C2")
    unet = make_unet()
    reports, path = decompose_unet(unet, config)
    targets, _ = select_targets(unet, config)
    assert list(reports) == list(targets)
    assert all(0 <= r.relative_error < 1 and r.seconds >= 0 for r in reports.values())
    assert all(r.relative_error < 1e-6 for r in reports.values() if r.layout == "conv")  # m = 9 = k*k is exact
    assert path.parent == cache_dir and list(cache_dir.iterdir()) == [path]


def test_cached_alpha_is_used_and_gives_the_same_model(cache_dir, monkeypatch):
    config = FilterAtomConfig.preset("C1")
    inputs = make_inputs()
    uncached = make_unet()
    add_filter_atoms(uncached, config)
    decompose_unet(make_unet(), config)
    import filteratom_sd.filter_atoms.method as fa

    calls = []
    for name in ("decompose_layer", "decompose_layers"):
        original = getattr(fa, name)
        monkeypatch.setattr(fa, name, lambda *a, _original=original, **k: calls.append(1) or _original(*a, **k))
    cached = make_unet()
    add_filter_atoms(cached, config)
    assert calls == []  # nothing was decomposed again
    for name, module in uncached.named_modules():
        if hasattr(module, "deltas"):
            other = cached.get_submodule(name).deltas["default"]
            torch.testing.assert_close(other.alpha, module.deltas["default"].alpha)
    torch.testing.assert_close(run(cached, inputs), run(uncached, inputs))


def test_cache_entries_never_apply_to_other_weights_or_configs(cache_dir):
    config = FilterAtomConfig.preset("C1")
    decompose_unet(make_unet(), config)
    targets = list(select_targets(make_unet(), config)[0])
    assert cached_decompositions(make_unet(), config, targets) is not None
    assert cached_decompositions(make_unet(seed=5), config, targets) is None
    assert cached_decompositions(make_unet(), FilterAtomConfig.preset("C2"), targets) is None


def test_loading_an_adapter_uses_the_cache_when_its_atoms_match(cache_dir, tmp_path):
    config = FilterAtomConfig.preset("C1")
    trained = make_unet()
    add_filter_atoms(trained, config)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    path = save_adapter(trained, tmp_path / "a.safetensors")
    decompose_unet(make_unet(), config)
    fresh = make_unet()
    load_adapter(fresh, path)
    torch.testing.assert_close(run(fresh, make_inputs()), run(trained, make_inputs()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_an_entry_whose_alpha_is_not_finite_is_not_used(cache_dir, bad):
    from safetensors.torch import load_file, save_file

    config = FilterAtomConfig.preset("C1")
    _, path = decompose_unet(make_unet(), config)
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".alpha"))
    tensors[key].view(-1)[tensors[key].numel() // 2] = bad
    save_file(tensors, str(path))
    targets = list(select_targets(make_unet(), config)[0])
    assert cached_decompositions(make_unet(), config, targets) is None
    assert not path.exists()


def test_cached_block_alpha_is_read_in_the_order_the_layers_keep_it(cache_dir):
    config = FilterAtomConfig.preset("C1")
    found, _ = decompose_unet(make_unet(), config)
    cached = cached_decompositions(make_unet(), config, list(found))
    blocks = [name for name, layer in found.items() if layer.layout == "blocks" and layer.alpha is not None]
    assert blocks
    for name in blocks:
        alpha = cached[name].alpha
        assert torch.equal(alpha, found[name].alpha.float())
        assert alpha.permute(0, 2, 1).is_contiguous()  # (a, m, b) in memory: AtomDelta keeps it without a copy
