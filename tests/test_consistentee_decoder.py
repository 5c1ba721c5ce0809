"""ConsistentEE on decoders, on the tiny random Llama: alignment, log-probability, reward and baseline by hand;
training-time state copying equal to what cached decoding with propagation computes; one method over two kinds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eebench.backbones import load_backbone
from eebench.methods import build_method
from eebench.methods.consistentee import ConsistentEE, group_advantage
from eebench.methods.consistentee.generation import PolicyExitRule
from eebench.methods.decoding import DecodeLimits, decode
from eebench.tasks import get_task


def _method(**overrides):
    backbone = load_backbone("tiny-llama", seed=0)
    method = build_method("consistentee", **overrides)
    torch.manual_seed(0)
    method.attach(backbone, get_task("dolly"))
    return method, backbone


def _set_policies(method, biases, weight_std=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for policy, bias in zip(method.model.policies, biases, strict=True):
            policy.weight.copy_(torch.randn(policy.weight.shape, generator=generator) * weight_std)
            policy.bias.fill_(bias)


def test_one_name_two_kinds_and_settings_checked_per_kind():
    method, backbone = _method(heads="copied")
    assert type(method._active).__name__ == "ConsistentEEDecoder"
    assert len(method.model.heads) == backbone.num_layers - 1 and len(method.model.policies) == backbone.num_layers
    assert method.training_signature()["recipe"] == "consistentee-decoder"
    assert ConsistentEE().training_signature()["recipe"] == "consistentee"  # before attach: the classification one
    with pytest.raises(ValueError, match="fit no task kind"):
        ConsistentEE(heads="tied")
    encoder_only = ConsistentEE(rollout_dropout="per_rollout")  # a classification setting
    with pytest.raises(ValueError, match="consistentee on generation task 'dolly'"):
        encoder_only.attach(load_backbone("tiny-llama", seed=0), get_task("dolly"))


def test_heads_start_as_the_lm_head_and_the_top_layer_is_the_model_itself():
    method, backbone = _method()
    hidden = torch.randn(3, backbone.hidden_size)
    for layer in range(1, backbone.num_layers + 1):  # zero-initialised adapters: every head is the LM head
        torch.testing.assert_close(method.model.head_logits(layer, hidden), backbone.logits(hidden))


def test_positions_pair_each_state_with_the_next_response_token():
    method, _ = _method(positions_per_sequence=10)
    labels = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, 8, 9, -100, -100, -100]])
    assert method.next_tokens(labels).tolist() == [[-100, 5, 6, 7, -100, -100], [8, 9, -100, -100, -100, -100]]
    # position t scored iff token t is a response token (it may exit) and token t + 1 is one too (its target)
    assert method.scored_positions(labels).tolist() == [[False, False, True, True, False, False],
                                                        [False, True, False, False, False, False]]
    assert method.can_exit(labels).tolist() == [[False, False, True, True, True, False],
                                                [False, True, True, False, False, False]]
    capped = _method(positions_per_sequence=1)[0].scored_positions(labels)
    assert capped.sum(1).tolist() == [1, 1]


def _batch(backbone, length=10, prompt=4, rows=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, backbone.model.config.vocab_size, (rows, length), generator=generator)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_log_probability_exit_layer_and_reward_by_hand():
    """Policies that ignore the state: P(exit) = sigmoid(b_l) everywhere. Greedy (eps 0): exit where b_l > 0.
    b = (-1, 2, ...): response positions exit at layer 2; replica 0 is forced to full depth."""
    method, backbone = _method(num_rollouts=2, eps_start=0.0, alpha=0.1, hardness_weighting=False,
                               positions_per_sequence=100)
    L = backbone.num_layers
    biases = [-1.0, 2.0] + [-3.0] * (L - 2)
    _set_policies(method, biases)
    batch = _batch(backbone)
    rollout = method.rollouts(batch, train_policy=False)
    n = int(rollout["chosen"].sum())
    assert n == 2 * 5  # positions 4..8 of each row (position 9 has no next token)
    assert rollout["exit_layer"].tolist() == [L] * n + [2] * n  # replica 0 first (k-major)
    log_p = [F.logsigmoid(torch.tensor(-b)).item() for b in biases]  # log(1 - p_l)
    exit_at_2 = (log_p[0] + F.logsigmoid(torch.tensor(2.0)).item()) / 2  # length-normalised
    full_depth = sum(log_p) / L  # never exited: every layer's log(1 - p), the last one's included
    torch.testing.assert_close(rollout["log_prob"], torch.tensor([full_depth] * n + [exit_at_2] * n))
    # exit states: replica 1's are layer-2 states of the same positions
    states = dict(backbone.forward_states(batch["input_ids"], batch["attention_mask"]))
    torch.testing.assert_close(rollout["states"][n:], states[2][rollout["chosen"]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rollout["states"][:n], states[L][rollout["chosen"]], rtol=1e-5, atol=1e-5)
    # CE of the exit head on the NEXT token; reward -CE - alpha e; baseline = mean of a position's two replicas
    ce = method.exit_cross_entropy(rollout["states"], rollout["exit_layer"], rollout["targets"])
    targets = batch["input_ids"][:, 5:10].reshape(-1)
    torch.testing.assert_close(ce[n:], F.cross_entropy(backbone.logits(states[2][rollout["chosen"]]), targets,
                                                       reduction="none"))
    rewards = -ce - 0.1 * rollout["exit_layer"].float()
    advantage = group_advantage(rewards, 2)
    torch.testing.assert_close(advantage[:n], (rewards[:n] - rewards[n:]) / 2)
    torch.testing.assert_close(advantage[:n], -advantage[n:])


def test_hardness_weighted_reward_uses_each_tokens_memorized_layer():
    method, backbone = _method(num_rollouts=2, eps_start=0.0, positions_per_sequence=100)
    batch = _batch(backbone)
    chosen = method.scored_positions(batch["labels"])
    memorized = method.memorized_layers(batch, chosen)
    states = dict(backbone.forward_states(batch["input_ids"], batch["attention_mask"]))
    targets = method.next_tokens(batch["labels"])[chosen]
    for i in range(len(targets)):  # m = lowest layer from which every head up to L predicts the target
        right = [bool(backbone.logits(states[layer][chosen][i]).argmax() == targets[i])
                 for layer in range(1, backbone.num_layers + 1)]
        expected = backbone.num_layers if not right[-1] else min(
            layer for layer in range(1, backbone.num_layers + 1) if all(right[layer - 1:]))
        assert memorized[i].item() == expected


def test_training_state_copying_equals_cached_decoding_with_propagation():
    """Decode greedily with the policy rule (KV cache, skipped layers filled by CALM's propagation), then run the
    training rollout on prompt + generated tokens: every generated position exits at the same layer and its
    exit head predicts the token decoding produced next. Random decisive policies mix exit layers."""
    method, backbone = _method(num_rollouts=2, eps_start=0.0, force_full_depth_first_rollout=False,
                               positions_per_sequence=1000, heads="copied")
    L = backbone.num_layers
    _set_policies(method, [0.0] * L, weight_std=1.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for head in method.model.heads:  # distinct heads, so a wrong exit layer would show in the tokens
            head.weight.add_(torch.randn_like(head.weight) * 0.5)
    method.model.eval()
    prompt = torch.randint(5, backbone.model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    limits = DecodeLimits(max_new_tokens=12)
    exit_states = []  # the state each token was predicted from: one head call per step at batch size 1

    def recording_head(layer, hidden):
        exit_states.append(hidden.reshape(-1))
        return method.model.head_logits(layer, hidden)

    with torch.no_grad():
        out = decode(backbone, prompt, torch.ones_like(prompt), limits, rule=PolicyExitRule(method.model, 0.5),
                     head=recording_head)
    generated = out.tokens[0]
    layers_used = out.token_layers[0]
    assert len(set(layers_used[1:])) > 1, "the policies should mix exit layers"
    ids = torch.cat([prompt, torch.tensor([generated])], dim=1)
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        rollout = method.rollouts({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                                  train_policy=False)
    n = int(rollout["chosen"].sum())  # positions of generated tokens 1 .. T-1 (each predicts the next one)
    assert n == len(generated) - 1
    assert rollout["exit_layer"][:n].tolist() == layers_used[1:]  # token i + 1 came from position of token i
    predicted = [method.model.head_logits(e, s).argmax().item()
                 for e, s in zip(rollout["exit_layer"][:n].tolist(), rollout["states"][:n], strict=True)]
    assert predicted == generated[1:]
    # and the states themselves: decoding's cached keys/values (prompt at full depth, skipped layers propagated)
    # are what the training rollout's copied states attend to
    assert len(exit_states) == len(generated)
    torch.testing.assert_close(rollout["states"][:n], torch.stack(exit_states[1:]), rtol=1e-4, atol=1e-5)


def test_policy_stage_changes_only_the_policies_and_logs_exits(tmp_path):
    from eebench.evaluation.generation import GenerationEvaluator
    from eebench.runner import Job
    from eebench.tasks import load_split
    from eebench.training import LoopTrainer, TrainConfig

    from conftest import SHARED_DATA

    method, backbone = _method(num_rollouts=2, positions_per_sequence=8)
    spec = get_task("dolly")
    train = load_split(spec, "train", SHARED_DATA / "generation", limit=8, seed=0)
    config = TrainConfig(epochs=1, lr=1e-3, batch_size=4, max_seq_length=48)
    job = Job(method="consistentee", task="dolly", seed=0, backbone="tiny-llama", train=config)
    encoded = GenerationEvaluator().encode_train(train.examples, backbone, job, spec)
    trainer = LoopTrainer(method.model, encoded, config, 0, backbone.tokenizer.pad_token_id, "cpu", progress=False)
    before = {name: p.detach().clone() for name, p in method.model.named_parameters()}
    method.fit(trainer)
    changed = {name for name, p in method.model.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all(name.startswith(("heads.", "policies.")) for name in changed)  # the backbone is frozen
    assert any(name.startswith("policies.") for name in changed) and any(name.startswith("heads.") for name in changed)
    # the released form: LoRA on copied heads, merged after each stage: plain linears and state-dict keys again
    assert not any("lora_" in key for key in method.model.state_dict())
    assert all(type(head) is torch.nn.Linear for head in method.model.heads)
    stages = trainer.stages
    assert [s["stage"].split(":")[0] for s in stages] == ["stage1", "stage2", "stage3"]
    assert all(math.isfinite(s["final_loss"]) for s in stages)
    assert 1 <= stages[1]["mean_rollout_exit_layer"] <= backbone.num_layers


def test_runs_through_the_runner_beside_calm(tmp_path):
    """One generation job end to end: records with the classification track's fields, per-token exits, a
    calibration (LTT) entry, and its own curve next to CALM's in the points table."""
    from eebench.leaderboard import load_records, points_table
    from eebench.runner import run_jobs
    from eebench.suites import get_suite

    from conftest import SHARED_DATA

    suite = get_suite("generation-tiny").with_overrides(methods=("consistentee",), train_limit=8, eval_limit=4,
                                                          data_dir=str(SHARED_DATA / "generation"),
                                                          selection_examples=4)
    summary = run_jobs(suite.jobs(), tmp_path / "out", tmp_path / "cache", progress=False, log=lambda _: None)
    assert summary["done"] == ["consistentee / dolly / seed 0 / tiny-llama"]
    records = load_records(tmp_path / "out")
    point = records[~records.is_full_model].iloc[0]
    assert point.knob == {"alpha": 0.05, "exit_threshold": 0.5} and 1 <= point.mean_exit_layer <= point.num_layers
    assert point.tokens_per_second > 0 and point.calibration and point.trained_on == "dolly"
    assert [stage["stage"].split(":")[0] for stage in point.train_stages] == ["stage1", "stage2", "stage3"]
    assert set(points_table(records).method) == {"consistentee"}


@pytest.mark.parametrize("policy", ["linear", "mlp"])
def test_policy_exit_prior_sets_the_starting_probability(policy):
    method, backbone = _method(policy=policy, policy_exit_prior=0.05)
    hidden = torch.randn(64, backbone.hidden_size)
    probabilities = torch.sigmoid(torch.stack([method.model.policy_logits(layer, hidden)
                                               for layer in range(1, backbone.num_layers + 1)]))
    assert abs(probabilities.mean().item() - 0.05) < 0.01  # the released zero bias starts at 0.5
    released, _ = _method(policy=policy)
    released_mean = torch.sigmoid(released.model.policy_logits(1, hidden)).mean().item()
    assert abs(released_mean - 0.5) < 0.05
    with pytest.raises(ValueError, match="policy_exit_prior must be a probability"):
        ConsistentEE(heads="copied", policy_exit_prior=1.0)


def _trainer(model, backbone, cache_dir, epochs=0.25):
    from eebench.evaluation.generation import GenerationEvaluator
    from eebench.runner import Job
    from eebench.tasks import load_split
    from eebench.training import LoopTrainer, StageCache, TrainConfig

    from conftest import SHARED_DATA

    spec = get_task("dolly")
    train = load_split(spec, "train", SHARED_DATA / "generation", limit=8, seed=0)
    config = TrainConfig(epochs=epochs, lr=1e-3, batch_size=4, max_seq_length=48)
    job = Job(method="consistentee", task="dolly", seed=0, backbone="tiny-llama", train=config)
    encoded = GenerationEvaluator().encode_train(train.examples, backbone, job, spec)
    return LoopTrainer(model, encoded, config, 0, backbone.tokenizer.pad_token_id, "cpu", progress=False,
                       stage_cache=StageCache(cache_dir, {"job": "shared by both methods"}))


def test_calm_anytime_backbone_is_calms_own_stage_restored_from_the_cache(tmp_path):
    """backbone_init="calm-anytime": CALM's jobs train the anytime stage once; ConsistentEE restores exactly
    that backbone (only the backbone: its heads and policies are other modules) and trains heads and policies
    on it, frozen; its copied heads start from the fine-tuned LM head, so every layer starts as CALM's exit."""
    from eebench.methods.calm import anytime_stage

    calm = build_method("calm")
    calm_backbone = load_backbone("tiny-llama", seed=0)
    calm.attach(calm_backbone, get_task("dolly"))
    shipped = {k: v.clone() for k, v in calm_backbone.state_dict().items()}
    assert anytime_stage(_trainer(calm.model, calm_backbone, tmp_path), calm_backbone, 4) is False  # trained
    trained = calm_backbone.state_dict()
    assert any(not torch.equal(shipped[k], trained[k]) for k in trained)

    restored, backbone = _method(backbone_init="calm-anytime", num_rollouts=2, positions_per_sequence=8)
    assert anytime_stage(_trainer(restored.model, backbone, tmp_path), backbone, 4) is True
    restored.model.copy_lm_head_into_heads()
    hidden = torch.randn(3, backbone.hidden_size)
    for layer in range(1, backbone.num_layers + 1):
        torch.testing.assert_close(restored.model.head_logits(layer, hidden), calm_backbone.logits(hidden))

    method, backbone = _method(backbone_init="calm-anytime", num_rollouts=2, positions_per_sequence=8)
    trainer = _trainer(method.model, backbone, tmp_path)
    method.fit(trainer)
    assert [s["stage"].split(":")[0] for s in trainer.stages] == ["anytime", "stage1", "stage2", "stage3"]
    assert trainer.stages[0].get("from_cache") and not trainer.stages[1].get("from_cache")
    for key, value in backbone.state_dict().items():  # frozen after the restored stage
        torch.testing.assert_close(value, trained[key])
    assert method.training_signature()["backbone_init"] == "calm-anytime"
