"""A generated binary sentiment task with known, graded difficulty (the offline default task).

Sentences are lower-cased and tokenised like SST-2 ("the film was wonderful ."). Each carries a difficulty
level 0..3:

- 0: one plain clause: "the film was wonderful ."
- 1: one clause with one negation: "the film was not wonderful .", "i would not call the plot dull ."
- 2: two clauses in contrast (opposite polarities), no negation:
  "the plot was dull , but the acting was superb ."
- 3: two clauses in contrast, with a negation (or a double negation) in the decisive clause, and maybe one
  in the other clause: "the acting was superb , but the plot was not interesting ."
  When only the decisive clause is negated, and only once, every sentiment adjective in the sentence has
  the polarity opposite to the label, so a bag-of-words model gets those wrong.

**Label rule.** A sentence is one clause, or two clauses joined as "X , but D", "although X , D" or
"D , although X". The *decisive* clause D is the one after "but", or the one *not* introduced by
"although". A clause holds exactly one sentiment adjective (from POSITIVE or NEGATIVE); its polarity is the
adjective's polarity, flipped once for every negation word ("not", "never") in that clause. The label is the
decisive clause's polarity: 1 = "positive", 0 = "negative". Nothing else (intensifiers, nouns) matters.

Generation is deterministic: the same (n, seed) gives identical examples, and difficulty levels and labels
are balanced (every count within 1 of equal).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from .tasks import Example

POSITIVE: tuple[str, ...] = (
    "wonderful", "superb", "excellent", "brilliant", "delightful", "charming", "moving", "engaging", "gripping",
    "beautiful", "clever", "stunning", "memorable", "enjoyable", "impressive", "inspired", "touching", "witty",
    "fresh", "compelling", "polished", "elegant", "heartfelt", "thrilling", "masterful",
)
NEGATIVE: tuple[str, ...] = (
    "dull", "boring", "awful", "terrible", "tedious", "bland", "clumsy", "dreadful", "lifeless", "predictable",
    "shallow", "sloppy", "forgettable", "painful", "messy", "weak", "stale", "tiresome", "pointless",
    "mediocre", "flat", "lazy", "hollow", "awkward", "annoying",
)
NOUNS: tuple[str, ...] = (
    "film", "movie", "plot", "script", "acting", "soundtrack", "dialogue", "ending", "cast", "direction",
    "story", "pacing", "cinematography", "score", "lead", "humor", "editing", "premise", "finale", "screenplay",
)
INTENSIFIERS: tuple[str, ...] = ("very", "really", "truly", "quite", "utterly")
NEGATORS: tuple[str, ...] = ("not", "never")
MAX_LEVEL = 3

# Clause templates by number of negation words; {n} = noun, {a} = (intensifier +) adjective.
_CLAUSES: dict[int, tuple[str, ...]] = {
    0: ("the {n} was {a}", "the {n} is {a}", "i found the {n} {a}", "the {n} felt {a}", "the {n} seemed {a}"),
    1: ("the {n} was not {a}", "the {n} was never {a}", "i would not call the {n} {a}",
        "the {n} did not feel {a}", "i did not find the {n} {a}"),
    2: ("i would not say the {n} was not {a}", "it is not true that the {n} was never {a}",
        "i did not think the {n} was not {a}"),
}
# Two-clause templates: D = decisive clause, X = contrasting clause.
_CONTRASTS: tuple[str, ...] = ("{x} , but {d} .", "although {x} , {d} .", "{d} , although {x} .")


def _clause(rng: random.Random, polarity: int, negations: int, noun: str) -> str:
    """A clause whose polarity (+1/-1) follows the label rule: adjective polarity * (-1) ** negations."""
    adjectives = POSITIVE if polarity * (-1) ** negations > 0 else NEGATIVE
    adjective = rng.choice(adjectives)
    if rng.random() < 0.3:
        adjective = f"{rng.choice(INTENSIFIERS)} {adjective}"
    return rng.choice(_CLAUSES[negations]).format(n=noun, a=adjective)


def _sentence(rng: random.Random, level: int, polarity: int) -> str:
    if level <= 1:  # one clause, `level` negations
        return _clause(rng, polarity, level, rng.choice(NOUNS)) + " ."
    noun_d, noun_x = rng.sample(NOUNS, 2)
    if level == 2:
        neg_d, neg_x = 0, 0
    else:
        neg_d, neg_x = rng.choice((1, 1, 2)), rng.choice((0, 1))
    decisive = _clause(rng, polarity, neg_d, noun_d)
    contrast = _clause(rng, -polarity, neg_x, noun_x)  # opposite polarity: that is what makes it a contrast
    return rng.choice(_CONTRASTS).format(d=decisive, x=contrast)


def _generate(n: int, rng: random.Random, max_difficulty: int, exclude: frozenset[str] | set[str]) -> list[Example]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 <= max_difficulty <= MAX_LEVEL:
        raise ValueError(f"max_difficulty must be in 0..{MAX_LEVEL}, got {max_difficulty}")
    levels = max_difficulty + 1
    # Cell i gets level i % L and label (i + i // L) % 2: any prefix is balanced in level, label and both.
    cells = [(i % levels, (i + i // levels) % 2) for i in range(n)]
    rng.shuffle(cells)
    seen = set(exclude)
    examples = []
    for level, label in cells:
        for _ in range(1000):  # rejection sampling: sentences are unique, and never in `exclude`
            text = _sentence(rng, level, 1 if label == 1 else -1)
            if text not in seen:
                break
        else:
            raise ValueError(f"cannot generate {n} distinct sentences at difficulty {level}; use a smaller n")
        seen.add(text)
        examples.append(Example(text_a=text, text_b=None, label=label, difficulty=level))
    return examples


def generate_graded(n: int, seed: int, max_difficulty: int = MAX_LEVEL) -> list[Example]:
    """``n`` distinct examples (label 1 = positive, 0 = negative) with difficulty 0..max_difficulty.

    Deterministic in (n, seed); levels and labels are balanced to within one example.
    """
    return _generate(n, random.Random(seed), max_difficulty, frozenset())


def generate_graded_split(split: str, seed: int, sizes: Mapping[str, int]) -> list[Example]:
    """The train or dev split of the graded task: separate random streams, and train never repeats a dev sentence."""
    dev = _generate(sizes["dev"], random.Random(f"graded:{seed}:dev"), MAX_LEVEL, frozenset())
    if split == "dev":
        return dev
    return _generate(sizes["train"], random.Random(f"graded:{seed}:train"), MAX_LEVEL, {e.text_a for e in dev})
