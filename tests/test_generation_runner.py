"""Generation jobs through the one runner: records, per-example rows, LTT calibration, shared checkpoints."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from eebench.runner import EvalConfig, GenerationConfig, Job, run_jobs
from eebench.training import TrainConfig

from conftest import SHARED_DATA

GENERATION = str(SHARED_DATA / "generation")
FIELDS = ("metric_name", "metric", "metrics", "mean_exit_layer", "saved_layer_speedup", "flops_speedup",
          "wallclock_speedup", "batch_size", "tokens_per_second")


def _job(**config) -> Job:
    return Job(method="calm", task="dolly", seed=0, backbone="tiny-llama", method_config=config,
               train=TrainConfig(epochs=1, lr=1e-3, batch_size=4, max_seq_length=64),
               eval=EvalConfig(batch_size=4, timing_batch_sizes=(1, 4), timing_examples=4, timing_repeats=1,
                               timing_warmup=0, timing_min_seconds=0.0),
               data_dir=GENERATION, train_limit=8, eval_limit=8, selection_examples=8,
               generation=GenerationConfig(max_new_tokens=6, bertscore="none", guarantee_draws=20))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("gen-results"), tmp_path_factory.mktemp("gen-cache")
    jobs = [_job(confidence="saturation", thresholds=(0.999, 0.9, -2.0)), _job(confidence="softmax")]
    summary = run_jobs(jobs, out, cache, progress=False, log=lambda _: None)
    assert len(summary["done"]) == 2
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return out, records, jobs


def test_records_keep_the_classification_fields_and_add_tokens_per_second(store):
    _, records, jobs = store
    assert {r["job_id"] for r in records} == {j.job_id for j in jobs}
    for record in records:
        for field in FIELDS:
            assert field in record, field
        assert record["metric_name"] == "rougeL" and 0 <= record["metric"] <= 1
        assert set(record["metrics"]) >= {"rougeL", "consistency_rougeL", "token_agreement", "bertscore_f1"}
        assert record["curve"] in ("calm[saturation]", "calm[softmax]")
        assert record["batch_size"] in (1, 4) and record["tokens_per_second"] > 0
    full = [r for r in records if r["is_full_model"]]
    assert all(r["metrics"]["consistency_rougeL"] == 1.0 and r["metrics"]["token_agreement"] == 1.0 for r in full)
    assert all(r["saved_layer_speedup"] == 1.0 and abs(r["flops_speedup"] - 1.0) < 1e-9 for r in full)


def test_always_exiting_knob_saves_layers_and_flops(store):
    _, records, _ = store
    eager = [r for r in records if r["knob"].get("threshold") == -2.0]
    assert eager and all(r["saved_layer_speedup"] > 1.5 and r["flops_speedup"] > 1.0 for r in eager)
    # saturation exits at the second exit point at the earliest; the prefill's token counts L = 6
    assert all(r["mean_exit_layer"] >= 2 for r in eager)


def test_the_two_measures_share_one_checkpoint(store):
    _, records, _ = store
    assert len({r["checkpoint"] for r in records}) == 1


def test_per_example_rows_keep_text_and_per_token_exit_layers(store):
    out, records, jobs = store
    examples = pd.read_parquet(out / "examples" / f"{jobs[0].job_id}.parquet")
    dev = examples[examples["split"] == "dev"]
    assert set(dev["knob_label"]) == {r["knob_label"] for r in records if r["job_id"] == jobs[0].job_id}
    assert len(dev[dev["knob_label"] == "full model"]) == 8
    for _, row in dev.iterrows():
        assert isinstance(row["text"], str)
        assert len(row["token_layers"]) == row["n_generated"] >= 1
        assert all(1 <= layer <= 6 for layer in row["token_layers"])
    calibration = examples[examples["split"] == "calibration"]
    assert len(calibration) == 8 * 3 and calibration["textual_loss"].between(0, 1).all()


def test_ltt_calibration_is_recorded_with_its_guarantee_check(store):
    _, records, jobs = store
    calibration = next(r for r in records if r["job_id"] == jobs[0].job_id)["calibration"]
    assert {(c["consistency"], c["delta"]) for c in calibration} == {(k, d) for k in ("textual", "risk") for d in (0.1, 0.2)}
    labels = {r["knob_label"] for r in records if r["job_id"] == jobs[0].job_id}
    for entry in calibration:
        assert entry["chosen_knob"] in labels
        assert len(entry["p_values"]) == 3 and entry["n_calibration"] == 8
        assert 0 <= entry["guarantee_check"]["violation_rate"] <= 1
    picked = [p for r in records if r["job_id"] == jobs[0].job_id for p in r["ltt_picks"]]
    assert len(picked) == 4 * 2  # each (consistency, delta) marks one point, at both timing batch sizes


def test_rerun_skips_and_backbone_kind_mismatch_fails_before_work(store, tmp_path):
    out, _, jobs = store
    assert run_jobs(jobs, out, progress=False, log=lambda _: None)["skipped"] == [j.describe() for j in jobs]
    from dataclasses import replace
    with pytest.raises(ValueError, match="generation tasks need a decoder"):
        run_jobs([replace(jobs[0], backbone="tiny-bert")], tmp_path, progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="need an encoder"):
        run_jobs([Job(method="pabee", task="graded", seed=0, backbone="tiny-llama")], tmp_path, progress=False,
                 log=lambda _: None)


def test_leaderboard_points_and_figures_read_generation_results(store):
    from eebench.leaderboard import leaderboard, load_records, points_markdown, points_table, to_markdown
    from eebench.plots.curves import write_figures

    out, _, _ = store
    records = load_records(out)
    assert set(records["method"]) == {"calm[saturation]", "calm[softmax]"}  # one curve per confidence measure
    board = leaderboard(records)
    assert set(board["method"]) == {"calm[saturation]", "calm[softmax]"}
    assert "calm[softmax]" in to_markdown(board)
    table = points_table(records)
    assert len(table) and (table["tokens_per_second_bs1"] > 0).all()
    text = points_markdown(table, all_metrics=True)
    assert "bertscore_f1" in text and "consistency_rougeL" in text and "tok/s bs=1" in text
    assert "bertscore_f1" not in points_markdown(table)
    paths = write_figures(out, speedups=("saved_layer_speedup", "wallclock_speedup"), formats=("png",))
    assert any(p.name == "dolly_saved_layer_speedup.png" for p in paths)


def test_figure_set_of_a_generation_run(store, tmp_path):
    from eebench.cli import main
    from eebench.leaderboard import load_records
    from eebench.plots.figures import INDEX_FILE

    out, _, _ = store
    assert main(["figures", "--results", str(out), "--out", str(tmp_path / "set"), "--format", "png", "svg"]) == 0
    index = (tmp_path / "set" / INDEX_FILE).read_text()
    stems = [line.split("`")[1] for line in index.splitlines() if line.startswith("| `")]
    records = load_records(out)
    sizes = sorted({int(b) for b in records.batch_size})
    assert stems[:2 + len(sizes)] == ["dolly_saved_layer_speedup", "dolly_flops_speedup",
                                      *[f"dolly_wallclock_speedup_bs{b}" for b in sizes]]
    scored = records.metrics.map(lambda m: m.get("bertscore_f1") == m.get("bertscore_f1")).any()  # not NaN  # no scorer on the tiny run
    assert ("dolly_bertscore_saved_layer_speedup" in stems) == scored
    assert "dolly_exit_layers" in stems
    assert {"dolly_token_exits_calm_saturation", "dolly_token_exits_calm_softmax"} <= set(stems)
    for stem in stems:
        assert (tmp_path / "set" / f"{stem}.png").stat().st_size > 1000 and (tmp_path / "set" / f"{stem}.svg").exists()
        assert f"[png]({stem}.png)" in index
    assert f"eebench figures --results {out} --out {tmp_path / 'set'} --format png svg" in index
    assert "Measured at commit" in index or "Commit not recorded" in index
    again = tmp_path / "again"
    assert main(["figures", "--results", str(out), "--out", str(again), "--format", "svg"]) == 0
    for stem in stems:  # regenerating gives the same bytes
        assert (again / f"{stem}.svg").read_bytes() == (tmp_path / "set" / f"{stem}.svg").read_bytes()


def test_bootstrap_intervals_cover_generation_points(store):
    from eebench.analysis import bootstrap_draws, bootstrap_intervals
    from eebench.leaderboard import leaderboard_intervals, load_records

    out, records, _ = store
    intervals = bootstrap_intervals(out, n_resamples=200)
    by_point = {(r["job_id"], r["knob_label"]): r["metric"] for r in records}
    assert len(intervals) == len(by_point)  # dev points only: the calibration rows are not a point
    for row in intervals.itertuples():
        assert abs(row.metric - by_point[(row.job_id, row.knob_label)]) < 1e-9
        assert row.ci_low <= row.metric + 1e-9 and row.metric <= row.ci_high + 1e-9
    assert len(leaderboard_intervals(load_records(out), bootstrap_draws(out, n_resamples=50)))


def test_full_model_reference_is_decoded_once_per_checkpoint_and_equals_a_fresh_decode(store, tmp_path):
    """The memo of one run_jobs call: the second job's full-model outputs are the first's; a job run alone
    (fresh memo) decodes exactly the same texts."""
    from eebench.runner import run_job

    out, _, jobs = store
    rows = pd.concat([pd.read_parquet(p) for p in (out / "examples").glob("*.parquet")])
    full = rows[(rows.knob_label == "full model") & (rows.split == "dev")]
    texts = {job_id: list(group.sort_values("example").text) for job_id, group in full.groupby("job_id")}
    assert len(texts) == 2 and len({tuple(t) for t in texts.values()}) == 1
    memo: dict = {}
    cache = next(out.parent.glob("gen-cache*"))
    _, alone = run_job(jobs[1], cache, progress=False, memo=memo)
    alone_full = alone[(alone.knob_label == "full model") & (alone.split == "dev")].sort_values("example")
    assert list(alone_full.text) == texts[jobs[1].job_id]
    assert len(memo) == 2  # the dev prompts and the calibration prompts
