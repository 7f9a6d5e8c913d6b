"""The verifiable-instruction task: determinism, a clean held-out split, and a judge that rewards
the reference and cannot be gamed by length, repetition, echoing or empty answers."""

import json
import random

import pytest
from datasets import Features, List, Value

from pipeline.task import instructions as it
from pipeline.task.instructions import check_constraint, expected_response, judge, passes

# ---- data: determinism and the held-out split ----------------------------------------------------


def test_sentences_are_short_clean_prose():
    sentences = it.source_sentences()
    assert len(sentences) > 2000
    for s in sentences:
        assert it.MIN_WORDS <= len(s.split()) <= it.MAX_WORDS and s[0].isupper() and s.endswith(".")
        assert not set("()[]{}=<>:;_`\"*#/\\") & set(s), s


def test_same_seed_same_data_and_other_seed_other_data():
    a, b, c = (it.make_examples(300, seed, "train") for seed in (0, 0, 1))
    assert a == b and a != c
    d1, d2 = it.build_preference_dataset("pairs", 50, 20, seed=3), it.build_preference_dataset("pairs", 50, 20, seed=3)
    assert d1["train"].to_dict() == d2["train"].to_dict() and d1["validation"].to_dict() == d2["validation"].to_dict()
    assert d1["train"].to_dict() != it.build_preference_dataset("pairs", 50, 20, seed=4)["train"].to_dict()


def test_train_and_held_out_sentences_are_disjoint():
    train, held_out = set(it.split_sentences("train")), set(it.split_sentences("eval"))
    assert train and held_out and not train & held_out
    assert not {s.lower() for s in train} & {s.lower() for s in held_out}
    assert len(held_out) / (len(train) + len(held_out)) == pytest.approx(it.EVAL_FRACTION, abs=0.05)
    sft, prompts = it.build_sft_dataset(1000, 300, 0), it.build_prompt_dataset(1000, 300, 0)
    train_sources = set(sft["train"]["source"]) | set(prompts["train"]["source"])
    eval_sources = set(sft["validation"]["source"]) | set(prompts["validation"]["source"])
    assert train_sources <= train and eval_sources <= held_out


def test_streams_give_different_prompts_and_unknown_names_fail():
    sft = [e.prompt for e in it.make_examples(200, 0, "train", stream="sft")]
    ppo = [e.prompt for e in it.make_examples(200, 0, "train", stream="prompts")]
    assert len(set(sft) & set(ppo)) < 20
    assert it.make_examples(5, 0, "validation") == it.make_examples(5, 0, "eval")
    with pytest.raises(ValueError, match="unknown split"):
        it.make_examples(5, 0, "test")
    with pytest.raises(ValueError, match="unknown preference kind"):
        it.build_preference_dataset("triples", 5, 5, 0)


def test_every_template_and_constraint_type_occurs():
    examples = it.make_examples(2000, 0, "train")
    assert {tuple(c["type"] for c in e.constraints) for e in examples} == {t for t, _ in it.TEMPLATES}
    assert {c["type"] for e in examples for c in e.constraints} == set(it.CONSTRAINT_TYPES)
    json.dumps([e.constraints for e in examples])


# ---- constraint checkers, references, prompts ----------------------------------------------------


@pytest.mark.parametrize(
    "constraint, good, bad",
    [
        ({"type": "lowercase"}, ["put the item on the queue.", "a 2nd try?"], ["Put the item.", "put the ITEM.", "", "123 ?"]),
        ({"type": "uppercase"}, ["PUT THE ITEM.", "A 2ND TRY?"], ["PUT THE ITEm.", "Put.", "", "42"]),
        ({"type": "max_words", "n": 3}, ["a b c", "one.", " put the item. "], ["a b c d", "", "   "]),
        ({"type": "end_with", "text": "?"}, ["is it?", "is it?  \n"], ["is it.", "is it? no", ""]),
        ({"type": "end_with", "text": "!"}, ["stop!"], ["stop?", "stop"]),
        ({"type": "include_word", "word": "python"}, ["I like Python.", "python", "use PYTHON now"], ["pythonic code", "py thon", ""]),
    ],
)
def test_constraint_checkers(constraint, good, bad):
    assert all(check_constraint(constraint, r) for r in good)
    assert not any(check_constraint(constraint, r) for r in bad)


def test_expected_response_and_prompt_by_hand():
    source = "Put the item on the queue, then wait."
    cases = [
        ([{"type": "lowercase"}], "Rewrite in lowercase", "put the item on the queue, then wait."),
        ([{"type": "uppercase"}, {"type": "end_with", "text": "!"}], "Rewrite in uppercase and end with an exclamation mark",
         "PUT THE ITEM ON THE QUEUE, THEN WAIT!"),
        ([{"type": "max_words", "n": 6}], "Keep only the first 6 words", "Put the item on the queue."),
        ([{"type": "max_words", "n": 3}, {"type": "end_with", "text": "?"}],
         "Keep only the first 3 words and end with a question mark", "Put the item?"),
        ([{"type": "lowercase"}, {"type": "include_word", "word": "now"}], "Rewrite in lowercase and add the word now at the end",
         "put the item on the queue, then wait now."),
    ]
    for constraints, instruction, reference in cases:
        assert expected_response(source, constraints) == reference
        assert it.format_prompt(source, constraints) == f"{instruction}: {source}"
        assert it.parse_prompt(f"{instruction}: {source}") == (constraints, source)
    with pytest.raises(ValueError, match="not a prompt"):
        it.parse_prompt("Translate to French: Put the item on the queue.")


def test_prompts_parse_back_to_their_constraints():
    for split in ("train", "eval"):
        for ex in it.make_examples(1000, 7, split):
            assert it.parse_prompt(ex.prompt) == (ex.constraints, ex.source)


# ---- the judge -----------------------------------------------------------------------------------


def test_references_score_one_and_pass():
    for split in ("train", "eval"):
        for ex in it.make_examples(1500, 0, split):
            assert ex.reference == expected_response(ex.source, ex.constraints)
            assert judge(ex, ex.reference) == 1.0 and passes(ex, ex.reference)


def test_judge_accepts_every_task_form_alike():
    ex = it.make_examples(1, 0, "eval")[0]
    row = {"prompt": ex.prompt, "constraints": json.dumps(ex.constraints), "source": ex.source}
    response = ex.reference.split()[0]
    scores = {judge(t, response) for t in (ex, row, {"prompt": ex.prompt}, ex.prompt, (ex.constraints, ex.source))}
    assert len(scores) == 1 and 0 < scores.pop() < 1


def test_judge_formula_by_hand():
    ex = it.make_example("Put the item on the queue.", [{"type": "lowercase"}, {"type": "end_with", "text": "?"}])
    assert ex.reference == "put the item on the queue?"
    assert judge(ex, "put the item on the queue.") == pytest.approx(0.5)  # one of two constraints, faithful
    assert judge(ex, "Put the item on the queue.") == 0.0  # neither constraint
    assert judge(ex, "put the item on queue?") == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))  # LCS 5: p=1, r=5/6
    assert judge(ex, "put the item on the queue the queue?") == pytest.approx(2 * (6 / 8) / (1 + 6 / 8))
    assert judge(ex, "put item the on the queue?") == pytest.approx(5 / 6)  # order matters: LCS 5
    grade = it.grade(ex, "put the item on queue?")  # one word missing: F1 10/11 >= 0.9
    assert grade.satisfied == [True, True] and grade.faithfulness == pytest.approx(10 / 11) and grade.passed
    grade = it.grade(ex, "put the item queue?")  # two missing: F1 0.8
    assert grade.satisfied == [True, True] and not grade.passed
    assert not passes(ex, "put the item on the queue.")  # faithful but a constraint broken


@pytest.mark.parametrize("name", list(it.CORRUPTERS))
def test_each_corrupter_lowers_the_score(name):
    corrupter, _ = it.CORRUPTERS[name]
    rng, applied = random.Random(name), 0
    for ex in it.make_examples(600, 1, "train"):
        response = corrupter(ex, rng)
        if response is None:
            continue
        applied += 1
        assert response != ex.reference and judge(ex, response) < judge(ex, ex.reference), (ex, response)
    assert applied >= 250


def test_degenerate_responses_score_low():
    """Length, repetition, echoing the prompt or saying nothing cannot buy reward."""
    examples = it.make_examples(400, 2, "eval")
    degenerate = {
        "empty": lambda ex: "",
        "whitespace": lambda ex: "  \n ",
        "prompt": lambda ex: ex.prompt,
        "source, every constraint ignored": lambda ex: ex.source,
        "reference x 50": lambda ex: " ".join([ex.reference] * 50),
        "reference + 300 words": lambda ex: ex.reference + " the value" * 150,
        "one word repeated": lambda ex: (ex.reference.split()[0] + " ") * 200,
        "constant": lambda ex: "Okay.",
    }
    for name, make in degenerate.items():
        scores = [judge(ex, make(ex)) for ex in examples]
        assert max(scores) <= 0.4 and sum(scores) / len(scores) < 0.1, name
        assert not any(passes(ex, make(ex)) for ex in examples), name
    assert all(judge(ex, "") == 0.0 for ex in examples)


def test_judge_cost_is_bounded_for_huge_responses():
    ex = it.make_examples(1, 0, "eval")[0]
    assert judge(ex, "word " * 200_000) == 0.0
    assert judge(ex, ex.reference * 20_000) < 0.01


# ---- dataset builders ----------------------------------------------------------------------------


def test_sft_dataset_columns_and_content():
    data = it.build_sft_dataset(40, 10, 0)
    assert set(data) == {"train", "validation"} and (data["train"].num_rows, data["validation"].num_rows) == (40, 10)
    assert data["train"].features == Features(
        {
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "prompt": Value("string"),
            "constraints": Value("string"),
            "source": Value("string"),
            "reference": Value("string"),
        }
    )
    for row in data["validation"]:
        assert row["messages"] == [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["reference"]}]
        assert judge(row, row["reference"]) == 1.0 and isinstance(json.loads(row["constraints"]), list)


def test_prompt_dataset_columns_and_scoring():
    data = it.build_prompt_dataset(30, 20, 0)
    assert data["validation"].features == Features({"prompt": Value("string"), "constraints": Value("string"), "source": Value("string")})
    rows = list(data["validation"])
    references = [expected_response(r["source"], json.loads(r["constraints"])) for r in rows]
    perfect = it.score_responses(data["validation"], references)
    assert perfect["mean_score"] == 1.0 and perfect["pass_rate"] == 1.0 and perfect["n"] == 20
    assert all(v == 1.0 for k, v in perfect.items() if k.startswith("pass_rate/"))
    assert it.score_responses(rows, [""] * 20)["pass_rate"] == 0.0
    half = it.score_responses(rows, references[:10] + [r["source"] for r in rows[10:]])
    assert half["pass_rate"] == 0.5
    with pytest.raises(ValueError, match="20 prompts but 3 responses"):
        it.score_responses(rows, references[:3])


def test_pairs_are_strictly_ordered_by_the_judge():
    data = it.build_preference_dataset("pairs", 400, 100, 0)
    assert data["train"].features == Features(
        {"prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string"), "margin": Value("float64")}
    )
    assert data["train"].num_rows == 400 and data["validation"].num_rows == 100
    for split in ("train", "validation"):
        for row in data[split]:
            chosen, rejected = judge(row["prompt"], row["chosen"]), judge(row["prompt"], row["rejected"])
            assert chosen > rejected and row["margin"] == pytest.approx(chosen - rejected)
    held_out = set(it.split_sentences("eval"))
    assert all(it.parse_prompt(p)[1] in held_out for p in data["validation"]["prompt"])
    # both easy (reference vs junk) and fine (near-miss vs near-miss) pairs
    assert 0.2 < sum(m < 0.5 for m in data["train"]["margin"]) / 400 < 0.9


def test_rankings_agree_with_the_judge():
    data = it.build_preference_dataset("rankings", 300, 50, 0)
    assert data["train"].features == Features(
        {"prompt": Value("string"), "responses": List(Value("string")), "ranks": List(Value("int64"))}
    )
    for row in data["train"]:
        responses, ranks = row["responses"], row["ranks"]
        assert len(responses) == it.RANKING_SIZE >= 3 and len(set(responses)) == len(responses)
        scores = [judge(row["prompt"], r) for r in responses]
        assert min(ranks) == 0 and sorted(set(ranks)) == list(range(max(ranks) + 1))
        for i in range(len(scores)):
            for j in range(len(scores)):
                assert (scores[i] > scores[j]) == (ranks[i] < ranks[j])


def test_ratings_equal_the_judge_and_tie():
    data = it.build_preference_dataset("ratings", 300, 50, 0)
    assert data["train"].features == Features({"prompt": Value("string"), "response": Value("string"), "rating": Value("float64")})
    ratings = data["train"]["rating"]
    assert all(r == judge(row["prompt"], row["response"]) for r, row in zip(ratings, data["train"]))
    assert len(set(ratings)) < len(ratings) and 0.0 in ratings and 1.0 in ratings and any(0 < r < 1 for r in ratings)


def test_empty_splits_keep_their_columns():
    data = it.build_preference_dataset("rankings", 5, 0, 0)
    assert data["validation"].num_rows == 0 and data["validation"].column_names == ["prompt", "responses", "ranks"]
    assert it.build_sft_dataset(0, 2, 0)["train"].column_names == ["messages", "prompt", "constraints", "source", "reference"]
