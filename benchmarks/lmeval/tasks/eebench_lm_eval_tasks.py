"""What the eebench lm-eval task YAMLs beside this file call (lm-eval imports this file by path, see `!function`).

Each task is the dev split of an eebench generation task, read by eebench's own loader, so an lm-eval run sees
exactly the prompts, references and example ids of `eebench run` (XSum: its fixed 500-document dev split). The
data folder comes from the task metadata `data_dir` (`eebench lm-eval --data-dir`, or lm-eval's
`--metadata '{"data_dir": "../shared/data/generation"}'`). ROUGE-L is eebench's (`eebench.metrics.generation.rouge_l`:
rouge-score rougeLsum, Porter stemmer, in [0, 1]): lm-eval ships no ROUGE of its own.
"""

from __future__ import annotations

from typing import Any

DEFAULT_DATA_DIR = "../shared/data/generation"


def load_dev(task: str, data_dir: str | None = None, **_metadata: Any):
    """{"test": the dev split of eebench task `task`} as a `datasets.DatasetDict` of prompt / reference rows."""
    from datasets import Dataset, DatasetDict

    from eebench.tasks import get_task, load_split

    data = load_split(get_task(task), "dev", data_dir or DEFAULT_DATA_DIR)
    rows = [{"prompt": e.prompt, "reference": e.reference, "example_id": e.example_id, "source": e.source}
            for e in data.examples]
    return DatasetDict({"test": Dataset.from_list(rows)})


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """ROUGE-L F of the one generation against the document's reference, in [0, 1]."""
    from eebench.metrics.generation import rouge_l

    return {"rougeL": float(rouge_l([results[0]], [doc["reference"]])[0])}
