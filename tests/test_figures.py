"""README figures come from the results files: every generated block equals what ``benchmarks/figures.py`` makes
from its JSON, a changed number is caught, and the claims report reads both the older JSON and the one with
timing repeats (calling a difference within the run-to-run spread a tie)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import claims  # noqa: E402
import figures  # noqa: E402


def test_readme_blocks_match_their_results_files():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert figures.differing(readme) == [], "run: make figures (python benchmarks/figures.py)"


def test_check_names_the_block_whose_number_differs(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = figures.read_block(readme, "peer-figures")
    assert "| fp32 | " in block
    changed = readme.replace(block, block.replace("| fp32 | ", "| fp32 | 1", 1))
    path = tmp_path / "README.md"
    path.write_text(changed, encoding="utf-8")
    assert figures.main(["--check", "--readme", str(path)]) == 1
    out = capsys.readouterr().out
    assert "peer-figures: differs from peer.json" in out and "claims-figures" not in out
    assert figures.main(["--readme", str(path)]) == 0  # regenerates it
    assert path.read_text(encoding="utf-8") == readme
    assert figures.main(["--check", "--readme", str(path)]) == 0


def test_blocks_name_what_their_files_record():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    peer = json.loads((figures.RESULTS / "peer.json").read_text())
    block = figures.read_block(readme, "peer-figures")
    assert peer["machine"]["cpu"] in block and peer["machine"]["commit"] in block
    assert f"{peer['summary']['135m-fp32']['ratios']['tokens_per_s']:.2f}×" in block
    half = figures.read_block(readme, "half-matmul-figures")
    row = json.loads((figures.RESULTS / "half_matmul.json").read_text())["rows"][2]
    assert f"| {row['bf16_gflops']:.0f} | {row['fp32_copies_gflops']:.0f} |" in half
    stored = json.loads((figures.RESULTS / "half_matmul.json").read_text())
    cpu = (stored.get("provenance") or {}).get("cpu", {}).get("model")
    assert (cpu in half) if cpu else ("CPU not recorded" in half)
    claims_block = figures.read_block(readme, "claims-figures")
    recorded = json.loads((figures.RESULTS / "claims.json").read_text())["provenance"]
    assert recorded["cpu"]["model"].split()[0] in claims_block and recorded["git"]["commit"][:7] in claims_block
    # the GFLOP/s figures in prose come from the table, nowhere else
    outside = readme.replace(half, "")
    assert "GFLOP/s" not in outside.replace("bf16 GFLOP/s", "").replace("fp32 copies GFLOP/s", "")


def test_provenance_line_reads_every_shape():
    new = {"provenance": {"git": {"commit": "a" * 40, "dirty": False}, "cpu": {"model": "X", "flags": {
        "avx2": True, "avx512f": True, "amx_tile": False}}, "threads": 2, "torch": {"cpu_capability": "AVX512"},
        "command": ["claims.py", "--repeats", "2"], "runtime_options": {"describe": "kernels eager"},
        "date": "2026-01-01T00:00:00"}}
    line = figures.provenance_line(new, "x.json")
    assert "CPU X (AVX2, AVX-512, no AMX" in line and "commit aaaaaaa;" in line and "2 thread(s)" in line
    assert "`python benchmarks/claims.py --repeats 2`" in line and "kernels eager" in line
    assert "records no provenance" in figures.provenance_line({}, "x.json", "python x.py")


def _with_repeats(old: dict, tps: dict[str, list[float]]) -> dict:
    """The stored claims.json turned into the new shape: timing repeats per cell with the given tokens/s."""
    d = copy.deepcopy(old)
    d["meta"].update(memory_steps=3, timing={"repeats": 2, "warmup": 2, "timed": 8})
    for r in d["runs"].values():
        runs = [{"tokens_per_s": t, "step_s": [1.0], "tokens": 1, "peak_bytes": r["peak_bytes"],
                 "peak_by_kind": r["peak_by_kind"], "rss_peak_bytes": r["rss_peak_bytes"],
                 "trainable_params": r["trainable_params"], "total_params": r["total_params"]}
                for t in tps.get(r["method"], [100.0, 110.0])]
        r["timing_runs"] = runs
        r.update(claims.timing_summary(runs))
    return d


def _speed_line(results: dict) -> str:
    return next(s for s in claims.findings(results) if s.startswith("**Speed"))


def test_claims_speed_is_a_tie_within_the_spread_and_unclaimed_from_one_run():
    # the older shape (one run per cell, no spread, first-step memory): the stored run before the repeats came
    old = json.loads((Path(__file__).parent / "fixtures" / "claims_single_run.json").read_text())
    assert "not established" in _speed_line(old)
    tie = _with_repeats(old, {"full": [100.0, 120.0], "r4": [105.0, 118.0], "r8": [112.0, 125.0],
                              "r16": [95.0, 100.0], "r64": [90.0, 101.0]})
    line = _speed_line(tie)
    assert "a tie" in line and "full FT 20 tok/s (18%)" in line, line
    faster = _with_repeats(old, {"full": [100.0, 104.0], "r4": [150.0, 155.0], "r8": [150.0, 151.0],
                                 "r16": [140.0, 146.0], "r64": [120.0, 125.0]})
    assert "is faster" in _speed_line(faster)
    mixed = _with_repeats(old, {"full": [100.0, 104.0], "r4": [150.0, 155.0], "r8": [101.0, 103.0],
                                "r16": [140.0, 146.0], "r64": [120.0, 125.0]})
    assert "LoRA r=8 102 tok/s, 1.00x (tie)" in _speed_line(mixed)
    r = tie["runs"]["full-large"]
    assert r["tokens_per_s_runs"] == [100.0, 120.0] and r["tokens_per_s_spread"] == 20.0 and r["repeats"] == 2
    assert claims._tps_cell(r) == "110 (100-120, 2 runs)"
    assert "Steady-state" in next(s for s in claims.findings(tie) if s.startswith("**Memory"))
    assert "First-step" in next(s for s in claims.findings(old) if s.startswith("**Memory"))


@pytest.mark.parametrize("a,b,sa,sb,want", [(100, 110, 10, 5, "tie"), (100, 111, 10, 5, "lower"),
                                             (120, 100, 5, 5, "higher"), (100, 100, None, 5, "unknown")])
def test_claims_compare(a, b, sa, sb, want):
    assert claims.compare(a, b, sa, sb) == want


def test_claims_report_qlora_beside_lora_of_its_rank_not_in_the_lora_claims():
    old = json.loads((Path(__file__).parent / "fixtures" / "claims_single_run.json").read_text())
    results = _with_repeats(old, {"full": [100.0, 104.0], "r4": [150.0, 155.0], "r8": [150.0, 151.0],
                                  "r16": [140.0, 146.0], "r64": [120.0, 125.0]})
    q = {**results["runs"]["r8-large"], "run_id": "q8-large", "method": "q8", "label": claims.label("q8"),
         "peak_bytes": results["runs"]["r8-large"]["peak_bytes"] // 2, "tokens_per_s": 140.0,
         "tokens_per_s_runs": [139.0, 141.0], "tokens_per_s_spread": 2.0}
    results["runs"]["q8-large"] = q
    lines = claims.findings(results)
    qlora = next(s for s in lines if s.startswith("**QLoRA"))
    assert "QLoRA r=8 over an NF4 base against LoRA r=8" in qlora and "(50%)" in qlora and "140 vs 150" in qlora
    assert "QLoRA" not in next(s for s in lines if s.startswith("**Memory"))
    assert "not compared" in qlora  # cells timed without a recorded commit (or at two) are not compared
    for r in (q, results["runs"]["r8-large"]):
        r["commit"] = "c0ffee"
    assert "140 vs 150 tok/s (lower)" in next(s for s in claims.findings(results) if s.startswith("**QLoRA"))
    assert claims.make_cfg("q8", Path("d.jsonl"), Path("e.jsonl"), 2, 2, 1e-3, Path("o")).four_bit["quant_type"] == "nf4"
