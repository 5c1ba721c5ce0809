"""ConsistentEE (Zeng et al., AAAI 2024) on classification: a learned exit policy trained by REINFORCE, hardness-guided reward.

Spec: ../shared/docs/methods/consistentee.md. Modules: one shared pooler (the pre-trained one), a linear
internal classifier (IC) per layer and a policy net per layer, Linear(d, 32) -> GELU -> Linear(32, 1) ->
sigmoid = P(exit), reading the pooled vector without dropout. Training: (1) all ICs jointly, weights = layer
index (PABEE's loss); then the memorized layer m(x) of every training example from that model; (2) the
policy alone, REINFORCE over K rollouts per example, baseline = mean reward of the example's rollouts;
(3) the classifiers (and backbone) on the cross-entropy at each rollout's exit layer only. Reward:
R = -CE(y, f_e) - alpha * (1 - m/L) * e. Inference: exit at the first layer with P(exit) > 0.5.

Reading the released code instead (spec section 11): rollout_policy="greedy_dropout",
rollout_dropout="per_rollout", alpha=0, stage3_joint_policy_loss=True, detach_policy_input=False,
stage1_batch_size=16, stage2_batch_size=32, stage3_batch_size=16 (finetune_bert_alternate.sh).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eebench.methods.consistentee.policy import (
    group_advantage,
    memorized_layer,
    policy_net,
    reward,
    trajectory,
)
from eebench.methods.exits import ExitHead, MultiExitModel, RuleState, sigmoid_row
from eebench.methods.pabee import layer_weighted_loss
from eebench.methods.protocol import Batch, ExitOutput, Knob, Trainer

ROLLOUT_POLICIES = ("bernoulli", "greedy_dropout", "eps_greedy")
_SQRT_HALF = math.sqrt(0.5)


@dataclass
class ConsistentEEConfig:
    alpha: float = 0.05                     # reward per layer; the trade-off knob (one training per value)
    hardness_weighting: bool = True         # the paper's (1 - m/L) factor; False gives -CE - alpha*e (LLM code)
    rollout_policy: str = "bernoulli"       # bernoulli (paper reading) | greedy_dropout (BERT code) | eps_greedy (LLM code)
    num_rollouts: int = 8                   # K
    # "shared": one backbone pass per example, its K rollouts differ by the sampled actions (K times cheaper);
    # "per_rollout": the batch is replicated K times, each copy with its own dropout masks (the released code).
    rollout_dropout: str = "shared"
    force_full_depth_first_rollout: bool = False  # LLM code: rollout k = 0 never exits
    eps_start: float = 0.1                  # eps_greedy: eps_t = eps_start * exp(-t / eps_decay_steps),
    eps_decay_steps: float = 20000.0        #   t counts layers of training forward passes
    stage3_joint_policy_loss: bool = False  # True: stage 3 also minimises the policy loss (BERT code)
    detach_policy_input: bool = True        # False: the policy gradient reaches pooler and backbone (BERT code)
    recompute_memorized_layer: bool = False  # recompute m from the current ICs before every later round
    num_rounds: int = 1                     # repetitions of (stage 2, stage 3)
    stage2_epochs: float = 1.0
    stage2_lr: float = 3e-4
    stage3_epochs: float = 1.0
    stage3_lr: float = 2e-5
    # None = the suite's batch size (eebench). Released BERT scripts: stage 1 16 and stage 2 (policy) 32 in both;
    # stage 3 16 in finetune_bert_alternate.sh, the script whose stage-3 lr and epochs are the defaults above (32 in
    # the other). At the suite's batch size, stage 1 trains as PABEE's joint fine-tune does (same loss, same batches).
    stage1_batch_size: int | None = None
    stage2_batch_size: int | None = None
    stage3_batch_size: int | None = None
    policy_hidden: int = 32
    # Inference: the paper's rule is P(exit) > 0.5. Other values are an eebench extension, not the paper's.
    exit_thresholds: tuple[float, ...] = (0.5,)

    def __post_init__(self):
        if self.rollout_policy not in ROLLOUT_POLICIES:
            raise ValueError(f"unknown rollout_policy {self.rollout_policy!r}; choose one of {', '.join(ROLLOUT_POLICIES)}")
        if self.rollout_dropout not in ("shared", "per_rollout"):
            raise ValueError(f"rollout_dropout must be 'shared' or 'per_rollout', not {self.rollout_dropout!r}")
        if self.rollout_policy == "greedy_dropout" and self.rollout_dropout == "shared":
            raise ValueError("rollout_policy='greedy_dropout' draws no random actions: with one shared backbone pass "
                             "all K rollouts are identical and every advantage is 0. Use rollout_dropout='per_rollout'.")
        if self.num_rollouts < 2:
            raise ValueError(f"num_rollouts must be >= 2 (the baseline is the mean over them), got {self.num_rollouts}")


class PolicyRule:
    """Inference: exit at the first layer l < L whose policy says P(exit) > threshold (strict)."""

    reads_logits = False  # decides from the pooled vector; the classifier runs only where it exits

    def __init__(self, heads: nn.ModuleList, threshold: float):
        self.heads, self.threshold = heads, threshold
        # each policy net's two Linears, looked up once per rule: indexing into an nn.Sequential inside the
        # batch-of-one layer loop cost ~20 us per layer (cold Python after a layer)
        self._linears = [(head.signal[0], head.signal[2]) for head in heads]

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        return {}

    def decide(self, layer: int, logits: torch.Tensor, state: RuleState,
               pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, RuleState]:
        return torch.sigmoid(self.heads[layer - 1].signal(pooled)).squeeze(-1) > self.threshold, state

    def decide_row(self, layer: int, logits: None, state: dict, pooled: torch.Tensor) -> bool:
        """`decide` for one example: the policy's first Linear as a tensor op, its `width` outputs read to the
        host once, then GELU, the width -> 1 Linear and the sigmoid on Python floats. Why: aten's exact GELU
        has a fixed cost of ~20 us even on 32 values (~75 us right after a layer); the whole decision went
        from ~200-265 to ~100-125 us per layer on MiniLM (timed inside the layer loop; README, "Wall-clock
        realization after ConsistentEE's decision moved to Python floats")."""
        first, second = self._linears[layer - 1]
        hidden = F.linear(pooled, first.weight, first.bias).tolist()[0]
        exit_logit = second.bias.item()
        for weight, value in zip(second.weight.tolist()[0], hidden, strict=True):
            exit_logit += weight * _gelu_row(value)
        return sigmoid_row(exit_logit) > self.threshold


def _gelu_row(value: float) -> float:
    """nn.GELU() (the exact, erf form) of one Python float."""
    return 0.5 * value * (1.0 + math.erf(value * _SQRT_HALF))


class ConsistentEEClassifier:
    """Per-layer ICs on a shared pooler + per-layer policy nets; joint warm-up, then REINFORCE and
    exit-layer-only classifier training; exit when P(exit) > 0.5."""

    name = "consistentee"
    granularity = "layer"
    task_kinds = frozenset({"classification"})
    knob_names = ("alpha", "exit_threshold")

    def __init__(self, **overrides):
        self.config = ConsistentEEConfig(**overrides)
        self.model: MultiExitModel | None = None
        self.memorized: torch.Tensor | None = None   # (N_train,) by example index, 1..L
        self.stage1_model: MultiExitModel | None = None  # kept to annotate dev examples with m(x)
        self._policy_steps = 0                        # eps_greedy's t

    def attach(self, backbone, task) -> MultiExitModel:
        config, d = backbone.model.config, backbone.hidden_size
        # signal = the layer's policy: the exit rule evaluates it on the pooled vector, and its MACs are
        # charged to every layer an example passes.
        heads = [ExitHead(backbone.pooler, d, task.num_labels, config.hidden_dropout_prob, config.initializer_range,
                          signal=policy_net(d, self.config.policy_hidden, config.initializer_range))
                 for _ in range(backbone.num_layers)]
        self.model = MultiExitModel(backbone, heads)
        return self.model

    # ---- training -----------------------------------------------------------------------------------
    def _policy_parameters(self) -> list[nn.Parameter]:
        return [p for head in self.model.heads for p in head.signal.parameters()]

    def _rollouts(self, batch: Batch, train_policy: bool, train_classifiers: bool) -> dict[str, torch.Tensor]:
        """K rollouts per example. Returns exit_layer, log_prob, cross_entropy (K*B,) and index (K*B,)."""
        model, config, K = self.model, self.config, self.config.num_rollouts
        if config.rollout_dropout == "per_rollout":  # copy k of example i at row k*B + i
            batch = {key: torch.cat([value] * K) if torch.is_tensor(value) else value for key, value in batch.items()}
        with torch.set_grad_enabled(train_classifiers):
            summaries = model.layer_summaries(batch, backbone_grad=train_classifiers)
            pooled = [head.pooler(summary) for head, summary in zip(model.heads, summaries, strict=True)]
            logits = torch.stack([head.classifier(head.dropout(z)) for head, z in zip(model.heads, pooled, strict=True)], 1)
        with torch.set_grad_enabled(train_policy):
            policy_input = [z.detach() if config.detach_policy_input else z for z in pooled]
            policy_logits = torch.cat([head.signal(z) for head, z in zip(model.heads, policy_input, strict=True)], 1)
        labels, index = batch["labels"], batch["index"]
        if config.rollout_dropout == "shared":
            logits, policy_logits = logits.repeat(K, 1, 1), policy_logits.repeat(K, 1)
            labels, index = labels.repeat(K), index.repeat(K)
        actions = self._actions(policy_logits.detach())
        exit_layer, log_prob = trajectory(policy_logits, actions)
        exit_logits = logits[torch.arange(len(exit_layer), device=logits.device), exit_layer - 1]
        cross_entropy = F.cross_entropy(exit_logits, labels, reduction="none")
        greedy_exit, _ = trajectory(policy_logits.detach(), policy_logits.detach() > 0)  # what inference would do
        return {"exit_layer": exit_layer, "log_prob": log_prob, "cross_entropy": cross_entropy, "index": index,
                "greedy_exit_layer": greedy_exit}

    def _actions(self, policy_logits: torch.Tensor) -> torch.Tensor:
        """(R, L) exit decisions for every layer of every rollout."""
        config, probs = self.config, torch.sigmoid(policy_logits)
        if config.rollout_policy == "bernoulli":
            actions = torch.bernoulli(probs).bool()
        elif config.rollout_policy == "greedy_dropout":
            actions = probs > 0.5
        else:  # eps_greedy: with probability eps a fair coin, otherwise greedy
            epsilon = config.eps_start * math.exp(-self._policy_steps / config.eps_decay_steps)
            self._policy_steps += policy_logits.shape[1]
            explore = torch.rand_like(probs) < epsilon
            actions = torch.where(explore, torch.rand_like(probs) < 0.5, probs > 0.5)
        if config.force_full_depth_first_rollout:
            actions[: len(actions) // config.num_rollouts] = False
        return actions

    def _policy_loss(self, rollout: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        memorized = self.memorized.to(rollout["index"].device)[rollout["index"]]
        rewards = reward(rollout["cross_entropy"].detach(), rollout["exit_layer"], memorized, self.config.alpha,
                         self.model.num_layers, self.config.hardness_weighting)
        advantage = group_advantage(rewards, self.config.num_rollouts)
        return -(advantage * rollout["log_prob"]).mean(), rewards

    def _stats(self, rollout: dict[str, torch.Tensor], rewards: torch.Tensor) -> dict[str, float]:
        return {"rollout_exit_layer": rollout["exit_layer"].float().mean().item(),
                "greedy_exit_layer": rollout["greedy_exit_layer"].float().mean().item(),
                "reward": rewards.mean().item()}

    def policy_stage_loss(self, batch: Batch):
        rollout = self._rollouts(batch, train_policy=True, train_classifiers=False)
        loss, rewards = self._policy_loss(rollout)
        return loss, self._stats(rollout, rewards)

    def classifier_stage_loss(self, batch: Batch):
        joint = self.config.stage3_joint_policy_loss
        rollout = self._rollouts(batch, train_policy=joint, train_classifiers=True)
        policy_loss, rewards = self._policy_loss(rollout)
        loss = rollout["cross_entropy"].mean()  # exit-layer ICs only: the "consistent" part
        return (loss + policy_loss if joint else loss), self._stats(rollout, rewards)

    @torch.no_grad()
    def compute_memorized_layers(self, trainer: Trainer) -> torch.Tensor:
        """m(x) for every training example from the current ICs, eval mode (spec 4.1), indexed by example."""
        model = self.model
        was_training = model.training
        model.eval()
        found: dict[int, int] = {}
        for batch in trainer.batches(shuffle=False):
            predictions = torch.stack([z.argmax(-1) for z in model.all_exit_logits(batch)], dim=1)
            for i, m in zip(batch["index"].tolist(), memorized_layer(predictions, batch["labels"]).tolist(), strict=True):
                found[i] = m
        model.train(was_training)
        return torch.tensor([found[i] for i in range(len(found))], dtype=torch.long)

    def fit(self, trainer: Trainer) -> None:
        model, config = self.model, self.config
        batch = {"batch_size": config.stage1_batch_size} if config.stage1_batch_size else {}
        trainer.cached("consistentee-stage1", {"recipe": "joint-layer-weighted", **batch},
                       lambda: trainer.train(model.parameters(), lambda b: layer_weighted_loss(model, b, "classification"),
                                             stage="stage1: all exits jointly, weights = layer index", **batch))
        self.stage1_model = copy.deepcopy(model).eval()
        self.memorized = self.compute_memorized_layers(trainer)
        classifier_params = [p for head in model.heads for p in (*head.pooler.parameters(), *head.classifier.parameters())]
        stage3_params = [*model.backbone.parameters(), *classifier_params]
        if config.stage3_joint_policy_loss:
            stage3_params += self._policy_parameters()
        for round_ in range(1, config.num_rounds + 1):
            if round_ > 1 and config.recompute_memorized_layer:
                self.memorized = self.compute_memorized_layers(trainer)
            trainer.train(self._policy_parameters(), self.policy_stage_loss, stage=f"stage2 round {round_}: policy (REINFORCE)",
                          epochs=config.stage2_epochs, lr=config.stage2_lr, batch_size=config.stage2_batch_size)
            trainer.train(stage3_params, self.classifier_stage_loss, stage=f"stage3 round {round_}: exit-layer classifiers",
                          epochs=config.stage3_epochs, lr=config.stage3_lr, batch_size=config.stage3_batch_size)

    # ---- inference ----------------------------------------------------------------------------------
    def knobs(self, task, num_layers: int) -> list[Knob]:
        # P(exit) > 1 never holds: the largest budget (full model) comes first, then the paper's 0.5.
        thresholds = sorted({1.0, *self.config.exit_thresholds}, reverse=True)
        return [{"alpha": self.config.alpha, "exit_threshold": t} for t in thresholds]

    def exit_rule(self, knob: Knob) -> PolicyRule:
        return PolicyRule(self.model.heads, knob["exit_threshold"])

    def predict(self, batch: Batch, knob: Knob | None) -> ExitOutput:
        if knob is None:
            return self.model.full(batch)
        return self.model.early_exit(batch, self.exit_rule(knob))

    @torch.no_grad()
    def annotate(self, batch: Batch) -> dict[str, torch.Tensor]:
        """m(x) of dev examples from the stage-1 model (for the hardness analysis); {} if it is not in memory
        (the job's final checkpoint came from the cache, so stage 1 never ran in this process)."""
        if self.stage1_model is None:
            return {}
        predictions = torch.stack([z.argmax(-1) for z in self.stage1_model.all_exit_logits(batch)], dim=1)
        return {"memorized_layer": memorized_layer(predictions, batch["labels"])}

    def training_signature(self) -> dict:
        settings = asdict(self.config)
        settings.pop("exit_thresholds")  # an exit-rule setting
        for name in ("stage1_batch_size", "stage2_batch_size", "stage3_batch_size"):
            if settings[name] is None:  # absent at the default: checkpoints from before the switch keep their keys
                del settings[name]
        return {"recipe": "consistentee", **settings}
