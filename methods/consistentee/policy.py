"""ConsistentEE's policy and reward, the same for both task kinds (classification.py: an example's episode over
layers; generation.py: a token's): the memorized layer m(x), a rollout's exit layer and log-probability, the
hardness-guided reward, the per-example baseline, and the per-layer policy net (spec sections 4, 5 and 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def memorized_layer(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """predictions (N, L) per-layer IC argmax, labels (N,) -> m (N,) in 1..L: the lowest layer from which every
    IC up to L is right; L when layer L itself is wrong (spec 4.1)."""
    num_layers = predictions.shape[1]
    wrong = predictions != labels[:, None]
    # The highest wrong layer w (1-based) -> m = w + 1; no wrong layer -> m = 1; wrong at L -> L.
    layer_index = torch.arange(1, num_layers + 1, device=predictions.device)
    highest_wrong = torch.where(wrong, layer_index, torch.zeros_like(layer_index)).amax(dim=1)
    return (highest_wrong + 1).clamp(max=num_layers)


def trajectory(policy_logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """policy_logits (R, L) (P(exit) = sigmoid), actions (R, L) bool (True = exit) -> exit layer (R,) in 1..L,
    log pi (R,) = sum_{j<e} log(1 - p_j) + log p_e if the rollout exited at e, else sum_{j<=L} log(1 - p_j)."""
    num_layers = policy_logits.shape[1]
    exited = actions.any(dim=1)
    first = actions.float().argmax(dim=1)  # first True (0-based); 0 when none, masked by `exited` below
    exit_layer = torch.where(exited, first + 1, torch.full_like(first, num_layers))
    log_continue = F.logsigmoid(-policy_logits)  # log(1 - p), stable for large logits
    before_exit = torch.arange(num_layers, device=policy_logits.device)[None, :] < (exit_layer - 1)[:, None]
    last = (exit_layer - 1)[:, None]
    final_step = torch.where(exited, F.logsigmoid(policy_logits).gather(1, last).squeeze(1),
                             log_continue.gather(1, last).squeeze(1))
    return exit_layer, (log_continue * before_exit).sum(dim=1) + final_step


def reward(cross_entropy: torch.Tensor, exit_layer: torch.Tensor, memorized: torch.Tensor, alpha: float,
           num_layers: int, hardness_weighting: bool) -> torch.Tensor:
    """R = -CE - alpha * (1 - m/L) * e (or -CE - alpha * e without hardness weighting); all (R,), e and m 1-based."""
    easiness = 1.0 - memorized.float() / num_layers if hardness_weighting else torch.ones_like(cross_entropy)
    return -cross_entropy - alpha * easiness * exit_layer.float()


def group_advantage(rewards: torch.Tensor, num_rollouts: int) -> torch.Tensor:
    """rewards (K*B,), rollout k of example i at k*B + i -> R - mean_k R of the same example (no scaling)."""
    grouped = rewards.view(num_rollouts, -1)
    return (grouped - grouped.mean(dim=0, keepdim=True)).view(-1)


def policy_net(hidden_size: int, width: int, init_std: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))
    for linear in (net[0], net[2]):  # BERT init: P(exit) ~ 0.5 before training
        nn.init.normal_(linear.weight, std=init_std)
        nn.init.zeros_(linear.bias)
    return net
