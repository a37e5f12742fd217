"""Every private torch / transformers API lorafit touches, in one place, each behind a guard with a fallback.

A torch or transformers release may rename or drop any of these; when it does, the guard here turns the
feature off (or takes the public route) instead of failing at import, and this file is the one to update.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# ---- dispatch modes (torch.utils._python_dispatch, torch ≥ 2.0) ---------------------------------------------
# MemTracker (``lorafit measure``) is a TorchDispatchMode: kernels ask whether one is watching, and run their
# compiled form out of its sight (``lorafit.kernels.compiled.unseen``).
try:
    from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode
except ImportError:  # pragma: no cover - a torch without them: no tracker can be detected, nothing to hide from
    _get_current_dispatch_mode = None
    _disable_current_modes = None


def dispatch_mode_active() -> bool:
    """Whether a TorchDispatchMode (a memory tracker) is watching the current thread."""
    return _get_current_dispatch_mode is not None and _get_current_dispatch_mode() is not None


def dispatch_modes_disabled():
    """A context where no dispatch mode sees the ops run inside it."""
    return _disable_current_modes() if _disable_current_modes is not None else contextlib.nullcontext()


# ---- CPU flash attention (aten private ops, torch ≥ 2.3) ----------------------------------------------------
_aten = torch.ops.aten
CPU_FLASH_ATTENTION = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
CPU_FLASH_ATTENTION_BACKWARD = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def has_cpu_flash_attention() -> bool:
    """Both CPU flash-attention ops exist (else lorafit's fp32-copy attention stays off: SDPA as it is)."""
    return CPU_FLASH_ATTENTION is not None and CPU_FLASH_ATTENTION_BACKWARD is not None


# ---- MemTracker (torch.distributed._tools.mem_tracker, torch ≥ 2.5) -----------------------------------------
def mem_tracker():
    """A new ``MemTracker``; a one-line error where this torch has none."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        from lorafit.errors import LorafitError

        raise LorafitError(f"measuring CPU memory needs torch's MemTracker (torch >= 2.5; this is {torch.__version__})"
                           ) from None
    return MemTracker()


class _NoHook:
    def remove(self) -> None:
        pass


def skip_frozen_grad_hooks(tracker, model: torch.nn.Module) -> None:
    """MemTracker hooks every parameter's gradient, and a frozen one (a LoRA base) cannot take a hook: mark them
    as hooked already (MemTracker's private ``_param_to_grad_hook_handles``; without it, nothing to do). FSDP2
    swaps in new unsharded parameters at each forward, so the table also answers "hooked" for any frozen
    parameter it meets later."""
    handles = getattr(tracker, "_param_to_grad_hook_handles", None)
    if handles is None:
        return
    if type(handles).__name__ != "_FrozenHooked":
        class _FrozenHooked(type(handles)):
            def get(self, key, default=None):
                if isinstance(key, torch.Tensor) and not key.requires_grad:
                    return (_NoHook(), _NoHook())
                return super().get(key, default)

        try:
            handles.__class__ = _FrozenHooked
        except TypeError:  # a table type that cannot be subclassed in place: mark the current ones only
            pass
    for p in model.parameters():
        if not p.requires_grad:
            handles[p] = (_NoHook(), _NoHook())


# ---- transformers ------------------------------------------------------------------------------------------
def forget_load_quantization(model) -> None:
    """A model dequantised on load (a GGUF file, an MXFP4 checkpoint) arrives still flagged as quantised; drop the
    flags so ``save_pretrained`` writes a plain HF model (``hf_quantizer`` / ``is_quantized`` are transformers')."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


@contextlib.contextmanager
def gguf_parsed_once():
    """Within the block, each GGUF file is parsed once and gguf's tensor-name map built once per architecture.

    transformers parses the whole file (its ~49k-entry vocabulary included) for the tokenizer, again for the
    config and again for the weights, and rebuilds ``gguf.get_tensor_name_map`` for every submodule of the model
    (397 times for SmolLM2-135M): most of a GGUF load. Both are looked up on the ``gguf`` module at each call, so
    they are cached here by swapping those two module attributes, restored on exit; the readers are read-only
    memory maps, safe to share. Re-entrant: an inner block uses the outer one's caches.
    """
    try:
        import gguf
    except ImportError:  # transformers raises its own message when a GGUF file is loaded without it
        yield
        return
    if getattr(gguf.GGUFReader, "lorafit_cached", False):
        yield
        return
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def cached_reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader(path, *args, **kwargs)
        return readers[key]

    cached_reader.lorafit_cached = True
    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def attn_implementation(model) -> str | None:
    """The attention implementation a transformers model runs (its config's private ``_attn_implementation``;
    the public setter is ``set_attn_implementation``)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


# ---- torch.compile statistics (torch._dynamo.utils, torch ≥ 2.1) -------------------------------------------
def compile_stats() -> tuple[int, float]:
    """``(graphs compiled, seconds spent compiling)`` so far in this process; ``(0, 0.0)`` where torch does not
    say. A recompile (new guard: another dtype, ``requires_grad``, tuple length) counts as one more graph."""
    try:
        from torch._dynamo.utils import compile_times, counters

        graphs = int(counters["stats"]["unique_graphs"])
        headers, values = compile_times(repr="csv", aggregate=True)
        seconds = float(values[headers.index("_compile.compile_inner")]) if "_compile.compile_inner" in headers else 0.0
        return graphs, seconds
    except Exception:  # pragma: no cover - a torch that moved these: the figure is missing, nothing breaks
        return 0, 0.0


def cache_kwarg(model) -> str:
    """The keyword a model's forward and ``generate`` take a key/value cache by: ``cache`` in newer transformers,
    ``past_key_values`` (deprecated there, with a warning per call) before."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
