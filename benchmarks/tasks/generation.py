"""Generation tasks (Alpaca, Dolly, CNN/DailyMail, XSum): specs, loaders and the prompt.

A generation task is a :class:`GenerationTaskSpec`. :func:`load_generation_split` turns it plus a split name
("train" or "dev") into a :class:`~eebench.tasks.TaskData` whose examples are :class:`GenerationExample` rows:
one user-message ``prompt`` and one ``reference`` text. :func:`render_prompt` turns a prompt into the string a
decoder is fed (its chat template, when it has one).

Data is read from local JSONL files only (the layout of ``shared/data/generation``, see its README section 3):
the task's folder is looked up in ``data_dir``, ``data_dir/generation`` and ``data_dir.parent``, so both
``--data-dir ../shared/data/generation`` and ``--data-dir ../shared/data`` work. There is no hub source.

Splits (fixed: they never depend on the job seed):

- ``alpaca``: dev = all of ``alpaca_first1727.jsonl`` (the first 1,727 records of ``alpaca_data.json``);
  train = ``alpaca_random9k_alpagasus.jsonl`` (9,229 records) minus every record whose (instruction, input)
  also occurs in the dev file. 307 do, so no dev prompt is ever trained or calibrated on.
- ``dolly``, ``cnndm``, ``xsum`` (one file each): dev = a fixed random subset of ``dev_size`` rows, drawn with
  ``random.Random(GENERATION_SPLIT_SEED)``; train = the other rows, minus any whose prompt is also a dev prompt
  (a file may repeat a prompt: Dolly 4 of its dev prompts, CNN/DM 1). Both keep file order.

Rows whose reference is empty or blank are dropped before splitting, because there is nothing to score
against and, in training, they would teach a model to stop at once. Only Alpaca has any: lines 285, 1,224 and
1,348 of the dev file and 4 lines of the train file (so alpaca dev has 1,724 examples, train 9,229 - 307 - 4).
Any other bad field is a :class:`~eebench.tasks.MalformedDataError` that names file, 1-based line and fix.

``limit`` keeps a random subset of that many examples in file order, as classification tasks do. For the
train split it is drawn with ``random.Random(seed)`` (the job seed). For the dev split it is drawn with
``random.Random(GENERATION_DEV_SEED)``, whatever the job seed. So ``limit=200`` on dev gives the same 200
prompts to every seed and every method, and their outputs can be compared prompt by prompt.
"""

from __future__ import annotations

import codecs
import itertools
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .classification import (
    MalformedDataError,
    MissingSplitError,
    Split,
    TaskData,
    TaskError,
    _check_limit,
    _key,
    _normalise_split,
    _subsample,
)

GENERATION_SPLIT_SEED = 20240917  # fixed: which rows of a one-file dataset are dev never moves
GENERATION_DEV_SEED = 20240918  # fixed: the dev subset a `limit` keeps is the same for every job seed
GENERATION_METRICS: tuple[str, ...] = ("rougeL", "bertscore_f1", "consistency_rougeL", "token_agreement")
_DATA_DIR_HINT = "pass --data-dir ../shared/data/generation (the folder that holds alpaca/, dolly/, cnn_dailymail/, xsum/)."
DATA_DIR_FIX = "Fix: " + _DATA_DIR_HINT


@dataclass(frozen=True)
class GenerationTaskSpec:
    """A text-generation task: where its JSONL file(s) live, how a record becomes a prompt, decoding limits.

    ``files``: one file (split into dev/train by ``dev_size``) or two, (dev file, train file), in ``folder``.
    A record's prompt is its ``instruction_field`` (or the fixed ``instruction`` of summarisation tasks),
    then a blank line and its ``input_field`` when that is not empty; see :func:`make_prompt`.
    ``reference_field`` is the gold text. ``id_field`` names the record's own id (None: the line number is
    used). ``max_new_tokens`` caps generated tokens per example; ``stop_strings`` end generation early (EOS
    always does: that is the decoder's job); ``max_source_words`` truncates the input text, in
    whitespace-separated words, before templating (None: never). ``metric_names[0]`` is the primary metric.
    """

    name: str
    description: str
    folder: str
    files: tuple[str, ...]
    input_field: str
    reference_field: str
    max_new_tokens: int
    instruction_field: str | None = None
    instruction: str | None = None
    id_field: str | None = None
    dev_size: int | None = None
    max_source_words: int | None = None
    stop_strings: tuple[str, ...] = ()
    metric_names: tuple[str, ...] = GENERATION_METRICS
    aliases: tuple[str, ...] = field(default=())
    kind: Literal["generation"] = "generation"

    def __post_init__(self) -> None:  # catches a mis-registered spec at import time
        if (self.instruction_field is None) == (self.instruction is None):
            raise ValueError(f"task '{self.name}': set exactly one of instruction_field and instruction")
        if len(self.files) not in (1, 2) or (len(self.files) == 1) != (self.dev_size is not None):
            raise ValueError(f"task '{self.name}': give one file with dev_size, or (dev file, train file) without")

    @property
    def primary_metric(self) -> str:
        return self.metric_names[0]

    @property
    def num_labels(self) -> int:
        """0: a generation task has no label head (the LM head emits tokens)."""
        return 0

    @property
    def train_split_rule(self) -> str | None:
        """How the train split was cut, when a change to the rule changed which rows it holds: it enters the
        checkpoint key (`eebench.runner.training_context`), so a fine-tune on an earlier split is not reused."""
        return "minus rows whose prompt is in dev" if len(self.files) == 1 else None


@dataclass(frozen=True)
class GenerationExample:
    """One generation input and its gold output.

    ``prompt``: the user-message text, before any chat template (see :func:`make_prompt`).
    ``reference``: the gold output (for CNN/DM, highlight sentences separated by ``\\n``).
    ``example_id``: stable across splits and runs: ``"<task>:<record id>"`` (cnndm, xsum) or
    ``"<task>:<file stem>:<line>"`` (alpaca, dolly).
    ``source``: ``"<path>:<1-based line>"`` of the record.
    """

    prompt: str
    reference: str
    example_id: str
    source: str


_SUMMARY_STOPS = ("\n\n###",)  # the H2O-style summarisation files used "###" as the separator between items

GENERATION_SPECS: tuple[GenerationTaskSpec, ...] = (
    GenerationTaskSpec(
        "alpaca", "Alpaca instruction following (dev: first 1,727 records; train: AlpaGasus random 9k minus overlap)",
        folder="alpaca", files=("alpaca_first1727.jsonl", "alpaca_random9k_alpagasus.jsonl"),
        instruction_field="instruction", input_field="input", reference_field="output", max_new_tokens=64),
    GenerationTaskSpec(
        "dolly", "Dolly instruction following (AlpaGasus quality-filtered 3k; fixed 500-row dev)",
        folder="dolly", files=("dolly_alpagasus_filtered_3k.jsonl",), dev_size=500,
        instruction_field="instruction", input_field="context", reference_field="response", max_new_tokens=64),
    GenerationTaskSpec(
        "cnndm", "CNN/DailyMail news summarisation in 3 sentences (1,000 test articles; fixed 500-row dev)",
        folder="cnn_dailymail", files=("test_1000.jsonl",), dev_size=500,
        instruction="Summarize the following article in 3 sentences.", input_field="article",
        reference_field="highlights", id_field="id", max_new_tokens=96, max_source_words=400,
        stop_strings=_SUMMARY_STOPS, aliases=("cnn_dailymail", "cnn-dm")),
    GenerationTaskSpec(
        "xsum", "XSum extreme summarisation in 1 sentence (1,000 test documents; fixed 500-row dev)",
        folder="xsum", files=("xsum_1000.jsonl",), dev_size=500,
        instruction="Summarize the following article in 1 sentence.", input_field="document",
        reference_field="summary", id_field="id", max_new_tokens=48, max_source_words=300,
        stop_strings=_SUMMARY_STOPS),
)


# --- prompts ---------------------------------------------------------------------------------------------


def truncate_words(text: str, max_words: int | None) -> str:
    """``text`` cut after its first ``max_words`` whitespace-separated words. The text up to there is kept
    verbatim (line breaks included); ``None`` or a shorter text returns it unchanged."""
    if max_words is None:
        return text
    last = None
    for match in itertools.islice(re.finditer(r"\S+", text), max_words):
        last = match  # the max_words-th word (or the final one of a shorter text)
    if last is None or not re.search(r"\S", text[last.end():]):
        return text
    return text[:last.end()]


def make_prompt(spec: GenerationTaskSpec, record: Mapping[str, Any]) -> str:
    """The user message for one record: the instruction, then a blank line and the input when it is not empty.

    - alpaca: ``instruction`` [+ ``"\\n\\n"`` + ``input``]; dolly: ``instruction`` [+ ``"\\n\\n"`` + ``context``].
    - cnndm: ``"Summarize the following article in 3 sentences.\\n\\n" + article``; xsum: the same with
      "in 1 sentence." and the document. The article (document) is first cut to ``spec.max_source_words``
      words (cnndm 400, xsum 300), which keeps prompts within a small decoder's context. Alpaca and Dolly
      inputs are never cut.

    Leading and trailing whitespace of each part is stripped; inner line breaks are kept.
    """
    head = (record[spec.instruction_field] if spec.instruction_field else spec.instruction) or ""
    body = truncate_words(record[spec.input_field], spec.max_source_words).strip()
    return f"{head.strip()}\n\n{body}" if body else head.strip()


def render_prompt(tokenizer: Any, example: GenerationExample) -> str:
    """The text to feed a decoder for ``example``.

    A tokenizer with a chat template (an instruct model) gets the prompt as one user turn, followed by the
    assistant header: ``apply_chat_template([{"role": "user", ...}], tokenize=False, add_generation_prompt=True)``.
    Then the returned text already holds any BOS token, so tokenize it with ``add_special_tokens=False``.
    A tokenizer without one (a base model) gets ``example.prompt + "\\n"``.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return example.prompt + "\n"


# --- loading ---------------------------------------------------------------------------------------------


def load_generation_split(spec: GenerationTaskSpec, split: str, data_dir: str | Path | None,
                          limit: int | None = None, seed: int = 0) -> TaskData:
    """Load one split ("train" or "dev"; "validation" is accepted for "dev") of a generation task.

    The split rule and how ``limit`` subsamples are in this module's docstring. ``source`` is the path of the
    file the examples were read from. Use :func:`eebench.tasks.load_split`, which also takes a name.
    """
    split_ = _normalise_split(spec, split)
    _check_limit(limit)
    if data_dir is None:
        raise TaskError(f"task '{spec.name}' is read from local files only; no Hugging Face hub source is wired. "
                        + DATA_DIR_FIX)
    folder = _find_folder(spec, Path(data_dir).expanduser())
    path = _find_file(spec, folder, spec.files[0] if split_ == "dev" or len(spec.files) == 1 else spec.files[1])
    rows = _read_rows(spec, path)
    if len(spec.files) == 2 and split_ == "train":  # drop whatever the dev file also holds (blank or not)
        taken = {key for _, key in _read_rows(spec, _find_file(spec, folder, spec.files[0]))}
        rows = [(e, key) for e, key in rows if key not in taken]
    examples = [e for e, _ in rows if e is not None]
    if len(spec.files) == 1:
        examples = _one_file_split(spec, examples, split_)
    if not examples:
        raise MalformedDataError(f"{path}: no examples in the {split_} split of '{spec.name}'. "
                                 "Fix: supply a file with non-empty references.")
    sub_seed = seed if split_ == "train" else GENERATION_DEV_SEED
    return TaskData(spec=spec, split=split_, examples=_subsample(examples, limit, sub_seed), source=str(path))


def _one_file_split(spec: GenerationTaskSpec, examples: list[GenerationExample], split: Split) -> list[GenerationExample]:
    assert spec.dev_size is not None
    if spec.dev_size >= len(examples):
        raise MalformedDataError(f"task '{spec.name}': {len(examples)} usable rows, too few for a {spec.dev_size}-row "
                                 "dev split plus a train split. Fix: supply the full file.")
    dev = set(random.Random(GENERATION_SPLIT_SEED).sample(range(len(examples)), spec.dev_size))
    if split == "dev":
        return [e for i, e in enumerate(examples) if i in dev]
    # A prompt that occurs twice in the file may land on both sides: train keeps no copy of a dev prompt (Dolly
    # repeats 4 instructions with other answers, CNN/DM one article with its highlights), as Alpaca's train does.
    dev_prompts = {examples[i].prompt for i in dev}
    return [e for i, e in enumerate(examples) if i not in dev and e.prompt not in dev_prompts]


def _find_folder(spec: GenerationTaskSpec, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise MissingSplitError(f"data dir '{data_dir}' does not exist or is not a folder. {DATA_DIR_FIX}")
    roots = list(dict.fromkeys([data_dir, data_dir / "generation", data_dir.parent]))
    for root in roots:
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if d.is_dir() and _key(d.name) == _key(spec.folder):
                    return d
    raise MissingSplitError(f"task '{spec.name}': no '{spec.folder}' folder in {', '.join(str(r) for r in roots)}. "
                            + DATA_DIR_FIX)


def _find_file(spec: GenerationTaskSpec, folder: Path, name: str) -> Path:
    path = folder / name
    if path.is_file():
        return path
    present = sorted(p.name for p in folder.iterdir() if p.suffix == ".jsonl")
    raise MissingSplitError(f"task '{spec.name}': no {name} in {folder} (found: {', '.join(present) or 'nothing'}). "
                            f"Fix: put {name} there (see shared/data/README.md section 3), or " + _DATA_DIR_HINT)


_FIX = "Fix: repair or delete that line (one JSON object per line, UTF-8)."


def _malformed(where: str, problem: str) -> MalformedDataError:
    return MalformedDataError(f"{where}: {problem}. {_FIX}")


def _read_rows(spec: GenerationTaskSpec, path: Path) -> list[tuple[GenerationExample | None, tuple[str, str]]]:
    """Each record of the file, in file order: its example (None: blank reference, dropped) and its
    (instruction, input) key, from the raw field values."""
    rows: list[tuple[GenerationExample | None, tuple[str, str]]] = []
    # Bytes, decoded line by line: a bad byte is reported with its line (a text-mode read cannot say which).
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _malformed(where, f"bad UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _malformed(where, f"invalid JSON ({e.msg} at column {e.colno})") from None
        example = _example(spec, record, path, lineno)  # validates the record first
        rows.append((example, (record[spec.instruction_field] if spec.instruction_field else "", record[spec.input_field])))
    return rows


def _example(spec: GenerationTaskSpec, record: Any, path: Path, lineno: int) -> GenerationExample | None:
    """One record as an example; None when its reference is blank (dropped, see the module docstring)."""
    where = f"{path}:{lineno}"
    if not isinstance(record, Mapping):
        raise _malformed(where, f"expected a JSON object, got {type(record).__name__}")
    needed = [f for f in (spec.instruction_field, spec.input_field, spec.reference_field, spec.id_field) if f]
    missing = [f for f in needed if f not in record]
    if missing:
        raise _malformed(where, f"missing field(s) {missing} (fields present: {sorted(record)})")
    # The instruction, and a summarisation source, must hold text; an instruction task's input may be empty.
    required = [spec.instruction_field] if spec.instruction_field else [spec.input_field]
    for name in (spec.instruction_field, spec.input_field, spec.reference_field):
        if name is None:
            continue
        value = record[name]
        if not isinstance(value, str) or (name in required and not value.strip()):
            raise _malformed(where, f"empty or non-text {name}: {_short(value)}")
    record_id = None
    if spec.id_field is not None:
        record_id = record[spec.id_field]
        if isinstance(record_id, bool) or not isinstance(record_id, int | str) or not str(record_id).strip():
            raise _malformed(where, f"bad {spec.id_field} {record_id!r}: expected an integer or a non-empty string")
    if not record[spec.reference_field].strip():
        return None
    return GenerationExample(
        prompt=make_prompt(spec, record), reference=record[spec.reference_field],
        example_id=f"{spec.name}:{record_id}" if record_id is not None else f"{spec.name}:{path.stem}:{lineno}",
        source=where)


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."
