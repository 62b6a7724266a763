"""Rebuild docs/study-smollm2/rewrite_measurement.json: this session's runs (profile with marker_before_stop)
from each run's summary.json and records.jsonl; the earlier runs (profile without it) kept under `before`."""

import json
import statistics
from pathlib import Path

doc = Path("docs/study-smollm2/rewrite_measurement.json")
old = json.loads(doc.read_text())
before = old.get("before", {"what": old["what"], "runs": old["runs"]})
runs = []
for task, t, tokens in [(k, t, 160) for k in ["chain_sum", "gcd", "gsm_symbolic"] for t in ["0.3", "1.0"]] + [
    ("gsm_symbolic", "0.3", 320)
]:
    out = Path(f"runs/rewrite-smollm2/hold/{task}-t{t}" + ("-320" if tokens == 320 else ""))
    if not (out / "summary.json").is_file():
        continue
    s = json.loads((out / "summary.json").read_text())
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    kept = [r for r in recs if r["provenance"] == "hinted"]
    z = [r["z"] for r in kept if r.get("z") is not None]
    by = {b["samples"]: b["share"] for b in s["yield"]["by_samples"]}
    runs.append(
        {
            "task": task,
            "temperature": float(t),
            "max_new_tokens": tokens,
            "prompts": len(recs),
            "candidates": s["answer_marker"]["candidates"],
            "marker_share": s["answer_marker"]["share"],
            "kept_marker_share": s["answer_marker"]["kept_share"],
            "yield_n1": by[1],
            "yield_n4": by[4],
            "kept": len(kept),
            "step_check_flagged": s["step_check"]["flagged"],
            "step_check_rows": s["step_check"]["rows_checked"],
            "z_kept_mean": statistics.mean(z),
            "z_kept_std": statistics.pstdev(z),
            "z_kept_above_1.645": sum(v > 1.645 for v in z) / len(z),
            "z_kept_below_-1.645": sum(v < -1.645 for v in z) / len(z),
            "mean_phi_references": statistics.mean(r["reference_mean_phi"] for r in recs),
            "mean_phi_kept": statistics.mean(r["mean_phi"] for r in kept),
            "candidate_ends": {
                f"{k}": v
                for k, v in sorted(
                    __import__("collections")
                    .Counter(
                        f"{c.get('finish_reason')}/{c.get('problem') or 'usable'}"
                        for r in recs
                        for c in r["candidates"]
                    )
                    .items()
                )
            },
            "wall_seconds": s.get("seconds") or s.get("wall_seconds"),
            "hint": s.get("hint"),
        }
    )
new = {
    "what": "onsft rewrite --model smollm2-135m --own_samples 0 --samples_per_prompt 4 --max_new_tokens 160 "
    "--chunk_size 64 [--temperature T] with the SmolLM2 rewrite profile as shipped now (restate form, markers "
    "\\boxed{|answer is, beta 1, marker_before_stop), 64 prompts per task (runs/rewrite-smollm2/TASK.jsonl, seed 0 "
    "data, gcd max_value=50); own-sample calibration (audits) from onsft audit --self_check 64 in the earlier session",
    "runs": runs,
    "audits": old["audits"],
    "before": before,
    "former_defaults": old["former_defaults"],
}
doc.write_text(json.dumps(new, indent=1) + "\n")
for r in runs:
    print(
        r["task"],
        r["temperature"],
        f"marker {r['marker_share']:.1%} yield {r['yield_n1']:.0%}/{r['yield_n4']:.0%} "
        f"flag {r['step_check_flagged']}/{r['step_check_rows']} z {r['z_kept_mean']:+.2f}±{r['z_kept_std']:.2f} "
        f"({r['z_kept_above_1.645']:.0%}) phi {r['mean_phi_references']:+.3f}->{r['mean_phi_kept']:+.3f} {r['candidate_ends']} {r['wall_seconds']}",
    )
