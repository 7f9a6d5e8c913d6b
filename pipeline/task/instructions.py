"""The default RLHF task: verifiable instructions on real sentences, with a programmatic judge.

In the style of IFEval (Zhou et al., 2023), but sized for a model of a few million parameters
trained for a minute or two on 2 CPU cores: every prompt is one short templated instruction
followed by one real English sentence from the embedded corpus, and the ideal answer is a
deterministic edit of that sentence (lowercase it, uppercase it, keep its first N words, end it with
"?" or "!", add a word at the end, or two of these at once):

    Rewrite in lowercase and end with a question mark: Put the item on the queue.
    -> put the item on the queue?

Used by the SFT stage (demonstrations), the reward stage (pairs, rankings or ratings ordered by the
judge) and PPO/evaluation (prompts + `score_responses`). Build everything with

    from pipeline.task.instructions import build_sft_dataset, build_preference_dataset, build_prompt_dataset

The judge (see `grade`) multiplies the fraction of constraints satisfied by the faithfulness of the
response to the expected edit of the source, so that length, repetition, echoing the prompt or an
empty answer cannot buy reward. Train and held-out prompts use disjoint sentences (a hash split).
docs/task.md describes the task for users.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.data.preferences import PREFERENCE_FORMATS

TASK_VERSION = "2"  # bump when sentences, templates, references or the judge change
EVAL_FRACTION = 0.2  # share of sentences held out for evaluation
SPLIT_KEY_WORDS = 5  # sentences starting with the same words share a split
MIN_WORDS, MAX_WORDS = 5, 15  # sentence length, in whitespace-separated words
PASS_FAITHFULNESS = 0.9  # `passes` needs every constraint and at least this faithfulness
MAX_JUDGED_TOKENS = 1000  # longer responses are cut for the LCS only (they still count in precision)
SPLITS = ("train", "eval")

# words that "add the word X at the end" asks for: plain, common, each a whole word in any tokenizer
# trained on English
EXTRA_WORDS = (
    "python", "today", "please", "again", "indeed", "always", "now", "here", "too", "maybe",
    "quickly", "carefully", "together", "tomorrow", "sometimes", "certainly", "gently", "twice",
    "soon", "later", "anyway", "really", "instead", "finally",
)
# (constraint types, weight): the fixed set of instruction templates. include_word always comes with
# a second constraint, so echoing the prompt (which contains the word) can never satisfy all of them;
# max_words never meets include_word (the added word would break the word limit).
TEMPLATES = (
    (("lowercase",), 3.0),
    (("uppercase",), 1.0),
    (("max_words",), 3.0),
    (("end_with",), 2.0),
    (("lowercase", "end_with"), 1.0),
    (("lowercase", "max_words"), 1.0),
    (("lowercase", "include_word"), 1.0),
    (("uppercase", "end_with"), 0.5),
    (("max_words", "end_with"), 1.0),
    (("end_with", "include_word"), 1.5),
)
CONSTRAINT_TYPES = ("lowercase", "uppercase", "max_words", "end_with", "include_word")
END_MARKS = {"?": "a question mark", "!": "an exclamation mark"}


@dataclass
class Example:
    prompt: str  # the user message
    source: str  # the sentence the instruction is about
    constraints: list[dict] = field(default_factory=list)  # JSON-serialisable, see `check_constraint`
    reference: str = ""  # the ideal response: `expected_response(source, constraints)`


@dataclass
class Grade:
    score: float  # the judge's score in [0, 1]: fraction satisfied x faithfulness
    passed: bool  # every constraint satisfied and faithfulness >= PASS_FAITHFULNESS
    satisfied: list[bool]  # one per constraint, in order
    faithfulness: float  # LCS F1 against the expected response, in [0, 1]


# --- sentences -----------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*,?")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|[*|+#-]|\d+[.)])")


def _is_prose_sentence(sentence: str) -> bool:
    if not sentence.endswith(".") or sentence.endswith(".."):
        return False
    words = sentence[:-1].split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or not words[0][0].isupper() or words[-1].endswith(","):
        return False
    # only plain words (letters, inner ' or -, a trailing comma); no identifiers in CamelCase/CAPS
    return all(_WORD.fullmatch(w) and w[1:] == w[1:].lower() for w in words)


@functools.lru_cache(maxsize=1)
def source_sentences() -> tuple[str, ...]:
    """Every clean prose sentence of the embedded corpus (5-15 plain words ending in "."), sorted."""
    from pipeline.data.corpus import stdlib_documents

    found = set()
    for _, text in stdlib_documents():
        for paragraph in re.split(r"\n\s*\n", text):
            lines = paragraph.splitlines()
            if any(_CODE_LINE.match(line) for line in lines):
                continue  # examples, lists and tables: not prose
            joined = " ".join(line.strip() for line in lines)
            found.update(s for s in re.split(r"(?<=[.!?])\s+", joined) if _is_prose_sentence(s))
    return tuple(sorted(found))


def is_held_out(sentence: str) -> bool:
    """Whether a sentence belongs to the held-out (eval) split; by a hash, so it never moves."""
    from pipeline.data.corpus import is_validation

    # keyed by the first words, so near-duplicates ("... are listed below." / "... are listed below in
    # order.") land on the same side: the evaluation's contamination check found such pairs
    key = " ".join(re.findall(r"\w+", sentence.lower())[:SPLIT_KEY_WORDS])
    return is_validation(f"sentence:{key}", EVAL_FRACTION)


@functools.lru_cache(maxsize=2)
def split_sentences(split: str) -> tuple[str, ...]:
    """The sentences of one split ("train" or "eval"); the two are disjoint."""
    split = _check_split(split)
    return tuple(s for s in source_sentences() if is_held_out(s) == (split == "eval"))


def _check_split(split: str) -> str:
    split = "eval" if split == "validation" else split
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} (or 'validation')")
    return split


# --- constraints, prompts and references ---------------------------------------------------------


def expected_response(source: str, constraints: Sequence[Mapping]) -> str:
    """The ideal response: the source, truncated / extended / re-punctuated, then re-cased."""
    body, end = source.rstrip()[:-1], source.rstrip()[-1]
    for c in constraints:
        if c["type"] == "max_words":
            body = " ".join(body.split()[: c["n"]]).rstrip(",")
    for c in constraints:
        if c["type"] == "include_word":
            body = f"{body} {c['word']}"
        elif c["type"] == "end_with":
            end = c["text"]
    text = body + end
    for c in constraints:
        if c["type"] == "lowercase":
            text = text.lower()
        elif c["type"] == "uppercase":
            text = text.upper()
    return text


def instruction_text(constraints: Sequence[Mapping]) -> str:
    """The instruction for a list of constraints, e.g. "Rewrite in lowercase and end with a question mark"."""
    phrases = []
    for c in constraints:
        if c["type"] in ("lowercase", "uppercase"):
            phrases.append(f"rewrite in {c['type']}")
        elif c["type"] == "max_words":
            phrases.append(f"keep only the first {c['n']} words")
        elif c["type"] == "end_with":
            phrases.append(f"end with {END_MARKS[c['text']]}")
        elif c["type"] == "include_word":
            phrases.append(f"add the word {c['word']} at the end")
        else:
            raise ValueError(f"unknown constraint type {c['type']!r}; known: {', '.join(CONSTRAINT_TYPES)}")
    text = " and ".join(phrases)
    return text[:1].upper() + text[1:]


def format_prompt(source: str, constraints: Sequence[Mapping]) -> str:
    return f"{instruction_text(constraints)}: {source}"


_PHRASES = (
    (re.compile(r"rewrite in (lowercase|uppercase)"), lambda m: {"type": m[1]}),
    (re.compile(r"keep only the first (\d+) words"), lambda m: {"type": "max_words", "n": int(m[1])}),
    (re.compile(r"end with (a question mark|an exclamation mark)"),
     lambda m: {"type": "end_with", "text": {v: k for k, v in END_MARKS.items()}[m[1]]}),
    (re.compile(r"add the word ([a-z]+) at the end"), lambda m: {"type": "include_word", "word": m[1]}),
)


def parse_prompt(prompt: str) -> tuple[list[dict], str]:
    """(constraints, source) back from a prompt made by `format_prompt`, so a row holding only a
    prompt (preference data) can be judged; sentences never contain ":"."""
    instruction, _, source = prompt.partition(": ")
    instruction = instruction[:1].lower() + instruction[1:]
    constraints = []
    for phrase in instruction.split(" and ") if source else []:
        for pattern, build in _PHRASES:
            if m := pattern.fullmatch(phrase):
                constraints.append(build(m))
                break
        else:
            raise ValueError(f"not a prompt of this task: {prompt!r}")
    if not constraints or not source:
        raise ValueError(f"not a prompt of this task: {prompt!r}")
    return constraints, source


def _sample_constraints(types: Sequence[str], source: str, rng: random.Random) -> list[dict]:
    words = source[:-1].split()
    lowered = {w.lower().strip(",") for w in words}
    out = []
    for kind in types:
        if kind in ("lowercase", "uppercase"):
            out.append({"type": kind})
        elif kind == "max_words":  # always cut at least two words
            out.append({"type": "max_words", "n": rng.randint(3, min(8, len(words) - 2))})
        elif kind == "end_with":
            out.append({"type": "end_with", "text": rng.choice(["?", "?", "!"])})
        elif kind == "include_word":
            out.append({"type": "include_word", "word": rng.choice([w for w in EXTRA_WORDS if w not in lowered])})
    return out


def make_example(source: str, constraints: list[dict]) -> Example:
    return Example(format_prompt(source, constraints), source, constraints, expected_response(source, constraints))


def make_examples(n: int, seed: int, split: str, stream: str = "sft") -> list[Example]:
    """`n` examples on the sentences of `split` ("train" or "eval"/"validation"); deterministic.

    Sentences are visited in a seeded random order (and revisited when `n` exceeds the pool);
    templates are drawn by their weight in `TEMPLATES`. `stream` names an independent random
    stream, so SFT, preference and PPO prompts differ for the same seed.
    """
    pool = list(split_sentences(split))
    if not pool and n > 0:
        raise ValueError(f"no {split} sentences in the embedded corpus of this Python")
    rng = random.Random(f"instruction-task:v{TASK_VERSION}:{seed}:{_check_split(split)}:{stream}")
    types, weights = zip(*TEMPLATES)
    examples: list[Example] = []
    while len(examples) < n:
        rng.shuffle(pool)
        for source in pool[: n - len(examples)]:
            kinds = rng.choices(types, weights)[0]
            examples.append(make_example(source, _sample_constraints(kinds, source, rng)))
    return examples


# --- the judge -----------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def content_tokens(text: str) -> list[str]:
    """Lowercased word tokens; punctuation and case are the constraints' business, not faithfulness'."""
    return _TOKEN.findall(text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def faithfulness(expected: str, response: str) -> float:
    """LCS F1 between the word tokens of the expected and the actual response (ROUGE-L F1)."""
    want, got = content_tokens(expected), content_tokens(response)
    if not want or not got:
        return float(want == got)
    lcs = _lcs_length(want, got[:MAX_JUDGED_TOKENS])
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(got), lcs / len(want)
    return 2 * precision * recall / (precision + recall)


def check_constraint(constraint: Mapping, response: str) -> bool:
    """Whether `response` satisfies one constraint; the checks, by "type":

    lowercase / uppercase: it has a letter and no letter of the other case;
    max_words {"n"}: 1 <= whitespace-separated words <= n;
    end_with {"text"}: it ends with text, trailing whitespace ignored;
    include_word {"word"}: the word appears as a whole word token, any case.
    """
    kind, text = constraint["type"], response.strip()
    has_letter = any(ch.isalpha() for ch in text)
    if kind == "lowercase":
        return has_letter and text == text.lower()
    if kind == "uppercase":
        return has_letter and text == text.upper()
    if kind == "max_words":
        return 1 <= len(text.split()) <= constraint["n"]
    if kind == "end_with":
        return bool(text) and text.endswith(constraint["text"])
    if kind == "include_word":
        return constraint["word"].lower() in content_tokens(text)
    raise ValueError(f"unknown constraint type {kind!r}; known: {', '.join(CONSTRAINT_TYPES)}")


def _task_of(task) -> tuple[list[dict], str]:
    """(constraints, source) from an Example, a prompt string, a row mapping (constraints may be a
    JSON string; a row with only "prompt" is parsed) or a (constraints, source) pair."""
    if isinstance(task, Example):
        return task.constraints, task.source
    if isinstance(task, str):
        return parse_prompt(task)
    if isinstance(task, Mapping) and "constraints" not in task:
        return parse_prompt(task["prompt"])
    if isinstance(task, Mapping):
        constraints, source = task["constraints"], task["source"]
    else:
        constraints, source = task
    if isinstance(constraints, str):
        constraints = json.loads(constraints)
    return list(constraints), source


def is_task_prompt(row) -> bool:
    """Whether a prompt (a row, a string or an Example) is one of this task's, so that the judge applies."""
    try:
        constraints, source = _task_of(row)
    except Exception:  # noqa: BLE001 - anyone's prompt: a conversation, free text, other columns
        return False
    return bool(constraints) and bool(source)


def grade(task, response: str) -> Grade:
    """Grade one response. `task`: an Example, a prompt dataset row ("constraints" and "source"), a
    prompt string or a row with only "prompt" (parsed by `parse_prompt`), or (constraints, source).

    score = (constraints satisfied / constraints) x faithfulness, where faithfulness is the F1 of the
    longest common subsequence of lowercased word tokens between the response and
    `expected_response(source, constraints)`: precision = LCS / response tokens, recall = LCS /
    expected tokens. The reference scores exactly 1.0. Every token the response adds (repetition,
    junk, an echoed prompt) lowers precision, every token it misses or reorders lowers recall, an
    empty response scores 0, and a response that breaks every constraint scores 0 whatever its
    content. `passed` = every constraint satisfied and faithfulness >= PASS_FAITHFULNESS (0.9).
    """
    constraints, source = _task_of(task)
    satisfied = [check_constraint(c, response) for c in constraints]
    faithful = faithfulness(expected_response(source, constraints), response)
    fraction = sum(satisfied) / len(satisfied) if satisfied else 1.0
    return Grade(fraction * faithful, all(satisfied) and faithful >= PASS_FAITHFULNESS, satisfied, faithful)


def judge(task, response: str) -> float:
    """The judge's score in [0, 1]: fraction of constraints satisfied x faithfulness; see `grade`."""
    return grade(task, response).score


def passes(task, response: str) -> bool:
    """All constraints satisfied and faithfulness >= PASS_FAITHFULNESS; see `grade`."""
    return grade(task, response).passed


def score_responses(prompt_rows, responses: Sequence[str]) -> dict:
    """Mean judge score and pass rate of `responses`, one per row of a prompt dataset (or Example).

    Returns {"mean_score", "pass_rate", "n"} plus "pass_rate/<type>" over the prompts that carry a
    constraint of that type.
    """
    rows = list(prompt_rows)
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} prompts but {len(responses)} responses")
    grades = [grade(row, response) for row, response in zip(rows, responses)]
    out = {
        "mean_score": sum(g.score for g in grades) / max(len(grades), 1),
        "pass_rate": sum(g.passed for g in grades) / max(len(grades), 1),
        "n": len(grades),
    }
    by_type: dict[str, list[bool]] = {}
    for row, g in zip(rows, grades):
        for kind in {c["type"] for c in _task_of(row)[0]}:
            by_type.setdefault(kind, []).append(g.passed)
    for kind in CONSTRAINT_TYPES:
        if kind in by_type:
            out[f"pass_rate/{kind}"] = sum(by_type[kind]) / len(by_type[kind])
    return out


# --- corrupters: realistic worse responses -------------------------------------------------------
# each takes (example, rng) and returns a response that the judge scores strictly below the
# reference, or None where it does not apply to that example

FILLER_WORDS = (
    "the", "value", "return", "object", "is", "of", "module", "default", "function", "a", "to", "file",
    "list", "name", "string", "and", "be", "class", "will", "data", "for", "if", "none", "new",
)


def _split_end(text: str) -> tuple[list[str], str]:
    if text and text[-1] in ".?!":
        return text[:-1].split(), text[-1]
    return text.split(), ""


def violate_constraint(ex: Example, rng: random.Random) -> str | None:
    """Break exactly one constraint, keeping the rest of the reference."""
    c = rng.choice(ex.constraints)
    others = [o for o in ex.constraints if o is not c]
    if c["type"] == "lowercase":
        return ex.reference[0].upper() + ex.reference[1:]
    if c["type"] == "uppercase":
        words, end = _split_end(ex.reference)
        return " ".join(words[:-1] + [words[-1].lower()]) + end
    if c["type"] == "max_words":
        longer = dict(c, n=c["n"] + rng.randint(1, 2))
        return expected_response(ex.source, others + [longer])
    if c["type"] == "end_with":
        return ex.reference[:-1] + "."
    if c["type"] == "include_word":
        return expected_response(ex.source, others)
    return None


def ignore_instruction(ex: Example, rng: random.Random) -> str | None:
    """Copy the source sentence unchanged (always breaks a constraint: sources start uppercase, end in ".")."""
    return ex.source


def drop_words(ex: Example, rng: random.Random) -> str | None:
    words, end = _split_end(ex.reference)
    if len(words) < 3:
        return None
    for i in sorted(rng.sample(range(len(words)), rng.randint(1, 2)), reverse=True):
        del words[i]
    return " ".join(words) + end


def duplicate_words(ex: Example, rng: random.Random) -> str | None:
    words, end = _split_end(ex.reference)
    i = rng.randrange(len(words))
    span = words[i : i + rng.randint(1, 3)]
    return " ".join(words[: i + len(span)] + span + words[i + len(span) :]) + end


def swap_words(ex: Example, rng: random.Random) -> str | None:
    words, end = _split_end(ex.reference)
    spots = [i for i in range(len(words) - 1) if content_tokens(words[i]) != content_tokens(words[i + 1])]
    if not spots:
        return None
    i = rng.choice(spots)
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words) + end


def replace_word(ex: Example, rng: random.Random) -> str | None:
    words, end = _split_end(ex.reference)
    i = rng.randrange(len(words))
    new = rng.choice([w for w in FILLER_WORDS if [w] != content_tokens(words[i])])
    if any(c["type"] == "uppercase" for c in ex.constraints):
        new = new.upper()
    words[i] = new
    return " ".join(words) + end


def truncate(ex: Example, rng: random.Random) -> str | None:
    """Stop early: about the first half of the words, no final punctuation."""
    words, _ = _split_end(ex.reference)
    if len(words) < 2:
        return None
    return " ".join(words[: rng.randint(1, math.ceil(len(words) / 2))])


def wrong_case(ex: Example, rng: random.Random) -> str | None:
    """The other case (or the source's case) where the instruction asks for one."""
    kinds = {c["type"] for c in ex.constraints}
    if "lowercase" in kinds:
        return rng.choice([ex.reference.upper(), ex.reference.capitalize()])
    if "uppercase" in kinds:
        return rng.choice([ex.reference.lower(), ex.reference.capitalize()])
    return None


def append_junk(ex: Example, rng: random.Random) -> str | None:
    """Keep going after the answer: a few filler words after it."""
    junk = " ".join(rng.choices(FILLER_WORDS, k=rng.randint(3, 8)))
    return f"{ex.reference} {junk.upper() if ex.reference.isupper() else junk}"


def repeat_response(ex: Example, rng: random.Random) -> str | None:
    return " ".join([ex.reference] * rng.randint(2, 4))


def repeat_prompt(ex: Example, rng: random.Random) -> str | None:
    return ex.prompt


def empty(ex: Example, rng: random.Random) -> str | None:
    return ""


# name -> (corrupter, weight when drawing rejected responses); realistic near-misses weigh most
CORRUPTERS: dict[str, tuple[Callable[[Example, random.Random], str | None], float]] = {
    "violate_constraint": (violate_constraint, 4.0),
    "ignore_instruction": (ignore_instruction, 2.0),
    "drop_words": (drop_words, 2.0),
    "duplicate_words": (duplicate_words, 1.5),
    "swap_words": (swap_words, 1.5),
    "replace_word": (replace_word, 1.5),
    "truncate": (truncate, 1.5),
    "wrong_case": (wrong_case, 1.5),
    "append_junk": (append_junk, 1.0),
    "repeat_response": (repeat_response, 0.5),
    "repeat_prompt": (repeat_prompt, 0.5),
    "empty": (empty, 0.25),
}


def corrupt(ex: Example, rng: random.Random, exclude: Sequence[str] = ()) -> tuple[str, str]:
    """(corrupter name, response) drawn by weight among the corrupters that apply to `ex`."""
    names = [n for n in CORRUPTERS if n not in exclude]
    while names:
        name = rng.choices(names, [CORRUPTERS[n][1] for n in names])[0]
        response = CORRUPTERS[name][0](ex, rng)
        if response is not None:
            return name, response
        names.remove(name)
    raise ValueError(f"no corrupter applies to {ex.prompt!r}")


# --- datasets ------------------------------------------------------------------------------------


def _dataset(rows: list[dict], features):
    import datasets

    # by columns, so that an empty split still has its columns
    return datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)


def _splits(make_rows: Callable[[str, int], list[dict]], features, n_train: int, n_eval: int):
    import datasets

    return datasets.DatasetDict(
        {"train": _dataset(make_rows("train", n_train), features), "validation": _dataset(make_rows("eval", n_eval), features)}
    )


def build_sft_dataset(n_train: int = 4000, n_eval: int = 200, seed: int = 0):
    """Demonstrations: columns messages (user prompt, assistant reference), prompt, constraints (JSON), source, reference."""
    from datasets import Features, List, Value

    features = Features(
        {
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "prompt": Value("string"),
            "constraints": Value("string"),
            "source": Value("string"),
            "reference": Value("string"),
        }
    )

    def rows(split, n):
        return [
            {
                "messages": [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.reference}],
                "prompt": ex.prompt,
                "constraints": json.dumps(ex.constraints),
                "source": ex.source,
                "reference": ex.reference,
            }
            for ex in make_examples(n, seed, split, stream="sft")
        ]

    return _splits(rows, features, n_train, n_eval)


def build_prompt_dataset(n_train: int = 2000, n_eval: int = 200, seed: int = 0):
    """Prompts for PPO and evaluation: columns prompt, constraints (JSON), source; judge rows with `judge`/`score_responses`."""
    from datasets import Features, Value

    features = Features({"prompt": Value("string"), "constraints": Value("string"), "source": Value("string")})

    def rows(split, n):
        # the held-out split is the same for every consumer: evaluation numbers stay comparable
        stream = "prompts" if split == "train" else "eval"
        return [
            {"prompt": ex.prompt, "constraints": json.dumps(ex.constraints), "source": ex.source}
            for ex in make_examples(n, seed, split, stream=stream)
        ]

    return _splits(rows, features, n_train, n_eval)


PREFERENCE_KINDS = PREFERENCE_FORMATS
RANKING_SIZE = 4  # responses per ranking: the reference and three corruptions
RATINGS_PER_PROMPT = 3  # rated responses per prompt (rows share the prompt)


def _pair(ex: Example, rng: random.Random) -> dict:
    # half reference vs a corruption, half corruption vs corruption (finer distinctions)
    for _ in range(8):
        a = ex.reference if rng.random() < 0.5 else corrupt(ex, rng)[1]
        b = corrupt(ex, rng)[1]
        sa, sb = judge(ex, a), judge(ex, b)
        if sa != sb:
            (chosen, sc), (rejected, sr) = sorted([(a, sa), (b, sb)], key=lambda t: -t[1])
            return {"prompt": ex.prompt, "chosen": chosen, "rejected": rejected, "margin": sc - sr}
    return _pair_with_reference(ex, rng)


def _pair_with_reference(ex: Example, rng: random.Random) -> dict:
    rejected = corrupt(ex, rng)[1]
    return {"prompt": ex.prompt, "chosen": ex.reference, "rejected": rejected, "margin": 1.0 - judge(ex, rejected)}


def _ranking(ex: Example, rng: random.Random) -> dict:
    responses = [ex.reference]
    for _ in range(50):
        if len(responses) == RANKING_SIZE:
            break
        response = corrupt(ex, rng)[1]
        if response not in responses:
            responses.append(response)
    rng.shuffle(responses)
    scores = [judge(ex, r) for r in responses]
    levels = sorted(set(scores), reverse=True)
    return {"prompt": ex.prompt, "responses": responses, "ranks": [levels.index(s) for s in scores]}


def _rating(ex: Example, rng: random.Random) -> list[dict]:
    # RATINGS_PER_PROMPT rated responses per prompt: the reward stage pairs responses of one prompt
    responses = [ex.reference if rng.random() < 0.25 else corrupt(ex, rng)[1]]
    while len(responses) < RATINGS_PER_PROMPT:
        responses.append(corrupt(ex, rng)[1])
    return [{"prompt": ex.prompt, "response": r, "rating": judge(ex, r)} for r in responses]


def build_preference_dataset(kind: str = "pairs", n_train: int = 4000, n_eval: int = 200, seed: int = 0):
    """Preference data ordered by the judge, in one of the formats the reward stage reads:

    pairs: prompt, chosen, rejected, margin (= judge(chosen) - judge(rejected) > 0; no ties);
    rankings: prompt, responses (RANKING_SIZE distinct strings), ranks (0 = best; equal scores share
        a rank, dense: 0, 1, 1, 2);
    ratings: prompt, response, rating (= the judge's score; ties occur, e.g. 1.0 for references),
        RATINGS_PER_PROMPT rows per prompt.
    Otherwise one row per prompt. Train prompts use train sentences (an independent stream from SFT's, so the
    prompts differ), validation prompts held-out sentences.
    """
    from datasets import Features, List, Value

    features = {
        "pairs": {"prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string"), "margin": Value("float64")},
        "rankings": {"prompt": Value("string"), "responses": List(Value("string")), "ranks": List(Value("int64"))},
        "ratings": {"prompt": Value("string"), "response": Value("string"), "rating": Value("float64")},
    }
    if kind not in features:
        raise ValueError(f"unknown preference kind {kind!r}; expected one of {', '.join(PREFERENCE_KINDS)}")
    make_row = {"pairs": _pair, "rankings": _ranking, "ratings": _rating}[kind]

    def rows(split, n):
        rng = random.Random(f"instruction-task:v{TASK_VERSION}:{seed}:{split}:{kind}")
        rows = [make_row(ex, rng) for ex in make_examples(n, seed, split, stream=f"preference-{kind}")]
        return [r for row in rows for r in (row if isinstance(row, list) else [row])]

    return _splits(rows, Features(features[kind]), n_train, n_eval)
