"""Issue 19 pilot: a one-shot example of the answer format inside SmolLM2's hinted (restate) context."""

import json
import sys
import time

import torch

from onsft.data.rows import load_examples
from onsft.engine.hinted import HintedConfig
from onsft.pipeline.rewrite import rewriting
from onsft.pipeline.rewrite.rewrite_config import RewriteConfig
from onsft.runtime.models import load_model, load_tokenizer, resolve_model_path

torch.set_num_threads(1)
FOLLOW = "Please write your solution again, step by step, and end with the final answer in \\boxed{}."
EXAMPLES = {
    "arith": [
        {"role": "user", "content": "What is 12 + 7 - 5?"},
        {"role": "assistant", "content": "12 + 7 = 19\n19 - 5 = 14\nSo the result is 14."},
        {"role": "user", "content": FOLLOW},
        {"role": "assistant", "content": "First, 12 + 7 = 19.\nThen, 19 - 5 = 14.\nThe final answer is \\boxed{14}."},
    ],
    "word": [
        {"role": "user", "content": "Tom has 3 bags with 4 apples each. He eats 2 apples. How many apples are left?"},
        {
            "role": "assistant",
            "content": "3 bags of 4 apples is 3 * 4 = 12 apples. After eating 2, 12 - 2 = 10 apples are left.",
        },
        {"role": "user", "content": FOLLOW},
        {
            "role": "assistant",
            "content": "Tom starts with 3 * 4 = 12 apples.\nHe eats 2, so 12 - 2 = 10 apples are left.\nThe final answer is \\boxed{10}.",
        },
    ],
}
original = rewriting.hinted_messages
path = resolve_model_path("smollm2-135m")
model, tok = load_model(path), load_tokenizer(path)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["none", "arith", "word"]
for variant in variants:
    shot = EXAMPLES.get(variant, [])
    rewriting.hinted_messages = lambda p, r, h, shot=shot: shot + original(p, r, h)
    parts, t0 = [], time.time()
    for task in ["chain_sum", "gcd", "gsm_symbolic"]:
        ex = load_examples(f"runs/rewrite-smollm2/{task}.jsonl", require_answer=True, require_reference=True)[:n]
        cfg = RewriteConfig(data="x", own_samples=0, samples_per_prompt=1)
        recs = rewriting.rewrite_examples(
            model, tok, ex, cfg, HintedConfig(max_new_tokens=192, marker_before_stop=variant.startswith("hold"))
        )
        cands = [
            c for r in recs for c in (eval(r["candidates"]) if isinstance(r["candidates"], str) else r["candidates"])
        ]
        marker = sum(bool(c.get("handed_over")) for c in cands)
        kept = [r for r in recs if r["provenance"] == "hinted"]
        z = sum(r["z"] for r in kept) / max(1, len(kept))
        trunc = sum(r.get("truncated") or r.get("finish_reason") == "length" for r in recs)
        boxed = sum("\\boxed{" in (r.get("response") or "") for r in kept)
        parts.append(f"{task}: marker {marker}/{len(cands)} ok {len(kept)} boxed {boxed} len {trunc} z {z:+.2f}")
    print(f"{variant} | " + " | ".join(parts) + f" {time.time() - t0:.0f}s", flush=True)
    if variant != "none":
        print("  e.g.", json.dumps(kept[0]["response"][-300:] if kept else None), flush=True)
