"""Best-of-n rewriting (onsft.pipeline.rewrite.best_of_n): the choice rule on fabricated candidates, the judgement
of a candidate, candidates that do not depend on N or on the chunking, --keep all, the yield and hand-over
summaries, and on the organism: the yield against N and the provenance of every kept row."""

import math
from pathlib import Path

import pytest

from onsft.data.rows import parse_example
from onsft.data.step_check import StepReport, get_step_checker
from onsft.data.verify import Verdict, get_verifier
from onsft.engine.decoding import Generation
from onsft.engine.hinted import HintedConfig
from onsft.errors import UserError
from onsft.pipeline.rewrite import best_of_n, rewrite_summary, rewriting
from onsft.pipeline.rewrite.best_of_n import BestOfNConfig, Candidate
from onsft.pipeline.rewrite.rewrite_config import RewriteConfig
from onsft.runtime.models import load_model, load_tokenizer, read_model_info
from tiny import tiny_tokenizer, untied_model

ORGANISM = Path(__file__).resolve().parents[1] / "src" / "onsft" / "organism" / "model"


def fabricated(sample, z, problem=None, text=None, beta=1.0, finish="eos") -> Candidate:
    generation = Generation([1], text if text is not None else f"text {sample}", finish, 1)
    candidate = Candidate(sample, beta, generation, Verdict(problem != "not verified", "exact", None))
    candidate.problem, candidate.score = problem, {"mean_phi": 0.0, "z": z}
    return candidate


# ------------------------------------------------------------------------------------------- choice


def test_best_is_the_usable_candidate_with_the_highest_z():
    candidates = [
        fabricated(0, -1.5),
        fabricated(1, 2.5, problem="not verified"),  # the highest Z, but wrong
        fabricated(2, 0.7),
        fabricated(3, 9.0, problem="truncated"),
        fabricated(4, 0.2),
        fabricated(5, 5.0, problem="false step"),
    ]
    assert [c.sample for c in best_of_n.choose(candidates, "best")] == [2]
    assert [c.sample for c in best_of_n.choose(candidates, "first")] == [0]
    assert [c.sample for c in best_of_n.choose(candidates, "all")] == [0, 2, 4]
    # Ties go to the lower sample; a candidate without a finite Z loses to every scored one.
    tied = [fabricated(0, None), fabricated(1, 0.3), fabricated(2, 0.3), fabricated(3, math.nan)]
    assert [c.sample for c in best_of_n.choose(tied, "best")] == [1]
    assert best_of_n.choose([fabricated(0, 1.0, problem="not verified")], "best") == []
    # --keep all keeps one candidate per distinct text.
    same = [fabricated(0, 0.1, text="a"), fabricated(1, 0.9, text="a"), fabricated(2, 0.5, text="b")]
    assert [c.sample for c in best_of_n.choose(same, "all")] == [0, 2]
    assert [c.sample for c in best_of_n.to_score(same, "all")] == [0, 2]
    assert [c.sample for c in best_of_n.to_score(same, "first")] == [0]


def test_judging_a_candidate_and_what_a_dropped_row_shows():
    verifier, checker = get_verifier("exact"), get_step_checker("arithmetic")

    def judged(text, finish="eos", keep_truncated=False, drop=False):
        candidate = Candidate(0, 1.0, Generation([1], text, finish, 1))
        best_of_n.judge(candidate, "5", verifier, checker, keep_truncated, drop)
        return candidate

    assert judged("2 + 3 = 5, \\boxed{5}").problem is None
    assert judged("\\boxed{6}").problem == "not verified"
    assert judged("\\boxed{5}", finish="length").problem == "truncated"
    assert judged("\\boxed{5}", finish="repetition").problem == "truncated"
    assert judged("\\boxed{5}", finish="length", keep_truncated=True).problem is None
    flagged = judged("2 + 2 = 5, \\boxed{5}")
    assert flagged.problem is None and flagged.steps == StepReport(1, ["2 + 2 = 5 (computes to 4)"])
    assert judged("2 + 2 = 5, \\boxed{5}", drop=True).problem == "false step"

    calls = []
    candidates = [Candidate(s, 1.0, Generation([1], str(s), "eos", 1)) for s in range(4)]

    def judge_one(candidate):
        calls.append(candidate.sample)
        candidate.problem = None if candidate.sample == 1 else "not verified"

    best_of_n.judge_all(candidates, True, judge_one)
    assert calls == [0, 1] and candidates[2].problem == "unjudged" and not candidates[2].usable
    best_of_n.judge_all(candidates, False, judge_one)
    assert calls == [0, 1, 0, 1, 2, 3]

    # A dropped row shows its most promising try: a verified one with a false step, else one that was cut,
    # else the last unverified one.
    tries = [fabricated(0, 0, "not verified"), fabricated(1, 0, "truncated"), fabricated(2, 0, "not verified")]
    assert best_of_n.shown(tries).sample == 1
    assert best_of_n.shown([*tries, fabricated(3, 0, "false step")]).sample == 3
    assert best_of_n.shown([fabricated(0, 0, "not verified"), fabricated(1, 0, "not verified")]).sample == 1
    assert best_of_n.shown([]) is None


def test_the_beta_ladder_and_its_checks():
    assert best_of_n.candidate_betas(BestOfNConfig(samples_per_prompt=5, beta_ladder="0.5, 1,2"), 3.0) == [
        0.5,
        1.0,
        2.0,
        0.5,
        1.0,
    ]
    assert best_of_n.candidate_betas(BestOfNConfig(samples_per_prompt=2), 3.0) == [3.0, 3.0]
    for bad in ("1,nan", "1,-2", "one", ",", "inf"):
        with pytest.raises(UserError, match="beta_ladder"):
            BestOfNConfig(beta_ladder=bad).validate()
    with pytest.raises(UserError, match="unknown keep `most`"):
        BestOfNConfig(keep="most").validate()
    with pytest.raises(UserError, match="samples_per_prompt"):
        BestOfNConfig(samples_per_prompt=0).validate()


# -------------------------------------------------------------------------------------- candidates


def test_candidates_do_not_depend_on_n_the_other_rows_or_the_batch():
    """Candidate s of the row with input index i is fixed by (seed, i, s): the same with N = 1 or 3, alone or
    with other rows, in any batch size. That is what makes the yield non-decreasing in N."""
    model, tokenizer = untied_model(), tiny_tokenizer()
    prompts = [tokenizer(f"<user>{q}<assistant>")["input_ids"] for q in ("ab", "What is 3?", "xyz q")]
    hinted = [tokenizer(f"<user>hint {q}<assistant>")["input_ids"] for q in ("ab", "What is 3?", "xyz q")]
    config = HintedConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5)

    def tokens(rows, indices, betas, batch_size=16):
        decoded = best_of_n.decode_candidates(
            model,
            tokenizer,
            [prompts[r] for r in rows],
            [hinted[r] for r in rows],
            indices,
            HintedConfig(**{**config.__dict__, "batch_size": batch_size}),
            betas,
        )
        return {(i, c.sample, c.beta): c.generation.token_ids for i, row in zip(indices, decoded) for c in row}

    three = tokens([0, 1, 2], [10, 11, 12], [1.0, 3.0, 1.0])
    assert len(three) == 9 and len({tuple(t) for t in three.values()}) > 3  # samples differ
    one = tokens([0, 1, 2], [10, 11, 12], [1.0])
    assert one == {key: ids for key, ids in three.items() if key[1] == 0}
    alone = tokens([1], [11], [1.0, 3.0], batch_size=1)
    assert alone == {key: ids for key, ids in three.items() if key[0] == 11 and key[1] < 2}
    # Another input index is another stream.
    assert tokens([1], [99], [1.0])[(99, 0, 1.0)] != three[(11, 0, 1.0)]


def test_keep_all_gives_a_training_row_per_distinct_candidate():
    model, tokenizer = untied_model(), tiny_tokenizer()
    rows = [{"prompt": f"What is {i}?", "answer": str(i), "reference": f"\\boxed{{{i}}}"} for i in range(4)]
    examples = [parse_example(r, i, i + 1, "rows", False) for i, r in enumerate(rows)]

    def rewrite(keep):
        config = RewriteConfig(
            data="d", own_samples=0, samples_per_prompt=3, beta_ladder="0,2", keep=keep, keep_truncated=True
        )
        # Accept about 2 of every 3 responses by their characters: some rows keep several candidates.
        verifier = lambda response, answer: sum(map(ord, response)) % 3 != 0  # noqa: E731
        hinted = HintedConfig(max_new_tokens=6, temperature=1.0)
        return rewriting.rewrite_examples(model, tokenizer, examples, config, hinted, verifier=verifier)

    every, best = rewrite("all"), rewrite("best")
    train = rewrite_summary.train_rows(every)
    expected = []
    for record in every:
        usable = [e for e in record["candidates"] if e["usable"]]
        kept = [e for e in record["candidates"] if e["kept"]]
        assert len(kept) <= len(usable) and (record["provenance"] == "hinted") == bool(usable)
        if kept:
            also = [a["sample_index"] for a in record["also_kept"]]
            assert [e["sample"] for e in kept] == [record["sample_index"], *also]
        for entry in kept:
            assert entry["beta"] == (0.0, 2.0)[entry["sample"] % 2]
            expected.append((record["prompt"], entry["sample"], entry["beta"]))
    assert [(t["prompt"], t["sample_index"], t["beta"]) for t in train] == expected
    assert len({(t["prompt"], t["completion"]) for t in train}) == len(train)  # distinct texts per prompt
    assert rewrite_summary.summarize(every)["training_rows"] == len(train) > len(rewrite_summary.train_rows(best))
    # best keeps one of those, the one with the highest Z.
    for record, other in zip(best, every):
        assert record["also_kept"] == [] and [e["usable"] for e in record["candidates"]] == [
            e["usable"] for e in other["candidates"]
        ]
        if record["provenance"] == "hinted":
            scored = [e for e in record["candidates"] if e["usable"]]
            assert record["z"] == max(e["z"] for e in scored) and record["sample_index"] in [
                e["sample"] for e in scored
            ]


def test_yield_and_handover_summaries_from_records():
    def entry(sample, usable, handed_over=True, kept=False, beta=1.0, judged=True):
        return {"sample": sample, "beta": beta, "usable": usable, "handed_over": handed_over, "kept": kept,
                "verified": usable if judged else None}  # fmt: skip

    records = [
        {"candidates": [entry(0, False), entry(1, True, kept=True), entry(2, True)]},
        # --keep first: the candidates after the first usable one are not judged
        {
            "candidates": [
                entry(0, True, kept=True, handed_over=False),
                entry(1, False, judged=False),
                entry(2, False, judged=False),
            ]
        },
        {"candidates": [entry(0, False, False), entry(1, False, False), entry(2, False, beta=3.0)]},
        {"candidates": None},  # an own answer: no hinted candidates
    ]
    result = best_of_n.yield_by_samples(records)
    assert result["prompts"] == 3
    assert [(y["samples"], y["prompts_with_a_usable_candidate"]) for y in result["by_samples"]] == [
        (1, 1),
        (2, 2),
        (3, 2),
    ]
    assert result["by_samples"][1]["share"] == pytest.approx(2 / 3)
    marker = best_of_n.handover(records)
    assert (marker["candidates"], marker["handed_over"], marker["kept"], marker["kept_handed_over"]) == (9, 6, 2, 1)
    assert best_of_n.by_beta(records) == {
        "1.0": {"candidates": 8, "judged": 6, "usable": 3, "handed_over": 5},
        "3.0": {"candidates": 1, "judged": 1, "usable": 0, "handed_over": 1},
    }
    assert best_of_n.yield_by_samples([{"candidates": None}]) == {"prompts": 0, "by_samples": []}


# -------------------------------------------------------------------------------------------- organism


@pytest.fixture(scope="module")
def organism():
    if not (ORGANISM / "config.json").is_file():
        pytest.skip("the organism checkpoint is not built (python -m onsft.organism.pretrain)")
    return load_model("organism"), load_tokenizer("organism"), read_model_info("organism")


def test_organism_yield_is_non_decreasing_in_n_and_kept_rows_name_sample_and_beta(organism):
    """New-skill teacher rows the organism cannot answer itself. The prompts with a verified rewrite among the
    first n candidates never shrink with n: within one run with N = 4, and from a run with N = 1 to it (the
    first candidate is the same). Measured on these 16 rows (temperature 1, betas 3,1): 13, 13, 14, 15 of 16
    at n = 1..4, every candidate handing over at the answer marker."""
    from onsft.organism import tasks

    model, tokenizer, info = organism
    rows = [{k: r[k] for k in ("prompt", "answer", "reference")} for r in tasks.new_skill_train(n=16, seed=0)[:16]]
    examples = [parse_example(r, i, i + 1, "rows", False) for i, r in enumerate(rows)]
    hinted = HintedConfig(max_new_tokens=48, temperature=1.0)

    def rewrite(n, keep):
        config = RewriteConfig(data="d", own_samples=0, samples_per_prompt=n, beta_ladder="3,1", keep=keep)
        records = rewriting.rewrite_examples(model, tokenizer, examples, config, hinted, verifier="exact", info=info)
        return records, rewrite_summary.summarize(records)

    (one, one_summary), (four, four_summary) = rewrite(1, "first"), rewrite(4, "best")
    curve = [y["prompts_with_a_usable_candidate"] for y in four_summary["yield"]["by_samples"]]
    assert curve == sorted(curve) and curve[0] == one_summary["rewritten"] and curve[-1] == four_summary["rewritten"]
    assert one_summary["rewritten"] >= 8, one_summary  # the organism does rewrite the new skill
    for first, best in zip(one, four):
        assert first["provenance"] != "hinted" or best["provenance"] == "hinted"
        if first["provenance"] == "hinted":  # its first candidate is the same in both runs
            assert (first["sample_index"], first["beta"]) == (0, 3.0)
            assert best["candidates"][0]["usable"] and best["candidates"][0]["n_tokens"] == first["n_tokens"]
    for record in four:
        if record["provenance"] == "hinted":
            assert tasks.is_correct(record["response"], record["answer"])
            assert record["beta"] == (3.0, 1.0)[record["sample_index"] % 2]
            usable = [e for e in record["candidates"] if e["usable"]]
            assert record["z"] == max(e["z"] for e in usable)  # the best: the highest Z
            assert record["candidates"][record["sample_index"]]["kept"] is True
    train = rewrite_summary.train_rows(four)
    assert [(t["sample_index"], t["beta"]) for t in train] == [
        (r["sample_index"], r["beta"]) for r in four if r["provenance"] == "hinted"
    ]
    marker = four_summary["answer_marker"]
    assert marker["candidates"] == 64 and marker["share"] > 0.9  # the organism writes \boxed{ and hands over
