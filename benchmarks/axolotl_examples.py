"""How many of axolotl's LoRA/QLoRA example configs lorafit's config loader accepts, and what stops the rest.

    python benchmarks/axolotl_examples.py PATH [--json OUT] [--all]

PATH is an axolotl checkout: a work tree (with ``examples/``) or a bare git directory (read with ``git show``).
Each ``examples/**/*lora*.y*ml`` (file name containing "lora", so "qlora" too) is read, ``base_model`` is set to
``demo`` and every dataset's ``path`` to a local file; nothing else changes. Then
:meth:`lorafit.config.TrainConfig.from_dict` validates it. Configs of vision/audio models (by their folder or
file name, or a ``processor_type`` key) are counted apart: the figure is for text models (``--all`` lists them
too). Each failure is reduced to the key that stopped it; that key is then dropped and the config tried again, so
every key that stops a config is listed, and the figure once issues 16 (QLoRA, 8-bit optimizers) and 18
(multi-device) are done is given too. ``--json`` writes ``{"provenance", "checkout", "checkout_commit", "results"}``
(``benchmarks/provenance.py``: lorafit's commit, CPU, versions, runtime options).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from provenance import provenance

NON_TEXT = re.compile(r"vision|[-_/]vl[-_/]|-vl-|llava|pixtral|voxtral|audio|smolvlm|internvl|paddleocr|glm46v|"
                      r"llama-3-vision|qwen2-vl|qwen2_5-vl|lfm2-vl")
EXAMPLE = re.compile(r"^examples/.*lora[^/]*\.ya?ml$", re.IGNORECASE)


def example_files(root: Path) -> dict[str, str]:
    """path -> text of every LoRA/QLoRA example config in the checkout (work tree or bare git dir)."""
    if (root / "examples").is_dir():
        return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
                for p in sorted((root / "examples").rglob("*")) if EXAMPLE.match(p.relative_to(root).as_posix())}
    names = subprocess.run(["git", "-C", str(root), "ls-tree", "-r", "--name-only", "HEAD", "examples"],
                           check=True, capture_output=True, text=True).stdout.split()
    return {n: subprocess.run(["git", "-C", str(root), "show", f"HEAD:{n}"], check=True, capture_output=True,
                              text=True).stdout for n in names if EXAMPLE.match(n)}


def is_text_model(path: str, cfg: dict) -> bool:
    return not NON_TEXT.search(path.lower()) and not cfg.get("processor_type")


def adapt(cfg: dict, data_file: str) -> dict:
    """base_model -> demo, dataset paths -> the local file; nothing else."""
    cfg = dict(cfg)
    cfg["base_model"] = "demo"
    for key in ("datasets", "test_datasets"):
        if isinstance(cfg.get(key), list):
            cfg[key] = [{**d, "path": data_file} if isinstance(d, dict) else d for d in cfg[key]]
    return cfg


def blocker(message: str) -> str:
    """The key an error names (``key 'datasets[0].type'`` -> ``datasets[].type``), or the message's gist."""
    m = re.search(r"key '([^']+)'", message)
    if m:
        return re.sub(r"\[\d+\]", "[]", m.group(1))
    return message.split(": ", 1)[-1][:70]


# what other open issues cover: 4-bit/quantized bases and low-bit (8-bit, paged, 4-bit) optimizers (16),
# multi-device training (18)
OTHER_ISSUES = {"16": re.compile(r"quantized bases|8-bit|QLoRA|'optimizer': got '\w*4bit'"),
                "18": re.compile(r"issue 18")}


def all_blockers(cfg: dict, source: str) -> list[tuple[str, str]]:
    """Every key that stops ``cfg``, as (key, message): the first error's key is dropped (a dataset's required key
    replaced by a plain value) and the config validated again, until it loads or nothing can be dropped."""
    from lorafit.config import TrainConfig
    from lorafit.errors import LorafitError

    found: list[tuple[str, str]] = []
    cfg = json.loads(json.dumps(cfg, default=str))
    for _ in range(40):
        try:
            TrainConfig.from_dict(cfg, source=source)
            return found
        except LorafitError as e:
            message = str(e)
        m = re.search(r"key '([^']+)'", message)
        found.append((blocker(message), message))
        if not m:
            return found
        d = re.fullmatch(r"(datasets|test_datasets)\[(\d+)\]\.(\w+)", m.group(1))
        if d:
            entry = cfg[d.group(1)][int(d.group(2))]
            if d.group(3) == "type":
                entry["type"] = "completion"
            elif d.group(3) in entry:
                del entry[d.group(3)]
            else:
                return found
        elif m.group(1) in cfg:
            del cfg[m.group(1)]
        else:
            return found
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path)
    ap.add_argument("--json", type=Path, help="write the per-file results here")
    ap.add_argument("--all", action="store_true", help="list the vision/audio configs' results too")
    args = ap.parse_args(argv)

    files = example_files(args.checkout)
    results = []
    for path, text in files.items():
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            results.append({"path": path, "text": True, "ok": False, "blocker": "invalid YAML", "error": str(e)[:200]})
            continue
        if not isinstance(raw, dict):
            continue
        text_model = is_text_model(path, raw)
        blockers = all_blockers(adapt(raw, "data.jsonl"), path)
        issues = sorted({n for _, msg in blockers for n, pat in OTHER_ISSUES.items() if pat.search(msg)})
        own = [k for k, msg in blockers if not any(pat.search(msg) for pat in OTHER_ISSUES.values())]
        r = {"path": path, "text": text_model, "ok": not blockers, "blockers": [k for k, _ in blockers],
             "other_issues": issues, "own_blockers": own}
        if blockers:
            r["blocker"], r["error"] = blockers[0][0], blockers[0][1]
        results.append(r)

    text = [r for r in results if r["text"]]
    ok = sum(r["ok"] for r in text)
    print(f"axolotl text-model LoRA/QLoRA example configs that load: {ok}/{len(text)}"
          f" ({100 * ok / max(len(text), 1):.0f}%); vision/audio configs not counted: {len(results) - len(text)}")
    after = sum(not r["own_blockers"] for r in text)
    print(f"would load once issues 16 (QLoRA/quantized bases, low-bit optimizers) and 18 (multi-device) are done:"
          f" {after}/{len(text)} ({100 * after / max(len(text), 1):.0f}%)")
    why = collections.Counter(k for r in text for k in dict.fromkeys(r["blockers"]))
    print("every key that stops a config (configs it stops; a config may have several):")
    for key, n in why.most_common():
        print(f"  {n:3d}  {key}")
    print("configs stopped by keys of no other issue:")
    for r in text:
        if r["own_blockers"]:
            print(f"  {r['path']}: {', '.join(r['own_blockers'])}")
    print("first error of each config that does not load:")
    for r in results:
        if (r["text"] or args.all) and not r["ok"]:
            print(f"  {r['path']}: {r['error'].split(': ', 1)[-1]}")
    if args.json:
        # the checkout's commit too: which axolotl examples were screened, not only by which lorafit
        examples_commit = subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"], capture_output=True,
                                         text=True).stdout.strip() or None
        payload = {"provenance": provenance(), "checkout": str(args.checkout), "checkout_commit": examples_commit,
                   "results": results}
        args.json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
