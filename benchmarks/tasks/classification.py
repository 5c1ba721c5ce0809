"""Classification and regression tasks (GLUE, M-CID, StackOverflow, graded): specs and data loaders.

A task is a :class:`TaskSpec` (what the labels are, which metrics to report, where the data lives).
:func:`load_classification_split` turns a spec plus a split name ("train" or "dev") into a :class:`TaskData`,
a list of :class:`Example` rows with integer class ids (classification) or float targets (regression).
The registry over these and the generation tasks (``get_task``, ``load_split``, ...) is :mod:`eebench.tasks`.
The types both kinds share (:class:`TaskData`, the errors, :class:`TaskSpecLike`) live here, where they
always have, and are re-exported from there.

Where the data comes from, in this order:

1. ``data_dir`` given: the task's folder is looked up in ``data_dir``, ``data_dir/glue`` and
   ``data_dir.parent`` (folder names matched case- and punctuation-insensitively, so "SST-2" == "sst2").
   Inside it, ``<split>.tsv`` (GLUE download layout) is preferred over ``<split>.jsonl`` (HF field names).
2. ``data_dir`` None: the Hugging Face hub, ``datasets.load_dataset("nyu-mll/glue", config)``.
3. The ``graded`` task is generated (see :mod:`eebench.graded`) and never reads data.

Every data problem raises a :class:`TaskError` whose message names the problem and the fix.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:  # generation imports this module; only type checkers look the other way
    from .generation import GenerationExample, GenerationTaskSpec

TaskKind = Literal["classification", "regression"]
Split = Literal["train", "dev"]

HUB_GLUE = "nyu-mll/glue"
GRADED_SEED = 1234  # fixed generator seed of the graded task: every job seed sees the same data
GRADED_SIZES = {"train": 2000, "dev": 600}

# The 16 M-CID intents, sorted. Fixed here (not read from the files) so that train and dev always agree on
# the label ids, whatever subset of intents a given file happens to contain.
MCID_LABELS: tuple[str, ...] = (
    "can i get from feces animal pets",
    "can i get from packages surfaces",
    "donate",
    "hi",
    "how does corona spread",
    "latest numbers",
    "myths",
    "news and press",
    "okay thanks",
    "protect yourself",
    "share",
    "travel",
    "what are symptoms",
    "what are treatment options",
    "what if i visited high risk area",
    "what is corona",
)


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark task.

    ``labels`` are the label names in id order (``()`` for regression); ``metric_names[0]`` is the primary
    metric. ``text_fields`` are the HF field names of the one or two input texts. The remaining fields say
    where the data lives: ``folder`` (GLUE download-layout folder name), ``dev_file`` (file stem of the dev
    split), ``tsv_columns`` (header names, or 0-based indices when ``tsv_header`` is False, of
    text_a[, text_b], label), ``hub_config``/``hub_dev_split`` (the ``nyu-mll/glue`` config and split), and
    ``hub_labels`` (our label name for each integer id the hub uses; the hub's MNLI ids differ from ours).
    """

    name: str
    kind: TaskKind
    labels: tuple[str, ...]
    metric_names: tuple[str, ...]
    text_fields: tuple[str, ...]
    description: str
    folder: str | None = None
    dev_file: str = "dev"
    tsv_columns: tuple[str | int, ...] | None = None
    tsv_header: bool = True
    tsv_ncols: int | None = None  # required column count for header-less TSVs
    hub_config: str | None = None
    hub_dev_split: str = "validation"
    hub_labels: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = field(default=())

    @property
    def num_labels(self) -> int:
        """Output width of the classifier head: number of classes, or 1 for regression."""
        return 1 if self.kind == "regression" else len(self.labels)

    @property
    def primary_metric(self) -> str:
        return self.metric_names[0]

    @property
    def train_split_rule(self) -> str | None:
        """None: the train split has been cut the same way since the first checkpoint (see the generation spec's)."""
        return None


@dataclass(frozen=True)
class Example:
    """One input: one or two texts and a label (class id for classification, float target for regression)."""

    text_a: str
    text_b: str | None
    label: int | float
    difficulty: int | None = None  # known graded difficulty (the generated task only)


class TaskSpecLike(Protocol):
    """What every task spec offers, whatever its kind (:class:`TaskSpec` and ``GenerationTaskSpec``):
    what ``eebench tasks``, the runner and the leaderboard read without caring which kind it is."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...  # "classification", "regression" or "generation"
    @property
    def metric_names(self) -> tuple[str, ...]: ...
    @property
    def description(self) -> str: ...
    @property
    def aliases(self) -> tuple[str, ...]: ...
    @property
    def primary_metric(self) -> str: ...
    @property
    def num_labels(self) -> int: ...  # 0 for generation: no label head
    @property
    def train_split_rule(self) -> str | None: ...  # enters checkpoint keys when set (runner.training_context)


@dataclass
class TaskData:
    """The examples of one split of one task, plus where they came from (a path, ``hub:...`` or ``generated:...``).

    ``examples`` are :class:`Example` rows for classification/regression specs and ``GenerationExample`` rows
    for generation specs."""

    spec: TaskSpec | GenerationTaskSpec
    split: str
    examples: list[Example] | list[GenerationExample]
    source: str

    def __len__(self) -> int:
        return len(self.examples)


class TaskError(ValueError):
    """Base class of every data problem. Messages name the problem and the fix."""


class UnknownTaskError(TaskError, KeyError):
    """The task name is not registered."""

    def __str__(self) -> str:  # KeyError would print the message repr()-quoted
        return str(self.args[0]) if self.args else ""


class MissingSplitError(TaskError):
    """The requested split (or the task's folder) is not in the data directory."""


class MalformedDataError(TaskError):
    """A data file (or hub row) cannot be parsed; the message names file, 1-based line and problem."""


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_MNLI = ("contradiction", "entailment", "neutral")  # DeeBERT/PABEE MnliProcessor order
_HUB_MNLI = ("entailment", "neutral", "contradiction")  # HF glue/mnli ClassLabel order


def _glue(name: str, labels: tuple[str, ...], metrics: tuple[str, ...], text_fields: tuple[str, ...],
          description: str, folder: str, tsv_columns: tuple[str | int, ...], **kw: Any) -> TaskSpec:
    kind: TaskKind = "regression" if not labels else "classification"
    kw.setdefault("hub_config", name)
    kw.setdefault("hub_labels", labels or None)  # same order as ours unless given
    return TaskSpec(name=name, kind=kind, labels=labels, metric_names=metrics, text_fields=text_fields,
                    description=description, folder=folder, tsv_columns=tsv_columns, **kw)


CLASSIFICATION_SPECS: tuple[TaskSpec, ...] = (
    _glue("sst2", _BINARY, ("accuracy",), ("sentence",), "SST-2 binary movie-review sentiment (0=negative, 1=positive)",
          "SST-2", ("sentence", "label")),
    _glue("mrpc", _BINARY, ("f1", "accuracy"), ("sentence1", "sentence2"),
          "MRPC paraphrase detection (1=paraphrase); F1 of class 1", "MRPC", ("#1 String", "#2 String", "Quality")),
    _glue("rte", _NLI2, ("accuracy",), ("sentence1", "sentence2"), "RTE textual entailment (2 classes)",
          "RTE", ("sentence1", "sentence2", "label")),
    _glue("qnli", _NLI2, ("accuracy",), ("question", "sentence"),
          "QNLI: does the sentence answer the question (2 classes)", "QNLI", ("question", "sentence", "label")),
    _glue("qqp", _BINARY, ("f1", "accuracy"), ("question1", "question2"),
          "QQP duplicate-question detection (1=duplicate); F1 of class 1", "QQP",
          ("question1", "question2", "is_duplicate")),
    _glue("mnli-m", _MNLI, ("accuracy",), ("premise", "hypothesis"), "MNLI 3-way NLI, matched dev set", "MNLI",
          ("sentence1", "sentence2", "gold_label"), hub_config="mnli", hub_labels=_HUB_MNLI,
          dev_file="dev_matched", hub_dev_split="validation_matched", aliases=("mnli", "mnli-matched")),
    _glue("mnli-mm", _MNLI, ("accuracy",), ("premise", "hypothesis"), "MNLI 3-way NLI, mismatched dev set",
          "MNLI", ("sentence1", "sentence2", "gold_label"), hub_config="mnli", hub_labels=_HUB_MNLI,
          dev_file="dev_mismatched", hub_dev_split="validation_mismatched", aliases=("mnli-mismatched",)),
    _glue("cola", _BINARY, ("mcc",), ("sentence",), "CoLA grammatical acceptability (1=acceptable); Matthews corr.",
          "CoLA", (3, 1), tsv_header=False, tsv_ncols=4),
    _glue("stsb", (), ("spearman", "pearson"), ("sentence1", "sentence2"),
          "STS-B semantic similarity, regression on a 0-5 score", "STS-B", ("sentence1", "sentence2", "score")),
    TaskSpec("mcid", "classification", MCID_LABELS, ("accuracy",), ("text",),
             "M-CID English COVID-19 intent detection (16 intents; ConsistentEE task)", folder="mcid",
             aliases=("m-cid",)),
    TaskSpec("stackoverflow", "classification", tuple(str(i) for i in range(1, 21)), ("accuracy",), ("text",),
             "StackOverflow question-title topic classification (20 tags; ConsistentEE task)",
             folder="stackoverflow", aliases=("stack-overflow", "so")),
    TaskSpec("graded", "classification", ("negative", "positive"), ("accuracy",), ("sentence",),
             "Generated binary sentiment with known difficulty 0-3 (offline default; no data needed)"),
)


def _key(name: str) -> str:
    """Case- and punctuation-insensitive key: 'SST-2' -> 'sst2', 'mnli_matched' -> 'mnlimatched'."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_classification_split(spec: TaskSpec, split: str, data_dir: str | Path | None = None,
                              limit: int | None = None, seed: int = 0) -> TaskData:
    """Load one split ("train" or "dev"; "validation" is accepted for "dev") of a classification/regression task.

    ``limit`` keeps a deterministic random subset of ``limit`` examples (chosen with ``random.Random(seed)``)
    in their original file order; ``limit >= len`` keeps everything. The graded task ignores ``data_dir``.
    Use :func:`eebench.tasks.load_split`, which also takes a name and generation tasks.
    """
    split_ = _normalise_split(spec, split)
    _check_limit(limit)

    if spec.name == "graded":
        examples, source = _load_graded(split_)
    elif data_dir is not None:
        path = _find_split_file(spec, split_, Path(data_dir).expanduser())
        examples = _read_tsv(spec, path) if path.suffix == ".tsv" else _read_jsonl(spec, path)
        source = str(path)
    else:
        examples, source = _load_hub(spec, split_)

    if not examples:
        raise MalformedDataError(f"{source}: no examples in the {split_} split of '{spec.name}'. "
                                 "Fix: supply a non-empty file.")
    return TaskData(spec=spec, split=split_, examples=_subsample(examples, limit, seed), source=source)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit <= 0:
        raise TaskError(f"limit must be a positive number of examples, got {limit}. Fix: pass limit >= 1 or None (all).")


def _normalise_split(spec: TaskSpecLike, split: str) -> Split:
    s = split.strip().lower()
    if s == "train":
        return "train"
    if s in ("dev", "validation", "valid", "val"):
        return "dev"
    raise TaskError(f"task '{spec.name}': unknown split '{split}'. Fix: use 'train' or 'dev' "
                    "(test sets are unlabelled and not used).")


def _subsample_indices(size: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= size:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), limit))  # sorted: keep file order


def _subsample(examples: list[Any], limit: int | None, seed: int) -> list[Any]:
    return [examples[i] for i in _subsample_indices(len(examples), limit, seed)]


def _load_graded(split: Split) -> tuple[list[Example], str]:
    from ..graded import generate_graded_split  # local import: graded imports Example from eebench.tasks

    return generate_graded_split(split, GRADED_SEED, GRADED_SIZES), f"generated:graded(seed={GRADED_SEED},split={split})"


# --- files -----------------------------------------------------------------------------------------------


def _split_stems(spec: TaskSpec, split: Split) -> tuple[str, ...]:
    if split == "train":
        return ("train",)
    return (spec.dev_file, spec.hub_dev_split) if spec.hub_config else (spec.dev_file,)


def _find_split_file(spec: TaskSpec, split: Split, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise TaskError(f"data dir '{data_dir}' does not exist or is not a folder. "
                        "Fix: pass --data-dir pointing at the shared data (e.g. ../shared/data/glue).")
    assert spec.folder is not None
    roots = list(dict.fromkeys([data_dir, data_dir / "glue", data_dir.parent]))
    folders = [d for root in roots if root.is_dir() for d in sorted(root.iterdir())
               if d.is_dir() and _key(d.name) == _key(spec.folder)]
    names = [f"{stem}.{ext}" for stem in _split_stems(spec, split) for ext in ("tsv", "jsonl")]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    if not folders:
        raise MissingSplitError(
            f"task '{spec.name}': no '{spec.folder}' folder in {', '.join(str(r) for r in roots)}. "
            f"Fix: pass --data-dir pointing at the folder that holds {spec.folder}/ (e.g. ../shared/data/glue)"
            + (", or omit --data-dir to load it from the Hugging Face hub." if spec.hub_config else "."))
    present = sorted({p.name for f in folders for p in f.iterdir() if p.suffix in (".tsv", ".jsonl")})
    raise MissingSplitError(
        f"task '{spec.name}': no {split} split in {', '.join(str(f) for f in folders)} "
        f"(looked for: {', '.join(names)}; found: {', '.join(present) or 'nothing'}). "
        f"{_SHARED_NOTE.get(spec.name, '')}Fix: put {names[0]} or {names[1]} there"
        + (f", or omit --data-dir to load {HUB_GLUE}/{spec.hub_config} from the Hugging Face hub." if spec.hub_config
           else "."))


# The shared snapshot ships no train split for these (README section 4); said so to make the message concrete.
_SHARED_NOTE = {name: f"../shared/data has {name.split('-')[0].upper()} dev only. "
                for name in ("qnli", "qqp", "mnli-m", "mnli-mm")}


def _malformed(where: str, problem: str, fix: str) -> MalformedDataError:
    return MalformedDataError(f"{where}: {problem}. {fix}")


_TSV_FIX = "Fix: repair or delete that line (GLUE TSVs are tab-separated, read without quoting)."
_JSONL_FIX = "Fix: repair or delete that line (one JSON object per line, with HF field names)."


def decoded_text(path: Path, fix: str) -> str:
    """The file as UTF-8 text, a leading BOM dropped (MRPC has one). A bad byte is a MalformedDataError naming
    file, 1-based line and byte: decoding the whole file at once is what lets us say where (a text-mode read
    reports a position inside its read buffer, which names neither)."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        lineno = data.count(b"\n", 0, e.start) + 1
        raise _malformed(f"{path}:{lineno}", f"bad UTF-8 byte 0x{data[e.start]:02x} at byte {e.start - line_start + 1} "
                         f"of the line (the file must be UTF-8; re-encode it, e.g. `iconv -f latin1 -t utf-8`)",
                         fix) from None


def _read_tsv(spec: TaskSpec, path: Path) -> list[Example]:
    assert spec.tsv_columns is not None, f"task '{spec.name}' has no TSV layout"
    examples: list[Example] = []
    # QUOTE_NONE because GLUE text holds bare '"'; newline="" as csv wants (no field spans lines without quoting).
    reader = csv.reader(io.StringIO(decoded_text(path, _TSV_FIX), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    ncols, cols = spec.tsv_ncols, spec.tsv_columns
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not row:  # blank line (e.g. a trailing one)
            continue
        if ncols is None:  # header line: look the columns up by name
            missing = [c for c in cols if c not in row]
            if missing:
                raise _malformed(where, f"header {row} lacks column(s) {missing}",
                                 f"Fix: use the GLUE {spec.folder} TSV, whose header has {list(cols)}.")
            ncols, cols = len(row), tuple(row.index(c) for c in cols)
            continue
        if len(row) != ncols:
            raise _malformed(where, f"expected {ncols} tab-separated columns, found {len(row)}", _TSV_FIX)
        *texts, label = (row[int(c)] for c in cols)
        examples.append(_make_example(spec, texts, label, where, _TSV_FIX))
    return examples


def _read_jsonl(spec: TaskSpec, path: Path) -> list[Example]:
    examples: list[Example] = []
    for lineno, line in enumerate(io.StringIO(decoded_text(path, _JSONL_FIX)), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _malformed(where, f"invalid JSON ({e.msg} at column {e.colno})", _JSONL_FIX) from None
        examples.append(_example_from_record(spec, record, where, _JSONL_FIX))
    return examples


# --- hub -------------------------------------------------------------------------------------------------


def _load_hub(spec: TaskSpec, split: Split) -> tuple[list[Example], str]:
    if spec.hub_config is None:
        raise TaskError(f"task '{spec.name}' has no Hugging Face hub source. "
                        f"Fix: pass --data-dir ../shared/data (it holds {spec.folder}/train.jsonl and dev.jsonl).")
    hub_split = "train" if split == "train" else spec.hub_dev_split
    source = f"hub:{HUB_GLUE}/{spec.hub_config}/{hub_split}"
    try:
        import datasets

        rows = datasets.load_dataset(HUB_GLUE, spec.hub_config, split=hub_split)
    except Exception as e:  # network, cache or hub errors all mean "cannot get it from the hub"
        raise TaskError(f"task '{spec.name}': could not load {source} ({type(e).__name__}: {e}). "
                        "no network? pass --data-dir ../shared/data/glue") from e
    return [_example_from_record(spec, r, f"{source} row {i}", "Fix: report the hub row, or use --data-dir.")
            for i, r in enumerate(rows, start=1)], source


# --- rows -> Example -------------------------------------------------------------------------------------


def _example_from_record(spec: TaskSpec, record: Any, where: str, fix: str) -> Example:
    """Map one HF-style record ({text fields..., "label"[, "label_text"]}) to an Example."""
    if not isinstance(record, Mapping):
        raise _malformed(where, f"expected a JSON object, got {type(record).__name__}", fix)
    needed = (*spec.text_fields, "label")
    missing = [k for k in needed if k not in record]
    if missing:
        raise _malformed(where, f"missing field(s) {missing} (fields present: {sorted(record)})", fix)
    label = record["label"]
    if spec.kind == "classification" and "label_text" in record:
        # MNLI: the hub's integer ids differ from our order, so the name is what counts.
        label_text = record["label_text"]
        if _is_int(label) and spec.hub_labels and 0 <= label < len(spec.hub_labels) \
                and spec.hub_labels[label] != label_text:
            raise _malformed(where, f"label {label} ({spec.hub_labels[label]}) disagrees with label_text "
                                    f"'{label_text}'", fix)
        label = label_text
    return _make_example(spec, [record[k] for k in spec.text_fields], label, where, fix)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _make_example(spec: TaskSpec, texts: list[Any], raw_label: Any, where: str, fix: str) -> Example:
    for name, text in zip(spec.text_fields, texts, strict=True):
        if not isinstance(text, str) or not text.strip():
            raise _malformed(where, f"empty or non-text {name}: {text!r}", fix)
    return Example(text_a=texts[0], text_b=texts[1] if len(texts) > 1 else None,
                   label=_parse_label(spec, raw_label, where, fix))


def _parse_label(spec: TaskSpec, raw: Any, where: str, fix: str) -> int | float:
    """Regression: a finite float. Classification: a label name, or an integer hub id (mapped via hub_labels)."""
    if spec.kind == "regression":
        try:
            value = float(raw)
            if isinstance(raw, bool) or not math.isfinite(value):
                raise ValueError
        except (TypeError, ValueError):
            raise _malformed(where, f"bad regression target {raw!r}: expected a finite number", fix) from None
        return value
    name = raw
    if _is_int(raw):
        if spec.hub_labels is not None:
            if not 0 <= raw < len(spec.hub_labels):
                raise _malformed(where, f"bad label {raw!r}: integer ids must be 0..{len(spec.hub_labels) - 1} "
                                        f"(an unlabelled test split uses -1)", fix)
            name = spec.hub_labels[raw]
        else:
            name = str(raw)
    if isinstance(name, str) and name in spec.labels:
        return spec.labels.index(name)
    allowed = ", ".join(repr(x) for x in spec.labels)
    raise _malformed(where, f"bad label {raw!r} for task '{spec.name}'; allowed: {allowed}", fix)
