"""ModelSpec: the shape of a causal LM (no weights), and where one comes from.

A spec is everything the memory estimate needs: sizes of the embedding, the decoder blocks and the head,
which linear layers a LoRA adapter can wrap, and the few architecture details that change what autograd
keeps (norm type, gated MLP, fused projections, logit soft-capping). Sources, in the order tried by
:func:`resolve_spec`: the demo model, a local HF folder or ``config.json``, a ``.gguf`` file (metadata only),
a name from :mod:`lorafit.memory.catalog`.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lorafit.architectures import check_causal_lm
from lorafit.config import DEMO_ALIASES
from lorafit.errors import LorafitError

# The output head's module path in every supported family: never an "all-linear" target.
HEAD = "lm_head"

# model_type (HF config) -> our architecture family; the family decides module names and norm/MLP details.
ARCH_FAMILIES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gemma": "gemma", "gemma2": "gemma2", "phi3": "phi3", "gpt2": "gpt2",
}


@dataclass(frozen=True)
class ModelSpec:
    """Public shape of a decoder-only causal LM."""

    name: str
    arch: str  # HF model_type: llama, mistral, qwen2, gemma, gemma2, phi3, gpt2
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    norm: str = "rms"  # "rms" | "layer"
    mlp: str = "gated"  # "gated" (gate/up/down) | "plain" (fc/proj)
    qkv_bias: bool = False
    max_positions: int = 0  # learned position embeddings (GPT-2); 0 = rotary
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None

    @property
    def family(self) -> str:
        return ARCH_FAMILIES.get(self.arch, "llama")

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def embedding_path(self) -> str:
        """Dotted path of the token embeddings in the transformers model (``model.embed_tokens``)."""
        return "transformer.wte" if self.family == "gpt2" else "model.embed_tokens"

    def block_prefix(self, layer: int) -> str:
        """Dotted path of decoder block ``layer`` in the transformers model (``model.layers.3``)."""
        return f"transformer.h.{layer}" if self.family == "gpt2" else f"model.layers.{layer}"

    def linear_layers(self) -> list[tuple[str, int, int, str]]:
        """Linear layers of one decoder block: (path inside the block, in, out, input group).

        Paths are the transformers modules' (``self_attn.q_proj``; GPT-2 ``attn.c_attn``), so LoRA targets
        match them as they match the real model's. Layers in the same input group read the same tensor (q/k/v
        read the normed hidden state; gate/up likewise), which the LoRA layer saves once for all of them.
        """
        d, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        fam = self.family
        if fam == "gpt2":
            return [("attn.c_attn", d, 3 * d, "attn_in"), ("attn.c_proj", d, d, "attn_out"),
                    ("mlp.c_fc", d, i, "mlp_in"), ("mlp.c_proj", i, d, "mlp_out")]
        if fam == "phi3":
            return [("self_attn.qkv_proj", d, q + 2 * kv, "attn_in"), ("self_attn.o_proj", q, d, "attn_out"),
                    ("mlp.gate_up_proj", d, 2 * i, "mlp_in"), ("mlp.down_proj", i, d, "mlp_out")]
        return [("self_attn.q_proj", d, q, "attn_in"), ("self_attn.k_proj", d, kv, "attn_in"),
                ("self_attn.v_proj", d, kv, "attn_in"), ("self_attn.o_proj", q, d, "attn_out"),
                ("mlp.gate_proj", d, i, "mlp_in"), ("mlp.up_proj", d, i, "mlp_in"),
                ("mlp.down_proj", i, d, "mlp_out")]

    def module_names(self) -> list[str]:
        """Short names a user can put in ``lora_target_modules`` (``c_proj`` matches both GPT-2 projections)."""
        names = []
        for name, *_ in self.linear_layers():
            short = name.split(".")[-1]
            if short not in names:
                names.append(short)
        return names

    # ---- parameter counts ------------------------------------------------------------------------------
    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.max_positions * self.hidden

    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def layer_params(self) -> int:
        d = self.hidden
        n = sum(i * o for _, i, o, _ in self.linear_layers())
        if self.family == "gpt2":
            n += 3 * d + d + self.intermediate + d  # biases of c_attn, c_proj, c_fc, c_proj
        elif self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        norms = 4 if self.family == "gemma2" else 2  # Gemma 2: pre and post norms around attention and MLP
        n += norms * d * (2 if self.norm == "layer" else 1)
        return n

    def final_norm_params(self) -> int:
        return self.hidden * (2 if self.norm == "layer" else 1)

    def total_params(self) -> int:
        return self.embedding_params() + self.head_params() + self.layers * self.layer_params() + self.final_norm_params()

    def to_dict(self) -> dict:
        return asdict(self)


_REQUIRED = {
    "hidden": ("hidden_size", "n_embd"),
    "layers": ("num_hidden_layers", "n_layer"),
    "heads": ("num_attention_heads", "n_head"),
    "vocab": ("vocab_size",),
}


# config keys that give a mixture-of-experts model's number of routed experts, across families
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def spec_from_hf_config(cfg: dict, name: str, source: str = "config.json") -> ModelSpec:
    """A spec from a transformers ``config.json`` mapping. Missing required fields: one-line error."""
    if not isinstance(cfg, dict):
        raise LorafitError(f"{source}: expected a JSON object with the model's config, got {type(cfg).__name__}")
    check_causal_lm(cfg, source)
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers: the language model's config
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    model_type = str(cfg.get("model_type", "llama"))
    experts = next((cfg[k] for k in _EXPERT_COUNTS if cfg.get(k)), None)
    if experts:  # a dense-MLP spec would count the wrong weights and activations: say so rather than guess
        raise LorafitError(f"{source}: {model_type} is a mixture-of-experts model ({experts} experts); the memory "
                           "estimate models dense decoder blocks only, so it cannot estimate this model yet (lorafit "
                           "train runs it)")
    values = {}
    missing = []
    for field, keys in _REQUIRED.items():
        found = next((cfg[k] for k in keys if cfg.get(k) is not None), None)
        if found is None:
            missing.append(keys[0])
        values[field] = found
    if missing:
        raise LorafitError(f"{source}: missing {', '.join(missing)}; a causal-LM config.json needs "
                           "hidden_size, num_hidden_layers, num_attention_heads and vocab_size")
    d, heads = int(values["hidden"]), int(values["heads"])
    gpt2 = model_type == "gpt2"
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * d
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or d // heads
    spec = ModelSpec(
        name=name, arch=model_type, hidden=d, intermediate=int(inter), layers=int(values["layers"]), heads=heads,
        kv_heads=int(kv), head_dim=int(head_dim), vocab=int(values["vocab"]),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True if gpt2 else False)),
        norm="layer" if gpt2 else "rms", mlp="plain" if gpt2 else "gated",
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        max_positions=int(cfg.get("n_positions") or 1024) if gpt2 else 0,
        final_logit_softcap=cfg.get("final_logit_softcapping"), attn_logit_softcap=cfg.get("attn_logit_softcapping"),
    )
    check_spec(spec, source)
    return spec


def check_spec(spec: ModelSpec, source: str) -> None:
    for field in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
        if getattr(spec, field) <= 0:
            raise LorafitError(f"{source}: {field} is {getattr(spec, field)}, must be > 0")
    if spec.heads % spec.kv_heads:
        raise LorafitError(f"{source}: {spec.heads} attention heads is not a multiple of {spec.kv_heads} kv heads")


def spec_from_gguf(path: Path) -> ModelSpec:
    """A spec from a GGUF file's metadata (no tensor data is read)."""
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise LorafitError("reading .gguf files needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path), "r")
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
        raise LorafitError(f"{path}: not a readable GGUF file ({e})") from None

    def field(key: str, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        val = f.parts[f.data[0]]
        if f.types and f.types[0].name == "STRING":
            return bytes(val).decode("utf-8")
        return val.tolist()[0] if hasattr(val, "tolist") else val

    arch = field("general.architecture")
    if arch is None:
        raise LorafitError(f"{path}: GGUF metadata has no general.architecture")
    p = f"{arch}."
    vocab = field(p + "vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    tensor_names = {t.name for t in reader.tensors}
    cfg = {
        "model_type": {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2", "phi3": "phi3",
                       "gpt2": "gpt2"}.get(arch, arch),  # others as named, so a GGUF BERT or Mamba is refused
        "hidden_size": field(p + "embedding_length"),
        "intermediate_size": field(p + "feed_forward_length"),
        "num_hidden_layers": field(p + "block_count"),
        "num_attention_heads": field(p + "attention.head_count"),
        "num_key_value_heads": field(p + "attention.head_count_kv"),
        "head_dim": field(p + "attention.key_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    return spec_from_hf_config(cfg, name=path.name, source=str(path))


def resolve_spec(model: str) -> ModelSpec:
    """The spec for ``model``: demo model, local folder / config.json / .gguf, or a catalog name."""
    from lorafit.memory import catalog

    if not isinstance(model, str) or not model.strip():
        raise LorafitError("model: give a catalog name (e.g. llama-3.1-8b), a local folder, a config.json or a .gguf file")
    if model in DEMO_ALIASES:
        return replace(catalog.get_model("smollm2-135m"), name="demo (SmolLM2-135M-Instruct)")
    p = Path(model).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            p = p / "config.json"
        else:
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) != 1:
                raise LorafitError(f"{model}: folder has no config.json (and not exactly one .gguf file)")
            p = ggufs[0]
    if p.is_file():
        if p.suffix == ".gguf":
            return spec_from_gguf(p)
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LorafitError(f"{p}: not a readable config.json ({str(e).splitlines()[0]})") from None
        return spec_from_hf_config(cfg, name=p.parent.name if p.name == "config.json" else p.stem, source=str(p))
    return catalog.get_model(model)


def closest(name: str, choices: list[str], n: int = 3) -> list[str]:
    key = name.lower().split("/")[-1]
    found = difflib.get_close_matches(key, choices, n=n, cutoff=0.4)
    return found or [c for c in choices if key[:4] in c][:n]
