"""ConsistentEE against its spec: memorized layer, trajectory log-probability, reward, advantage, which
parameters each stage trains, the inference rule, and the alpha sweep sharing one cached stage 1."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from eebench.backbones import load_backbone
from eebench.leaderboard import load_records
from eebench.methods.consistentee import (
    ConsistentEE,
    group_advantage,
    memorized_layer,
    reward,
    trajectory,
)
from eebench.methods.pabee import layer_weighted_loss
from eebench.runner import checkpoint_key, run_jobs
from eebench.tasks import get_task, load_split
from eebench.training import LoopTrainer, collate, encode

from conftest import FAST_TRAIN, tiny_job

Y, N = 1, 0  # label 1; a correct / wrong prediction


def test_memorized_layer_walks_down_from_the_top_while_correct():
    predictions = torch.tensor([
        [Y, Y, Y, Y],   # right everywhere -> 1
        [N, Y, Y, Y],   # -> 2
        [Y, N, Y, Y],   # early right answers do not count once a later layer forgets -> 3
        [Y, Y, N, Y],   # -> 4
        [Y, Y, Y, N],   # last layer wrong -> L
        [N, N, N, N],   # -> L
    ])
    labels = torch.full((6,), Y)
    assert memorized_layer(predictions, labels).tolist() == [1, 2, 3, 4, 4, 4]


def test_trajectory_log_probability_exited_and_never_exited():
    p = torch.tensor([0.2, 0.7, 0.4])
    logits = torch.log(p / (1 - p)).repeat(4, 1)
    actions = torch.tensor([[False, True, True],    # exits at 2; later actions are irrelevant
                            [False, False, False],  # never exits: e = L and log(1 - p_L) counts
                            [True, False, False],   # exits at 1
                            [False, False, True]])  # chooses exit at L
    exit_layer, log_prob = trajectory(logits, actions)
    assert exit_layer.tolist() == [2, 3, 1, 3]
    expected = [math.log(0.8) + math.log(0.7),
                math.log(0.8) + math.log(0.3) + math.log(0.6),
                math.log(0.2),
                math.log(0.8) + math.log(0.3) + math.log(0.4)]
    assert log_prob.tolist() == pytest.approx(expected, rel=1e-5)


def test_trajectory_gradient_reaches_only_the_visited_policies():
    logits = torch.zeros(1, 4, requires_grad=True)
    trajectory(logits, torch.tensor([[False, True, False, False]]))[1].sum().backward()
    # d/ds log(1 - sigmoid(s)) = -p = -0.5 ; d/ds log sigmoid(s) = 1 - p = 0.5 ; layers after the exit: 0
    assert logits.grad.tolist() == [[-0.5, 0.5, 0.0, 0.0]]


def test_reward_with_and_without_hardness_weighting():
    ce = torch.tensor([0.5, 0.5, 0.1])
    exit_layer = torch.tensor([2, 6, 3])
    memorized = torch.tensor([1, 6, 3])
    # L = 6, alpha = 0.1: -CE - alpha * (1 - m/L) * e
    hard = reward(ce, exit_layer, memorized, alpha=0.1, num_layers=6, hardness_weighting=True)
    assert hard.tolist() == pytest.approx([-0.5 - 0.1 * (5 / 6) * 2, -0.5 - 0.0, -0.1 - 0.1 * 0.5 * 3])
    plain = reward(ce, exit_layer, memorized, alpha=0.1, num_layers=6, hardness_weighting=False)
    assert plain.tolist() == pytest.approx([-0.7, -1.1, -0.4])
    assert reward(ce, exit_layer, memorized, 0.0, 6, True).tolist() == pytest.approx((-ce).tolist())


def test_advantage_groups_rollouts_of_the_same_example():
    # K = 2, B = 3: rollout k of example i sits at k*B + i
    rewards = torch.tensor([1.0, 2.0, 3.0, 3.0, 2.0, 7.0])
    assert group_advantage(rewards, 2).tolist() == [-1.0, 0.0, -2.0, 1.0, 0.0, 2.0]


def test_greedy_dropout_needs_per_rollout_dropout():
    with pytest.raises(ValueError, match="per_rollout"):
        ConsistentEE(rollout_policy="greedy_dropout")
    ConsistentEE(rollout_policy="greedy_dropout", rollout_dropout="per_rollout")
    with pytest.raises(ValueError, match="rollout_policy"):
        ConsistentEE(rollout_policy="ppo")


@pytest.fixture(scope="module")
def warm():
    """A tiny ConsistentEE after stage 1, its trainer and one training batch."""
    spec = get_task("graded")
    backbone = load_backbone("tiny-bert", seed=0)
    method = ConsistentEE(num_rollouts=4)
    torch.manual_seed(0)
    model = method.attach(backbone, spec)
    data = encode(load_split(spec, "train", None, limit=48, seed=0).examples, backbone.tokenizer, 48, False)
    trainer = LoopTrainer(model, data, FAST_TRAIN, 0, backbone.tokenizer.pad_token_id, "cpu", progress=False)
    trainer.train(model.parameters(), lambda b: layer_weighted_loss(model, b, "classification"), stage="stage1")
    method.memorized = method.compute_memorized_layers(trainer)
    batch = collate(data, list(range(8)), backbone.tokenizer.pad_token_id, "cpu")
    return method, trainer, batch


def _snapshot(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_memorized_layers_cover_the_training_set(warm):
    method, trainer, _ = warm
    assert method.memorized.shape == (48,)
    assert int(method.memorized.min()) >= 1 and int(method.memorized.max()) <= method.model.num_layers


def test_stage2_changes_only_policy_parameters(warm):
    method, trainer, _ = warm
    before = _snapshot(method.model)
    trainer.train(method._policy_parameters(), method.policy_stage_loss, stage="stage2", epochs=1, lr=1e-2)
    after = method.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "stage 2 did not train anything"
    assert all(".signal." in name for name in changed), sorted(changed)
    record = trainer.stages[-1]
    assert {"mean_rollout_exit_layer", "mean_greedy_exit_layer", "mean_reward"} <= record.keys()


def test_stage3_classification_loss_reaches_only_each_rollouts_exit_classifier(warm):
    method, _, batch = warm
    model = method.model
    with torch.no_grad():  # force every rollout to exit at layer 2: P(exit) ~ 0 at layer 1, ~ 1 at layer 2
        for layer, head in enumerate(model.heads, start=1):
            head.signal[2].bias.fill_(50.0 if layer == 2 else -50.0)
    model.train()
    model.zero_grad(set_to_none=True)
    loss, stats = method.classifier_stage_loss(batch)
    loss.backward()
    assert stats["rollout_exit_layer"] == 2.0
    for layer, head in enumerate(model.heads, start=1):
        grad = head.classifier.weight.grad
        touched = grad is not None and bool(grad.abs().sum() > 0)
        assert touched == (layer == 2), f"classifier {layer}"
        assert all(p.grad is None for p in head.signal.parameters()), "stage 3 must not train the policy by default"
    first_layer = [p for name, p in model.backbone.named_parameters() if ".0." in name]
    assert first_layer and all(p.grad is not None for p in first_layer), "the backbone learns from the exit loss"
    model.zero_grad(set_to_none=True)


def test_inference_rule_equals_the_greedy_trajectory_of_training(warm):
    method, _, batch = warm
    model = method.model
    model.eval()
    with torch.no_grad():  # centre layer 1's P(exit) on this batch so that about half the examples exit there
        head = model.heads[0]
        head.signal[2].bias.zero_()
        first = head.signal(head.pooler(model.layer_summaries(batch, layers=[1])[0])).squeeze(-1)
        head.signal[2].bias.fill_(-float(first.median()) + 1e-6)
    model.eval()
    with torch.inference_mode():
        pooled = [head.pooler(s) for head, s in zip(model.heads, model.layer_summaries(batch), strict=True)]
        policy_logits = torch.cat([head.signal(z) for head, z in zip(model.heads, pooled, strict=True)], 1)
        greedy, _ = trajectory(policy_logits, policy_logits > 0)
        online = method.predict(batch, {"alpha": 0.05, "exit_threshold": 0.5}).exit_layer
        never = method.predict(batch, {"alpha": 0.05, "exit_threshold": 1.0})
        full = method.predict(batch, None)
    assert online.tolist() == greedy.tolist()
    assert len(set(online.tolist())) > 1, "the test needs examples exiting at different layers"
    assert (never.exit_layer == model.num_layers).all() and torch.equal(never.logits, full.logits)


def test_forced_full_depth_rollout_and_eps_greedy_actions(warm):
    method, *_ = warm
    eps = ConsistentEE(rollout_policy="eps_greedy", eps_start=1.0, num_rollouts=4, force_full_depth_first_rollout=True)
    logits = torch.full((4 * 5, 6), 10.0)  # greedy would exit everywhere
    actions = eps._actions(logits)
    assert not actions[:5].any(), "rollout k = 0 of each example never exits"
    assert 0 < actions[5:].float().mean() < 1, "eps = 1 makes actions fair coins"
    assert eps._policy_steps == 6


def test_alpha_sweep_shares_stage1_and_annotates_memorized_layer(tmp_path):
    cache = tmp_path / "cache"
    jobs = [tiny_job("consistentee", method_config={"alpha": alpha}, train_limit=64, eval_limit=16) for alpha in (0.02, 0.2)]
    run_jobs(jobs, tmp_path / "out", cache, progress=False, log=lambda _: None)
    records = load_records(tmp_path / "out")
    stages = {row.job_id: row.train_stages for row in records.drop_duplicates("job_id").itertuples()}
    first, second = stages[jobs[0].job_id], stages[jobs[1].job_id]
    assert not first[0].get("from_cache") and second[0].get("from_cache"), "stage 1 ran twice"
    assert second[0]["seconds"] == first[0]["seconds"], "the cached stage keeps its original cost"
    assert len(list(cache.glob("checkpoints/stage-*.pt"))) == 1
    # The second job, run against an empty cache, gives the same result: restoring stage 1 changes nothing.
    run_jobs(jobs[1:], tmp_path / "fresh", tmp_path / "empty-cache", progress=False, log=lambda _: None)
    fresh = pd.read_parquet(tmp_path / "fresh" / "examples" / f"{jobs[1].job_id}.parquet")
    shared = pd.read_parquet(tmp_path / "out" / "examples" / f"{jobs[1].job_id}.parquet")
    pd.testing.assert_frame_equal(fresh, shared)
    depth = int(records.num_layers.iloc[0])
    assert "memorized_layer" in shared and shared.memorized_layer.between(1, depth).all()
    assert shared.memorized_layer.nunique() > 1
    knobs = records[records.job_id == jobs[1].job_id].knob_label.unique().tolist()
    assert knobs == ["full model", "alpha=0.2, exit_threshold=1.0", "alpha=0.2, exit_threshold=0.5"]
    assert np.isfinite(records.metric).all()


def test_hardness_analysis_of_a_real_run(tmp_path):
    from scipy.stats import spearmanr

    from eebench.analysis import hardness_table
    from eebench.cli import main
    from eebench.plots.hardness import write_hardness_figures

    out = tmp_path / "out"
    job = tiny_job("consistentee", method_config={"alpha": 0.05}, train_limit=64, eval_limit=24)
    run_jobs([job, tiny_job("pabee", train_limit=64, eval_limit=24)], out, tmp_path / "cache", progress=False,
             log=lambda _: None)
    table = hardness_table(out)
    assert set(table.method) == {"consistentee"}, "only jobs that annotate the memorized layer"
    examples = pd.read_parquet(out / "examples" / f"{job.job_id}.parquet")
    point = examples[examples.knob_label == "alpha=0.05, exit_threshold=0.5"]
    row = table[table.knob_label == "alpha=0.05, exit_threshold=0.5"].iloc[0]
    if point.exit_layer.nunique() > 1:
        assert row.spearman_rho == pytest.approx(spearmanr(point.memorized_layer, point.exit_layer)[0])
    else:
        assert math.isnan(row.spearman_rho)
    assert row.mean_exit_layer == pytest.approx(point.exit_layer.mean())
    paths = write_hardness_figures(out, formats=("png",))
    heat_map = {"graded_memorized_exit.png"} if table[table.knob_label != "full model"].spearman_rho.notna().any() else set()
    assert {p.name for p in paths} == {"graded_hardness.png", "graded_difficulty.png", *heat_map}
    assert all(p.stat().st_size > 1000 for p in paths)
    from eebench.plots.figures import write_figure_set
    stems = [entry.stem for entry in write_figure_set(out, tmp_path / "set", formats=("png",))]
    assert {"graded_saved_layer_speedup", "graded_exit_layers", "graded_hardness", "graded_difficulty"} <= set(stems)
    assert main(["hardness", "--results", str(out)]) == 0
    from eebench.analysis import training_table
    stages = training_table(out)
    consistentee = stages[stages.method == "consistentee"]
    assert len(consistentee) == 3 and consistentee.setting.eq("alpha=0.05, hardness_weighting=True").all()
    assert consistentee.mean_greedy_exit_layer.notna().sum() == 2  # stages 2 and 3 log both exit layers
    assert main(["training", "--results", str(out)]) == 0


def test_hardness_analysis_says_which_runs_it_needs(tmp_path):
    from eebench.analysis import hardness_table

    run_jobs([tiny_job("pabee", train_limit=32, eval_limit=8)], tmp_path / "out", tmp_path / "cache", progress=False,
             log=lambda _: None)
    with pytest.raises(ValueError, match="consistentee"):
        hardness_table(tmp_path / "out")


# ---- per-stage batch sizes (finetune_bert_alternate.sh: stage 2 at 32, stage 3 at 16) -------------------------
def test_stage_batch_sizes_are_what_the_policy_and_classifier_stages_iterate_in():
    spec = get_task("graded")
    backbone = load_backbone("tiny-bert", seed=0)
    method = ConsistentEE(num_rollouts=2, stage1_batch_size=12, stage2_batch_size=24, stage3_batch_size=16)
    torch.manual_seed(0)
    model = method.attach(backbone, spec)
    data = encode(load_split(spec, "train", None, limit=48, seed=0).examples, backbone.tokenizer, 48, False)
    suite = dataclasses.replace(FAST_TRAIN, batch_size=32)
    trainer = LoopTrainer(model, data, suite, 0, backbone.tokenizer.pad_token_id, "cpu", progress=False)
    seen: dict[str, list[int]] = {"stage2": [], "stage3": []}

    def counting(stage, loss):
        def wrapped(batch):
            seen[stage].append(len(batch["labels"]))
            return loss(batch)
        return wrapped

    # fit looks the stage losses up on the instance, so these wrappers are what the trainer calls.
    method.policy_stage_loss = counting("stage2", method.policy_stage_loss)
    method.classifier_stage_loss = counting("stage3", method.classifier_stage_loss)
    method.fit(trainer)
    assert seen == {"stage2": [24, 24], "stage3": [16, 16, 16]}
    assert [s["batch_size"] for s in trainer.stages] == [12, 24, 16]  # the suite's is 32
    assert [s["steps"] for s in trainer.stages] == [4, 2, 3]
    assert len(method.memorized) == 48  # m(x) still covers every example (suite-sized batches)


def test_stage_batch_sizes_enter_the_checkpoint_key_only_when_set():
    job = tiny_job("consistentee", "sst2")
    default = ConsistentEE().training_signature()
    # The signature of every checkpoint stored before the switch existed: it must not change.
    assert default == {"recipe": "consistentee", "alpha": 0.05, "hardness_weighting": True, "rollout_policy": "bernoulli",
                       "num_rollouts": 8, "rollout_dropout": "shared", "force_full_depth_first_rollout": False,
                       "eps_start": 0.1, "eps_decay_steps": 20000.0, "stage3_joint_policy_loss": False,
                       "detach_policy_input": True, "recompute_memorized_layer": False, "num_rounds": 1,
                       "stage2_epochs": 1.0, "stage2_lr": 3e-4, "stage3_epochs": 1.0, "stage3_lr": 2e-5,
                       "policy_hidden": 32}
    keys = {checkpoint_key(job, ConsistentEE(**config).training_signature())
            for config in ({}, {"stage3_batch_size": 16}, {"stage2_batch_size": 16}, {"stage2_batch_size": 32},
                           {"stage1_batch_size": 16})}
    assert len(keys) == 5
