"""1 process vs 2 (DDP, FSDP2) on the same global batch: tokens/s, per-rank memory, and whether results agree.

Each run is lorafit's own trainer (``lorafit.train.train``) in fresh processes, one thread each, on a random
Llama built here (no download): 1 process with micro-batch 2b, then 2 processes of micro-batch b under torchrun
with DDP, then with FSDP2. The model's vocabulary is small (``--vocab``, a BPE trained on the rows) so that the
decoder layers, which FSDP2 shards and gathers one at a time, are most of it, as in the models people shard;
with the demo tokenizer's 49,152 rows (``--vocab 0``) the embeddings and head dominate a small model and FSDP2
gathers them whole. Per run it records

- tokens/s: the median over the steps after the first two of the trained tokens of *all* ranks per second;
- per rank: the peak resident memory of the process (``ru_maxrss``: whole process, torch's libraries, the
  allocator's free lists and the whole model loaded before FSDP2 shards it included), the resident memory at
  the end of training, and the parameter bytes the rank holds (FSDP2 holds its shard; DDP and 1 process hold the
  whole model);
- per rank, tensors only: the peak of MemTracker over 2 steps of full-length batches (micro-batch ×
  sequence_len; the training rows are shorter) on the same model, wrapped the same way, and lorafit's estimate
  per rank of that step (``lorafit estimate --nproc N [--fsdp]``);
- FSDP2's collectives: a third launch of the same run with each all-gather and reduce-scatter waited for at
  once and timed (calls, MiB and seconds per step, against that run's step time), so that its speed is explained;
- agreement: the largest relative difference of each step's loss and of the final adapter from the 1-process
  run (fp32, dropout 0: only the summation order differs; the adapter's is each tensor's largest elementwise
  difference over its largest value).

    OMP_NUM_THREADS=1 python benchmarks/scaling.py

Prints a table and writes ``benchmarks/results/scaling.json`` with provenance and the load average. On a machine
with fewer free cores than processes the 2-process speed measures the sharing, not the scaling: the CPU model and
thread count are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

WORKER = r"""
import json, os, resource, sys
from dataclasses import replace
from pathlib import Path
import torch
torch.set_num_threads(1)
from lorafit.config import load_config
from lorafit.measure import every_rank, measure
from lorafit.memory.estimate import estimate
from lorafit.memory.settings import settings_from_config
from lorafit.memory.spec import resolve_spec
from lorafit.train import train
from lorafit.train.distributed import held_fraction
# ranks run every row whole (no shared-prefix pass under torchrun): so does the single process, like for like
os.environ["LORAFIT_SHARED_PREFIX"] = "0"

cfg = load_config(sys.argv[1])
rank, nproc = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
report = Path(sys.argv[2], f"rank{rank}.json")


def rss_now():  # resident memory at this moment (the peak counts the whole model loaded before sharding)
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def timed(name, comm):  # FSDP2's collective `name`, waited for at once: calls, seconds, bytes received
    import time
    import torch.distributed as dist
    orig = getattr(dist, name)
    def call(*a, **kw):
        t = time.perf_counter()
        work = orig(*a, **kw)
        if work is not None:
            work.wait()
        out = kw.get("output_tensor", kw.get("output", a[0] if a else None))
        comm[name]["seconds"] += time.perf_counter() - t
        comm[name]["bytes"] += out.numel() * out.element_size()
        comm[name]["calls"] += 1
        return work
    comm[name] = {"seconds": 0.0, "bytes": 0, "calls": 0}
    setattr(dist, name, call)


if sys.argv[3] == "train":
    result = train(cfg)
    local, whole = held_fraction(result.model)
    dtype_bytes = next(result.model.parameters()).element_size()
    out = {"rank": rank, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "rss_end_bytes": rss_now(), "held_param_bytes": local * dtype_bytes, "model_param_bytes": whole * dtype_bytes}
elif sys.argv[3] == "comm":
    # a launch of its own (the tokens/s above are untouched): FSDP2's all-gathers and reduce-scatters made
    # synchronous and timed, over a run as long as the training one
    comm = {}
    for name in ("all_gather_single", "reduce_scatter_single"):
        timed(name, comm)
    folder = f"{cfg.output_dir}-comm"
    train(cfg.model_copy(update={"output_dir": folder}))
    rows = [json.loads(l) for l in Path(folder, "metrics.jsonl").read_text().splitlines() if l]
    out = {**json.loads(report.read_text()), "comm": comm,
           "comm_run_elapsed_s": [r["elapsed_s"] for r in rows if "loss" in r]}
else:  # a launch of its own, so that its memory is not in the training processes' RSS
    # tensor memory of the same step, per rank: MemTracker over 2 steps of full-length batches (micro-batch x
    # sequence_len; the training rows are shorter), and the estimate per rank of that step
    spec = resolve_spec(cfg.base_model_path)
    s = replace(settings_from_config(cfg, "cpu", nproc=nproc), dtype="float32")
    m = every_rank(measure(spec, s, 2, model_name=cfg.base_model_path))[rank]
    out = {**json.loads(report.read_text()), "tensor_peak_bytes": m.peak,
           "estimate_bytes": estimate(spec, s).allocated_peak}
report.write_text(json.dumps(out))
"""


def rows() -> list[dict]:
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]
    return [{"messages": [{"role": "user", "content": f"Repeat twice: {w}" + " please" * (i % 7)},
                          {"role": "assistant", "content": f"{w} {w}"}]} for i, w in enumerate(words * 40)]


def small_tokenizer(data: list[dict], vocab: int):
    """A byte-level BPE trained on the rows (at most ``vocab`` tokens), with the demo tokenizer's chat template and
    special tokens: the demo's 49,152 ids would make the embeddings and head most of a small model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorafit.models import load_tokenizer

    demo = load_tokenizer("demo")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [demo.apply_chat_template(r["messages"], tokenize=False) for r in data]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=demo.chat_template, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>")


def build(folder: Path, hidden: int, layers: int, vocab: int) -> None:
    """A random Llama (embedding and head of ``vocab`` rows, 0: the demo tokenizer's 49,152) and chat rows of
    varied length."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import save_tiny_llama

    from lorafit.models import load_tokenizer

    data = rows()
    tokenizer = small_tokenizer(data, vocab) if vocab else load_tokenizer("demo")
    save_tiny_llama(folder / "model", tokenizer, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                    vocab_size=vocab or len(tokenizer))
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))


def run(folder: Path, name: str, nproc: int, micro: int, steps: int, fsdp: bool) -> dict:
    import yaml

    out = folder / name
    cfg = dict(base_model=str(folder / "model"), adapter="lora", lora_r=8, lora_alpha=16, lora_target_linear=True,
               datasets=[{"path": str(folder / "data.jsonl"), "type": "chat_template"}], sequence_len=128,
               micro_batch_size=micro, max_steps=steps, learning_rate=1e-3, lr_scheduler="constant", seed=1,
               output_dir=str(out), lora_dropout=0.0, compile_kernels=False, **({"fsdp_version": 2} if fsdp else {}))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = folder / f"{name}-ranks"
    report.mkdir()
    worker = folder / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={nproc}"]
    for what in ("train", "measure", *(["comm"] if fsdp else [])):
        done = subprocess.run([*launcher, str(worker), str(path), str(report), what], capture_output=True, text=True,
                              env=env)
        if done.returncode:
            raise SystemExit(f"{name} ({what}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps_rows = [r for r in rows if "loss" in r]
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(nproc)]
    return {"name": name, "processes": nproc, "micro_batch_per_rank": micro, "fsdp": fsdp,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps_rows[2:]),
            "losses": [r["loss"] for r in steps_rows], "ranks": ranks, "adapter": str(out),
            **({"collectives": collectives(ranks)} if fsdp else {})}


def collectives(ranks: list[dict]) -> dict:
    """Rank 0's FSDP2 collectives per step in the timed run: calls, MiB received, seconds (waited for at once, so
    the other rank's lateness counts too), against that run's median step time."""
    elapsed = ranks[0]["comm_run_elapsed_s"]
    steps = len(elapsed)
    per_step = {name: {"calls": c["calls"] / steps, "mib": c["bytes"] / steps / 2**20, "seconds": c["seconds"] / steps}
                for name, c in ranks[0]["comm"].items()}
    step_s = statistics.median(b - a for a, b in zip(elapsed[2:], elapsed[3:], strict=False))
    share = sum(c["seconds"] for c in per_step.values()) / step_s
    return {"per_step": per_step, "median_step_seconds": step_s, "share_of_step": share}


def rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def adapter_diff(a: str, b: str) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(Path(a) / "adapter_model.safetensors"), load_file(Path(b) / "adapter_model.safetensors")
    return max(float((wa[k] - wb[k]).abs().max() / wb[k].abs().max().clamp_min(1e-12)) for k in wb)


def each(r: dict, key: str, fmt: str = "{:.0f}") -> str:
    return " / ".join(fmt.format(k[key] / 2**20) for k in r["ranks"])


def table(runs: list[dict]) -> None:
    print(f"{'run':<11} {'tokens/s':>9} {'peak RSS / rank':>16} {'RSS at end':>11} {'tensors / rank':>15} "
          f"{'estimate':>9} {'params held / rank':>19} {'loss Δ':>8} {'adapter Δ':>9}   (MiB)")
    for r in runs:
        print(f"{r['name']:<11} {r['tokens_per_s']:>9.0f} {each(r, 'peak_rss_bytes'):>16} "
              f"{each(r, 'rss_end_bytes'):>11} {each(r, 'tensor_peak_bytes', '{:.1f}'):>15} "
              f"{r['ranks'][0]['estimate_bytes'] / 2**20:>9.1f} {each(r, 'held_param_bytes', '{:.1f}'):>19} "
              f"{r['max_rel_loss_diff']:>8.1e} {r['max_rel_adapter_diff']:>9.1e}")
    for r in runs:
        if "collectives" in r:
            c = r["collectives"]
            parts = ", ".join(f"{n} {v['calls']:.0f} × ({v['mib']:.1f} MiB, {v['seconds']:.2f} s)"
                              for n, v in c["per_step"].items())
            print(f"{r['name']} collectives per step (rank 0, timed run): {parts}; "
                  f"{c['share_of_step']:.0%} of its {c['median_step_seconds']:.2f} s step")


def notes(runs: list[dict]) -> dict:
    """What the figures come from, in words built from the measured values."""
    fsdp = next(r for r in runs if r["fsdp"])
    c = fsdp["collectives"]
    gather = c["per_step"]["all_gather_single"]
    return {
        "fsdp_speed": f"FSDP2 all-gathers the frozen weights group by group before the forward and again before "
                      f"the backward (the groups resharded after forward): {gather['calls']:.0f} all-gathers of "
                      f"{gather['mib']:.0f} MiB in "
                      f"all per step and rank, over gloo (TCP through the loopback on one machine), "
                      f"{c['share_of_step']:.0%} of a step's time with the collectives timed; DDP all-reduces only "
                      "the LoRA gradients",
        "rss": "peak RSS is the whole process: torch's libraries, the whole model loaded before FSDP2 shards it, and "
               "the blocks glibc keeps after they are freed (with its default threshold, FSDP2's all-gather buffers "
               "freed every step stay in the heap); --mmap-threshold makes RSS follow the live tensors",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=4096,
                    help="embedding and head rows (a BPE trained on the rows); 0: the demo tokenizer's 49,152")
    ap.add_argument("--micro", type=int, default=2, help="micro-batch per rank (1 process: twice this)")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="MALLOC_MMAP_THRESHOLD_ for the runs (bytes): glibc then returns each larger freed block to "
                         "the system, so RSS follows the live tensors; 0: glibc's default (a threshold that rises to "
                         "the largest block freed, up to 32 MiB, keeping smaller ones in the heap)")
    ap.add_argument("--out", default=str(HERE / "results" / "scaling.json"))
    args = ap.parse_args()
    if args.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        load_start = os.getloadavg()
        build(folder, args.hidden, args.layers, args.vocab)
        runs = [run(folder, "1 process", 1, 2 * args.micro, args.steps, False),
                run(folder, "2 × DDP", 2, args.micro, args.steps, False),
                run(folder, "2 × FSDP2", 2, args.micro, args.steps, True)]
        base = runs[0]
        for r in runs:
            r["max_rel_loss_diff"] = rel_diff(r["losses"], base["losses"])
            r["max_rel_adapter_diff"] = adapter_diff(r.pop("adapter"), base["adapter"]) if r is not base else 0.0
        base.pop("adapter", None)
    table(runs)
    payload = {"command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]), "args": vars(args),
               "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "load_average_at_start": load_start,
               "notes": notes(runs), "runs": runs, "provenance": provenance(threads=1)}
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
