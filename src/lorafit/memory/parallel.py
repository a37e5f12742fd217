"""One rank's share of a step's persistent memory under torchrun: DDP (a whole replica) or FSDP2 (shards).

What ``lorafit.train.distributed.wrap`` builds, in bytes per rank:

* **DDP** — every rank holds the whole model, its gradients and optimizer states, plus DDP's gradient buckets:
  flat copies of the trainable parameters' gradients (``bucket_cap_mb`` = 25 by default; the buckets partition
  the trainable parameters, so together they are as large as their gradients), allocated once, kept all run.
* **FSDP2** — ``fully_shard`` per decoder layer (its frozen base and its LoRA parameters together), the input
  embeddings on their own when the head does not share them, then the root (final norm, head, anything else
  outside the layers). Each parameter is cut on dim 0 into N equal
  pieces (dim 0 padded up to a multiple of N), so a rank holds 1/N of the weights, of the trained parameters, of
  their gradients and of the optimizer states. Unsharded on top of that: a layer's parameters while it runs
  (all-gathered whole, padded), the next one prefetched during backward, the root for the whole forward and
  backward (FSDP2 does not reshard the root after forward), the embeddings for their lookup, and each group's
  all-gather output until the next group's all-gather is copied out. A layer's gradients exist whole until
  reduce-scattered. A 4-bit base (QLoRA) is sharded as its packed codes (½ B an element) and its blocks' absmax
  (``lorafit.kernels.nf4.ShardableLinear4bit``); the rest of its quantization state (codebook, double
  quantization's own absmax, offset and map) is a buffer every rank keeps whole; an 8-bit base as its int8 codes
  and fp32 row scales (``lorafit.kernels.int8.ShardableLinear8bit``).

Pure arithmetic on a :class:`~lorafit.memory.spec.ModelSpec`; imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.memory.spec import ModelSpec

# torch's DistributedDataParallel default bucket size; the buckets together hold every trainable gradient once.
DDP_BUCKET_CAP_MB = 25
# bitsandbytes' 4-bit weights: 64-element blocks; under double quantization the blocks' absmax are 8-bit in
# blocks of 256 (fp32 absmax each), plus an fp32 offset and a 256-entry map; a 16-entry fp32 codebook per layer.
FOUR_BIT_BLOCK, NESTED_BLOCK = 64, 256


@dataclass(frozen=True)
class Tensor:
    """One parameter: element count, size of dim 0 (what FSDP2 shards), bytes per element, trained or not, a
    LoRA parameter (fp32, counted apart from the weights) or not."""

    numel: int
    dim0: int
    elt: int
    trained: bool = False
    lora: bool = False
    replicated: bool = False  # a buffer: every rank holds it whole, nothing is gathered

    def shard(self, n: int) -> int:
        """Elements one of ``n`` ranks holds: dim 0 padded up to a multiple of n, cut in n."""
        return self.numel if self.replicated else -(-self.dim0 // n) * (self.numel // max(self.dim0, 1))

    def gathered(self, n: int) -> int:
        """Bytes of this parameter all-gathered whole (padded) while its group runs."""
        return 0 if self.replicated else self.shard(n) * n * self.elt


def four_bit_tensors(numel: int, double_quant: bool) -> list[Tensor]:
    """One bitsandbytes 4-bit weight of ``numel`` elements as FSDP2 holds it: packed codes (a byte per two
    elements, shape numel/2 × 1) and the blocks' absmax (8-bit under double quantization) sharded; the codebook
    and double quantization's fp32 absmax, offset and map replicated."""
    blocks = -(-numel // FOUR_BIT_BLOCK)
    kept = 4 * 16 + (4 * -(-blocks // NESTED_BLOCK) + 4 + 4 * NESTED_BLOCK if double_quant else 0)
    return [Tensor(numel // 2, numel // 2, 1), Tensor(blocks, blocks, 1 if double_quant else 4),
            Tensor(kept, kept, 1, replicated=True)]


def layer_tensors(spec: ModelSpec, base_elt: int, targets: dict[str, int], dora: bool,
                  four_bit: bool | None = None, eight_bit: bool = False) -> list[Tensor]:
    """The parameters of one decoder block: its linears (and biases), its norms, and the LoRA ``targets``
    (path inside the block → rank: A is r × in, B out × r, DoRA's magnitude one per output row), fp32.
    ``four_bit``: None for a dense base, else the linears are 4-bit with (True) or without double quantization;
    ``eight_bit``: the linears are int8 codes (out × in) and fp32 row scales (``ShardableLinear8bit``)."""
    out = []
    linear = 0
    for name, i, o, _ in spec.linear_layers():
        out += (four_bit_tensors(i * o, four_bit) if four_bit is not None else
                [Tensor(i * o, o, 1), Tensor(o, o, 4)] if eight_bit else [Tensor(i * o, o, base_elt)])
        linear += i * o
        if name in targets:
            r = targets[name]
            out += [Tensor(r * i, r, 4, True, True), Tensor(o * r, o, 4, True, True)] + (
                [Tensor(o, o, 4, True, True)] if dora else [])
    rest = spec.layer_params() - linear  # biases and norms: vectors
    if rest:
        out.append(Tensor(rest, rest, base_elt, False))
    return out


def root_tensors(spec: ModelSpec, base_elt: int, outside_lora: list[int], saved: list[int],
                 copies: int) -> tuple[list[Tensor], list[Tensor]]:
    """(the root group, the input embeddings' own group). The root: final norm, an untied head, LoRA on the head
    and the head's ``modules_to_save`` table. Untied input embeddings (and positions) are a group of their own
    (``lorafit.train.distributed.separate_embeddings``); a table tied to the head stays in the root. LoRA on the
    embeddings / head (``outside_lora``: element counts, fp32, embeddings first) and the ``modules_to_save``
    tables (``saved``) and the untied copy of a tied one (``copies``) go with their module."""
    V, d = spec.vocab, spec.hidden
    root = [Tensor(spec.final_norm_params(), spec.final_norm_params(), base_elt)]
    emb = [Tensor(V * d, V, base_elt)]
    if spec.max_positions:
        emb.append(Tensor(spec.max_positions * d, spec.max_positions, base_elt))
    if spec.head_params():
        root.append(Tensor(spec.head_params(), V, base_elt))
    if copies:  # a tied table trained in full: PEFT unties it, the copy is the head's
        root.append(Tensor(copies, V, base_elt))
    extra = [Tensor(n, n, 4, True, True) for n in outside_lora] + [Tensor(n, V, base_elt, True) for n in saved]
    tied = spec.tied_embeddings and not copies
    if tied:
        return root + emb + extra, []
    return root + extra, emb  # LoRA / saved tables counted with the root (either group: the same bytes)


@dataclass
class RankShare:
    """Bytes one rank holds under the chosen strategy (see the module's docstring)."""

    weights: int  # frozen (and, for full fine-tuning, trained) base parameters held
    adapter: int  # LoRA parameters held (fp32)
    grads: int  # gradients held after a step's reduction (sharded under FSDP2)
    states_fraction: float  # of the whole optimizer states
    bucket: int = 0  # DDP's gradient buckets
    root_gathered: int = 0  # FSDP2: the root group unsharded (forward and backward)
    embed_gathered: int = 0  # FSDP2: untied input embeddings, their own group (gathered for the lookup only)
    layer_gathered: int = 0  # FSDP2: the largest decoder layer unsharded (padded whole)
    layer_grads: int = 0  # FSDP2: a layer's trained gradients whole, before reduce-scatter


def fsdp_share(spec: ModelSpec, n: int, base_elt: int, adapters: list[dict[str, int]], dora: bool,
               outside_lora: list[int], saved: list[int], copies: int, four_bit: bool | None = None,
               eight_bit: bool = False) -> RankShare:
    """One of ``n`` ranks' bytes under FSDP2 (LoRA: the base frozen, the adapter in fp32; ``four_bit`` /
    ``eight_bit``: the decoder linears quantized, :func:`layer_tensors`)."""
    layers = [layer_tensors(spec, base_elt, w, dora, four_bit, eight_bit) for w in adapters]
    root, emb = root_tensors(spec, base_elt, outside_lora, saved, copies)
    every = [t for ts in layers for t in ts] + root + emb
    weights = sum(t.shard(n) * t.elt for t in every if not t.lora)  # modules_to_save tables included
    adapter = sum(t.shard(n) * t.elt for t in every if t.lora)
    grads = sum(t.shard(n) * t.elt for t in every if t.trained)
    gathered = [sum(t.gathered(n) for t in ts) for ts in layers]
    layer_grads = max(sum(t.numel * t.elt for t in ts if t.trained) for ts in layers) if layers else 0
    return RankShare(weights=weights, adapter=adapter, grads=grads, states_fraction=1 / n,
                     root_gathered=sum(t.gathered(n) for t in root),
                     embed_gathered=sum(t.gathered(n) for t in emb),
                     layer_gathered=max(gathered) if gathered else 0, layer_grads=layer_grads)


def ddp_bucket_bytes(trainable_grad_bytes: int) -> int:
    """DDP's buckets: one flat copy of every trainable gradient (the reducer allocates them at wrap time)."""
    return trainable_grad_bytes

