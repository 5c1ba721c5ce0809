"""Task registry over both kinds of task, and the one entry point that loads a split of either.

- Classification and regression tasks (GLUE, M-CID, StackOverflow, graded) are :class:`TaskSpec` s, with
  :class:`Example` rows; specs and loaders are in :mod:`eebench.tasks.classification`.
- Generation tasks (alpaca, dolly, cnndm, xsum) are :class:`GenerationTaskSpec` s, with
  :class:`GenerationExample` rows; specs, loaders and :func:`render_prompt` are in :mod:`eebench.tasks.generation`.

Both kinds of spec have ``name``, ``kind``, ``metric_names``, ``primary_metric``, ``description``, ``aliases``
and ``num_labels`` (:class:`TaskSpecLike`). :func:`get_task` finds either by name or alias;
:func:`load_split` and :func:`train_and_selection` take either and return :class:`TaskData`.
Every data problem raises a :class:`TaskError` whose message names the problem and the fix.
"""

from __future__ import annotations

import difflib
import random
from pathlib import Path
from typing import Literal

from .classification import (
    CLASSIFICATION_SPECS,
    GRADED_SEED,
    GRADED_SIZES,
    HUB_GLUE,
    MCID_LABELS,
    Example,
    MalformedDataError,
    MissingSplitError,
    Split,
    TaskData,
    TaskError,
    TaskKind,
    TaskSpec,
    TaskSpecLike,
    UnknownTaskError,
    _key,
    _subsample_indices,
    load_classification_split,
)
from .generation import (
    GENERATION_DEV_SEED,
    GENERATION_METRICS,
    GENERATION_SPECS,
    GENERATION_SPLIT_SEED,
    GenerationExample,
    GenerationTaskSpec,
    load_generation_split,
    make_prompt,
    render_prompt,
    truncate_words,
)

__all__ = [
    "CLASSIFICATION_SPECS", "GENERATION_DEV_SEED", "GENERATION_METRICS", "GENERATION_SPECS", "GENERATION_SPLIT_SEED",
    "GRADED_SEED", "GRADED_SIZES", "HUB_GLUE", "MCID_LABELS", "AnySpec", "Example", "GenerationExample",
    "GenerationTaskSpec", "MalformedDataError", "MissingSplitError", "Split", "TaskData", "TaskError", "TaskKind",
    "TaskSpec", "TaskSpecLike", "Track", "UnknownTaskError", "get_task", "load_classification_split",
    "load_generation_split", "load_split", "make_prompt", "render_prompt", "task_names", "train_and_selection",
    "truncate_words",
]

AnySpec = TaskSpec | GenerationTaskSpec
Track = Literal["classification", "generation", "all"]
"""Which tasks :func:`task_names` lists: "classification" (classification and regression: the encoder
track), "generation", or "all"."""

_SPECS: tuple[AnySpec, ...] = (*CLASSIFICATION_SPECS, *GENERATION_SPECS)
_REGISTRY: dict[str, AnySpec] = {s.name: s for s in _SPECS}

_LOOKUP: dict[str, str] = {}
for _s in _SPECS:
    for _n in (_s.name, *_s.aliases):
        if _LOOKUP.setdefault(_key(_n), _s.name) != _s.name:  # else get_task would depend on registry order
            raise ValueError(f"task '{_s.name}': name or alias '{_n}' is taken by '{_LOOKUP[_key(_n)]}'")


def task_names(track: Track = "classification") -> list[str]:
    """Registered task names, in registry order.

    The default lists the classification and regression tasks only (what ``eebench tasks`` and the encoder
    suites have always listed); ``"generation"`` lists the generation tasks, ``"all"`` both."""
    if track == "all":
        return list(_REGISTRY)
    if track == "generation":
        return [s.name for s in GENERATION_SPECS]
    if track == "classification":
        return [s.name for s in CLASSIFICATION_SPECS]
    raise TaskError(f"unknown track '{track}'. Fix: use 'classification', 'generation' or 'all'.")


def get_task(name: str) -> AnySpec:
    """The spec registered under ``name`` (case-insensitive; aliases such as 'SST-2', 'STS-B', 'mnli_matched',
    'cnn_dailymail'), of either kind."""
    canonical = _LOOKUP.get(_key(name))
    if canonical is not None:
        return _REGISTRY[canonical]
    close = difflib.get_close_matches(name.lower(), [*_REGISTRY, *(a for s in _SPECS for a in s.aliases)],
                                      n=1, cutoff=0.5)
    hint = f"; did you mean '{_REGISTRY[_LOOKUP[_key(close[0])]].name}'?" if close else "."
    raise UnknownTaskError(f"unknown task '{name}'{hint} Known tasks: {', '.join(_REGISTRY)}. "
                           "Fix: pass one of these names (case-insensitive; 'SST-2', 'STS-B', 'mnli_matched', "
                           "'cnn_dailymail' also work).")


def load_split(spec: AnySpec | str, split: str, data_dir: str | Path | None = None,
               limit: int | None = None, seed: int = 0) -> TaskData:
    """Load one split ("train" or "dev"; "validation" is accepted for "dev") of a task of either kind.

    ``limit`` keeps a deterministic random subset of ``limit`` examples in their original file order;
    ``limit >= len`` keeps everything. It is drawn with ``random.Random(seed)``, except on a generation task's
    dev split, where a fixed seed makes the subset the same for every job seed (see
    :mod:`eebench.tasks.generation`). The graded task ignores ``data_dir``; generation tasks require it.
    """
    if isinstance(spec, str):
        spec = get_task(spec)
    if isinstance(spec, GenerationTaskSpec):
        return load_generation_split(spec, split, data_dir, limit, seed)
    return load_classification_split(spec, split, data_dir, limit, seed)


def train_and_selection(spec: AnySpec | str, data_dir: str | Path | None, train_limit: int | None,
                        selection_examples: int, seed: int = 0) -> tuple[TaskData, TaskData, bool]:
    """The training examples and a disjoint held-out SELECTION set from the train split, on which operating
    points are chosen (so no reported dev number is tuned on dev). For generation tasks this is where a
    calibration set (e.g. CALM's) comes from.

    The training examples are exactly ``load_split(spec, "train", data_dir, train_limit, seed)`` whenever the
    split has ``selection_examples`` examples left over (e.g. SST-2 capped at 8,000 of 67k): the selection set
    is then drawn from the rest. Otherwise (MRPC, RTE) the selection set is carved out of the split first and
    training uses what remains, so training differs; the third value says so (True = carved)."""
    whole = load_split(spec, "train", data_dir, None, seed)
    size = len(whole.examples)
    if not 0 < selection_examples < size:
        raise TaskError(f"selection_examples must be in 1..{size - 1} for '{whole.spec.name}' (its train split has "
                        f"{size} examples), got {selection_examples}")
    train_ids = _subsample_indices(size, train_limit, seed)
    rest = sorted(set(range(size)) - set(train_ids))
    draw = random.Random(seed + 1)  # a different stream from the training subsample's
    carved = len(rest) < selection_examples
    if carved:
        selection_ids = sorted(draw.sample(range(size), selection_examples))
        taken = set(selection_ids)
        remaining = [i for i in range(size) if i not in taken]
        train_ids = [remaining[i] for i in _subsample_indices(len(remaining), train_limit, seed)]
    else:
        selection_ids = sorted(draw.sample(rest, selection_examples))
    pick = whole.examples.__getitem__
    return (TaskData(whole.spec, "train", [pick(i) for i in train_ids], whole.source),
            TaskData(whole.spec, "train", [pick(i) for i in selection_ids], whole.source + " (held-out selection)"),
            carved)
