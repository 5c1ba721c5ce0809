"""ConsistentEE on decoder LMs (spec consistentee.md §3.2, §5, §6, §7.2): every generated token is an episode.

Modules: an exit head per layer l < L reading the model's shared final norm, initialised from the LM head, and a
policy per layer, Linear(d, 1) + sigmoid = P(exit) on the normed state (the released form; `policy="mlp"` is
the encoder's two-layer net). The backbone is frozen, as released. Heads, as released (default): a copy of the
LM head per layer, trained through peft LoRA (rank 16, alpha 16, dropout 0.05) merged after each stage;
`head_training="full"` trains the copies whole (small models); `heads="lowrank"` keeps ONE shared LM head plus a
per-layer low-rank adapter of the same rank, the same function class without L - 1 copies of the head (for
memory: SmolLM2's copies take 3.4 GB). Layer L keeps the model's own head, so that full depth is the model as
shipped.

Training (one round, as released): (1) the heads, CE of head l weighted by l at every response position;
(2) the policies, REINFORCE over K replicas of each sequence (row k*B + i), baseline = mean reward of the K
replicas of the same position, eps-greedy exploration (eps_t = 0.1 exp(-t / 20000), t counting layer steps)
with replica 0 forced to full depth, log pi of §5.2 divided by the exit layer; reward R = -CE(y, head_e) -
alpha (1 - m/L) e with m the token's memorized layer (the lowest layer from which every head up to L predicts
the reference token, §4.1 applied per position; `hardness_weighting=False` gives the LLM code's -CE - alpha e,
alpha=0 its committed script); (3) the heads on the CE at each position's exit layer only.
Training-time state copying: once a position exits at e, h_e is its input to (and output of) every higher
layer, so later positions attend to the keys/values inference gives them (CALM's propagation; the released
inference projects the raw state without the norm: `propagation="raw"`).
Two eebench extensions, off by default (README, fidelity notes, says what each measured): `policy_exit_prior=p`
starts every policy at P(exit) = p instead of 0.5 (at 0.5 per layer half the tokens leave at layer 1 before
stage 2 has taught anything, and a CPU budget gives it few steps); `backbone_init="calm-anytime"` gives the
backbone CALM's anytime fine-tuning first, the very stage CALM's jobs train and cache (shared through
`Trainer.cached(part="backbone")`), and re-copies the heads from its LM head: both methods then exit from one
network, and the shallow heads start from a head every layer was trained to feed.
Rewards pair each position's state with the NEXT token's label (the release mixes shifted and unshifted
positions, spec §11.10) and cover response tokens only; `positions_per_sequence` of them are scored per
sequence (every position still runs and exits), for the CPU budget.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eebench.backbones.decoder import causal_bias
from eebench.methods.consistentee.policy import (
    group_advantage,
    memorized_layer,
    policy_net,
    reward,
    trajectory,
)
from eebench.methods.decoding import DecodeLimits, LayerView, RuleState, decode
from eebench.methods.protocol import Knob, PromptBatch, Trainer


@dataclass
class ConsistentEEDecoderConfig:
    alpha: float = 0.05                      # reward per layer; the trade-off knob (one training per value)
    hardness_weighting: bool = True          # (1 - m/L) with the token's memorized layer; False: the LLM code's -CE - alpha e
    num_rollouts: int = 4                    # K (the LLM code's)
    rollout_policy: str = "eps_greedy"       # eps_greedy (LLM code) | bernoulli (actions sampled from P(exit))
    force_full_depth_first_rollout: bool = True
    eps_start: float = 0.1
    eps_decay_steps: float = 20000.0
    length_normalise: bool = True            # log pi / e, as the LLM code
    heads: str = "copied"                    # copied (a head per layer, as released) | lowrank (shared head + adapters)
    head_training: str = "lora"              # copied heads: lora (peft, merged after each stage, as released) | full
    head_rank: int = 16
    head_alpha: float = 16.0
    head_dropout: float = 0.05
    policy: str = "linear"                   # linear (released LLM form) | mlp (the encoder's Linear-GELU-Linear)
    policy_hidden: int = 32
    policy_exit_prior: float | None = None   # None: P(exit) ~ 0.5 at the start (zero bias, as released); p: bias logit(p)
    backbone_init: str = "shipped"           # shipped (frozen as released) | calm-anytime (CALM's anytime stage first)
    anytime_exits_per_step: int = 4          # calm-anytime: CALM's exits_per_step (equal values share CALM's stage)
    positions_per_sequence: int = 32         # scored response positions per sequence and step
    stage1_epochs: float = 1.0
    stage1_lr: float = 3e-4
    stage2_epochs: float = 1.0
    stage2_lr: float = 3e-4
    stage3_epochs: float = 1.0
    stage3_lr: float = 3e-5
    propagation: str = "calm"                # inference K/V of skipped layers: calm | raw (the released code) | copy
    exit_thresholds: tuple[float, ...] = (0.5,)  # P(exit) > t; values other than 0.5 are an eebench extension

    def __post_init__(self):
        choices = {"rollout_policy": ("eps_greedy", "bernoulli"), "heads": ("copied", "lowrank"),
                   "head_training": ("lora", "full"),
                   "policy": ("linear", "mlp"), "propagation": ("calm", "raw", "copy"),
                   "backbone_init": ("shipped", "calm-anytime")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"consistentee (generation): {name} must be one of {allowed}, not {getattr(self, name)!r}")
        if self.policy_exit_prior is not None and not 0.0 < self.policy_exit_prior < 1.0:
            raise ValueError(f"policy_exit_prior must be a probability in (0, 1) or None, got {self.policy_exit_prior}")
        if self.num_rollouts < 2:
            raise ValueError(f"num_rollouts must be >= 2 (the baseline is the mean over them), got {self.num_rollouts}")


class LowRankHead(nn.Module):
    """The per-layer part of a head: (alpha / r) B A dropout(z), B zero-initialised (so it starts as the LM head)."""

    def __init__(self, hidden_size: int, vocab_size: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.down, self.up = nn.Linear(hidden_size, rank, bias=False), nn.Linear(rank, vocab_size, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.dropout, self.scale = nn.Dropout(dropout), alpha / rank

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(self.dropout(z))) * self.scale


class DecoderExitModel(nn.Module):
    """The frozen decoder, exit heads for layers 1..L-1 and a policy per layer 1..L."""

    def __init__(self, backbone, config: ConsistentEEDecoderConfig):
        super().__init__()
        self.backbone, self.config = backbone, config
        lm_head, d, last = backbone.model.lm_head, backbone.hidden_size, backbone.num_layers
        if config.heads == "copied":
            self.heads = nn.ModuleList([copy.deepcopy(lm_head) for _ in range(last - 1)])
        else:
            self.heads = nn.ModuleList([LowRankHead(d, lm_head.out_features, config.head_rank, config.head_alpha,
                                                    config.head_dropout) for _ in range(last - 1)])
        init = backbone.model.config.initializer_range
        policies = [policy_net(d, config.policy_hidden, init) if config.policy == "mlp" else nn.Linear(d, 1)
                    for _ in range(last)]
        for policy in policies:
            if isinstance(policy, nn.Linear):  # P(exit) ~ 0.5 before training, as the encoder's policies
                nn.init.normal_(policy.weight, std=init)
                nn.init.zeros_(policy.bias)
            if config.policy_exit_prior is not None:  # the output layer's bias: P(exit) ~ prior for any state
                output = policy if isinstance(policy, nn.Linear) else policy[-1]
                nn.init.constant_(output.bias, math.log(config.policy_exit_prior / (1 - config.policy_exit_prior)))
        self.policies = nn.ModuleList(policies)

    def copy_lm_head_into_heads(self) -> None:
        """Re-initialise copied heads from the model's LM head as it is now (after the backbone was trained)."""
        if self.config.heads == "copied":
            for head in self.heads:
                head.load_state_dict(self.backbone.model.lm_head.state_dict())

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def head_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) raw states -> (..., V) logits of layer `layer`'s exit head (layer L: the model's own head)."""
        z = self.backbone.model.model.norm(hidden)
        lm_head = self.backbone.model.lm_head
        if layer == self.num_layers:
            return lm_head(z)
        head = self.heads[layer - 1]
        return head(z) if self.config.heads == "copied" else lm_head(z) + head(z)

    def policy_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) raw states -> (...,) logit of P(exit) at `layer`, read from the normed state."""
        return self.policies[layer - 1](self.backbone.model.model.norm(hidden)).squeeze(-1)


class PolicyExitRule:
    """Inference: a token exits at the first layer l < L with P(exit) > threshold (strict, §7.2)."""

    def __init__(self, model: DecoderExitModel, threshold: float):
        self.model, self.threshold = model, threshold
        self.exit_points = tuple(range(1, model.num_layers))
        d = model.backbone.hidden_size
        self.extra_macs = 2.0 * d + d * (model.config.policy_hidden + 1 if model.config.policy == "mlp" else 1)

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        return {}

    def decide(self, layer: int, step: int, view: LayerView, state: RuleState) -> torch.Tensor:
        return torch.sigmoid(self.model.policy_logits(layer, view.hidden).float()) > self.threshold


class ConsistentEEDecoder:
    """The generation half of `consistentee` (the registry's ConsistentEE dispatches to it by task kind)."""

    def __init__(self, **overrides):
        self.config = ConsistentEEDecoderConfig(**overrides)
        self.model: DecoderExitModel | None = None
        self._layer_steps = 0  # eps-greedy's t

    def attach(self, backbone, task) -> DecoderExitModel:
        self.model = DecoderExitModel(backbone, self.config)
        return self.model

    # ---- training -----------------------------------------------------------------------------------
    @staticmethod
    def can_exit(labels: torch.Tensor) -> torch.Tensor:
        """(B, S) bool: positions holding a response token. Only they may exit: at inference the prompt is
        prefilled at full depth (and its last position gives the first response token), so a prompt position
        that exited in training would show later positions keys/values they never see."""
        return labels != -100

    def scored_positions(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, S) bool: up to `positions_per_sequence` positions t per row that may exit and whose next token
        t+1 is a response token, drawn at random (the state at t predicts labels[t + 1])."""
        valid = self.can_exit(labels)
        valid[:, :-1] &= labels[:, 1:] != -100
        valid[:, -1] = False
        scores = torch.where(valid, torch.rand(labels.shape, device=labels.device), torch.full_like(labels, -1.0, dtype=torch.float))
        keep = min(self.config.positions_per_sequence, labels.shape[1])
        threshold = scores.topk(keep, dim=1).values[:, -1:]
        return valid & (scores >= threshold)

    @staticmethod
    def next_tokens(labels: torch.Tensor) -> torch.Tensor:
        """(B, S) the label of position t + 1 at t (-100 at the last position)."""
        return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)

    def stage1_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """sum_l l CE(head_l) / sum_l l over layers 1..L at the scored positions (layer L's head is frozen: its
        term is a constant, kept so that the loss is the formula's)."""
        model, last = self.model, self.model.num_layers
        chosen = self.scored_positions(batch["labels"])
        targets = self.next_tokens(batch["labels"])[chosen]
        with torch.no_grad():
            states = model.backbone.forward_states(batch["input_ids"], batch["attention_mask"])
        loss = sum(layer * F.cross_entropy(model.head_logits(layer, hidden[chosen]).float(), targets)
                   for layer, hidden in states)
        return loss / (last * (last + 1) / 2), {}

    def _decide(self, policy_logits: torch.Tensor, rollouts: int) -> torch.Tensor:
        """(K*B, S) exit actions at one layer from its policy logits."""
        probs = torch.sigmoid(policy_logits)
        if self.config.rollout_policy == "bernoulli":
            actions = torch.bernoulli(probs).bool()
        else:
            epsilon = self.config.eps_start * math.exp(-self._layer_steps / self.config.eps_decay_steps)
            self._layer_steps += 1
            explore = torch.rand_like(probs) < epsilon
            actions = torch.where(explore, torch.rand_like(probs) < 0.5, probs > 0.5)
        if self.config.force_full_depth_first_rollout:
            actions[: len(actions) // rollouts] = False
        return actions

    def rollouts(self, batch, train_policy: bool) -> dict[str, torch.Tensor]:
        """K replicas of the batch run layer by layer with state copying. Returns, per scored position of every
        replica (k-major, so `group_advantage` groups a position's K replicas): exit_layer, log_prob (length-
        normalised if configured), states (the exit states), targets; and `chosen` (B, S)."""
        model, backbone, K, last = self.model, self.model.backbone, self.config.num_rollouts, self.model.num_layers
        chosen = self.scored_positions(batch["labels"])
        ids, mask = batch["input_ids"].repeat(K, 1), batch["attention_mask"].repeat(K, 1)
        may_exit = self.can_exit(batch["labels"]).repeat(K, 1)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            hidden = backbone.embed(ids)
            cos, sin = backbone.rotary(hidden, positions)
            bias = causal_bias(mask, mask, 0, hidden.dtype)
        exited = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        policy_logits, actions = [], []
        for layer in range(1, last + 1):
            with torch.no_grad():
                new = backbone.layer(layer, hidden, cos, sin, bias)
                hidden = torch.where(exited[..., None], hidden, new)  # an exited position keeps h_e upward
            with torch.set_grad_enabled(train_policy):
                logits = model.policy_logits(layer, hidden)
            act = self._decide(logits.detach(), K) if layer < last else torch.zeros_like(exited)
            act &= may_exit & ~exited
            exited |= act
            policy_logits.append(logits)
            actions.append(act)
        scored = chosen.repeat(K, 1)
        exit_layer, log_prob = trajectory(torch.stack(policy_logits, -1)[scored], torch.stack(actions, -1)[scored])
        if self.config.length_normalise:
            log_prob = log_prob / exit_layer
        return {"exit_layer": exit_layer, "log_prob": log_prob, "states": hidden[scored],
                "targets": self.next_tokens(batch["labels"]).repeat(K, 1)[scored], "chosen": chosen}

    def exit_cross_entropy(self, states: torch.Tensor, exit_layer: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(n,) CE of each position's exit-layer head on its exit state."""
        ce = torch.zeros(len(states), device=states.device)
        for layer in exit_layer.unique().tolist():
            rows = exit_layer == layer
            ce = ce.index_put((rows.nonzero().squeeze(1),), F.cross_entropy(
                self.model.head_logits(layer, states[rows]).float(), targets[rows], reduction="none"))
        return ce

    @torch.no_grad()
    def memorized_layers(self, batch, chosen: torch.Tensor) -> torch.Tensor:
        """(n,) m of each scored position (§4.1 per token: heads 1..L on full-depth states, reference next token)."""
        targets = self.next_tokens(batch["labels"])[chosen]
        states = self.model.backbone.forward_states(batch["input_ids"], batch["attention_mask"])
        predictions = torch.stack([self.model.head_logits(layer, hidden[chosen]).argmax(-1) for layer, hidden in states], 1)
        return memorized_layer(predictions, targets)

    def policy_stage_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        config, K = self.config, self.config.num_rollouts
        rollout = self.rollouts(batch, train_policy=True)
        with torch.no_grad():
            ce = self.exit_cross_entropy(rollout["states"], rollout["exit_layer"], rollout["targets"])
            weighted = config.hardness_weighting and config.alpha > 0
            memorized = self.memorized_layers(batch, rollout["chosen"]).repeat(K) if weighted else ce.new_zeros(len(ce))
        rewards = reward(ce, rollout["exit_layer"], memorized, config.alpha, self.model.num_layers, weighted)
        loss = -(group_advantage(rewards, K) * rollout["log_prob"]).mean()
        return loss, {"rollout_exit_layer": rollout["exit_layer"].float().mean().item(), "reward": rewards.mean().item()}

    def head_stage_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            rollout = self.rollouts(batch, train_policy=False)
        ce = self.exit_cross_entropy(rollout["states"], rollout["exit_layer"], rollout["targets"])
        return ce.mean(), {"rollout_exit_layer": rollout["exit_layer"].float().mean().item()}

    def fit(self, trainer: Trainer) -> None:
        model, config = self.model, self.config
        if config.backbone_init == "calm-anytime":  # the network CALM exits from; heads start from its LM head
            from eebench.methods.calm import anytime_stage

            anytime_stage(trainer, model.backbone, config.anytime_exits_per_step)
            model.copy_lm_head_into_heads()
        backbone_trainable = {p: p.requires_grad for p in model.backbone.parameters()}
        for parameter in backbone_trainable:  # frozen from here on, as released (the heads are new modules)
            parameter.requires_grad_(False)
        policies = list(model.policies.parameters())
        stage1 = {k: v for k, v in asdict(config).items()
                  if k.startswith(("head", "stage1", "positions", "backbone_init", "anytime"))}
        trainer.cached("consistentee-decoder-stage1", stage1, lambda: self._train_heads(
            trainer, self.stage1_loss, "stage1: exit heads, CE weighted by layer", config.stage1_epochs, config.stage1_lr))
        trainer.train(policies, self.policy_stage_loss, stage="stage2: policies (REINFORCE, K replicas per sequence)",
                      epochs=config.stage2_epochs, lr=config.stage2_lr)
        self._train_heads(trainer, self.head_stage_loss, "stage3: exit heads at each token's exit layer",
                          config.stage3_epochs, config.stage3_lr)
        for parameter, trainable in backbone_trainable.items():
            parameter.requires_grad_(trainable)

    def _train_heads(self, trainer: Trainer, loss, stage: str, epochs: float, lr: float) -> None:
        """One stage on the exit heads: through merged-after-the-stage LoRA on copied heads (the release), or the
        parameters themselves (lowrank adapters; head_training="full")."""
        config = self.config
        if config.heads == "copied" and config.head_training == "lora":
            from eebench.lora import lora_adapters

            with lora_adapters(self.model, r"heads\.\d+", config.head_rank, config.head_alpha,
                               config.head_dropout) as adapters:
                trainer.train(adapters, loss, stage=stage, epochs=epochs, lr=lr)
        else:
            trainer.train(self.model.heads.parameters(), loss, stage=stage, epochs=epochs, lr=lr)

    # ---- inference ----------------------------------------------------------------------------------
    def knobs(self, task, num_layers: int) -> list[Knob]:
        return [{"alpha": self.config.alpha, "exit_threshold": t} for t in sorted(self.config.exit_thresholds, reverse=True)]

    def generate(self, batch: PromptBatch, knob: Knob | None):
        limits: DecodeLimits = batch.limits
        if knob is None:
            return decode(self.model.backbone, batch.input_ids, batch.attention_mask, limits)
        return decode(self.model.backbone, batch.input_ids, batch.attention_mask, limits,
                      rule=PolicyExitRule(self.model, float(knob["exit_threshold"])), propagation=self.config.propagation,
                      head=self.model.head_logits)

    def training_signature(self) -> dict:
        settings = asdict(self.config)
        for inference_only in ("exit_thresholds", "propagation"):
            settings.pop(inference_only)
        return {"recipe": "consistentee-decoder", **settings}
