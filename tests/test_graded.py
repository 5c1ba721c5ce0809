"""The generated graded task: labels re-derived by an independent parser, balance, determinism, splits."""

from __future__ import annotations

from collections import Counter

import pytest

from eebench.graded import NEGATIVE, NOUNS, POSITIVE, generate_graded
from eebench.tasks import Example, get_task, load_split

NEGATION_WORDS = {"not", "never"}


def _clause_polarity(clause: str) -> tuple[int, int]:
    """(polarity, negation count) of one clause: its one sentiment adjective, flipped per negation word."""
    words = clause.split()
    adjectives = [w for w in words if w in POSITIVE or w in NEGATIVE]
    assert len(adjectives) == 1, clause
    negations = sum(w in NEGATION_WORDS for w in words)
    return (1 if adjectives[0] in POSITIVE else -1) * (-1) ** negations, negations


def parse(sentence: str) -> tuple[int, int, int, int | None]:
    """(label, clauses, negations in decisive clause, polarity of the other clause or None)."""
    assert sentence.endswith(" ."), sentence
    body = sentence[: -len(" .")]
    if body.startswith("although "):
        other, decisive = body[len("although "):].split(" , ")
    elif " , but " in body:
        other, decisive = body.split(" , but ")
    elif " , although " in body:
        decisive, other = body.split(" , although ")
    else:
        decisive, other = body, None
    polarity, negations = _clause_polarity(decisive)
    other_polarity = None if other is None else _clause_polarity(other)[0]
    return int(polarity > 0), 1 if other is None else 2, negations, other_polarity


@pytest.mark.parametrize("sentence,label", [
    ("the film was wonderful .", 1),
    ("the film was not wonderful .", 0),
    ("i would not call the plot dull .", 1),
    ("the plot was dull , but the acting was superb .", 1),
    ("although the plot was dull , the acting was superb .", 1),
    ("the acting was superb , although the plot was dull .", 1),
    ("the acting was superb , but the plot was not very engaging .", 0),
    ("i would not say the film was not wonderful .", 1),
])
def test_parser_on_known_cases(sentence, label):
    assert parse(sentence)[0] == label


def _check(examples: list[Example]) -> None:
    for ex in examples:
        label, clauses, negations, other = parse(ex.text_a)
        assert ex.label == label, ex
        assert ex.text_b is None
        if ex.difficulty == 0:
            assert (clauses, negations) == (1, 0), ex
        elif ex.difficulty == 1:
            assert (clauses, negations) == (1, 1), ex
        else:
            assert clauses == 2 and other == (-1 if label else 1), ex  # a real contrast
            assert (negations == 0) if ex.difficulty == 2 else (negations >= 1), ex
            if ex.difficulty == 2:
                assert not NEGATION_WORDS & set(ex.text_a.split()), ex


@pytest.mark.parametrize("seed", [0, 7, 2024])
def test_generated_labels_follow_the_rule(seed):
    _check(generate_graded(400, seed))


def test_balanced_levels_and_labels():
    ex = generate_graded(803, seed=1)
    levels, labels = Counter(e.difficulty for e in ex), Counter(e.label for e in ex)
    assert set(levels) == {0, 1, 2, 3} and max(levels.values()) - min(levels.values()) <= 1
    assert max(labels.values()) - min(labels.values()) <= 1
    cells = Counter((e.difficulty, e.label) for e in generate_graded(800, seed=1))
    assert set(cells.values()) == {100}
    assert {e.difficulty for e in generate_graded(50, seed=1, max_difficulty=1)} == {0, 1}
    with pytest.raises(ValueError):
        generate_graded(10, seed=1, max_difficulty=4)


def test_deterministic_and_seed_dependent():
    assert generate_graded(200, seed=5) == generate_graded(200, seed=5)
    assert generate_graded(200, seed=5) != generate_graded(200, seed=6)
    texts = [e.text_a for e in generate_graded(1000, seed=5)]
    assert len(set(texts)) == len(texts)


def test_vocabulary_is_unambiguous():
    assert len(POSITIVE) == len(NEGATIVE) == 25 and len(NOUNS) == 20
    assert not set(POSITIVE) & set(NEGATIVE)
    assert not (set(POSITIVE) | set(NEGATIVE)) & (set(NOUNS) | NEGATION_WORDS)


def test_task_splits_are_fixed_disjoint_and_valid():
    spec = get_task("graded")
    train, dev = load_split(spec, "train", seed=0), load_split(spec, "dev", seed=0)
    assert (len(train), len(dev)) == (2000, 600)
    assert train.source.startswith("generated:graded(") and dev.source.startswith("generated:graded(")
    assert not {e.text_a for e in train.examples} & {e.text_a for e in dev.examples}
    _check(train.examples + dev.examples)
    # The data does not depend on the job seed (nor on data_dir); only `limit` subsampling does.
    assert load_split(spec, "dev", seed=3, data_dir="/nonexistent").examples == dev.examples
    a, b = load_split(spec, "dev", limit=100, seed=1), load_split(spec, "dev", limit=100, seed=2)
    assert len(a) == 100 and a.examples != b.examples
    assert a.examples == load_split(spec, "dev", limit=100, seed=1).examples
