"""The embedded organism: tokenizer, chat template, seeded tasks, and the shipped checkpoint's skills."""

from __future__ import annotations

import json
import random
import string

import pytest
import torch

from onsft.organism import MODEL_DIR, tasks
from onsft.organism.pretrain import accuracy_by_task, encode_pairs, greedy_generate
from onsft.organism.tokenizer import CHARACTERS, PIECES, SPECIALS, build_tokenizer
from onsft.runtime.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def organism():
    return load_model("organism"), load_tokenizer("organism")


# ---------------------------------------------------------------- tokenizer


def test_vocabulary_layout(tokenizer):
    assert len(tokenizer) == len(SPECIALS) + len(CHARACTERS) + len(PIECES) == 134
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token == "<eos>"
    for digit in string.digits:
        assert tokenizer(f"12{digit}34", add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(c) for c in f"12{digit}34"
        ]
    for piece in PIECES:
        assert len(tokenizer(piece, add_special_tokens=False)["input_ids"]) == 1, piece


def test_round_trip_is_exact(tokenizer):
    rng = random.Random(0)
    texts = ["Let's compare. 45 > 23. \\boxed{45}", "  spaces  .  and . \\boxed{}", "a\tb\nc", "x -> y -> z"]
    texts += ["".join(rng.choice(CHARACTERS) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    texts += [p + r for p, r, _ in (tasks.pretraining_example(rng) for _ in range(300))]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_longest_piece_wins(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("ab. \\boxed{ab}", add_special_tokens=False)["input_ids"])
    assert tokens == ["a", "b", ". \\boxed{", "a", "b", "}"]


def test_shipped_tokenizer_matches_builder(tokenizer, organism):
    _, shipped = organism
    assert shipped.get_vocab() == tokenizer.get_vocab()
    text = tasks.hinted_prompt("Reverse abc.", "Solution: the reversed string is cba, hence \\boxed{cba}")
    assert shipped(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_chat_template(organism, tokenizer):
    _, shipped = organism
    for tok in (tokenizer, shipped):
        messages = [{"role": "user", "content": "Copy ab."}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == "<user>Copy ab.<assistant>"
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == ["<user>", "Copy ", "a", "b", ".", "<assistant>"]
        full = messages + [{"role": "assistant", "content": "Let's copy. ab -> ab. \\boxed{ab}"}]
        assert (
            tok.apply_chat_template(full, tokenize=False)
            == "<user>Copy ab.<assistant>Let's copy. ab -> ab. \\boxed{ab}<eos>"
        )
        system = [{"role": "system", "content": "S"}] + messages
        assert tok.apply_chat_template(system, tokenize=False) == "<system>S<user>Copy ab."
        # {% generation %} marks the assistant's tokens, <eos> included, for assistant-only losses.
        enc = tok.apply_chat_template(full, return_assistant_tokens_mask=True, return_dict=True)
        mask = enc["assistant_masks"]
        ids = enc["input_ids"]
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Let's copy. ab -> ab. \\boxed{ab}<eos>"
        with pytest.raises(Exception, match="unknown chat role"):
            tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_pretraining_encoding_matches_chat_template(tokenizer):
    rng = random.Random(1)
    pairs = [tasks.pretraining_example(rng)[:2] for _ in range(50)]
    for (ids, prompt_len), (p, r) in zip(encode_pairs(tokenizer, pairs), pairs):
        messages = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        assert ids == tokenizer.apply_chat_template(messages)["input_ids"]
        assert ids[:prompt_len] == tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)["input_ids"]


# ---------------------------------------------------------------- tasks


def test_answer_checks():
    assert tasks.boxed_answer("x \\boxed{a{b}c} y \\boxed{42}") == "42"
    assert tasks.boxed_answer("\\boxed{a{b}c}") == "a{b}c"
    assert tasks.boxed_answer("no box") is None and tasks.boxed_answer("\\boxed{open") is None
    assert tasks.is_native_style("Let's compare. 45 > 23. \\boxed{45}")
    assert tasks.is_native_style("Let's transform. abc -> bca. \\boxed{bca}")
    assert not tasks.is_native_style("Let's transform. abc -> bca. \\boxed{cab}")  # boxed != stated
    assert not tasks.is_native_style("Solution: the rotation of abc is bca, hence \\boxed{bca}")
    assert not tasks.is_native_style("abc -> bca. \\boxed{bca}")
    rng = random.Random(3)
    for _ in range(200):
        for task in tasks.OLD_TASKS:
            _, solution, answer = tasks.make_question(task, rng)
            assert tasks.is_native_style(solution) and tasks.is_correct(solution, answer)
        _, solution, answer = tasks.make_opaque(rng)
        assert tasks.is_native_style(solution) and tasks.is_correct(solution, answer)


def test_old_skill_answers_are_right():
    for row in tasks.retention_test(200, seed=5):
        operand = row["prompt"][:-1].split(" ")[-1]
        expected = {"reverse": operand[::-1], "copy": operand, "count": str(len(operand))}.get(row["task"])
        if row["task"] == "compare":
            a, b = row["prompt"][len("Compare ") : -1].split(" and ")
            expected = str(max(int(a), int(b)))
        assert row["answer"] == expected


def test_validation_draws_are_held_out_and_disjoint_from_the_tests():
    test = {r["prompt"] for r in tasks.new_skill_test(200, 0)}
    validation = tasks.new_skill_validation(200, 0, 200)
    trained = {r["prompt"] for r in tasks.new_skill_train(500, 0)}
    assert len(validation) == 200 and not test & {r["prompt"] for r in validation}
    assert not trained & {r["prompt"] for r in validation}
    assert all(tasks.is_held_out(r["prompt"]) for r in validation)
    kept = tasks.retention_validation(200, 0, 200)
    assert not {r["prompt"] for r in tasks.retention_test(200, 0)} & {r["prompt"] for r in kept}
    assert {r["task"] for r in kept} == set(tasks.OLD_TASKS)


def test_tasks_are_deterministic_per_seed(tmp_path):
    for name, (build, _) in tasks.DATASETS.items():
        assert build(40, 7) == build(40, 7), name
        assert build(40, 7) != build(40, 8), name
    a = tasks.write_demo_data(tmp_path / "a", seed=3, n_train=30, n_test=20, n_ood=20, n_retention=20)
    b = tasks.write_demo_data(tmp_path / "b", seed=3, n_train=30, n_test=20, n_ood=20, n_retention=20)
    assert sorted(a) == sorted(b) and len(a) == 7 + len(tasks.STYLE_NAMES)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
    rng_a, rng_b = random.Random(9), random.Random(9)
    assert [tasks.pretraining_example(rng_a) for _ in range(50)] == [
        tasks.pretraining_example(rng_b) for _ in range(50)
    ]


def test_columns_and_splits(tmp_path):
    train = tasks.new_skill_train(60, seed=0)
    assert len(train) == 60 * len(tasks.STYLE_NAMES)
    assert {r["style"] for r in train} == set(tasks.STYLE_NAMES)
    for r in train:
        assert set(r) == {"prompt", "completion", "answer", "reference", "style", "task"}
        s = r["prompt"][len("Cycle ") : -1]
        assert r["prompt"] == f"Cycle {s}." and r["answer"] == s[1:] + s[0] != s
        assert r["completion"] == r["reference"] and tasks.is_correct(r["completion"], r["answer"])
        assert 3 <= len(s) <= 6 and not tasks.is_held_out(r["prompt"])
    assert [r for r in train if r["style"] == "native"][0]["completion"].startswith("Let's transform. ")
    test, ood, retention = tasks.new_skill_test(100), tasks.new_skill_ood(100), tasks.retention_test(100)
    for rows, extra in ((test, set()), (ood, {"shift"}), (retention, set())):
        assert all(set(r) == {"prompt", "answer", "task"} | extra for r in rows)
        assert all(tasks.is_held_out(r["prompt"]) for r in rows)
        assert len({r["prompt"] for r in rows}) == len(rows)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test + ood}
    assert {r["shift"] for r in ood} == {"longer", "symbols"}
    assert all(len(r["answer"]) == 7 for r in ood if r["shift"] == "longer")
    assert all(len(set(r["answer"])) == len(r["answer"]) for r in test + ood)  # distinct characters
    assert all(any(c not in string.ascii_lowercase for c in r["answer"]) for r in ood if r["shift"] == "symbols")
    assert {r["task"] for r in retention} == set(tasks.OLD_TASKS)
    # Replay prompts: old skills from the pretraining distribution, never a held-out (test) prompt.
    replay = tasks.replay_prompts(100)
    assert {r["task"] for r in replay} == set(tasks.OLD_TASKS) and len({r["prompt"] for r in replay}) == 100
    assert not any(tasks.is_held_out(r["prompt"]) for r in replay)
    assert not {r["prompt"] for r in replay} & {r["prompt"] for r in retention + test + ood + train}
    paths = tasks.write_demo_data(tmp_path, seed=0, n_train=10, n_test=5, n_ood=4, n_retention=8)
    rows = [json.loads(line) for line in paths["new_skill_train.solution"].read_text().splitlines()]
    assert len(rows) == 10 and all(r["style"] == "solution" for r in rows)


def test_pretraining_never_sees_held_out_or_new_verb():
    rng = random.Random(11)
    kinds = []
    for _ in range(3000):
        prompt, solution, kind = tasks.pretraining_example(rng)
        question = prompt.split("\n")[1] if kind.endswith("hinted") else prompt
        assert not tasks.is_held_out(question) and not question.startswith(tasks.NEW_VERB + " ")
        kinds.append(kind)
    shares = {k: kinds.count(k) / len(kinds) for k, _ in tasks.PRETRAIN_MIX}
    for kind, weight in tasks.PRETRAIN_MIX:
        assert abs(shares[kind] - weight) < 0.03


# ---------------------------------------------------------------- the shipped checkpoint


def test_shipped_checkpoint_files():
    info = json.loads((MODEL_DIR / "onsft.json").read_text())
    assert info["hint_template"] == tasks.HINT_TEMPLATE and info["answer_marker"] == "\\boxed{"
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert size < 15_000_000


def test_shipped_organism_keeps_old_skills_and_lacks_the_new_one(organism):
    model, tokenizer = organism
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 3_000_000 < sum(p.numel() for p in model.parameters()) < 3_500_000
    rows = tasks.retention_test(48, seed=123)
    responses = greedy_generate(model, tokenizer, [r["prompt"] for r in rows])
    plain = accuracy_by_task(rows, responses, native=True)
    assert plain["all"] >= 0.85, plain
    assert min(plain[t] for t in tasks.OLD_TASKS) >= 0.6, plain

    rows = tasks.hinted_old_test(40, seed=123)
    hinted = accuracy_by_task(rows, greedy_generate(model, tokenizer, [r["prompt"] for r in rows]), native=True)
    assert hinted["all"] >= 0.85, hinted

    rows = tasks.new_skill_test(40, seed=123)
    responses = greedy_generate(model, tokenizer, [r["prompt"] for r in rows])
    assert accuracy_by_task(rows, responses)["all"] <= 0.15
    # It does not know the verb, but answers in its own style ("Let's transform. ...").
    assert sum(map(tasks.is_native_style, responses)) >= 0.8 * len(rows)
