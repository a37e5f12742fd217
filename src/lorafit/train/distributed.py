"""Training on several processes: torch.distributed under torchrun, DDP by default, FSDP2 when the config asks.

Nothing here is home-made parallelism: the process group is torch's (gloo on CPU, NCCL on CUDA), gradients are
reduced by :class:`~torch.nn.parallel.DistributedDataParallel` or by FSDP2's ``fully_shard``. What this module adds
is what the recipe needs around them:

- :class:`World` — this process's rank, the world size, the device; ``World.single()`` when not under torchrun,
  so the recipe reads the same either way;
- :class:`LossModule` — the model and its chunked loss as *one* module, so DDP's and FSDP2's forward hooks run
  around the whole computation (the loss reads the head's weight outside ``model.forward``);
- :func:`wrap` — DDP, or FSDP2 with one group per decoder layer (its frozen base and LoRA parameters
  together; a 4-bit or 8-bit base's codes and statistics sharded as plain parameters), untied input embeddings
  as a group of their own, and the root (final norm, head, the embeddings when tied) as its own group;
- sums across ranks (token counts, losses) and the whole adapter gathered for rank 0 to write.

The loss of a step is normalised by the *global* number of trained tokens (all ranks, all accumulation steps),
and both wrappers average gradients over ranks, so each rank scales its backward by the world size: 2 ranks of
micro-batch b take the step that 1 process takes on the union of their batches (to float rounding: a kernel's
sums can run over another padded width).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.options import RuntimeOptions
from lorafit.train.loss import causal_lm_loss, decoder_stack

# A rank that fails ends its process; torchrun then stops the others. The timeout bounds how long a collective
# waits for a peer that died without torchrun noticing (e.g. a lost node).
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls) -> World:
        return cls()

    @classmethod
    def on(cls, model: nn.Module) -> World:
        """One process on the device ``model``'s parameters are on."""
        param = next(model.parameters(), None)
        return cls(device=param.device if param is not None else torch.device("cpu"))

    def describe(self) -> str:
        if not self.distributed:
            return f"1 process ({self.device.type})"
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
        return f"{self.world_size} processes ({'FSDP2' if self.fsdp else 'DDP'}, {backend}, {self.device.type})"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_world(fsdp: bool = False, timeout_s: float | None = None, single_ok: bool = False) -> World:
    """The process group of a torchrun launch (started here if not yet), or ``World.single()`` outside one.

    NCCL on CUDA (one device per local rank), gloo on CPU. ``timeout_s`` (default ``LORAFIT_DIST_TIMEOUT`` or
    600 s) bounds every collective, so a lost peer ends the job instead of hanging it. ``fsdp`` in one process is
    an error unless ``single_ok`` (a DeepSpeed ZeRO-3 config, which also runs on one device).
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        if fsdp and not single_ok:
            raise LorafitError("fsdp: FSDP2 needs several processes; start the run with torchrun --nproc-per-node N "
                               "or lorafit train --nproc N")
        # one process trains on the GPU when there is one (CUDA_VISIBLE_DEVICES= keeps it on the CPU)
        return World(device=torch.device("cuda", torch.cuda.current_device())) if torch.cuda.is_available() \
            else World.single()
    import torch.distributed as dist

    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    timeout = timeout_s or float(os.environ.get("LORAFIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return World(rank, world_size, local_rank, device, fsdp)


def shutdown(world: World) -> None:
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_sum(world: World, *values: float) -> list[float]:
    """Each value summed over all ranks (float64 on the run's device; a single process returns them as given)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


def broadcast_object(world: World, obj):
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(world: World, obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out = [None] * world.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


class LossModule(nn.Module):
    """The model's summed causal-LM loss as a module's forward: what DDP and FSDP2 wrap.

    ``forward(inputs, labels, chunk_tokens, options)`` returns ``(loss_sum, n_trained_tokens)`` as
    :func:`lorafit.train.loss.causal_lm_loss` does.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict, labels: torch.Tensor, chunk_tokens: int | None = None,
                options: RuntimeOptions | None = None):
        return causal_lm_loss(self.model, inputs, labels, chunk_tokens, options)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a transformers causal LM (``model.model.layers``, ``transformer.h`` ...)."""
    body = decoder_stack(model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return list(layers)
    raise LorafitError(f"fsdp: cannot find the decoder layers of {type(model).__name__} to shard")


def separate_embeddings(model: nn.Module) -> nn.Module | None:
    """The input embeddings as an FSDP2 group of their own, when they share no parameter with the head.

    The root stays gathered from the start of the forward to the end of the backward (FSDP2 does not reshard
    it), and its all-gather buffer lives until the next all-gather: with the embeddings in it, a rank would
    hold the whole table (often most of a small model) twice at the start of every step. On their own they are
    gathered for the lookup and resharded at once; a frozen table is not gathered again in backward. A table
    tied to the head stays in the root (the chunked loss reads the head's weight outside its module)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if emb is None or head is None:
        return None
    shared = {id(p) for p in emb.parameters()} & {id(p) for p in head.parameters()}
    return None if shared else emb


def wrap(model: nn.Module, world: World, reshard_after_forward: bool = True, objective=LossModule) -> nn.Module:
    """The module the step calls: ``objective(model)`` (the causal-LM loss, or a preference loss) for one process,
    else DDP or FSDP2 around it; the objective is made once the model is on the run's device.

    Every rank's parameters must already be equal (the same seed and the same adapter initialisation: FSDP2 does
    not broadcast them; DDP does, from rank 0).
    """
    model.to(world.device)
    loss_module = objective(model)
    if not world.distributed:
        return loss_module
    if world.fsdp:
        from torch.distributed.fsdp import fully_shard

        from lorafit.kernels import int8, nf4

        weights = [getattr(m, "weight", None) for m in model.modules()]
        if any(nf4.is_4bit(w) for w in weights):  # codes and absmax as plain parameters, which FSDP2 can shard
            nf4.make_shardable(model)
        if any(int8.is_int8(w) for w in weights):  # codes and row scales likewise
            int8.make_shardable(model)
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=reshard_after_forward)
        embeddings = separate_embeddings(model)
        if embeddings is not None:  # gathered for its lookup only, not for the whole step with the root
            fully_shard(embeddings, reshard_after_forward=True)
        fully_shard(loss_module)  # the root: final norm, head (and the embeddings when tied to it)
        return loss_module
    # the buffers (rotary tables) are equal on every rank: no broadcast before each forward (torch 2.13 renamed it)
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(loss_module, device_ids=[world.local_rank] if world.device.type == "cuda" else None,
                                   **no_sync)


def held_fraction(module: nn.Module, params=None) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model): FSDP2's shards against the whole;
    ``params``: only those (default: all of ``module``'s)."""
    local = total = 0
    for p in module.parameters() if params is None else params:
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
        total += p.numel()
    return local, total


def held_codes(module: nn.Module) -> tuple[int, int] | None:
    """(bytes of 4-bit or 8-bit codes this rank holds, bytes of all of them), or None without a sharded
    quantized layer."""
    from lorafit.kernels.int8 import ShardableLinear8bit
    from lorafit.kernels.nf4 import ShardableLinear4bit

    codes = [m.codes for m in module.modules() if isinstance(m, (ShardableLinear4bit, ShardableLinear8bit))]
    return held_fraction(module, codes) if codes else None


def unwrapped(loss_module: nn.Module) -> nn.Module:
    """The loss module inside a DDP wrapper (FSDP2 wraps in place)."""
    return getattr(loss_module, "module", loss_module)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (a DTensor shard of FSDP2 is gathered; a plain tensor returned as is)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
