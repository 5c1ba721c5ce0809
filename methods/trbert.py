"""TR-BERT (Ye et al., NAACL 2021): at two fixed depths a policy keeps or drops each token for good.

Spec: ../shared/docs/methods/trbert.md (classification). After layer 1 and after layer L/2 a selector
MLP(d -> 32 -> 1) + sigmoid gives P(keep) per token; dropped tokens leave the computation (neither queries
nor keys; `eebench.backbones.keep_positions`), [CLS] is always kept. Training: (1) plain fine-tuning;
(2) token importance |<dCE/dh_ref, h_ref - h_b>| from the stage-1 model; (3) REINFORCE on the selectors only,
K rollouts, per-example mean baseline, reward -CE - alpha * (1/2) sum_k kept_k / N, the first rollout replaced
by the importance "expert" during the first guide_rate of the steps; (4) the stage-1 model's logits as
teacher; (5) everything jointly: soft CE to the teacher over K sampled rollouts + the RL loss.
Inference keeps a token when P(keep) >= 0.5, per example (the release keeps the batch maximum per row).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eebench.backbones import attention_bias, keep_positions
from eebench.methods.consistentee import group_advantage, policy_net
from eebench.methods.exits import ExitHead
from eebench.methods.protocol import Batch, ExitOutput, Knob, Trainer


@dataclass
class TRBERTConfig:
    alpha: float = 1.0                 # length penalty; the trade-off knob (one RL + joint training per value)
    num_rollouts: int = 8              # K
    guide_rate: float = 0.5            # fraction of RL steps whose rollout 0 is the importance expert
    penalty_length: int | None = 128   # N in kept/N: the padded training length (pitfall 4); None = real length
    importance_layer: int | None = None  # h_ref; default 3L/4 (BERT-base: 9), L - 1 for L <= 6 (DistilBERT: 5)
    rl_epochs: float = 1.0             # the release: 3 and 3; one each fits the CPU suites
    joint_epochs: float = 1.0
    rl_lr: float = 3e-5
    joint_lr: float = 3e-5
    policy_hidden: int = 32
    # Inference: keep iff P(keep) >= 0.5 (the paper). Other values are an eebench extension.
    keep_thresholds: tuple[float, ...] = (0.5,)


class TRBERT:
    """Two learned token-drop points; RL with an importance expert, then joint training with distillation."""

    name = "trbert"
    granularity = "token"
    task_kinds = frozenset({"classification"})
    knob_names = ("alpha", "keep_threshold")

    def __init__(self, **overrides):
        self.config = TRBERTConfig(**overrides)
        if self.config.num_rollouts < 2:
            raise ValueError(f"num_rollouts must be >= 2 (the baseline is their mean), got {self.config.num_rollouts}")
        self.importance: dict[int, list[torch.Tensor]] = {}  # example index -> [(S,) scores per selection point]
        self.teacher: dict[int, torch.Tensor] = {}           # example index -> (C,) stage-1 logits
        self._rl_step, self._guided_steps = 0, 0

    def attach(self, backbone, task) -> nn.Module:
        config, d, L = backbone.model.config, backbone.hidden_size, backbone.num_layers
        if L < 4:
            raise ValueError(f"TR-BERT selects after layers 1 and L/2: it needs L >= 4, the backbone has {L}")
        self.selection_layers = (1, L // 2)
        self.reference_layer = self.config.importance_layer or (L - 1 if L <= 6 else 3 * L // 4)
        model = nn.Module()
        model.backbone = backbone
        model.head = ExitHead(backbone.pooler, d, task.num_labels, config.hidden_dropout_prob, config.initializer_range)
        model.selectors = nn.ModuleList(policy_net(d, self.config.policy_hidden, config.initializer_range)
                                        for _ in self.selection_layers)
        self.model = model
        return model

    # ---- the forward pass with token selection ------------------------------------------------------
    def run(self, batch: Batch, choose=None, backbone_grad: bool = True) -> dict:
        """choose(point k, keep_logits (B, S), present mask (B, S), original positions (B, S)) -> keep (B, S) bool;
        None = no selection (the plain model). Returns logits (B, C), token_layers (B, S0) (layers each original
        token ran; 0 at padding), and per point the keep logits, present mask and decision (for the
        log-probability). backbone_grad=False runs backbone and head without autograd (stage 3: frozen)."""
        backbone, mask0 = self.model.backbone, batch["attention_mask"]
        track = backbone_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(track):
            hidden, bias = backbone.embed(batch["input_ids"], mask0, batch.get("token_type_ids"))
        mask = mask0
        positions = torch.arange(mask0.shape[1], device=mask0.device).expand_as(mask0)
        token_layers = mask0.long() * backbone.num_layers
        trace = []
        for layer in range(1, backbone.num_layers + 1):
            with torch.set_grad_enabled(track):
                hidden = backbone.layer(layer, hidden, bias)
            if choose is None or layer not in self.selection_layers or hidden.shape[1] <= 1:
                continue
            k = self.selection_layers.index(layer)
            keep_logits = self.model.selectors[k](hidden).squeeze(-1)
            keep = (choose(k, keep_logits, mask, positions) | (positions == 0)) & mask.bool()  # [CLS] always kept
            dropped = mask.bool() & ~keep
            current = token_layers.gather(1, positions)
            token_layers = token_layers.scatter(1, positions, torch.where(dropped, torch.full_like(current, layer), current))
            trace.append({"logits": keep_logits, "present": mask.bool(), "keep": keep})
            hidden, mask, positions = keep_positions(hidden, mask, keep, positions)
            bias = attention_bias(mask, hidden.dtype)
        with torch.set_grad_enabled(track):
            logits = self.model.head(backbone.summarize(hidden, mask))
        return {"logits": logits, "token_layers": token_layers * mask0.long(), "trace": trace}

    def selector_macs(self, trace: list[dict]) -> torch.Tensor:
        """(B,) MACs of the selectors: each runs on the tokens present at its point (the release charges kept)."""
        per_token = sum(m.in_features * m.out_features for m in self.model.selectors[0].modules() if isinstance(m, nn.Linear))
        return sum(point["present"].sum(1).double() for point in trace) * per_token

    # ---- training -----------------------------------------------------------------------------------
    def log_likelihood(self, trace: list[dict]) -> torch.Tensor:
        """(R,) sum over points of the mean log-probability of the actions over the tokens present ([CLS] included)."""
        total = 0.0
        for point in trace:
            log_p = torch.where(point["keep"], F.logsigmoid(point["logits"]), F.logsigmoid(-point["logits"]))
            present = point["present"].float()
            total = total + (log_p * present).sum(1) / present.sum(1).clamp_min(1.0)
        return total

    def length_penalty(self, trace: list[dict], batch: Batch) -> torch.Tensor:
        """(R,) Delta L = (1/2) sum_k kept_k / N, N = the padded training length or the real length."""
        real = batch["attention_mask"].sum(1).float()
        length = real if self.config.penalty_length is None else torch.full_like(real, float(self.config.penalty_length))
        return 0.5 * sum(point["keep"].sum(1).float() for point in trace) / length

    def _replicate(self, batch: Batch) -> dict:
        K = self.config.num_rollouts
        return {key: torch.cat([value] * K) if torch.is_tensor(value) else value for key, value in batch.items()}

    def _sampler(self, expert_rows: int, index: torch.Tensor):
        """Bernoulli actions; the first `expert_rows` rows (rollout 0) keep their top round(sum p) tokens by importance."""
        def choose(k, keep_logits, present, positions):
            probs = torch.sigmoid(keep_logits) * present
            keep = torch.bernoulli(probs.detach()).bool()
            if expert_rows:
                scores = self._importance_at(k, positions[:expert_rows], index[:expert_rows])
                scores = scores.masked_fill(~present[:expert_rows].bool(), -math.inf)
                wanted = probs[:expert_rows].detach().sum(1).round().long().clamp(min=1)
                rank = scores.argsort(1, descending=True).argsort(1)
                keep[:expert_rows] = rank < wanted[:, None]
            return keep
        return choose

    def _importance_at(self, k: int, positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        rows = []
        for i, pos in zip(index.tolist(), positions, strict=True):
            scores = self.importance[i][k].to(pos.device)
            rows.append(scores[pos.clamp(max=len(scores) - 1)])
        return torch.stack(rows)

    def rollout_loss(self, batch: Batch, joint: bool):
        """Stage 3 (joint=False: CE, expert early on) or stage 5 (joint=True: soft CE to the teacher)."""
        K = self.config.num_rollouts
        size = batch["labels"].shape[0]
        replicated = self._replicate(batch)
        guided = not joint and self._rl_step < self._guided_steps
        self._rl_step += 0 if joint else 1
        out = self.run(replicated, self._sampler(size if guided else 0, replicated["index"]), backbone_grad=joint)
        if joint:
            teacher = torch.stack([self.teacher[i] for i in replicated["index"].tolist()]).to(out["logits"].device)
            task_loss = -(F.softmax(teacher, -1) * F.log_softmax(out["logits"], -1)).sum(-1)
        else:
            task_loss = F.cross_entropy(out["logits"], replicated["labels"], reduction="none")
        penalty = self.length_penalty(out["trace"], replicated)
        rewards = -task_loss.detach() - self.config.alpha * penalty
        rl_loss = (group_advantage(rewards, K) * -self.log_likelihood(out["trace"])).mean()
        loss = task_loss.mean() + rl_loss if joint else rl_loss
        kept = out["trace"][-1]["keep"].sum(1).float() / replicated["attention_mask"].sum(1).float()
        return loss, {"kept_fraction": float(kept.mean()), "reward": float(rewards.mean())}

    def compute_importance(self, trainer: Trainer) -> int:
        """Stage 2 with the stage-1 model (eval mode): per example and selection point, per original position,
        |<g, h_ref - h_b>| with g = dCE/dh_ref. Returns the number of batches (steps per epoch)."""
        backbone, model = self.model.backbone, self.model
        model.eval()
        steps = 0
        for batch in trainer.batches(shuffle=False):
            steps += 1
            mask = batch["attention_mask"]
            hidden, bias = backbone.embed(batch["input_ids"], mask, batch.get("token_type_ids"))
            states = {}
            for layer in range(1, backbone.num_layers + 1):
                hidden = backbone.layer(layer, hidden, bias)
                states[layer] = hidden
            loss = F.cross_entropy(model.head(backbone.summarize(hidden, mask)), batch["labels"], reduction="sum")
            (grad,) = torch.autograd.grad(loss, states[self.reference_layer])
            reference = states[self.reference_layer].detach()
            for row, i in enumerate(batch["index"].tolist()):
                n = int(mask[row].sum())
                self.importance[i] = [(grad[row, :n] * (reference[row, :n] - states[b][row, :n].detach())).sum(-1).abs().cpu()
                                      for b in self.selection_layers]
        return steps

    @torch.no_grad()
    def compute_teacher(self, trainer: Trainer) -> None:
        self.model.eval()
        for batch in trainer.batches(shuffle=False):
            logits = self.run(batch)["logits"]
            for i, z in zip(batch["index"].tolist(), logits.cpu(), strict=True):
                self.teacher[i] = z

    def fit(self, trainer: Trainer) -> None:
        model, config = self.model, self.config
        task_params = [*model.backbone.parameters(), *model.head.parameters()]

        def full_loss(batch: Batch) -> torch.Tensor:
            return F.cross_entropy(self.run(batch)["logits"], batch["labels"])

        trainer.cached("trbert-stage1", {"recipe": "plain-fine-tune"},
                       lambda: trainer.train(task_params, full_loss, stage="stage1: plain fine-tuning"))
        steps_per_epoch = self.compute_importance(trainer)
        self.compute_teacher(trainer)
        self._guided_steps = int(config.guide_rate * math.ceil(config.rl_epochs * steps_per_epoch))
        selector_params = list(model.selectors.parameters())
        trainer.train(selector_params, lambda b: self.rollout_loss(b, joint=False), stage="stage3: RL on the selectors",
                      epochs=config.rl_epochs, lr=config.rl_lr)
        trainer.train(model.parameters(), lambda b: self.rollout_loss(b, joint=True),
                      stage="stage5: joint, distillation + RL", epochs=config.joint_epochs, lr=config.joint_lr)

    # ---- inference ----------------------------------------------------------------------------------
    def knobs(self, task, num_layers: int) -> list[Knob]:
        # keep_threshold 0 keeps every token (P >= 0 always): the full model comes first.
        thresholds = sorted({0.0, *self.config.keep_thresholds})
        return [{"alpha": self.config.alpha, "keep_threshold": t} for t in thresholds]

    def predict(self, batch: Batch, knob: Knob | None) -> ExitOutput:
        if knob is None:  # the full model: no selector evaluated, every token through every layer
            out = self.run(batch)
        else:
            threshold = float(knob["keep_threshold"])
            out = self.run(batch, lambda k, z, present, pos: torch.sigmoid(z) >= threshold)
        size = out["logits"].shape[0]
        head_macs = torch.full((size,), float(self.model.head.macs()), dtype=torch.float64, device=out["logits"].device)
        if knob is None:
            return ExitOutput(out["logits"], batch["attention_mask"].new_full((size,), self.model.backbone.num_layers),
                              head_macs)
        layers = out["token_layers"]
        return ExitOutput(out["logits"], layers.amax(1), head_macs + self.selector_macs(out["trace"]).to(head_macs.device),
                          token_layers=layers, key_layers=layers)  # dropped tokens are keys no more

    def training_signature(self) -> dict:
        settings = asdict(self.config)
        settings.pop("keep_thresholds")
        return {"recipe": "trbert", **settings}
