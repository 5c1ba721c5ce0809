"""The lm-eval adapter on the tiny Llama and real XSum documents: lm-eval drives eebench's decoding, the full-depth
output equals `model.generate`, per-request exit layers reach eebench's records, scoring is the full model's."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

from eebench.cli import main
from eebench.lmeval import TASKS_DIR, LMEvalSettings, run_lm_eval, task_manager
from eebench.lmeval.model import EEBenchLM, parse_knob
from eebench.lmeval.sweep import checkpoint_job, parse_setting
from eebench.runner import prepare_job

from conftest import SHARED_DATA

GENERATION = str(SHARED_DATA / "generation")
# decay off + threshold 0: softmax confidence >= 0 always, so every decoded token exits at layer 1.
CONFIG = {"decay": "off", "classifier_epochs": 0.25}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lmeval-cache")


@pytest.fixture(scope="module")
def prepared(cache):
    torch.set_num_threads(1)
    job = checkpoint_job("calm", CONFIG, suite="generation-tiny", data_dir=GENERATION)
    return prepare_job(job, cache, progress=False)


def _evaluate(model, tasks=("eebench-xsum",), limit=4):
    from lm_eval import simple_evaluate
    return simple_evaluate(model=model, tasks=list(tasks), task_manager=task_manager(tasks, GENERATION), limit=limit,
                           apply_chat_template=True, log_samples=True, bootstrap_iters=0)


def test_tasks_are_eebench_dev_splits_scored_by_eebench_rouge():
    from eebench.metrics.generation import rouge_l

    # lm-eval imports the tasks' functions by file path (`!function`), and so does this test
    spec = importlib.util.spec_from_file_location("eebench_lm_eval_tasks", TASKS_DIR / "eebench_lm_eval_tasks.py")
    functions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(functions)
    load_dev, process_results = functions.load_dev, functions.process_results
    from eebench.tasks import get_task, load_split

    alpaca = load_dev("alpaca", GENERATION)["test"]
    assert alpaca["prompt"] == [e.prompt for e in load_split(get_task("alpaca"), "dev", GENERATION).examples]
    rows = load_dev("xsum", GENERATION)["test"]
    dev = load_split(get_task("xsum"), "dev", GENERATION)
    assert len(rows) == len(dev) == 500
    assert rows["prompt"] == [e.prompt for e in dev.examples]
    assert rows["example_id"] == [e.example_id for e in dev.examples]
    doc = rows[0]
    guess = "A man appeared in court after firearms were found."
    assert process_results(doc, [guess]) == {"rougeL": pytest.approx(rouge_l([guess], [doc["reference"]])[0])}


def test_full_depth_output_equals_generate(prepared):
    model = EEBenchLM.from_prepared(prepared, None, batch_size=3)
    results = _evaluate(model)
    backbone = prepared.backbone
    samples = results["samples"]["eebench-xsum"]
    assert len(samples) == 4
    for sample in samples:
        context, gen_kwargs = sample["arguments"][0]
        assert context.startswith("<|im_start|>")  # the chat template was applied
        ids = torch.tensor([backbone.tokenizer(context, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            reference = backbone.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                max_new_tokens=gen_kwargs["max_gen_toks"], pad_token_id=0,
                                                eos_token_id=sorted(backbone.stop_token_ids()))[0, ids.shape[1]:]
        stats = model.log.requests[("eebench-xsum", sample["doc_id"])]
        assert stats.tokens == reference[:len(stats.tokens)].tolist()
        text = backbone.tokenizer.decode(reference, skip_special_tokens=True)
        assert sample["resps"][0][0] == text.split("\n\n###")[0]
        assert stats.token_layers == [backbone.num_layers] * len(stats.tokens)


def test_greedy_only_and_knob_syntax(prepared):
    from lm_eval.api.instance import Instance

    model = EEBenchLM.from_prepared(prepared, None)
    request = Instance("generate_until", {}, ("Hello", {"until": [], "do_sample": True}), 0, ("t", 0, 1))
    with pytest.raises(ValueError, match="greedily"):
        model.generate_until([request])
    assert parse_knob("full") is None and parse_knob("threshold:0.8") == {"threshold": 0.8}
    assert parse_knob("threshold=0.5;min:1") == {"threshold": 0.5, "min": 1.0}
    with pytest.raises(ValueError, match="NAME:VALUE"):
        parse_knob("threshold")
    assert parse_setting("confidence=classifier") == ("confidence", "classifier")
    assert parse_setting("classifier_epochs=0.5") == ("classifier_epochs", 0.5)


def test_loglikelihood_is_the_full_models(prepared):
    from lm_eval.api.instance import Instance

    model = EEBenchLM.from_prepared(prepared, {"threshold": 0.0})  # the knob does not touch scoring
    context, continuation = "The capital of France is", " Paris, of course."
    request = Instance("loglikelihood", {}, (context, continuation), 0, ("t", 0, 1))
    (log_prob, greedy), = model.loglikelihood([request])
    tokenizer, hf = prepared.backbone.tokenizer, prepared.backbone.model
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        logits = torch.log_softmax(hf(torch.tensor([whole])).logits[0].float(), -1)
    expected = sum(float(logits[i - 1, whole[i]]) for i in range(n_context, len(whole)))
    assert log_prob == pytest.approx(expected, abs=1e-4)
    assert greedy == all(int(logits[i - 1].argmax()) == whole[i] for i in range(n_context, len(whole)))

    rolling = Instance("loglikelihood_rolling", {}, (context,), 0, ("t", 0, 1))
    (total,) = model.loglikelihood_rolling([rolling])
    ids = [tokenizer.bos_token_id, *tokenizer(context, add_special_tokens=False)["input_ids"]]
    with torch.inference_mode():
        logits = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    assert total == pytest.approx(sum(float(logits[i - 1, ids[i]]) for i in range(1, len(ids))), abs=1e-4)
    assert model.log.loglikelihood_requests == 2


def test_sweep_writes_lm_eval_results_and_records_with_exit_layers(prepared, cache, tmp_path):
    from eebench.plots.curves import write_figures
    from eebench.store import ResultsStore

    out = tmp_path / "lm"
    settings = LMEvalSettings(method="calm", tasks=("eebench-xsum",), out=out, knobs=({"threshold": 0.0},),
                              method_config=CONFIG, suite="generation-tiny", limit=3, batch_size=2,
                              data_dir=GENERATION, cache_dir=cache)
    table = run_lm_eval(settings, progress=False, log=lambda line: None)
    assert list(table["knob_label"]) == ["full model", "threshold=0.0"]
    assert table["checkpoint"].nunique() == 1 and table["checkpoint"].iloc[0] == prepared.training["checkpoint"]
    full, early = table.iloc[0], table.iloc[1]
    assert full["saved_layer_speedup"] == 1.0 and full["mean_exit_layer"] == 6.0
    # every token after the first (from the full-depth prefill) left at layer 1
    examples = ResultsStore(out).examples(early["job_id"])
    rows = examples[examples["knob_label"] == "threshold=0.0"]
    assert len(rows) == 3
    for layers in rows["token_layers"]:
        assert list(layers) == [6] + [1] * (len(layers) - 1)
    tokens = rows["n_generated"].sum()
    assert early["mean_exit_layer"] == pytest.approx(rows["token_layers"].map(sum).sum() / tokens)
    assert early["saved_layer_speedup"] == pytest.approx(6 / early["mean_exit_layer"])
    for record in table.itertuples():
        lm_eval = json.loads((out / "lm_eval" / record.knob_label.replace("=", "_").replace(" ", "_") /
                              "results.json").read_text())
        assert record.metric == pytest.approx(lm_eval["results"]["eebench-xsum"]["rougeL,none"])
        assert lm_eval["configs"]["eebench-xsum"]["metadata"]["config_source"] == "eebench/lmeval/tasks/eebench-xsum.yaml"
        assert record.metric == pytest.approx(record.eebench_rougeL)
    assert (out / "lm_eval" / "full_model" / "samples_eebench-xsum.jsonl").read_text().count("\n") == 3
    assert examples.groupby("knob_label")["lm_eval_rougeL"].mean().to_dict() == pytest.approx(
        dict(zip(table["knob_label"], table["metric"], strict=True)))
    # a rerun of the same settings finds the job stored and evaluates nothing
    assert run_lm_eval(settings, progress=False, log=lambda line: None).empty
    records = pd.read_json(out / "records.jsonl", lines=True)
    assert len(records) == 2 and np.isfinite(records["wallclock_speedup"]).all()
    assert records["timing_exclusive"].all() and (records["timing_threads"] >= 1).all()  # clocked alone on the node
    paths = write_figures(out, speedups=("saved_layer_speedup", "flops_speedup", "wallclock_speedup"), formats=["png"])
    assert {p.name for p in paths} == {"eebench-xsum_saved_layer_speedup.png", "eebench-xsum_flops_speedup.png",
                                       "eebench-xsum_wallclock_speedup_bs2.png"}


def test_unknown_task_names_lm_evals_closest_and_loads_nothing(tmp_path, capsys):
    code = main(["lm-eval", "--suite", "generation-tiny", "--tasks", "eebench-xsumm", "--out", str(tmp_path / "x"),
                 "--data-dir", GENERATION, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown lm-eval task(s): eebench-xsumm" in err and "Did you mean" in err and "eebench-xsum" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_registered_model_from_model_args_reuses_the_cached_checkpoint(prepared, cache):
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model

    assert get_model("eebench") is EEBenchLM
    args = (f"method=calm,suite=generation-tiny,decay=off,classifier_epochs=0.25,knob=threshold:0,"
            f"cache_dir={cache},data_dir={GENERATION},batch_size=2")
    by_name = simple_evaluate(model="eebench", model_args=args, tasks=["eebench-xsum"],
                              task_manager=task_manager(["eebench-xsum"], GENERATION), limit=2,
                              apply_chat_template=True, log_samples=True, bootstrap_iters=0)
    direct = _evaluate(EEBenchLM.from_prepared(prepared, {"threshold": 0.0}, batch_size=2), limit=2)
    texts = [[s["resps"] for s in run["samples"]["eebench-xsum"]] for run in (by_name, direct)]
    assert texts[0] == texts[1]
