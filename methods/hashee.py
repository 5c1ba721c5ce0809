"""HashEE (Sun et al., Findings of ACL 2022): token-level early exit decided by a hash of the token id.

Spec: ../shared/docs/methods/hashee.md. No learned exit and no internal classifiers: a lookup table built
once from the training data sends every vocabulary id to a bucket e; a token of bucket e is updated by the
first e - 1 layers, then its state is frozen but stays a key/value for the tokens still running
(`EncoderBackbone.layer_for_positions`). Special and unseen ids run every layer. One head (pooler + dropout
+ linear) reads the top layer. Training is plain fine-tuning with the hashed exits in the forward pass, so
each trade-off point (max_layer m, num_buckets B, hash) is its own fine-tune: a suite sweeps them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from eebench.methods.exits import ExitHead, exit_loss
from eebench.methods.protocol import Batch, ExitOutput, Knob, Trainer

HASHES = ("frequency", "mi", "cluster", "random-cons", "random-incons")


@dataclass
class HashEEConfig:
    num_buckets: int = 6                  # B
    max_layer: int | None = None          # m; a token of bucket e runs e - 1 layers. Default L + 1 (no truncation)
    hash: str = "frequency"               # see HASHES
    seed: int = 0                         # random-* hashes and the k-means of `cluster`


def bucket_table(ranked_ids: list[int], vocab_size: int, num_buckets: int, max_layer: int) -> torch.Tensor:
    """Buckets (vocab_size,) int64 from ids ranked best-first (spec 2.1): buckets of floor(V/B) distinct ids,
    starting at e = 2 and moving by step = floor((m - 1)/B) while e < m; ids not ranked get e = m."""
    table = torch.full((vocab_size,), max_layer, dtype=torch.long)
    per_bucket = max(1, len(ranked_ids) // num_buckets)
    step = max(1, (max_layer - 1) // num_buckets)
    bucket, filled = 2, 0
    for token_id in ranked_ids:
        table[token_id] = bucket
        filled += 1
        if filled == per_bucket and bucket < max_layer:
            bucket, filled = bucket + step, 0
    return table


def frequency_ranking(id_lists: list[list[int]], special_ids: set[int]) -> list[int]:
    """Distinct non-special ids by descending count (ties: smaller id first, for determinism)."""
    counts = Counter(i for ids in id_lists for i in ids if i not in special_ids)
    return sorted(counts, key=lambda i: (-counts[i], i))


def mutual_information_ranking(id_lists: list[list[int]], labels: list[int], special_ids: set[int]) -> list[int]:
    """Distinct non-special ids by descending MI with a binary label (spec 2.1; p(x), p(x, y) over token
    occurrences, p(y) over examples)."""
    if set(labels) - {0, 1}:
        raise ValueError("hash='mi' needs binary labels (the spec's formula); use hash='frequency'")
    joint: Counter = Counter()
    for ids, label in zip(id_lists, labels, strict=True):
        joint.update((i, label) for i in ids if i not in special_ids)
    total = sum(joint.values())
    p_label = {y: labels.count(y) / len(labels) for y in (0, 1)}
    marginal: Counter = Counter()
    for (i, _), count in joint.items():
        marginal[i] += count
    scores = {}
    for i, count in marginal.items():
        p_x = count / total
        scores[i] = sum((joint[(i, y)] / total) * math.log((joint[(i, y)] / total) / (p_x * p_label[y]) + 1e-6)
                        for y in (0, 1) if p_label[y] > 0)
    return sorted(scores, key=lambda i: (-scores[i], i))


def cluster_buckets(embeddings: torch.Tensor, num_buckets: int, max_layer: int, special_ids: set[int],
                    seed: int) -> torch.Tensor:
    """k-means (k-means++, n_init 40) over the word-embedding matrix; clusters ordered by the ascending sum of
    their members' L2 norms get e = 2, 2 + step, ... (spec 2.1)."""
    from sklearn.cluster import KMeans

    vectors = embeddings.detach().float().cpu().numpy()
    assignment = KMeans(num_buckets, init="k-means++", n_init=40, max_iter=300, random_state=seed).fit_predict(vectors)
    norms = np.linalg.norm(vectors, axis=1)
    order = np.argsort([norms[assignment == c].sum() for c in range(num_buckets)], kind="stable")
    step = max(1, (max_layer - 1) // num_buckets)
    bucket_of_cluster = {int(c): 2 + rank * step for rank, c in enumerate(order)}
    table = torch.tensor([bucket_of_cluster[int(c)] for c in assignment], dtype=torch.long)
    table[list(special_ids)] = max_layer
    return table


class HashEE:
    """Token-level exits from a fixed hash of token ids; one head on the top layer; plain fine-tuning."""

    name = "hashee"
    granularity = "token"
    task_kinds = frozenset({"classification", "regression"})
    knob_names = ("num_buckets", "max_layer", "hashed")

    def __init__(self, **overrides):
        self.config = HashEEConfig(**overrides)
        if self.config.hash not in HASHES:
            raise ValueError(f"unknown hash {self.config.hash!r}; choose one of {', '.join(HASHES)}")
        self.task_kind = "classification"

    def attach(self, backbone, task) -> nn.Module:
        L = backbone.num_layers
        self.max_layer = self.config.max_layer or L + 1
        if self.max_layer != L + 1:
            raise ValueError(f"max_layer={self.max_layer} would truncate the {L}-layer backbone; eebench compares "
                             f"every method against the whole backbone, so use max_layer={L + 1} (the default)")
        config = backbone.model.config
        model = nn.Module()
        model.backbone = backbone
        model.head = ExitHead(backbone.pooler, backbone.hidden_size, task.num_labels, config.hidden_dropout_prob,
                              config.initializer_range)
        # bucket per vocabulary id, built in `fit` from the training data; saved with the weights.
        model.register_buffer("buckets", torch.full((config.vocab_size,), self.max_layer, dtype=torch.long))
        self.model, self.task_kind = model, task.kind
        self.special_ids = set(backbone.tokenizer.all_special_ids)
        return model

    # ---- the hash ------------------------------------------------------------------------------------
    def build_table(self, trainer: Trainer) -> torch.Tensor:
        config, vocab_size = self.config, self.model.buckets.numel()
        if config.hash == "cluster":
            embeddings = self.model.backbone.model.embeddings.word_embeddings.weight
            return cluster_buckets(embeddings, config.num_buckets, self.max_layer, self.special_ids, config.seed)
        if config.hash.startswith("random"):
            generator = torch.Generator().manual_seed(config.seed)
            step = max(1, (self.max_layer - 1) // config.num_buckets)
            table = 2 + step * torch.randint(0, config.num_buckets, (vocab_size,), generator=generator)
            table[list(self.special_ids)] = self.max_layer
            return table
        id_lists, labels = [], []
        for batch in trainer.batches(shuffle=False):  # train only: the release also counts dev (a leak)
            for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True):
                id_lists.append([i for i, keep in zip(ids, mask, strict=True) if keep])
            labels.extend(int(y) for y in batch["labels"].tolist())
        if config.hash == "mi":
            ranked = mutual_information_ranking(id_lists, labels, self.special_ids)
        else:
            ranked = frequency_ranking(id_lists, self.special_ids)
        return bucket_table(ranked, vocab_size, config.num_buckets, self.max_layer)

    def token_depths(self, batch: Batch) -> torch.Tensor:
        """(B, S) layers each token runs: bucket - 1, capped at L; 0 at padding. `random-incons` draws a
        bucket per occurrence from a fixed function of (id, position), so a prediction never depends on the
        batch (the release draws fresh ones; this keeps runs reproducible)."""
        ids, L = batch["input_ids"], self.max_layer - 1
        buckets = self.model.buckets[ids]
        if self.config.hash == "random-incons":
            positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
            mixed = (ids * 1_000_003 + positions * 7_919 + self.config.seed) % self.config.num_buckets
            step = max(1, (self.max_layer - 1) // self.config.num_buckets)
            special = torch.isin(ids, torch.tensor(sorted(self.special_ids), device=ids.device))
            buckets = torch.where(special, torch.full_like(ids, self.max_layer), 2 + step * mixed)
        depths = (buckets - 1).clamp(max=L)
        return depths * batch["attention_mask"].long()

    # ---- forward, training, inference -----------------------------------------------------------------
    def forward(self, batch: Batch, hashed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits (B, C), token depths (B, S). Layer l updates the tokens whose depth >= l."""
        backbone, mask = self.model.backbone, batch["attention_mask"]
        depths = self.token_depths(batch) if hashed else mask.long() * backbone.num_layers
        hidden, bias = backbone.embed(batch["input_ids"], mask, batch.get("token_type_ids"))
        for layer in range(1, backbone.num_layers + 1):
            active = depths >= layer
            if bool((active == mask.bool()).all()):  # nobody has left: the plain (faster) layer
                hidden = backbone.layer(layer, hidden, bias)
            else:
                hidden = backbone.layer_for_positions(layer, hidden, bias, active)
        return self.model.head(backbone.summarize(hidden, mask)), depths

    def fit(self, trainer: Trainer) -> None:
        self.model.buckets.copy_(self.build_table(trainer))
        kind = self.task_kind
        trainer.train(self.model.parameters(), lambda batch: exit_loss(self.forward(batch)[0], batch["labels"], kind),
                      stage=f"fine-tune with {self.config.hash}-hashed token exits")

    def knobs(self, task, num_layers: int) -> list[Knob]:
        point = {"num_buckets": self.config.num_buckets, "max_layer": self.max_layer}
        return [{**point, "hashed": 0}, {**point, "hashed": 1}]  # hashed = 0: every token to the top

    def predict(self, batch: Batch, knob: Knob | None) -> ExitOutput:
        hashed = knob is not None and bool(knob["hashed"])
        logits, depths = self.forward(batch, hashed)
        size = logits.shape[0]
        head_macs = torch.full((size,), float(self.model.head.macs()), dtype=torch.float64, device=logits.device)
        exit_layer = depths.amax(dim=1).clamp(min=1)
        # Exited tokens stay keys/values: every real token is a key in every layer the example runs.
        return ExitOutput(logits=logits, exit_layer=exit_layer, head_macs=head_macs,
                          token_layers=depths if hashed else None)

    def training_signature(self) -> dict:
        return {"recipe": "hashee", "num_buckets": self.config.num_buckets, "max_layer": self.config.max_layer,
                "hash": self.config.hash, "seed": self.config.seed}
