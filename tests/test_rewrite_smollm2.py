"""On the real model (runs only where smollm2-135m is already in the onsft cache; tests never download it):
the rewrite profile makes SmolLM2's hinted rewrites reach the answer marker and hand over to its plain context.
With the generic hinted context it answered "I'm ready to help. What's your next question?" or ended without
the marker (0 of 13 hinted candidates reached it in the issue's try)."""

from __future__ import annotations

import pytest

from onsft.data.rows import parse_example
from onsft.engine.hinted import HintedConfig
from onsft.pipeline.rewrite import hint_profiles
from onsft.pipeline.rewrite.rewriting import RewriteConfig, rewrite_examples
from onsft.runtime import aliases
from onsft.runtime.models import load_model, load_tokenizer

CACHED = (aliases.cache_dir() / aliases.SMOLLM2 / aliases.SMOLLM2_GGUF).is_file()

# Two chain_sum rows as `onsft data gym --task chain_sum` writes them (prompt, answer, reference).
ROWS = [
    ("15 - 43 - 75", "-103", "15 - 43 = -28\n-28 - 75 = -103"),
    ("23 + 60 - 9", "74", "23 + 60 = 83\n83 - 9 = 74"),
]


@pytest.mark.slow
@pytest.mark.skipif(not CACHED, reason="smollm2-135m is not in the onsft cache (tests never download it)")
def test_smollm2_rewrites_reach_the_answer_marker():
    tokenizer, model = load_tokenizer("smollm2-135m"), load_model("smollm2-135m")
    profile = hint_profiles.model_profile("smollm2-135m", model.config, tokenizer)
    assert profile.name == "smollm2" and profile.marker_before_stop
    examples = [
        parse_example(
            {
                "prompt": f"State the final answer to the following arithmetic problem: {expression} =\n\n"
                "Put your final answer in \\boxed{}.",
                "answer": answer,
                "reference": f"{steps}\nThe final answer is \\boxed{{{answer}}}.",
            },
            i,
            i + 1,
            "rows",
            require_response=False,
        )
        for i, (expression, answer, steps) in enumerate(ROWS)
    ]
    config = RewriteConfig(data="rows", own_samples=0, samples_per_prompt=1, step_check="off")
    records = rewrite_examples(model, tokenizer, examples, config, HintedConfig(max_new_tokens=96, seed=0))
    for record in records:
        (candidate,) = record["candidates"]
        assert candidate["handed_over"], record["response"]
        assert record["beta"] == 1.0  # the profile's, not the generic 3.0
    assert sum(r["verified"] for r in records) >= 1
