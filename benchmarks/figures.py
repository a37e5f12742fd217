"""Regenerate every figure block in README.md from the results files in ``benchmarks/results/``.

    python benchmarks/figures.py           # rewrite README.md in place (``make figures``)
    python benchmarks/figures.py --check   # exit 1 and name each block whose text differs from its file(s)

Each block sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` lines, the pattern of the
``axolotl-keys`` block (``lorafit.config.axolotl_keys.compatibility_markdown``, also rewritten here), and opens
with the provenance its JSON records: CPU model and flags, threads, commit, command — "not recorded" where an
older file lacks it. Nothing in a results file is changed; a number in a block is only ever read from one.
``tests/test_figures.py`` fails when a README block and its JSON disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
MB = 1024 * 1024
NR = "not recorded"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


# ---- the marker pattern (the axolotl-keys block's) ----------------------------------------------------------

def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"


def read_block(text: str, name: str) -> str | None:
    """The text between the block's markers (None when the README has no such block)."""
    start, end = markers(name)
    if start not in text or end not in text.split(start, 1)[1]:
        return None
    return text.split(start, 1)[1].split(end, 1)[0]


def write_block(text: str, name: str, body: str) -> str:
    start, end = markers(name)
    if read_block(text, name) is None:
        raise SystemExit(f"README.md has no {start.strip()} ... {end} pair: add the markers where the block goes")
    head, rest = text.split(start, 1)
    return head + start + body + end + rest.split(end, 1)[1]


# ---- provenance, whatever shape a file records it in ---------------------------------------------------------

FLAG_NAMES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16",
              "amx_tile": "AMX", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}


def _flags_from_provenance(p: dict) -> str:
    flags = (p.get("cpu") or {}).get("flags") or {}
    on = [FLAG_NAMES.get(k, k) for k, v in flags.items() if v]
    if not flags:
        return f"flags {NR}"
    return ", ".join(on) + ("" if flags.get("amx_tile") else ", no AMX") if on else "none of AVX2/AVX-512/AMX"


def provenance_fields(d: dict) -> dict:
    """CPU, flags, threads, commit, command, date of a results file: from its ``provenance`` (benchmarks/
    provenance.py), else the older ``machine`` (peer.py) or ``cpu`` (half_matmul.py) records, else not recorded."""
    p = d.get("provenance")
    if p:
        git = p.get("git") or {}
        commit = (git.get("commit") or "")[:7] or NR
        if git.get("dirty"):
            commit += f" + {git.get('n_changed')} uncommitted change(s)"
        cmd = p.get("command")
        return {"cpu": (p.get("cpu") or {}).get("model") or NR, "flags": _flags_from_provenance(p),
                "capability": (p.get("torch") or {}).get("cpu_capability") or NR,
                "threads": p.get("threads", NR), "commit": commit,
                "command": "python benchmarks/" + " ".join(cmd) if cmd else NR,
                "options": (p.get("runtime_options") or {}).get("describe") or NR, "date": (p.get("date") or NR)[:10]}
    m = d.get("machine") or {}
    if m:
        flags = m.get("cpu_flags")
        flag_text = (", ".join(FLAG_NAMES.get(f, f.upper()) for f in flags) if flags else "") if flags is not None \
            else f"flags {NR}"
        if flags is not None:
            flag_text = (flag_text + ", " if flag_text else "") + ("AMX" if any("amx" in f for f in flags)
                                                                    else "no AMX")
        return {"cpu": m.get("cpu") or NR, "flags": flag_text, "capability": m.get("cpu_capability") or NR,
                "threads": m.get("threads", NR), "commit": m.get("commit") or NR, "command": NR, "options": NR,
                "date": (m.get("date") or NR)[:10]}
    c = d.get("cpu") or {}
    if c:
        flags = [x for x, on in (("AVX512-BF16", c.get("avx512_bf16")),) if on] + ([] if c.get("amx") else ["no AMX"])
        return {"cpu": NR, "flags": ", ".join(flags), "capability": c.get("capability") or NR,
                "threads": c.get("threads", NR), "commit": NR, "command": NR, "options": NR, "date": NR}
    return {k: NR for k in ("cpu", "flags", "capability", "threads", "commit", "command", "options", "date")}


def provenance_line(d: dict, file: str, command: str | None = None) -> str:
    """One line: the file, and what it records about where its numbers came from ("not recorded" for the rest)."""
    f = provenance_fields(d)
    if all(v == NR for v in f.values()):
        recorded = "records no provenance (CPU model and flags, threads, commit: not recorded)"
    else:
        cpu = f"CPU {f['cpu']}" + (f" ({f['flags']}" + (f"; torch capability {f['capability']}"
                                                         if f["capability"] != NR else "") + ")")
        threads = f"{f['threads']} thread(s)" if f["threads"] != NR else f"threads {NR}"
        opts = f"; lorafit options: {f['options']}" if f["options"] != NR else ""
        recorded = f"{cpu}, {threads}; commit {f['commit']}; date {f['date']}{opts}"
    if f["command"] != NR:
        cmd = f"`{f['command']}`"
    else:
        cmd = NR + (f" (documented: `{command}`)" if command else "")
    return f"<sub>`benchmarks/results/{file}`: {recorded}; command: {cmd}.</sub>\n"


# ---- the blocks -------------------------------------------------------------------------------------------

def _worst(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: abs(r["error_pct"]))


def estimator_block() -> str:
    out = ["| rows | what they are | configurations | within ±5% | worst error | mean abs error | file |",
           "|---|---|---|---|---|---|---|"]
    sources = []
    for name, what in (("estimate_vs_measured.json", "the backward constants were calibrated on them"),
                       ("estimate_vs_measured_heldout.json", "never used to fit a constant")):
        d = load(name)
        rows = d["rows"]
        within = sum(abs(r["error_pct"]) <= 5 for r in rows)
        w = _worst(rows)
        mean = sum(abs(r["error_pct"]) for r in rows) / len(rows)
        out.append(f"| {'held out' if d.get('split') == 'heldout' else 'fitted'} | {what} | {len(rows)} | {within}/{len(rows)} | "
                   f"{w['error_pct']:+.1f}% ({w['shape']}) | {mean:.1f}% | `{name}` |")
        sources.append((name, d))
    out.append("")
    for name, d in sources:
        out.append(provenance_line(d, name, "python benchmarks/estimate_vs_measured.py"
                                   + (" --rows heldout" if "heldout" in name else "")).rstrip("\n"))
        if d.get("reestimated"):
            out.append(provenance_line({"provenance": d["reestimated"]}, name).rstrip("\n")
                       .replace(":", ", estimates recomputed from its stored peaks (its peaks themselves record no "
                                     "provenance):", 1))
        out.append("")
    return "\n".join(out)


PEER_CONFIGS = [("135m-fp32", "fp32"), ("135m-bf16", "bf16"), ("135m-fp32-gc", "fp32, gradient checkpointing"),
                ("135m-bf16-gc", "bf16, gradient checkpointing"), ("135m-4layers-fp32", "fp32, 4 layers"),
                ("135m-qlora-fp32", "QLoRA (NF4 base), fp32"), ("135m-qlora-bf16", "QLoRA (NF4 base), bf16"),
                ("135m-dora-fp32", "DoRA, fp32")]
PEER_NAMES = {"peft-loop": "loop", "peft-trainer": "Trainer"}


def _ratio(x) -> str:
    return f"{x:.2f}×" if x else "–"


def peer_block() -> str:
    d = load("peer.json")
    a, s = d.get("args") or {}, d["summary"]
    m = d.get("machine") or {}
    done = f" ({m['runs_done']} of {m['runs_planned']} runs finished)" if m.get("runs_done", 0) < m.get(
        "runs_planned", 0) else ""
    out = [provenance_line(d, "peer.json", "python benchmarks/peer.py --threads 2 --repeats 2").rstrip("\n"),
           f"<sub>Recorded arguments: {a.get('repeats', NR)} repeat(s), {a.get('warmup', NR)} untimed + "
           f"{a.get('steps', NR)} timed steps, batch {a.get('batch', NR)}, dropout {a.get('dropout', NR)}, "
           f"{a.get('threads', NR)} thread(s) per run; load average {_load(m)}; whole run "
           f"{m.get('wall_s', 0) / 60:.0f} min{done}. tok/s: the median over the repeats of each run's tokens "
           "of the timed steps / their wall time; CPU time: the same over the process's CPU seconds (less "
           "disturbed by other work on a shared machine).</sub>", "",
           "| config | lorafit tok/s | faster PEFT tok/s | speed × | speed × (CPU time) | "
           "peak tensor memory × (MemTracker) | process RSS × | load average (lorafit / PEFT run) |",
           "|---|---|---|---|---|---|---|---|"]
    for key, label in PEER_CONFIGS:
        if key not in s or "faster_peer" not in s[key]:
            continue
        c = s[key]
        peer = c["faster_peer"]
        r = c["ratios"]
        out.append(f"| {label} | {c['impls']['lorafit']['tokens_per_s']:.0f} | "
                   f"{c['impls'][peer]['tokens_per_s']:.0f} ({PEER_NAMES.get(peer, peer)}) | "
                   f"{_ratio(r['tokens_per_s'])} | {_ratio(r.get('tokens_per_cpu_s'))} | "
                   f"{_ratio(r['memtracker_peak'])} | {_ratio(r['rss_timed_peak'])} | "
                   f"{_run_load(c['impls']['lorafit'])} / {_run_load(c['impls'][peer])} |")
    for key, c in s.items():
        v = c.get("recipe_vs_step")
        if v:
            cpu = f", CPU time {v['step_cpu_s']:.2f}×" if v.get("step_cpu_s") else ""
            out += ["", f"{key}: a step of `lorafit train` (the recipe: data, clipping, metrics, progress) against "
                        f"`train_step` in a bare loop on the same batches: wall time {v['step_s']:.2f}×{cpu}."]
    out += exact_lines(d)
    return "\n".join(out) + "\n"


def exact_lines(d: dict) -> list[str]:
    """One sentence per exactness run of a peer.py results file."""
    out = []
    for key, e in d["summary"].items():
        if "exact" not in e:
            continue
        ex = e["exact"]
        lf, pl = e["impls"]["lorafit"], e["impls"]["peft-loop"]
        adapter = next((r["spec"].get("adapter", "lora") for r in d.get("runs", []) if r["spec"]["config"] == key),
                       "lora")
        w = ex.get("weights") or {}
        weights = (f"; adapters after the steps: B @ A within {w['max_delta_rel']:.1e}, updates within "
                   f"{w['max_update_rel']:.1e} relative (bounds {ex['delta_rtol']:g}, {ex['update_rtol']:g})"
                   if "max_update_rel" in w else "")
        out += ["", f"Exactness run `{key}` ({adapter}, fp32, dropout 0, {ex['steps']} steps from the first, one run "
                    f"each side): losses agree to {ex['max_rel_diff']:.1e} relative (bound {ex['rtol']:g}){weights}: "
                    f"{'passed' if ex.get('passed', ex['max_rel_diff'] <= ex['rtol']) else 'FAILED'}. Its speed is "
                    f"tokens over the time of all {ex['steps']} steps, the first (compiling) step included: lorafit "
                    f"{lf['tokens_per_s']:.0f} tok/s, PEFT's loop {pl['tokens_per_s']:.0f}, "
                    f"{lf['tokens_per_s'] / pl['tokens_per_s']:.2f}×."]
    return out


def _run_load(row: dict) -> str:
    """The 1-minute load average when a configuration's run(s) of one implementation started."""
    loads = [x for x in row.get("loadavg_1m") or [] if x is not None]
    return ", ".join(f"{x:.1f}" for x in loads) if loads else NR


def _load(m: dict) -> str:
    start, end = m.get("loadavg_start"), m.get("loadavg_end")
    if not start:
        return NR
    return f"{start[0]:.1f} at the start" + (f", {end[0]:.1f} at the end" if end else "")


def half_matmul_block() -> str:
    d = load("half_matmul.json")
    out = [provenance_line(d, "half_matmul.json", "python benchmarks/half_matmul.py").rstrip("\n"), "",
           "| GEMM (m×k×n) | bf16 GFLOP/s | fp32 copies GFLOP/s | bf16 / fp32 copies |", "|---|---|---|---|"]
    for r in d["rows"]:
        m, k, n = r["shape"]
        out.append(f"| {m}×{k}×{n} | {r['bf16_gflops']:.0f} | {r['fp32_copies_gflops']:.0f} | {r['ratio']:.2f} |")
    out += ["", f"Faster here: {d.get('faster', NR)}; lorafit's rule picks: {d.get('lorafit_picks', NR)}."]
    return "\n".join(out) + "\n"


PROFILE_GROUPS = [("matmuls", lambda op: op in ("aten::mm", "aten::addmm", "aten::bmm")),
                  ("flash attention", lambda op: "flash_attention" in op),
                  ("compiled kernels", lambda op: "CompiledFxGraph" in op),
                  ("bernoulli_", lambda op: op == "aten::bernoulli_"),
                  ("log-softmax backward", lambda op: op == "aten::_log_softmax_backward_data")]


def profile_block() -> str:
    out = []
    for file in ("peer_profile_135m-fp32.json", "peer_profile_135m-bf16.json"):
        d = load(file)
        out.append(provenance_line(d, file, "python benchmarks/peer.py --profile --configs "
                                   + file.removeprefix("peer_profile_").removesuffix(".json")).rstrip("\n"))
    out += ["", "| profile | side | profiled step s | " + " | ".join(f"{g} s" for g, _ in PROFILE_GROUPS) + " |",
            "|---|---|---|" + "---|" * len(PROFILE_GROUPS)]
    for file in ("peer_profile_135m-fp32.json", "peer_profile_135m-bf16.json"):
        d = load(file)
        for r in d["runs"]:
            p = r["profile"]
            cells = [sum(o["self_ms"] for o in p["top_self"] if f(o["op"])) / 1000 for _, f in PROFILE_GROUPS]
            out.append(f"| {file.removeprefix('peer_profile_').removesuffix('.json')} | {r['impl']} | "
                       f"{p['wall_s']:.2f} | " + " | ".join(f"{c:.2f}" if c else "-" for c in cells) + " |")
    out += ["", "<sub>Self time of the 30 costliest ops per profile (torch profiler, one step, the threads above); "
                "\"-\": not among them.</sub>"]
    return "\n".join(out) + "\n"


def _short_commit(prov: dict) -> str:
    commit = (prov.get("git") or {}).get("commit") or prov.get("commit")
    return commit[:7] if commit else NR


def claims_block() -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import claims

    d = load("claims.json")
    meta, base = d["meta"], d["base"]
    runs = claims._ordered(d["runs"])
    out = [provenance_line(d, "claims.json", "python benchmarks/claims.py").rstrip("\n"),
           f"<sub>{meta['steps']} steps × {meta['micro_batch']} samples per run, {meta['threads']} thread(s); "
           f"{meta['mode']} mode; last invocation {meta.get('wall_s_this_invocation', 0) / 60:.0f} min"
           + (f" (it resumed the file: the other rows come from {len(d['provenance_earlier'])} earlier invocation(s), "
              f"at {', '.join(sorted({_short_commit(p) for p in d['provenance_earlier']}))})"
              if d.get("provenance_earlier") else "") + ". "
           + claims.measurement_note(meta) + "</sub>", "",
           "| method | rows | tuned LR | trainable | peak MiB | tokens/s (range, runs) | disk MiB | held-out EM | "
           "retention acc | retention ppl |",
           "|---|---|---|---|---|---|---|---|---|---|",
           f"| base model | - | - | - | - | - | - | {claims._pct(base['heldout_em'])} | "
           f"{claims._pct(base['retention_acc'])} | {base['retention_ppl']:.2f} |"]
    for r in runs:
        out.append(f"| {r['label'].replace('full FT', 'full FT')} | {r['train_rows']} | {r['lr']:g} | "
                   f"{r['trainable_params'] / 1e6:.1f}M | {r['peak_bytes'] / MB:.0f} | {claims._tps_cell(r)} | "
                   f"{r['disk_bytes'] / MB:.1f} | {claims._pct(r['heldout_em'])} | "
                   f"{claims._pct(r['retention_acc'])} | {r['retention_ppl']:.2f} |")
    if not (meta.get("memory_steps") and meta.get("timing")):
        out += ["", "**This stored run predates the steady-state memory measurement and the timing repeats** (its "
                    "memory is the first step's peak, before AdamW's states exist, and its tokens/s one whole training "
                    "run per cell): its memory shares understate LoRA's and its speed differences are not claimed. "
                    "`python benchmarks/claims.py` at the current commit measures both, then `make figures`."]
    out += ["", "What the numbers say (`claims.findings`, fixed thresholds; the same text as "
                "`benchmarks/results/claims.md`):", ""]
    out += [f"- {line}" for line in claims.findings(d)]
    return "\n".join(out) + "\n"


def axolotl_keys_block() -> str:
    from lorafit.config.axolotl_keys import compatibility_markdown

    return compatibility_markdown()


def axolotl_examples_block() -> str:
    """How many of axolotl's text-model LoRA/QLoRA example configs load, and the first error of the others."""
    d = load("axolotl_examples.json")
    text = [r for r in d["results"] if r["text"]]
    ok = sum(r["ok"] for r in text)
    commit = (d.get("checkout_commit") or NR)[:9]
    out = [f"**{ok} of {len(text)}** ({100 * ok / max(len(text), 1):.0f}%) of axolotl's text-model LoRA/QLoRA example "
           f"configs (`examples/**/*lora*.y*ml` at axolotl commit {commit}) load and validate with only `base_model` "
           f"and dataset paths changed; {len(d['results']) - len(text)} vision/audio configs are not counted. Each "
           "of the others stops with one line; the first line each gets, by how many configs get it:", "",
           "| configs | first error (the key, what it is, what to do) |", "|---|---|"]
    first: dict[str, list] = {}
    for r in text:
        if not r["ok"]:
            gist = r["error"].split(": ", 1)[-1]
            entry = first.setdefault(r["blocker"], [0, gist])
            entry[0] += 1
    for n, gist in sorted(first.values(), key=lambda e: (-e[0], e[1])):
        out.append(f"| {n} | {gist.replace('|', '/')} |")
    out.append("")
    return "\n".join(out) + provenance_line(d, "axolotl_examples.json")


BLOCKS: dict[str, tuple[Callable[[], str], str]] = {
    "estimator-figures": (estimator_block, "estimate_vs_measured.json, estimate_vs_measured_heldout.json"),
    "peer-figures": (peer_block, "peer.json"),
    "half-matmul-figures": (half_matmul_block, "half_matmul.json"),
    "profile-figures": (profile_block, "peer_profile_135m-fp32.json, peer_profile_135m-bf16.json"),
    "claims-figures": (claims_block, "claims.json"),
    "axolotl-keys": (axolotl_keys_block, "lorafit.config.axolotl_keys"),
    "axolotl-examples": (axolotl_examples_block, "axolotl_examples.json"),
}


def render(text: str) -> str:
    for name, (fn, _) in BLOCKS.items():
        text = write_block(text, name, fn())
    return text


def differing(text: str) -> list[str]:
    """The blocks whose README text is not what their file(s) give now (or whose markers are missing)."""
    bad = []
    for name, (fn, source) in BLOCKS.items():
        current = read_block(text, name)
        if current is None:
            bad.append(f"{name}: markers missing in README.md")
        elif current != fn():
            bad.append(f"{name}: differs from {source}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 naming each block that differs")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    if args.check:
        bad = differing(text)
        for line in bad:
            print(line)
        if bad:
            print("run `make figures` (python benchmarks/figures.py) to regenerate them")
        return 1 if bad else 0
    new = render(text)
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
        print(f"rewrote {args.readme}")
    else:
        print(f"{args.readme} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
