"""Benchmark: filter atoms against peft's LoRA (and LieRA) on the same UNet and the same target layers.

Every method is measured by `measure_method`, meant to run in a fresh process (`python -m benchmarks.run`
starts one per method) so that memory peaks never mix. It reports the median training step
(forward, backward, AdamW step), the peak memory of the training phase, AdamW's state, the adapter
file, the time to load and fuse it (and to load and merge it for good), and the sampling step (one UNet call with
the classifier-free guidance batch) unfused and fused, each next to the bare base UNet measured in the same process.
`measure_decomposition` times the whole-UNet decomposition with and without the cache.

The functions return plain dicts; printing and files are the script's job.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from filteratom_sd.core.adapter_file import save_adapter
from filteratom_sd.core.api import fuse_adapter, load_adapter, merge_and_unload, unfuse_adapter, unload_adapter
from filteratom_sd.core.fast_paths import compiled
from filteratom_sd.core.fingerprint import forget_signatures
from filteratom_sd.core.inject import add_adapter, remove_adapter
from filteratom_sd.core.layer import set_train_path, set_weight_recompute
from filteratom_sd.filter_atoms.cache import cache_key, decompose_unet
from filteratom_sd.filter_atoms.config import FilterAtomConfig
from filteratom_sd.filter_atoms.method import FilterAtomMethod, add_filter_atoms
from filteratom_sd.filter_atoms.targets import select_targets
from filteratom_sd.methods.registry import method_class
from filteratom_sd.models import build_unet as unet_from_config
from filteratom_sd.resources import shipped_config
from filteratom_sd.tiny.bundled import bundled_model_path

METHODS = ("base", "C1", "C2", "C3", "lora-r4", "lora-r16", "liera-r4")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTION = ("sdpa", "math", "xformers")


@dataclass
class BenchSettings:
    """What is measured and how (all of it goes into the JSON report)."""

    model: str = "sd-v1-4"  # "sd-v1-4" (its config, random weights), "tiny" (the bundled UNet) or a UNet folder
    resolution: int = 64  # image pixels; the latents are resolution / VAE factor
    batch_size: int = 1  # training batch; sampling uses 2x (classifier-free guidance)
    dtype: str = "fp32"  # base weights; adapter parameters stay fp32 and autocast runs the forward
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    device: str = "auto"
    train_steps: int = 5
    sample_steps: int = 5
    warmup: int = 1
    rounds: int = 3  # load / unfused / fused / base rounds, interleaved
    seed: int = 0
    lr: float = 1e-4
    threads: int | None = None
    channels_last: bool = False  # GPU only
    cudnn_benchmark: bool = False  # GPU only
    train_path: str = "auto"  # adapted layers' training path: "auto", "activations" or "weight" (for ablations)
    recompute_weights: bool = False  # rebuild each W_eff in the backward, as the trainer does with gradient checkpointing
    compile: str | None = None  # torch.compile mode of the training steps (inductor), None for eager
    profile: bool = False  # add a torch.profiler table of one training step to the report
    cache_dir: str | None = None  # decomposition cache (a fresh temporary folder when None)
    work_dir: str | None = None  # where adapter files are written

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# --------------------------------------------------------------------------- environment


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_info(device: torch.device) -> dict[str, Any]:
    """CPU model, threads, load averages and GPU (when used)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _busy_jiffies() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_jiffies() -> int:
    parts = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])  # utime + stime, all threads


class ForeignLoad:
    """CPU cores used by *other* processes while timed code runs (Linux /proc; None elsewhere)."""

    def __init__(self) -> None:
        self.foreign = 0
        self.total = 0
        self.available = Path("/proc/stat").is_file()

    @contextmanager
    def measure(self) -> Iterator[None]:
        if not self.available:
            yield
            return
        busy0, total0 = _busy_jiffies()
        own0 = _own_jiffies()
        try:
            yield
        finally:
            busy1, total1 = _busy_jiffies()
            self.foreign += (busy1 - busy0) - (_own_jiffies() - own0)
            self.total += total1 - total0

    def cores(self) -> float | None:
        """Average number of cores busy with other work during the measured sections."""
        if not self.available or self.total == 0:
            return None
        return round(max(self.foreign, 0) * (os.cpu_count() or 1) / self.total, 2)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Seconds one call takes, with the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _return_free_heap() -> None:
    """Hand glibc's free heap pages back to the OS (malloc_trim); nothing where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of one phase: CUDA max allocated, or the process's RSS high-water mark on the CPU.

    On Linux the RSS high-water mark is reset at the start of the phase (/proc/self/clear_refs),
    so the build and injection before it do not count; where that is refused, the whole
    process's peak (ru_maxrss) is reported and `scope` says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.scope = "phase"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _return_free_heap()  # freed memory of earlier phases (a decomposition) would otherwise still count as resident
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.scope = "process"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.scope == "phase":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def current_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


# --------------------------------------------------------------------------- model and inputs


def _unet_folder(model: str) -> Path | None:
    if model == "sd-v1-4":
        return None
    return bundled_model_path() / "unet" if model == "tiny" else Path(model)


def build_unet(settings: BenchSettings, device: torch.device) -> nn.Module:
    """The base UNet (seeded random weights for "sd-v1-4"), frozen, on the device, in the dtype."""
    from diffusers import UNet2DConditionModel

    folder = _unet_folder(settings.model)
    torch.manual_seed(settings.seed)
    if folder is None:
        # initialise the 860M weights where they will live: no 3.4 GB host copy to the GPU
        unet = unet_from_config(shipped_config("model", "sd-v1-4-unet"), device=device)
    else:
        unet = UNet2DConditionModel.from_pretrained(str(folder))
    unet.requires_grad_(False)
    unet.to(device=device, dtype=settings.torch_dtype())
    if settings.channels_last and device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    set_attention(unet, settings.attention)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.eval()


def set_attention(unet: nn.Module, backend: str) -> None:
    """sdpa: torch's scaled_dot_product_attention; math: the plain softmax(QK^T)V; xformers: memory-efficient."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif backend == "math":
        unet.set_attn_processor(AttnProcessor())
    elif backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        raise ValueError(f"unknown attention backend {backend!r}")


def latent_geometry(settings: BenchSettings) -> tuple[int, int]:
    """(latent edge, text length) for the model: VAE factor 8 and 77 tokens for SD, the tiny model's own."""
    folder = _unet_folder(settings.model)
    factor, tokens = 8, 77
    if folder is not None:
        vae = folder.parent / "vae" / "config.json"
        text = folder.parent / "text_encoder" / "config.json"
        if vae.is_file():
            factor = 2 ** (len(json.loads(vae.read_text())["block_out_channels"]) - 1)
        if text.is_file():
            tokens = int(json.loads(text.read_text()).get("max_position_embeddings", tokens))
    return max(settings.resolution // factor, 1), tokens


def make_inputs(unet: nn.Module, settings: BenchSettings, device: torch.device, batch: int) -> dict[str, torch.Tensor]:
    edge, tokens = latent_geometry(settings)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    cfg = unet.config
    dtype = settings.torch_dtype()
    latents = torch.randn(batch, cfg.in_channels, edge, edge, generator=gen)
    inputs = {
        "sample": latents.to(device=device, dtype=dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen).to(device),
        "encoder_hidden_states": torch.randn(batch, tokens, cfg.cross_attention_dim, generator=gen).to(device, dtype),
        "target": torch.randn(batch, cfg.out_channels, edge, edge, generator=gen).to(device),
    }
    if settings.channels_last and device.type == "cuda":
        inputs["sample"] = inputs["sample"].to(memory_format=torch.channels_last)
    return inputs


def autocast(settings: BenchSettings, device: torch.device):
    """Mixed precision as the diffusers trainers run it: fp32 adapter weights, low-precision compute."""
    if settings.dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=settings.torch_dtype())


# --------------------------------------------------------------------------- methods


def default_targets(unet: nn.Module) -> list[str]:
    """The filter-atom default targets (the same for C1-C3), used for every method."""
    return list(select_targets(unet, FilterAtomConfig.preset("C2"))[0])


class MethodHarness:
    """add (trainable) / save / load (frozen) / fuse / unfuse / unload for one benchmarked method."""

    def __init__(self, name: str, settings: BenchSettings) -> None:
        self.name = name
        self.settings = settings

    @property
    def kind(self) -> str:
        if self.name.startswith("lora"):
            return "peft-lora"
        if self.name.startswith("liera"):
            return "liera"
        return "filter-atoms" if self.name != "base" else "base"

    @property
    def rank(self) -> int:
        return int(self.name.rsplit("-r", 1)[1])

    def _lora_config(self, unet: nn.Module):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=default_targets(unet), init_lora_weights=True)

    def _method(self):
        if self.kind == "filter-atoms":
            return FilterAtomMethod(FilterAtomConfig.preset(self.name), compute_dtype=torch.float32)
        return method_class("liera").from_config_dict({"rank": self.rank})

    def add(self, unet: nn.Module) -> list[nn.Parameter]:
        """Attach a fresh trainable adapter; returns its parameters (fp32)."""
        if self.kind == "base":
            return []
        if self.kind == "peft-lora":
            from peft import inject_adapter_in_model

            inject_adapter_in_model(self._lora_config(unet), unet, adapter_name="default")
            params = []
            for name, p in unet.named_parameters():
                p.requires_grad_("lora_" in name)
                if p.requires_grad:
                    p.data = p.data.float()
                    params.append(p)
            return params
        add_adapter(unet, self._method(), "default")
        return [p for p in unet.parameters() if p.requires_grad]

    def save(self, unet: nn.Module, path: Path) -> Path:
        if self.kind == "peft-lora":
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
            save_file(state, str(path))
            return path
        return save_adapter(unet, path)

    def load(self, unet: nn.Module, path: Path) -> None:
        if self.kind == "peft-lora":
            from peft import inject_adapter_in_model, set_peft_model_state_dict
            from safetensors.torch import load_file

            inject_adapter_in_model(self._lora_config(unet), unet, adapter_name="default")
            set_peft_model_state_dict(unet, load_file(str(path), device=str(unet.device)))
            unet.requires_grad_(False)
            return
        load_adapter(unet, path, adapter_name="default")

    def fuse(self, unet: nn.Module) -> None:
        if self.kind == "peft-lora":
            for layer in _peft_layers(unet):
                layer.merge()
            return
        fuse_adapter(unet)

    def unfuse(self, unet: nn.Module) -> None:
        if self.kind == "peft-lora":
            for layer in _peft_layers(unet):
                layer.unmerge()
            return
        unfuse_adapter(unet)

    def merge_and_unload(self, unet: nn.Module) -> None:
        """Fuse for good (no unfuse), as a sampling process that never switches adapters does."""
        if self.kind == "peft-lora":
            for layer in _peft_layers(unet):
                layer.merge()  # peft's merge adds into the base weight in place
            _remove_peft_layers(unet)
            return
        merge_and_unload(unet)

    def unload(self, unet: nn.Module) -> None:
        if self.kind == "peft-lora":
            for layer in _peft_layers(unet):
                if layer.merged:
                    layer.unmerge()
            _remove_peft_layers(unet)
            return
        unload_adapter(unet)


def _remove_peft_layers(unet: nn.Module) -> None:
    """Put each peft layer's base layer back in its place (merged weights stay merged)."""
    layers = {id(m) for m in _peft_layers(unet)}
    for name in [n for n, m in unet.named_modules() if id(m) in layers]:
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, child, unet.get_submodule(name).get_base_layer())
    if hasattr(unet, "peft_config"):
        del unet.peft_config


def _peft_layers(unet: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def _perturb(params: list[nn.Parameter], seed: int) -> None:
    """Give every adapter parameter a trained-looking non-zero value (so fuse and the file are realistic)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * 1e-3)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t) and t.dim() > 0)


# --------------------------------------------------------------------------- measurements


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def decompose_if_needed(unet: nn.Module, preset: str, cache_dir: Path) -> float | None:
    """Write the decomposition cache entry for `preset` when it is missing; seconds taken (None: was cached)."""
    config = FilterAtomConfig.preset(preset)
    targets = default_targets(unet)
    if (cache_dir / f"{cache_key(unet, config, targets)}.safetensors").is_file():
        return None
    start = time.perf_counter()
    decompose_unet(unet, config, cache_dir=cache_dir)
    return time.perf_counter() - start


def profile_table(device: torch.device, step: Callable[[], Any], rows: int = 15) -> str:
    """torch.profiler's table of one call, operators sorted by their own time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def training_step(unet: nn.Module, params: list[nn.Parameter], settings: BenchSettings,
                  device: torch.device) -> tuple[Callable[[], None], torch.optim.Optimizer | None]:
    """One AdamW step of `params` on `unet` in training mode (with no parameters: the frozen UNet's forward and
    backward to its input), compiled as `settings` asks; returns the step and its optimizer."""
    inputs = make_inputs(unet, settings, device, settings.batch_size)
    optimizer = torch.optim.AdamW(params, lr=settings.lr) if params else None
    sample = inputs["sample"].clone().requires_grad_(not params)
    unet.train()
    train_unet = unet
    if settings.compile is not None:  # every method the same way, so LoRA gets the same help
        train_unet = compiled(unet, settings.compile)

    def step() -> None:
        with autocast(settings, device):
            pred = train_unet(sample, inputs["timestep"], inputs["encoder_hidden_states"]).sample
        F.mse_loss(pred.float(), inputs["target"]).backward()
        if optimizer is None:
            sample.grad = None
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def measure_method(method: str, settings: BenchSettings) -> dict[str, Any]:
    """Every number of one method (see the module docstring); run it in a fresh process."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    harness = MethodHarness(method, settings)
    load = ForeignLoad()
    memory = PeakMemory(device)
    work = Path(settings.work_dir or tempfile.mkdtemp(prefix="fa-bench-"))
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else work / "decompositions"
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["FILTERATOM_SD_CACHE_DIR"] = str(cache_dir)
    out: dict[str, Any] = {"method": method, "device": device_info(device)}

    start = time.perf_counter()
    unet = build_unet(settings, device)
    out["build_s"] = time.perf_counter() - start
    out["base_bytes"] = sum(p.numel() * p.element_size() for p in unet.parameters())
    if harness.kind == "filter-atoms":
        out["decompose_s"] = decompose_if_needed(unet, method, cache_dir)

    # ---- training
    start = time.perf_counter()
    params = harness.add(unet)
    out["inject_s"] = time.perf_counter() - start
    set_train_path(unet, settings.train_path)
    set_weight_recompute(unet, settings.recompute_weights or settings.gradient_checkpointing)
    out["trainable_params"] = sum(p.numel() for p in params)
    train_step, optimizer = training_step(unet, params, settings, device)

    memory.start()
    out["memory_before_train_bytes"] = memory.current_bytes()
    step_times = []
    # compiling takes the first step; CUDA graphs are recorded over the next ones
    warmup = max(settings.warmup, 3) if settings.compile is not None else settings.warmup
    with load.measure():
        for i in range(warmup + settings.train_steps):
            seconds = timed(device, train_step)
            if i == 0:
                out["first_step_s"] = seconds
            if i >= warmup:
                step_times.append(seconds)
    if settings.profile:
        out["profile"] = profile_table(device, train_step)
    out["train_step_s"] = _median(step_times)
    out["train_step_all_s"] = step_times
    out["peak_train_bytes"] = memory.peak_bytes()
    out["peak_scope"] = memory.scope
    out["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    unet.eval()
    del optimizer

    # ---- adapter file, then load / sample rounds
    sample_inputs = make_inputs(unet, settings, device, 2 * settings.batch_size)
    with torch.no_grad():
        _perturb(params, settings.seed)
    path = None
    if params:
        path = harness.save(unet, work / f"{method}.safetensors")
        out["adapter_file_bytes"] = path.stat().st_size
        harness.unload(unet)
    del params
    gc.collect()

    def sample_step() -> None:
        with torch.no_grad(), autocast(settings, device):
            unet(sample_inputs["sample"], sample_inputs["timestep"], sample_inputs["encoder_hidden_states"])

    def sample_times() -> tuple[float, list[float]]:
        first = timed(device, sample_step)
        for _ in range(settings.warmup - 1):
            timed(device, sample_step)
        return first, [timed(device, sample_step) for _ in range(settings.sample_steps)]

    base, unfused, fused, unfused_first, loads, fuses = [], [], [], [], [], []
    with load.measure():
        for _ in range(settings.rounds):
            base.extend(sample_times()[1])
            if path is None:
                continue
            forget_signatures()  # the load pays for reading the base's fingerprint, as in a fresh process
            loads.append(timed(device, lambda: harness.load(unet, path)))
            first, times = sample_times()
            unfused_first.append(first)
            unfused.extend(times)
            fuses.append(timed(device, lambda: harness.fuse(unet)))
            fused.extend(sample_times()[1])
            harness.unload(unet)
        if path is not None:  # last: the base weights stay merged
            forget_signatures()
            out["load_merge_s"] = timed(device, lambda: harness.load(unet, path)) + \
                timed(device, lambda: harness.merge_and_unload(unet))
    out.update(
        sample_base_s=_median(base),
        sample_unfused_s=_median(unfused),
        sample_unfused_first_s=_median(unfused_first),
        sample_fused_s=_median(fused),
        load_s=_median(loads),
        fuse_s=_median(fuses),
        load_fuse_s=_median([a + b for a, b in zip(loads, fuses)]),
        foreign_cores=load.cores(),
        load_average_end=list(os.getloadavg()),
    )
    return out


def measure_decomposition(settings: BenchSettings, presets: tuple[str, ...] = ("C2", "C3")) -> dict[str, Any]:
    """Whole-UNet decomposition time without the cache (writing it) and injection time reading it."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    load = ForeignLoad()
    unet = build_unet(settings, device)
    out: dict[str, Any] = {"device": device_info(device), "presets": {}}
    for preset in presets:
        config = FilterAtomConfig.preset(preset)
        with tempfile.TemporaryDirectory(prefix="fa-decomp-") as tmp:
            os.environ["FILTERATOM_SD_CACHE_DIR"] = tmp
            with load.measure():
                start = time.perf_counter()
                reports, path = decompose_unet(unet, config, cache_dir=Path(tmp))
                uncached = time.perf_counter() - start
                start = time.perf_counter()
                add_filter_atoms(unet, config)
                cached = time.perf_counter() - start
            remove_adapter(unet, "default")
            by_layout: dict[str, float] = {}
            for r in reports.values():
                by_layout[r.layout] = by_layout.get(r.layout, 0.0) + r.seconds
            out["presets"][preset] = {
                "layers": len(reports),
                "decompose_unet_s": uncached,
                "seconds_by_layout": by_layout,
                "inject_from_cache_s": cached,
                "cache_file_bytes": path.stat().st_size,
                "worst_relative_error": max(r.relative_error for r in reports.values()),
            }
    out["foreign_cores"] = load.cores()
    out["load_average_end"] = list(os.getloadavg())
    return out


# --------------------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def _kb(value: int | None) -> str:
    return "–" if value is None else f"{value / 1024:,.1f}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per method; ratios against the floor (frozen UNet), LoRA r=4 and the base sampling step."""
    lora = results.get("lora-r4", {})
    floor = results.get("base", {})
    header = ("| method | trainable | train step (s) | first step (s) | × floor | × LoRA r=4 | peak train mem (MB) "
              "| × LoRA r=4 | AdamW state (KB) | adapter file (KB) | load + fuse (s) | load + merge (s) "
              "| sample unfused (s) | × base "
              "| sample fused (s) | × base |")
    rows = [header, "|" + "|".join(["---"] + ["---:"] * 15) + "|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | {r['error']} |" + " |" * 14)
            continue
        mb = r["peak_train_bytes"] / 2**20
        rows.append(
            f"| {name} | {r['trainable_params']:,} | {_fmt(r['train_step_s'])} | {_fmt(r.get('first_step_s'))} "
            f"| {_ratio(r['train_step_s'], floor.get('train_step_s'))} "
            f"| {_ratio(r['train_step_s'], lora.get('train_step_s'))} | {mb:,.0f} "
            f"| {_ratio(r['peak_train_bytes'], lora.get('peak_train_bytes'))} | {r['optimizer_state_bytes'] / 1024:,.1f} "
            f"| {_kb(r.get('adapter_file_bytes'))} "
            f"| {_fmt(r.get('load_fuse_s'))} | {_fmt(r.get('load_merge_s'))} | {_fmt(r.get('sample_unfused_s'))} "
            f"| {_ratio(r.get('sample_unfused_s'), r.get('sample_base_s'))} | {_fmt(r.get('sample_fused_s'))} "
            f"| {_ratio(r.get('sample_fused_s'), r.get('sample_base_s'))} |"
        )
    return "\n".join(rows)


def settings_dict(settings: BenchSettings) -> dict[str, Any]:
    return asdict(settings)


__all__ = [
    "METHODS",
    "BenchSettings",
    "markdown_table",
    "measure_decomposition",
    "measure_method",
    "settings_dict",
]
