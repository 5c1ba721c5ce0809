"""Which state should CALM's shared exit classifier read: the raw residual h_t^i (the paper) or norm(h_t^i)?

    python benchmarks/micro/calm_classifier_input.py --checkpoint $EEBENCH_CACHE/checkpoints/<calm key>.pt

On one anytime-fine-tuned CALM checkpoint of `generation-smollm2` (any calm job's .pt: the backbone is what
matters), states of every layer below L are collected once at random response positions of teacher-forced
Alpaca pairs (train: the suite's 800 training pairs; held out: 100 dev pairs), labelled "argmax at layer i equals
argmax at L", and the same Linear(d, 2) is trained on both inputs with the training stage's loss (class-balanced
CE per layer, mean over layers, AdamW) for the suite's step count and ten times that. Reported: held-out
balanced CE and the pooled AUC of the consistent-class probability, beside the softmax measure's AUC
(top-1 - top-2, which costs an LM head per exit point). Fixed seeds: the same numbers on a rerun.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from eebench.backbones import load_backbone
from eebench.evaluation import evaluator_for
from eebench.methods.calm import CALMConfig, CALMModel, balanced_cross_entropy
from eebench.runner import Job
from eebench.suites import get_suite
from eebench.tasks import get_task, load_split


def collect(model: CALMModel, data, batches: int, positions: int, batch_size: int = 8):
    """{layer: states (n, d)}, {layer: labels (n,)}, {layer: softmax top-1 - top-2 (n,)} at sampled positions."""
    backbone, last = model.backbone, model.num_layers
    states, labels, margins = ({layer: [] for layer in range(1, last)} for _ in range(3))
    pad = backbone.tokenizer.pad_token_id
    with torch.no_grad():
        for start in range(0, min(len(data), batches * batch_size), batch_size):
            batch = data.collate(list(range(start, min(len(data), start + batch_size))), pad, torch.device("cpu"))
            every = dict(backbone.forward_states(batch["input_ids"], batch["attention_mask"]))
            valid = (batch["labels"][:, 1:] != -100).nonzero()
            chosen = valid[torch.randperm(len(valid))[:positions]]
            top = backbone.logits(every[last][:, :-1][chosen[:, 0], chosen[:, 1]]).argmax(-1)
            for layer in states:
                hidden = every[layer][:, :-1][chosen[:, 0], chosen[:, 1]]
                probs = F.softmax(backbone.logits(hidden).float(), dim=-1)
                top2 = probs.topk(2, dim=-1).values
                states[layer].append(hidden)
                labels[layer].append((probs.argmax(-1) == top).long())
                margins[layer].append(top2[:, 0] - top2[:, 1])
    return [{layer: torch.cat(v[layer]) for layer in v} for v in (states, labels, margins)]


def load_calm_on_alpaca(checkpoint: str | None, backbone: str | None):
    """(CALMModel in eval mode, an Alpaca Job, the generation-smollm2 suite, the alpaca TaskSpec) for a calm .pt
    of that suite (None: the backbone as shipped)."""
    suite, spec = get_suite("generation-smollm2"), get_task("alpaca")
    backbone_name = backbone or suite.backbone
    model = CALMModel(load_backbone(backbone_name))
    if checkpoint:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    return model, Job(method="calm", task="alpaca", seed=0, backbone=backbone_name, train=suite.train), suite, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a calm .pt (default: the backbone as shipped, for a smoke run)")
    parser.add_argument("--backbone", help="default: the suite's (smollm2); tiny-llama for a smoke run")
    parser.add_argument("--train-batches", type=int, default=50, help="batches of 8 training pairs (the suite's 800)")
    parser.add_argument("--test-batches", type=int, default=13, help="batches of 8 dev pairs (100)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--positions", type=int, default=256, help="positions per layer per training step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, job, suite, spec = load_calm_on_alpaca(args.checkpoint, args.backbone)
    encode = evaluator_for(spec).encode_train
    train = encode(load_split(spec, "train", suite.data_dir, suite.train_limit, 0).examples, model.backbone, job, spec)
    dev = encode(load_split(spec, "dev", suite.data_dir, 100, 0).examples, model.backbone, job, spec)
    x_train, y_train, _ = collect(model, train, batches=args.train_batches, positions=128)
    x_test, y_test, margin_test = collect(model, dev, batches=args.test_batches, positions=128)
    layers = list(x_train)
    pooled = torch.cat([y_test[layer] for layer in layers]).numpy()
    softmax_auc = roc_auc_score(pooled, torch.cat([margin_test[layer] for layer in layers]).numpy())
    print(f"positions per layer: {len(y_train[layers[0]])} train, {len(y_test[layers[0]])} held out; "
          f"consistent {pooled.mean():.3f}; softmax top-1 - top-2 pooled AUC {softmax_auc:.3f}")
    print("input   steps  held-out balanced CE  pooled AUC")
    for reads in ("raw", "normed"):
        for steps in args.steps:
            torch.manual_seed(0)
            model.exit_classifier.reset_parameters()
            optimiser = torch.optim.AdamW(model.exit_classifier.parameters(), lr=CALMConfig().classifier_lr)
            for _ in range(steps):
                rows = torch.randint(0, len(y_train[layers[0]]), (args.positions,))
                loss = torch.stack([balanced_cross_entropy(model.classify(x_train[layer][rows], reads), y_train[layer][rows])
                                    for layer in layers]).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            with torch.no_grad():
                ce = torch.stack([balanced_cross_entropy(model.classify(x_test[layer], reads), y_test[layer]) for layer in layers])
                confidence = torch.cat([F.softmax(model.classify(x_test[layer], reads), -1)[:, 1] for layer in layers])
            print(f"{reads:7s} {steps:5d}  {ce.mean().item():20.3f}  {roc_auc_score(pooled, confidence.numpy()):10.3f}")


if __name__ == "__main__":
    main()
