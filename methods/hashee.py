"""HashEE (Sun et al., Findings of ACL 2022): token-level early exit decided by a hash of the token id.

Spec: ../shared/docs/methods/hashee.md. No learned exit and no internal classifiers: a lookup table built
once from the training data sends every vocabulary id to a bucket e; a token of bucket e is updated by the
first e - 1 layers, then its state is frozen but stays a key/value for the tokens still running
(`EncoderBackbone.layer_for_positions`). Special and unseen ids run every layer. One head (pooler + dropout
+ linear) reads the top layer. Training is plain fine-tuning with the hashed exits in the forward pass, so
each trade-off point (max_layer m, num_buckets B, hash) is its own fine-tune: a suite sweeps them.

Three fidelity switches reproduce how the released code (txsun1997/HashEE, utils.py) departs from eebench's
reading of spec 2.1: `mi_counts`, `incons_draws` and `ties` (see HashEEConfig). Their defaults are eebench's
behaviour from before they existed, so stored checkpoints and job ids keep meaning what they meant.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from eebench.methods.exits import ExitHead, exit_loss
from eebench.methods.protocol import Batch, ExitOutput, Knob, Trainer

HASHES = ("frequency", "mi", "cluster", "random-cons", "random-incons")
# Fidelity switches: name -> (eebench's reading = the default, the release's behaviour).
SWITCHES = {"mi_counts": ("all", "skip-first"), "incons_draws": ("id-position", "occurrence"),
            "ties": ("id", "first-seen")}


@dataclass
class HashEEConfig:
    num_buckets: int = 6                  # B
    max_layer: int | None = None          # m; a token of bucket e runs e - 1 layers. Default L + 1 (no truncation)
    hash: str = "frequency"               # see HASHES
    seed: int = 0                         # random-* hashes and the k-means of `cluster`
    # Defaults keep eebench's reading; the other value reproduces the release. Spec 2.1 defines MI over every
    # occurrence, so the release's skip of an id's first occurrence in p(x, y) (singletons get MI 0, many ids
    # negative MI) is a slip, not the reference.
    mi_counts: str = "all"                # "skip-first": the release's counting (hash='mi')
    # Spec 2.1 sends special ids to the top ([CLS] feeds the head); the release's random-incons draws for every
    # occurrence, [CLS]/[SEP] included, so a sentence can be read from a [CLS] frozen after one layer.
    incons_draws: str = "id-position"     # "occurrence": the release's draws (hash='random-incons')
    # The spec leaves ties open; the release's stable sort keeps ids of equal count (or MI) in order of first
    # appearance in the data, eebench puts the smaller id first (independent of data order).
    ties: str = "id"                      # "first-seen": the release's order (hash='frequency' or 'mi')


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


def rank(scores: dict[int, float], ties: str = "id") -> list[int]:
    """Ids by descending score. `scores` is in first-appearance order, so a stable sort on the score alone
    gives the release's tie order ("first-seen"); "id" breaks ties by the smaller id."""
    if ties == "first-seen":
        return sorted(scores, key=lambda i: -scores[i])
    return sorted(scores, key=lambda i: (-scores[i], i))


def frequency_ranking(id_lists: list[list[int]], special_ids: set[int], ties: str = "id") -> list[int]:
    """Distinct non-special ids by descending count (ties: see `rank`)."""
    return rank(Counter(i for ids in id_lists for i in ids if i not in special_ids), ties)


def mutual_information(id_lists: list[list[int]], labels: list[int], special_ids: set[int],
                       counts: str = "all") -> dict[int, float]:
    """MI of every distinct non-special id with a binary label (spec 2.1; p(x), p(x, y) over token occurrences,
    p(y) over examples), in first-appearance order. counts="skip-first": as the release, an id's first
    occurrence enters p(x) but not p(x, y), so a singleton scores 0 and an id spread evenly scores below 0."""
    if set(labels) - {0, 1}:
        raise ValueError("hash='mi' needs binary labels (the spec's formula); use hash='frequency'")
    marginal: Counter = Counter()
    joint: Counter = Counter()
    for ids, label in zip(id_lists, labels, strict=True):
        for i in ids:
            if i in special_ids:
                continue
            if counts == "all" or i in marginal:
                joint[(i, label)] += 1
            marginal[i] += 1
    total = sum(marginal.values())
    p_label = {y: labels.count(y) / len(labels) for y in (0, 1)}
    scores = {}
    for i, count in marginal.items():
        p_x = count / total
        scores[i] = sum((joint[(i, y)] / total) * math.log((joint[(i, y)] / total) / (p_x * p_label[y]) + 1e-6)
                        for y in (0, 1) if p_label[y] > 0)
    return scores


def mutual_information_ranking(id_lists: list[list[int]], labels: list[int], special_ids: set[int],
                               counts: str = "all", ties: str = "id") -> list[int]:
    """Distinct non-special ids by descending MI with a binary label."""
    return rank(mutual_information(id_lists, labels, special_ids, counts), ties)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xor-shift-multiply rounds) on int64 tensors holding values < 2^32. The
    multiplier is < 2^27, so no product leaves int64."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


def id_position_hash(ids: torch.Tensor, positions: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, S) int64 in [0, 2^32): a hash of (token id, position, seed), so that every occurrence gets its own
    draw (spec 2.1's random-incons) while runs stay reproducible and independent of batching. Until this hash,
    the draw was (id * 1000003 + position * 7919 + seed) mod B, which is linear: at B = 6 it is
    (id + 5 * position + seed) mod 6, so an id repeated every 6 positions and neighbours moved in lockstep."""
    return _mix32(_mix32(ids ^ _mix32(torch.tensor(seed & 0xFFFFFFFF))) ^ positions)


def occurrence_buckets(ids: torch.Tensor, mask: torch.Tensor, num_buckets: int, step: int, seed: int) -> torch.Tensor:
    """(B, S) buckets drawn independently for every real token, special ones included (the release's
    random-incons). The release draws once per example when it prepares the data, so an example keeps its
    draws across epochs; here the generator is seeded by the example's own ids, which keeps that, keeps
    predictions independent of batching and padding, and makes runs reproducible (duplicate examples share
    draws)."""
    buckets = torch.zeros(ids.shape, dtype=torch.long)
    for row, (row_ids, row_mask) in enumerate(zip(ids.tolist(), mask.tolist(), strict=True)):
        real = [i for i, keep in zip(row_ids, row_mask, strict=True) if keep]
        rng = np.random.default_rng([seed, zlib.crc32(np.asarray(real, dtype=np.int64).tobytes())])
        buckets[row, torch.tensor(row_mask, dtype=torch.bool)] = torch.from_numpy(
            2 + step * rng.integers(0, num_buckets, len(real)))
    return buckets.to(ids.device)


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
        for name, values in SWITCHES.items():
            if getattr(self.config, name) not in values:
                raise ValueError(f"unknown {name} {getattr(self.config, name)!r}; choose one of {', '.join(values)}")
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
            ranked = mutual_information_ranking(id_lists, labels, self.special_ids, config.mi_counts, config.ties)
        else:
            ranked = frequency_ranking(id_lists, self.special_ids, config.ties)
        return bucket_table(ranked, vocab_size, config.num_buckets, self.max_layer)

    def token_depths(self, batch: Batch) -> torch.Tensor:
        """(B, S) layers each token runs: bucket - 1, capped at L; 0 at padding. `random-incons` with
        incons_draws="id-position" takes a bucket per occurrence from a fixed function of (id, position) and
        sends special ids to the top; "occurrence" draws as the release does (`occurrence_buckets`). Either
        way a prediction never depends on the batch."""
        ids, L = batch["input_ids"], self.max_layer - 1
        buckets = self.model.buckets[ids]
        if self.config.hash == "random-incons":
            step = max(1, (self.max_layer - 1) // self.config.num_buckets)
            if self.config.incons_draws == "occurrence":
                buckets = occurrence_buckets(ids, batch["attention_mask"], self.config.num_buckets, step,
                                             self.config.seed)
            else:
                positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
                mixed = id_position_hash(ids, positions, self.config.seed) % self.config.num_buckets
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
        signature = {"recipe": "hashee", "num_buckets": self.config.num_buckets, "max_layer": self.config.max_layer,
                     "hash": self.config.hash, "seed": self.config.seed}
        # A switch enters the checkpoint key only off its default: keys of checkpoints trained before the
        # switches existed (all at the default) stay as they were.
        signature.update({name: getattr(self.config, name) for name, (default, _) in SWITCHES.items()
                          if getattr(self.config, name) != default})
        if self.config.hash == "random-incons" and self.config.incons_draws == "id-position":
            signature["id_position_draw"] = "hash32"  # not the earlier linear draw's checkpoints
        return signature
