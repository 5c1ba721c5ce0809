"""Generated text side by side: a few dev prompts, the full model's output and each method's early-exit output
with every token tagged by the layer it exited at (what `eebench report` shades).

Token texts: runs since the report landed store each generated token's text (`token_texts` in the examples);
for older runs the output text is re-tokenised with the backbone's tokenizer when a converted copy sits in the
backbone cache and the token count matches the stored exit layers; otherwise the output is shown unshaded,
with its mean exit layer. Prompts and references are read back from the task's data (the job's `data_dir`)
by example id; when the data is not there the example id stands in for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from eebench.plots.style import display_task

N_PROMPTS = 3


@dataclass
class Output:
    """One model's output for one prompt: ``label`` (method and point), ``text``, and ``tokens`` as
    (text, exit layer) pairs, or None when they could not be recovered; ``mean_layer`` over its tokens."""

    label: str
    text: str
    tokens: list[tuple[str, int]] | None
    mean_layer: float


@dataclass
class Sample:
    example_id: str
    prompt: str
    reference: str
    outputs: list[Output] = field(default_factory=list)


@dataclass
class TaskSamples:
    task: str
    title: str
    num_layers: int
    samples: list[Sample]


def _cached_tokenizer(backbone: str):
    """The tokenizer of a converted backbone in the cache, without converting anything; None if absent."""
    from eebench.backbones.decoder import backbone_cache

    folder = backbone_cache() / "backbones" / "smollm2-135m-instruct-fp32" if backbone == "smollm2" else Path(backbone)
    if not (folder / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def token_pieces(row: dict, tokenizer) -> list[tuple[str, int]] | None:
    """(text, exit layer) per generated token of one examples row (see the module docstring)."""
    layers = [int(layer) for layer in row["token_layers"]]
    texts = row.get("token_texts")
    if texts is not None and not (isinstance(texts, float) and pd.isna(texts)) and len(texts) == len(layers):
        return list(zip(map(str, texts), layers, strict=True))
    if tokenizer is None:
        return None
    ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
    if len(ids) == len(layers) - 1:  # the stop token ends the sequence but not the decoded text
        ids = [*ids, None]
    if len(ids) != len(layers):
        return None
    return [("" if i is None else tokenizer.decode([i]), layer) for i, layer in zip(ids, layers, strict=True)]


def _dev_texts(record: pd.Series) -> dict[str, tuple[str, str]]:
    """{example id: (prompt, reference)} of the job's dev split, or {} when its data is not on this machine."""
    from eebench.tasks import load_split

    config = record["config"] if isinstance(record.get("config"), dict) else {}
    try:
        data = load_split(record["task"], "dev", config.get("data_dir"), config.get("eval_limit"), int(record["seed"]))
    except (FileNotFoundError, ValueError, OSError):
        return {}
    return {e.example_id: (e.prompt, e.reference) for e in data.examples}


def generation_samples(records: pd.DataFrame, folders: Sequence[str | Path], n_prompts: int = N_PROMPTS
                       ) -> list[TaskSamples]:
    """The first `n_prompts` dev prompts of every generation task in `records`: the full model's output, then
    each curve's picked operating point (`exits.picked_points`)."""
    from eebench.analysis import load_examples
    from eebench.plots.exits import picked_points

    generation = records[records.metric_name == "rougeL"]
    if generation.empty:
        return []
    frames = [load_examples(f) for f in folders if any((Path(f) / "examples").glob("*.parquet"))]
    examples = pd.concat(frames, ignore_index=True)
    examples = examples[examples.split.fillna("dev") == "dev"] if "split" in examples else examples
    tokenizers: dict[str, object] = {}
    result = []
    for task in sorted(generation.task.unique()):
        picks = picked_points(generation, task)
        first = generation[generation.task == task].iloc[0]
        texts = _dev_texts(first)
        backbone = str(first["backbone"])
        tokenizer = tokenizers.setdefault(backbone, _cached_tokenizer(backbone))
        full_rows = examples[(examples.job_id == picks.job_id.iloc[0]) & (examples.knob_label == "full model")]
        samples = []
        for _, full in full_rows.sort_values("example").head(n_prompts).iterrows():
            prompt, reference = texts.get(full.example_id, (f"(prompt {full.example_id}: task data not found)", ""))
            sample = Sample(full.example_id, prompt, reference)
            sample.outputs.append(_output("full model", full.to_dict(), tokenizer))
            for pick in picks.itertuples(index=False):
                rows = examples[(examples.job_id == pick.job_id) & (examples.knob_label == pick.knob_label)
                                & (examples.example_id == full.example_id)]  # fmt: skip
                if len(rows):
                    sample.outputs.append(_output(f"{pick.label} · {pick.knob_label}", rows.iloc[0].to_dict(),
                                                  tokenizer))  # fmt: skip
            samples.append(sample)
        title = f"{display_task(task)}: full model vs each method's picked point ({', '.join(picks.rule.unique())})"
        result.append(TaskSamples(task, title, int(first["num_layers"]), samples))
    return result


def _output(label: str, row: dict, tokenizer) -> Output:
    layers = [int(layer) for layer in row["token_layers"]]
    mean = sum(layers) / len(layers) if layers else float("nan")
    return Output(label, str(row["text"]), token_pieces(row, tokenizer), mean)

