"""What a rewrite produced: the training-ready rows and the counts and mean phi per provenance."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from onsft.pipeline.rewrite.best_of_n import by_beta, handover, yield_by_samples
from onsft.pipeline.rewrite.rewrite_config import ADDED_FIELDS

Z_95 = 1.645  # one-sided 5% point of N(0, 1)
LOW_MARKER_SHARE = 0.5  # below this share of hinted candidates reaching the marker, the summary advises
HIGH_CUT_SHARE = 0.25  # from this share of candidates cut before any marker (EOS held), it advises too


def train_rows(records: Sequence[dict]) -> list[dict]:
    """The kept rows as prompt + completion (the response), with the provenance of the response (own or
    hinted, its sample index and beta); other input columns stay, except the ones that would give `onsft
    train` a second prompt/response (`messages`). A row with other kept candidates (--keep all) gives one
    training row per candidate."""
    rows = []
    for record in records:
        if record["provenance"] == "dropped":
            continue
        if "messages" in record and record["messages"] is not None:
            turns = record["messages"]
            last = max((i for i, t in enumerate(turns) if t.get("role") == "assistant"), default=len(turns))
            prompt = turns[:last]
        else:
            prompt = record["prompt"]
        base = {k: v for k, v in record.items() if k not in ("messages", "prompt", "completion", *ADDED_FIELDS)}
        main = {key: record.get(key) for key in ("response", "sample_index", "beta", "mean_phi", "false_steps")}
        for kept in [main, *(record.get("also_kept") or [])]:
            row = {
                "prompt": prompt,
                "completion": kept["response"],
                **base,
                "provenance": record["provenance"],
                "sample_index": kept["sample_index"],
                "beta": kept["beta"],
                "mean_phi": kept["mean_phi"],
            }
            if kept["false_steps"] is not None:  # the step check's flags (--step_check flag), to filter on
                row["false_steps"] = kept["false_steps"]
            rows.append(row)
    return rows


def _phi_stats(records: Sequence[dict], key: str = "mean_phi", tokens: str = "scored_tokens") -> dict:
    scored = [r for r in records if r.get(key) is not None]
    if not scored:
        return {"n": 0}
    stats = {"n": len(scored), "mean_phi": sum(r[key] for r in scored) / len(scored)}
    if tokens and all(r.get(tokens) for r in scored):
        total = sum(r[tokens] for r in scored)
        stats["mean_phi_token_weighted"] = sum(r[key] * r[tokens] for r in scored) / total
    z_key = key.replace("mean_phi", "z")
    stats["mean_z"] = sum(r[z_key] for r in scored) / len(scored)
    return stats


def _z_stats(records: Sequence[dict]) -> dict:
    """Z of kept responses against the model's own distribution (each response's Z is already that test: a
    sample of the model itself has Z ~ N(0, 1)): mean, std, the share below -1.645 (off-policy at one-sided
    p < 0.05) and above +1.645 (sharper than the model: typical of low-temperature decoding)."""
    zs = [r["z"] for r in records if r.get("z") is not None]
    if not zs:
        return {"n": 0}
    mean = sum(zs) / len(zs)
    return {
        "n": len(zs),
        "mean_z": mean,
        "std_z": (sum((z - mean) ** 2 for z in zs) / max(len(zs) - 1, 1)) ** 0.5,
        "share_below_-1.645": sum(z < -Z_95 for z in zs) / len(zs),
        "share_above_1.645": sum(z > Z_95 for z in zs) / len(zs),
    }


def _step_check(records: Sequence[dict]) -> dict:
    """Kept rows whose steps were checked, how many steps, the rows flagged for a false one (kept, with
    --step_check flag) and the rows dropped for one (--step_check drop)."""
    kept = [r for r in records if r["provenance"] != "dropped" and r.get("false_steps") is not None]
    return {
        "rows_checked": len(kept),
        "steps_checked": sum(r["steps_checked"] for r in kept),
        "flagged": sum(bool(r["false_steps"]) for r in kept),
        "dropped": sum(r.get("drop_reason") == "false step" for r in records),
    }


def summarize(records: Sequence[dict]) -> dict:
    """Counts and mean phi per provenance from finished records (pure)."""
    n = len(records)
    count = Counter(r["provenance"] for r in records)
    attempted = [
        r for r in records if r["hinted_tries"] or str(r.get("drop_reason")).startswith(("no analysis", "analysis"))
    ]
    k = records[0]["own_samples"] if records else 0
    rewritten = [r for r in records if r["provenance"] == "hinted"]
    return {
        "rows": n,
        "own_correct": count["own"],
        "rewritten": count["hinted"],
        "dropped": count["dropped"],
        "kept": count["own"] + count["hinted"],
        "training_rows": count["own"] + count["hinted"] + sum(len(r.get("also_kept") or []) for r in records),
        "prompts_with_an_own_correct_sample": sum(r["own_correct"] > 0 for r in records),
        "own_sample_accuracy": sum(r["own_correct"] for r in records) / (n * k) if n and k else None,
        "hinted_attempted": len(attempted),
        "hinted_success_rate": count["hinted"] / len(attempted) if attempted else None,
        "mean_phi": {
            "references": _phi_stats(records, "reference_mean_phi", ""),
            "references_of_rewritten": _phi_stats(rewritten, "reference_mean_phi", ""),
            "rewritten": _phi_stats(rewritten),
            "own": _phi_stats([r for r in records if r["provenance"] == "own"]),
            "kept": _phi_stats([r for r in records if r["provenance"] != "dropped"]),
            "dropped": _phi_stats([r for r in records if r["provenance"] == "dropped"]),
        },
        "drop_reasons": dict(sorted(Counter(r["drop_reason"] for r in records if r.get("drop_reason")).items())),
        # Responses that did not end by themselves: kept only with --keep_truncated, else the row is
        # dropped when its only verified responses were cut.
        "truncated": {
            "kept": sum(r["provenance"] != "dropped" and bool(r["truncated"]) for r in records),
            "dropped": sum(r.get("drop_reason") == "truncated" for r in records),
        },
        "z": {
            "rewritten": _z_stats(rewritten),
            "own": _z_stats([r for r in records if r["provenance"] == "own"]),
        },
        "step_check": _step_check(records),
        # Best-of-n: the share of failed prompts with a usable candidate among their first n, per beta, and
        # how many hinted candidates handed over to the plain context at the answer marker.
        "yield": yield_by_samples(records),
        "by_beta": by_beta(records),
        "answer_marker": handover(records),
        "finish_reasons": dict(sorted(Counter(r["finish_reason"] for r in records if r["finish_reason"]).items())),
        "verify_methods": dict(sorted(Counter(r["verify_method"] for r in records if r["verify_method"]).items())),
        "generated_tokens": sum(r["generated_tokens"] for r in records),
    }


def advice(summary: dict, hint: dict) -> list[str]:
    """Concrete suggestions when the rewrite went poorly in a way a setting can fix (printed as warnings)."""
    notes = []
    marker = summary["answer_marker"]
    if marker["candidates"] and marker["share"] is not None and marker["share"] < LOW_MARKER_SHARE:
        restate = (
            ""
            if hint.get("form") == "restate"
            else " --hint_form restate (the plain prompt with the reference as the model's earlier answer),"
        )
        hold = "" if hint.get("marker_before_stop") else " --marker_before_stop (no EOS before a marker),"
        notes.append(
            f"only {marker['share']:.0%} of hinted candidates reached the answer marker {hint.get('answer_marker')!r}, "
            "so the plain context rarely finished the answers and the rewrites may lack the answer format; try"
            f"{restate} --answer_marker '\\boxed{{|answer is' (add a phrase the model writes by habit before its "
            f"answer),{hold} or a lower --hint_beta (e.g. 1) so that the hinted context leads more often."
        )
    if hint.get("marker_before_stop") and (marker.get("cut_share") or 0) >= HIGH_CUT_SHARE:
        notes.append(
            f"{marker['cut_share']:.0%} of hinted candidates ran to --max_new_tokens without reaching an answer "
            "marker, before which EOS is held (--marker_before_stop, the model's rewrite profile); raise "
            "--max_new_tokens if the solutions are long, or pass --marker_before_stop false (sampling at a high "
            "--temperature often wanders off instead of reaching a marker)."
        )
    kept = summary["step_check"]
    if kept["rows_checked"] and kept["flagged"] / kept["rows_checked"] >= 0.25:
        notes.append(
            f"{kept['flagged']} of {kept['rows_checked']} kept rows state a false step (e.g. a wrong `a + b = c`); "
            "pass --step_check drop to keep only rows whose stated steps are true."
        )
    return notes
