"""The runner end to end on a tiny model and slices of real data; idempotence; the records it writes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from eebench.leaderboard import leaderboard, load_records
from eebench.runner import UnsupportedTaskError, checkpoint_key, run_job, run_jobs, slurm_job_id

from conftest import GLUE, tiny_job

REQUIRED = {"method", "task", "seed", "backbone", "knob", "metric_name", "metric", "num_layers", "mean_exit_layer",
            "saved_layer_speedup", "flops_speedup", "wallclock_speedup", "batch_size", "device", "n_examples",
            "job_id", "config", "environment"}


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    cache = tmp_path_factory.mktemp("cache")
    jobs = [tiny_job(m, "sst2", data_dir=str(GLUE)) for m in ("deebert", "pabee")]
    summary = run_jobs(jobs, out, cache, progress=False, log=lambda _: None)
    return out, cache, jobs, summary


def test_records_have_the_documented_fields(sst2_run):
    out, _, jobs, summary = sst2_run
    assert len(summary["done"]) == 2
    lines = (out / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    examples = pd.read_parquet(next((out / "examples").glob("*.parquet")))
    labels = examples[examples.knob_label == "full model"].label.to_numpy()
    for record in records:
        assert REQUIRED <= set(record), REQUIRED - set(record)
        assert record["task"] == "sst2" and record["n_examples"] == 24 and record["device"] == "cpu"
        assert 1 <= record["mean_exit_layer"] <= record["num_layers"] == 4
        assert record["saved_layer_speedup"] == pytest.approx(4 / record["mean_exit_layer"])
        assert record["batch_size"] in (1, 4)
        assert {"git_commit", "torch", "transformers", "device_name", "torch_threads", "dtype"} <= set(record["environment"])
        assert record["evaluation"] == "trace" and record["eval_seconds"] > 0  # layer-wise: one recorded pass
        assert record["curve_cost_ratio"] > 0 and record["n_points"] >= 2
        # every timing repeat is kept, with the load it ran under and why it would be untrustworthy
        assert len(record["wallclock_seconds_repeats"]) == 1 and record["wallclock_seconds"] > 0
        assert isinstance(record["load_average"], float) and isinstance(record["timing_flag"], str)
        # where and how it was timed: the clock ran holding the node's activity lock (nothing of ours beside it)
        assert record["timing_exclusive"] is True and isinstance(record["load_average_end"], float)
        assert record["host"] and record["slurm_job_id"] == slurm_job_id()  # None outside Slurm
        assert record["realization"] == pytest.approx(record["wallclock_speedup"] / record["timed_saved_layer_speedup"])
        assert record["config"]["eval"]["timing_sample"] == "random" and record["checkpoint_commit"]
        assert record["floor_metric"] == pytest.approx(max(np.mean(labels), 1 - np.mean(labels)))  # majority class
    # one full-model row per job and batch size, knobs as objects
    full = [r for r in records if r["is_full_model"]]
    assert len(full) == 4 and all(r["knob"] == {} and r["saved_layer_speedup"] == 1.0 for r in full)
    assert {tuple(r["knob"]) for r in records if r["method"] == "pabee" and not r["is_full_model"]} == {("patience",)}


def test_metric_matches_the_stored_per_example_predictions(sst2_run):
    out, _, jobs, _ = sst2_run
    records = load_records(out)
    for job in jobs:
        examples = pd.read_parquet(out / "examples" / f"{job.job_id}.parquet")
        for label, group in examples.groupby("knob_label"):
            record = records[(records.job_id == job.job_id) & (records.knob_label == label)].iloc[0]
            assert record["metric"] == pytest.approx((group.prediction == group.label).mean())
            assert record["mean_exit_layer"] == pytest.approx(group.exit_layer.mean())


def test_realization_uses_the_saved_layers_of_the_timed_examples(sst2_run):
    """FAST_EVAL times the first 8 of 24 dev examples: the runner records their saved layers, the analysis
    recomputes the same number from the stored examples, and points_table divides the clock by it."""
    from eebench.analysis import timed_saved_layer_speedups
    from eebench.leaderboard import points_table

    out, _, jobs, _ = sst2_run
    records = load_records(out)
    recomputed = timed_saved_layer_speedups(out).set_index(["job_id", "knob_label"])["timed_saved_layer_speedup"]
    for job in jobs:
        examples = pd.read_parquet(out / "examples" / f"{job.job_id}.parquet")
        for label, group in examples.groupby("knob_label"):
            record = records[(records.job_id == job.job_id) & (records.knob_label == label)].iloc[0]
            first = group.sort_values("example").exit_layer.to_numpy()[:8]
            assert record["n_timed_examples"] == 8
            assert record["timed_saved_layer_speedup"] == pytest.approx(4 * 8 / first.sum())
            assert recomputed[(job.job_id, label)] == pytest.approx(record["timed_saved_layer_speedup"])
    table = points_table(records).set_index(["job_id", "knob_label"])
    row = records[records.batch_size == 1].set_index(["job_id", "knob_label"]).iloc[-1]
    assert table.loc[row.name, "realization_bs1"] == pytest.approx(row.wallclock_speedup / row.timed_saved_layer_speedup)


def test_rerun_is_idempotent_and_uses_the_checkpoint_cache(sst2_run):
    out, cache, jobs, _ = sst2_run
    before = (out / "records.jsonl").read_text()
    summary = run_jobs(jobs, out, cache, progress=False, log=lambda _: None)
    assert summary["skipped"] == [job.describe() for job in jobs] and not summary["done"]
    assert (out / "records.jsonl").read_text() == before
    # a fresh results dir re-evaluates but loads the fine-tuned weights instead of training again
    records, _ = run_job(jobs[1], cache, progress=False)
    assert len(list((cache / "checkpoints").glob("*.pt"))) == 2
    old = load_records(out)
    old_pabee = old[(old.method == "pabee")].sort_values(["knob_label", "batch_size"])
    new = pd.DataFrame(records).sort_values(["knob_label", "batch_size"])
    assert list(new.metric) == list(old_pabee.metric)
    assert list(new.mean_exit_layer) == list(old_pabee.mean_exit_layer)


def test_leaderboard_from_a_real_run(sst2_run):
    out, *_ = sst2_run
    board = leaderboard(load_records(out))
    assert set(board.method) == {"deebert", "pabee"} and set(board.task) == {"sst2"}


def test_floor_of_records_from_before_the_field_is_recomputed_from_stored_labels(sst2_run):
    from eebench.analysis import with_floor_metrics

    out, *_ = sst2_run
    records = load_records(out)
    old = records.drop(columns=["floor_metric"])
    filled = with_floor_metrics(old, out)
    assert filled["floor_metric"].tolist() == pytest.approx(records["floor_metric"].tolist())


def test_job_identity_is_a_hash_of_the_resolved_config():
    a, b = tiny_job("pabee"), tiny_job("pabee")
    assert a.job_id == b.job_id
    assert tiny_job("pabee", seed=1).job_id != a.job_id
    assert tiny_job("pabee", eval_limit=10).job_id != a.job_id


def test_checkpoint_key_is_shared_by_methods_with_the_same_training_signature():
    job = tiny_job("pabee")
    assert checkpoint_key(job, {"recipe": "x"}) == checkpoint_key(tiny_job("other"), {"recipe": "x"})
    assert checkpoint_key(job, {"recipe": "x"}) != checkpoint_key(job, {"recipe": "y"})
    # evaluation settings do not change the trained weights
    assert checkpoint_key(tiny_job("pabee", eval_limit=3), {"r": 1}) == checkpoint_key(job, {"r": 1})


def test_unsupported_task_is_reported_not_run(tmp_path):
    with pytest.raises(UnsupportedTaskError, match="deebert does not support regression"):
        run_job(tiny_job("deebert", "stsb", data_dir=str(GLUE)), tmp_path, progress=False)
    summary = run_jobs([tiny_job("deebert", "stsb", data_dir=str(GLUE))], tmp_path / "out", tmp_path,
                       progress=False, log=lambda _: None)
    assert summary["unsupported"] and not summary["done"]


def test_pcee_and_pabee_share_one_fine_tuned_network(tmp_path):
    cache = tmp_path / "cache"
    summary = run_jobs([tiny_job("pabee"), tiny_job("pcee")], tmp_path / "out", cache, progress=False, log=lambda _: None)
    assert len(summary["done"]) == 2
    assert len(list((cache / "checkpoints").glob("*.pt"))) == 1  # trained once
    records = load_records(tmp_path / "out")
    full = records[records.is_full_model & (records.batch_size == 1)].set_index("method")
    assert full.loc["pabee", "checkpoint"] == full.loc["pcee", "checkpoint"]
    assert full.loc["pabee", "metric"] == full.loc["pcee", "metric"]


def test_job_ids_of_stored_results_stay_stable():
    """New Job settings must not re-key old jobs: results/quick's jobs (timed on the first N dev examples, no
    selection set, whole passes timed as one region: all from before the settings existed) keep these ids; the
    random timing sample, the held-out selection set and batch-interleaved timing are other measurements, so
    other ids."""
    from dataclasses import replace

    from eebench.suites import get_suite

    jobs = get_suite("quick").jobs()
    first_n = [replace(job, eval=replace(job.eval, timing_sample="first", timing_interleave="pass", timing_min_seconds=0),
                       selection_examples=None).job_id for job in jobs]
    assert first_n == ["32734c63393fbcca", "fc25e4f76a5037d8"]
    assert not {job.job_id for job in jobs} & set(first_n)


def test_selection_set_is_evaluated_and_picks_the_operating_point(tmp_path):
    job = tiny_job("pabee", "sst2", data_dir=str(GLUE), train_limit=64, eval_limit=24, selection_examples=32)
    run_jobs([job], tmp_path / "out", tmp_path / "cache", progress=False, log=lambda _: None)
    records = load_records(tmp_path / "out")
    assert (records.n_selection_examples == 32).all() and not records.selection_carved_from_training.any()
    assert records.selection_metric.between(0, 1).all() and (records.selection_saved_layer_speedup >= 1).all()
    board = leaderboard(records)
    pick = board.iloc[0]
    assert 1.0 <= pick.heldout_pick_speedup and 0 <= pick.heldout_pick_metric <= 1
    points = records[records.batch_size == 1]
    assert pick.heldout_pick_metric in set(points.metric)  # a dev metric of one stored point


@pytest.mark.parametrize("method", ["pabee", "berxit", "hashee"])
def test_regression_heads_start_at_the_mean_training_target(method, tmp_path, monkeypatch):
    """Untrained (fit does nothing), a regression model predicts about the mean STS-B training score, not 0;
    and its checkpoint key differs from the zero-bias era's (regression jobs only)."""
    from eebench.methods import get_method_class
    from eebench.runner import training_context
    from eebench.tasks import load_split

    monkeypatch.setattr(get_method_class(method), "fit", lambda self, trainer: None)
    job = tiny_job(method, "stsb", data_dir=str(GLUE))
    _, examples = run_job(job, tmp_path, progress=False)
    train_mean = sum(e.label for e in load_split("stsb", "train", GLUE, job.train_limit, job.seed).examples) / job.train_limit
    assert train_mean > 1.5
    full = examples[examples.knob_label == "full model"]
    assert full.prediction.mean() == pytest.approx(train_mean, abs=0.1)
    assert "regression_heads" in training_context(job)
    assert "regression_heads" not in training_context(tiny_job(method, "sst2", data_dir=str(GLUE)))


def test_real_suites_choose_points_on_held_out_data():
    """Every suite that reads real data sets a selection set (the leaderboard's headline pick); small train
    splits get their own, smaller one."""
    from eebench.suites import SUITES

    for suite in SUITES.values():
        if suite.backbone in ("tiny-bert", "tiny-llama") or suite.name == "generation-tiny":
            continue
        assert all(job.selection_examples for job in suite.jobs()), suite.name
    jobs = SUITES["leaderboard-minilm"].jobs()
    assert {(job.task, job.selection_examples) for job in jobs} == {("sst2", 500), ("mcid", 200)}
    assert {job.seed for job in jobs} == {0, 1, 2} and len({job.job_id for job in jobs}) == len(jobs) == 48
    # M-CID's small train split gets more epochs (suites.MCID_TRAIN); SST-2 keeps the suite's own
    assert {(job.task, job.train.epochs) for job in jobs} == {("sst2", 2), ("mcid", 12)}
    shorter = SUITES["leaderboard-minilm"].with_epochs(1).jobs()  # `eebench run --epochs 1` reaches every task
    assert {(job.task, job.train.epochs) for job in shorter} == {("sst2", 1), ("mcid", 1)}


def test_a_folder_measured_by_other_code_gets_no_new_job_unless_allowed(sst2_run, tmp_path, monkeypatch):
    """A table is measured by one commit: new jobs into a folder another commit measured are refused before
    anything runs; finishing the folder's own jobs (all skipped) is fine; --allow-mixed-commits appends, and
    the tables' footer then lists every commit."""
    import shutil

    from eebench import runner
    from eebench.store import MixedCommitsError, commits_line, measured_commits

    out, cache, jobs, _ = sst2_run
    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    (measured,) = measured_commits(folder)
    assert measured_commits(folder) == {measured: len(jobs)}
    assert commits_line(folder) == f"Measured at commit {measured[:12]} ({len(jobs)} jobs)."
    monkeypatch.setattr(runner, "git_commit", lambda: "f00dfeed" * 5)  # the code has changed since
    assert run_jobs(jobs, folder, cache, progress=False, log=lambda _: None)["skipped"]  # nothing new: fine
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    extra = tiny_job("pcee", "sst2", data_dir=str(GLUE))
    with pytest.raises(MixedCommitsError, match=f"measured at {measured[:12]} \\(2 jobs\\); this checkout is "
                                                "f00dfeedf00d.*--allow-mixed-commits.*Nothing was run"):
        run_jobs([*jobs, extra], folder, cache, progress=False, log=lambda _: None)
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
    summary = run_jobs([extra], folder, cache, progress=False, log=lambda _: None, allow_mixed_commits=True)
    assert summary["done"] == [extra.describe()]
    assert measured_commits(folder) == {measured: len(jobs) + 1}  # its records carry the (unpatched) real commit
    merged = tmp_path / "merged"  # a records.jsonl line from elsewhere, with another commit, counts too
    shutil.copytree(out, merged)
    line = json.loads((merged / "records.jsonl").read_text().splitlines()[0])
    line.update(job_id="from-elsewhere", environment={**line["environment"], "git_commit": "abc1234"})
    with (merged / "records.jsonl").open("a") as handle:
        handle.write(json.dumps(line) + "\n")
    assert measured_commits(merged) == {measured: len(jobs), "abc1234": 1}
    assert commits_line(merged).startswith("**Mixed commits**: ")
