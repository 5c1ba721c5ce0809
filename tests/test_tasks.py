"""Task registry and loaders: real shared data (counts from ../shared/data/README.md), malformed files, hub mapping."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from eebench.tasks import (
    Example,
    MalformedDataError,
    MissingSplitError,
    TaskData,
    TaskError,
    UnknownTaskError,
    get_task,
    load_split,
    task_names,
)

from conftest import SHARED_DATA

DATA = SHARED_DATA
GLUE = DATA / "glue"


def needs_data(test):
    """Marks tests that read ../shared/data. They fail (never skip) without it: CI always has it."""
    return test

ALL_TASKS = ["sst2", "mrpc", "rte", "qnli", "qqp", "mnli-m", "mnli-mm", "cola", "stsb", "mcid", "stackoverflow",
             "graded"]


# --- registry --------------------------------------------------------------------------------------------


def test_registry_names_and_specs():
    assert task_names() == ALL_TASKS
    expected_metrics = {"mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"), "cola": ("mcc",),
                        "stsb": ("spearman", "pearson")}
    for name in ALL_TASKS:
        spec = get_task(name)
        assert spec.name == name
        assert spec.metric_names == expected_metrics.get(name, ("accuracy",))
        assert spec.primary_metric == spec.metric_names[0]
        assert len(spec.text_fields) in (1, 2)
    assert get_task("stsb").kind == "regression" and get_task("stsb").num_labels == 1
    assert get_task("stsb").labels == ()
    assert get_task("mnli-m").labels == ("contradiction", "entailment", "neutral")
    assert get_task("rte").labels == get_task("qnli").labels == ("entailment", "not_entailment")
    assert get_task("stackoverflow").labels == tuple(str(i) for i in range(1, 21))
    assert get_task("graded").labels == ("negative", "positive")
    mcid = get_task("mcid").labels
    assert len(mcid) == 16 and list(mcid) == sorted(mcid) and mcid.count("donate") == 1


@pytest.mark.parametrize("alias,name", [("SST-2", "sst2"), ("sst-2", "sst2"), ("STS-B", "stsb"), ("CoLA", "cola"),
                                        ("mnli_matched", "mnli-m"), ("MNLI-MM", "mnli-mm"),
                                        ("mnli_mismatched", "mnli-mm"), ("M-CID", "mcid"),
                                        ("StackOverflow", "stackoverflow")])
def test_aliases_case_insensitive(alias, name):
    assert get_task(alias).name == name


def test_unknown_task_lists_known_and_suggests():
    with pytest.raises(UnknownTaskError) as err:
        get_task("sst3")
    msg = str(err.value)
    assert "did you mean 'sst2'?" in msg
    assert all(name in msg for name in ALL_TASKS)
    assert isinstance(err.value, KeyError) and isinstance(err.value, TaskError)
    assert not msg.startswith('"')  # KeyError would quote the message
    with pytest.raises(UnknownTaskError) as err:
        get_task("zzzzzz")
    assert "did you mean" not in str(err.value)


# --- real shared data ------------------------------------------------------------------------------------

# (task, split, data_dir, rows, {label name: count} or None). data_dir alternates between data/ and
# data/glue to exercise both lookups (data_dir/glue and data_dir.parent).
COUNTS = [
    ("sst2", "train", GLUE, 67349, {"1": 37569, "0": 29780}),
    ("sst2", "dev", DATA, 872, {"1": 444, "0": 428}),
    ("mrpc", "train", GLUE, 3668, {"1": 2474, "0": 1194}),
    ("mrpc", "dev", GLUE, 408, {"1": 279, "0": 129}),
    ("rte", "train", GLUE, 2490, {"entailment": 1249, "not_entailment": 1241}),
    ("rte", "dev", GLUE, 277, {"entailment": 146, "not_entailment": 131}),
    ("cola", "train", GLUE, 8551, {"1": 6023, "0": 2528}),
    ("cola", "dev", GLUE, 1043, {"1": 721, "0": 322}),
    ("stsb", "train", GLUE, 5749, None),
    ("stsb", "dev", GLUE, 1500, None),
    ("qnli", "dev", GLUE, 5463, {"not_entailment": 2761, "entailment": 2702}),
    ("qqp", "dev", DATA, 40430, {"0": 25545, "1": 14885}),
    ("mnli-m", "dev", GLUE, 9815, {"entailment": 3479, "contradiction": 3213, "neutral": 3123}),
    ("mnli-mm", "dev", GLUE, 9832, {"entailment": 3463, "contradiction": 3240, "neutral": 3129}),
    ("mcid", "train", GLUE, 1220, None),
    ("mcid", "dev", DATA, 176, {label: 11 for label in get_task("mcid").labels}),
    ("stackoverflow", "train", DATA, 18000, {str(i): 900 for i in range(1, 21)}),
    ("stackoverflow", "dev", GLUE, 1000, {str(i): 50 for i in range(1, 21)}),
]


@needs_data
@pytest.mark.parametrize("task,split,data_dir,rows,dist", COUNTS, ids=[f"{c[0]}-{c[1]}" for c in COUNTS])
def test_shared_data_counts_and_labels(task, split, data_dir, rows, dist):
    data = load_split(get_task(task), split, data_dir=data_dir)
    assert isinstance(data, TaskData) and data.split == split and len(data) == rows
    assert Path(data.source).is_file()
    spec = data.spec
    for ex in data.examples[:50]:
        assert isinstance(ex, Example) and ex.text_a.strip() and ex.difficulty is None
        assert (ex.text_b is None) == (len(spec.text_fields) == 1)
    if dist is not None:
        assert Counter(spec.labels[ex.label] for ex in data.examples) == dist


@needs_data
def test_mcid_train_has_fixed_label_ids():
    counts = Counter(get_task("mcid").labels[e.label] for e in load_split("mcid", "train", DATA).examples)
    small = {"what if i visited high risk area", "can i get from feces animal pets", "can i get from packages surfaces"}
    assert counts == {label: 73 if label in small else 77 for label in get_task("mcid").labels}


@needs_data
def test_mrpc_bom_and_unquoted_text():
    ex = load_split("mrpc", "dev", GLUE).examples[0]
    assert ex.text_a == "He said the foodservice pie business doesn't fit the company's long-term growth strategy."
    # QUOTE_NONE: the stray opening quote is part of the text, not a CSV quote.
    assert ex.text_b == '"The foodservice pie business does not fit our long-term growth strategy.'
    assert ex.label == 1


@needs_data
def test_cola_has_no_header():
    data = load_split("cola", "dev", GLUE)
    assert len(data) == 1043
    assert data.examples[0] == Example("The sailors rode the breeze clear of the rocks.", None, 1)


@needs_data
def test_stsb_scores_are_floats():
    data = load_split("stsb", "dev", GLUE)
    scores = [e.label for e in data.examples]
    assert all(isinstance(s, float) for s in scores)
    assert scores[:2] == [5.0, 4.75]
    assert min(scores) >= 0 and max(scores) <= 5 and sum(scores) / len(scores) == pytest.approx(2.364, abs=1e-3)


@needs_data
def test_mnli_labels_mapped_by_name():
    # First dev_matched row has HF label 1 with label_text "neutral"; our id for neutral is 2.
    ex = load_split("mnli-m", "dev", GLUE).examples[0]
    assert (ex.text_a, ex.text_b) == ("The new rights are nice enough", "Everyone really likes the newest benefits ")
    assert ex.label == get_task("mnli-m").labels.index("neutral") == 2


@needs_data
@pytest.mark.parametrize("task", ["qnli", "qqp", "mnli-m"])
def test_missing_train_split(task):
    with pytest.raises(MissingSplitError) as err:
        load_split(task, "train", GLUE)
    msg = str(err.value)
    assert "no train split" in msg and "train.tsv" in msg and "train.jsonl" in msg
    assert "dev only" in msg and "omit --data-dir" in msg and get_task(task).folder in msg


def test_missing_folder_and_missing_dir(tmp_path):
    with pytest.raises(TaskError, match="no 'SST-2' folder"):
        load_split("sst2", "dev", tmp_path)
    with pytest.raises(TaskError, match="does not exist"):
        load_split("sst2", "dev", tmp_path / "nope")
    with pytest.raises(TaskError, match="unknown split 'test'"):
        load_split("sst2", "test", tmp_path)


# --- limit -----------------------------------------------------------------------------------------------


@needs_data
def test_limit_is_deterministic_and_keeps_order():
    full = load_split("rte", "dev", GLUE).examples
    a = load_split("rte", "dev", GLUE, limit=50, seed=3).examples
    b = load_split("rte", "dev", GLUE, limit=50, seed=3).examples
    c = load_split("rte", "dev", GLUE, limit=50, seed=4).examples
    assert a == b and len(a) == 50 and a != c
    positions = [full.index(ex) for ex in a]
    assert positions == sorted(positions) and len(set(positions)) == 50
    assert load_split("rte", "dev", GLUE, limit=277).examples == full
    assert load_split("rte", "dev", GLUE, limit=10_000).examples == full
    with pytest.raises(TaskError, match="limit"):
        load_split("rte", "dev", GLUE, limit=0)


# --- file formats and malformed files --------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_folder_variants_and_tsv_preferred(tmp_path):
    _write(tmp_path / "sst2" / "dev.jsonl", '{"sentence": "a fine film", "label": 1, "idx": 0}\n\n'
           '{"sentence": "a bad film", "label": 0, "idx": 1}\n')
    data = load_split("SST-2", "dev", tmp_path)
    assert [(e.text_a, e.label) for e in data.examples] == [("a fine film", 1), ("a bad film", 0)]
    assert data.source.endswith("dev.jsonl")
    _write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\nit 's \"great\" \t1\n")
    (tmp_path / "glue").mkdir()
    data = load_split("sst2", "dev", tmp_path / "glue")  # found through data_dir.parent
    assert [(e.text_a, e.label) for e in data.examples] == [('it \'s "great" ', 1)]
    assert data.source.endswith("dev.tsv")


def test_jsonl_label_names_and_hub_ids(tmp_path):
    _write(tmp_path / "RTE" / "dev.jsonl", '{"sentence1": "a", "sentence2": "b", "label": 1}\n'
           '{"sentence1": "c", "sentence2": "d", "label": "entailment"}\n')
    assert [e.label for e in load_split("rte", "dev", tmp_path).examples] == [1, 0]
    # MNLI JSONL without label_text: integer hub ids (0=entailment, 1=neutral, 2=contradiction) are remapped.
    _write(tmp_path / "MNLI" / "dev_mismatched.jsonl",
           "".join(f'{{"premise": "p", "hypothesis": "h", "label": {i}}}\n' for i in range(3)))
    assert [e.label for e in load_split("mnli-mm", "dev", tmp_path).examples] == [1, 2, 0]
    _write(tmp_path / "stackoverflow" / "train.jsonl", '{"text": "t", "label": 20}\n{"text": "u", "label": "1"}\n')
    assert [e.label for e in load_split("stackoverflow", "train", tmp_path).examples] == [19, 0]


@pytest.mark.parametrize("folder,name,content,line,words", [
    ("SST-2", "dev.tsv", "sentence\tlabel\ngood\t1\ntoo\tmany\tcolumns\n", 3, ["expected 2", "found 3"]),
    ("CoLA", "dev.tsv", "a\t1\t\tok sentence\nb\t1\tonly three\n", 2, ["expected 4", "found 3"]),
    ("RTE", "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tentailment\n"
     "2\ta\tb\tmaybe\n", 4, ["'maybe'", "'entailment'", "'not_entailment'"]),
    ("SST-2", "train.tsv", "sentence\tlabel\n \t1\n", 2, ["empty"]),
    ("SST-2", "train.tsv", "text\tlabel\nx\t1\n", 1, ["lacks column", "sentence"]),
    ("STS-B", "dev.tsv", "sentence1\tsentence2\tscore\na\tb\t4.0\na\tb\tfive\n", 3, ["'five'", "number"]),
    ("QQP", "dev.jsonl", '{"question1": "a", "question2": "b", "label": 0}\n{"question1": "a", \n', 2,
     ["invalid JSON"]),
    ("QQP", "dev.jsonl", '{"question1": "a", "label": 0}\n', 1, ["missing field", "question2"]),
    ("QQP", "dev.jsonl", '{"question1": "a", "question2": "b", "label": -1}\n', 1, ["bad label -1"]),
    ("mcid", "dev.jsonl", '{"text": "hi there", "label": "hi"}\n{"text": "x", "label": "weather"}\n', 2,
     ["'weather'", "'donate'"]),
    ("MNLI", "dev_matched.jsonl", '{"premise": "p", "hypothesis": "h", "label": 0, "label_text": "neutral"}\n', 1,
     ["disagrees", "neutral"]),
])
def test_malformed_files_name_file_and_line(tmp_path, folder, name, content, line, words):
    path = _write(tmp_path / folder / name, content)
    task = {"SST-2": "sst2", "CoLA": "cola", "RTE": "rte", "STS-B": "stsb", "QQP": "qqp", "mcid": "mcid",
            "MNLI": "mnli-m"}[folder]
    split = "train" if name.startswith("train") else "dev"
    with pytest.raises(MalformedDataError) as err:
        load_split(task, split, tmp_path)
    msg = str(err.value)
    assert f"{path}:{line}: " in msg, msg
    assert "Fix:" in msg
    for word in words:
        assert word in msg, msg


def test_empty_file_is_an_error(tmp_path):
    _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\n")
    with pytest.raises(MalformedDataError, match="no examples"):
        load_split("sst2", "dev", tmp_path)


# --- hub path (datasets.load_dataset mocked: no network here) ----------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls: list[tuple] = []
    tables = {
        ("sst2", "train"): {"sentence": ["good movie ", "bad movie "], "label": [1, 0], "idx": [0, 1]},
        ("mrpc", "validation"): {"sentence1": ["a"], "sentence2": ["b"], "label": [1], "idx": [0]},
        ("stsb", "validation"): {"sentence1": ["a", "c"], "sentence2": ["b", "d"], "label": [4.25, 0.0],
                                 "idx": [0, 1]},
        # HF MNLI ids: 0=entailment, 1=neutral, 2=contradiction.
        ("mnli", "validation_matched"): {"premise": ["p0", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"],
                                         "label": [0, 1, 2], "idx": [0, 1, 2]},
        ("mnli", "validation_mismatched"): {"premise": ["q"], "hypothesis": ["r"], "label": [2], "idx": [0]},
        ("qnli", "train"): {"question": ["q?"], "sentence": ["s."], "label": [1], "idx": [0]},
    }

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if (name, split) not in tables:
            raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")
        return datasets.Dataset.from_dict(tables[(name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_field_mapping(fake_hub):
    data = load_split("sst2", "train")
    assert fake_hub[-1] == ("nyu-mll/glue", "sst2", "train")
    assert data.source == "hub:nyu-mll/glue/sst2/train" and data.split == "train"
    assert data.examples == [Example("good movie ", None, 1), Example("bad movie ", None, 0)]

    assert load_split("mrpc", "dev").examples == [Example("a", "b", 1)]
    assert fake_hub[-1] == ("nyu-mll/glue", "mrpc", "validation")
    assert [e.label for e in load_split("stsb", "dev").examples] == [4.25, 0.0]
    assert load_split("qnli", "train").examples == [Example("q?", "s.", 1)]

    mnli = load_split("mnli-m", "dev")
    assert fake_hub[-1] == ("nyu-mll/glue", "mnli", "validation_matched")
    labels = get_task("mnli-m").labels
    assert [labels[e.label] for e in mnli.examples] == ["entailment", "neutral", "contradiction"]
    assert [(e.text_a, e.text_b) for e in mnli.examples] == [("p0", "h0"), ("p1", "h1"), ("p2", "h2")]
    assert [labels[e.label] for e in load_split("mnli-mm", "dev").examples] == ["contradiction"]
    assert fake_hub[-1] == ("nyu-mll/glue", "mnli", "validation_mismatched")


def test_hub_failure_is_a_task_error(fake_hub):
    with pytest.raises(TaskError) as err:
        load_split("cola", "dev")
    assert fake_hub[-1] == ("nyu-mll/glue", "cola", "validation")
    assert "no network? pass --data-dir ../shared/data/glue" in str(err.value)
    assert isinstance(err.value.__cause__, ConnectionError)


def test_no_hub_source_for_consistentee_tasks(fake_hub):
    for task in ("mcid", "stackoverflow"):
        with pytest.raises(TaskError, match="--data-dir"):
            load_split(task, "dev")
    assert fake_hub == []


def test_selection_set_is_held_out_and_keeps_the_training_subsample():
    from eebench.tasks import train_and_selection

    train, selection, carved = train_and_selection("sst2", GLUE, 200, 50, seed=0)
    assert not carved and len(selection) == 50
    assert [e.text_a for e in train.examples] == [e.text_a for e in load_split("sst2", "train", GLUE, 200, 0).examples]
    texts = {e.text_a for e in train.examples}
    assert not any(e.text_a in texts for e in selection.examples)


def test_selection_set_is_carved_out_when_nothing_is_left_over():
    from eebench.tasks import train_and_selection

    whole = load_split("rte", "train", GLUE)
    train, selection, carved = train_and_selection("rte", GLUE, None, 100, seed=0)
    assert carved and len(train) + len(selection) == len(whole)
    pairs = {(e.text_a, e.text_b) for e in train.examples}
    assert sum((e.text_a, e.text_b) in pairs for e in selection.examples) <= 1  # RTE has a duplicate pair or two
    with pytest.raises(TaskError, match="selection_examples"):
        train_and_selection("rte", GLUE, None, len(whole), seed=0)


def test_bad_utf8_byte_names_file_line_and_fix(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "dev.tsv").write_bytes(b"sentence\tlabel\ngood film\t1\nun caf\xe9 noir\t0\n")
    with pytest.raises(MalformedDataError) as error:
        load_split("sst2", "dev", tmp_path)
    message = str(error.value)
    assert "dev.tsv:3" in message and "0xe9" in message and "byte 7 of the line" in message and "iconv" in message
    (folder / "dev.tsv").unlink()
    (folder / "dev.jsonl").write_bytes(b'{"sentence": "ok", "label": 1}\n{"sentence": "caf\xe9", "label": 0}\n')
    with pytest.raises(MalformedDataError, match=r"dev\.jsonl:2: bad UTF-8 byte 0xe9"):
        load_split("sst2", "dev", tmp_path)
