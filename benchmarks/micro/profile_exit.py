"""Where does early exit's wall-clock go? A profile of the per-layer overhead on real dev examples.

    python benchmarks/micro/profile_exit.py --task sst2 --data-dir ../shared/data/glue --examples 64

Times, interleaved on the same examples (medians of --repeats rounds), at each batch size:
  full          the full model: embeddings, L layers, the final head;
  layers-only   the same L layers with nothing else, the floor any early-exit method can reach at no exit;
  no-exit       `early_exit` with DeeBERT-style heads and an entropy rule that never fires (threshold 0):
                every head, every decision, every host sync, and no saving; no-exit / full is the overhead
                a point that exits nowhere pays, the realization such a point gets is full / no-exit.
  embeddings    the embedding layer alone (a cost no exit can save);
  floor@1       embeddings + layer 1 + one head: the least an example exiting at layer 1 can cost;
  exit@1        `early_exit` with a rule that always fires at layer 1 (saved layers say L x; this says what
                the clock gives, and floor@1 says how much of the gap is the embeddings and the head).
Then a torch.profiler table of the no-exit run (self CPU time per op), so the remaining time has names.
Heads are untrained: cost does not depend on their weights.
"""

from __future__ import annotations

import argparse
import copy

import torch

from eebench.backbones import load_backbone
from eebench.methods.deebert import entropy_rule
from eebench.methods.exits import ExitHead, MultiExitModel
from eebench.tasks import get_task, load_split
from eebench.timing import CpuClock, interleaved_medians
from eebench.training import batch_indices, collate, encode


def build(backbone_name: str, num_labels: int) -> MultiExitModel:
    backbone = load_backbone(backbone_name, seed=0)
    heads = [ExitHead(copy.deepcopy(backbone.pooler), backbone.hidden_size, num_labels, 0.1, 0.02)
             for _ in range(backbone.num_layers)]
    return MultiExitModel(backbone, heads).eval()


def layers_only(model: MultiExitModel, batch, depth: int | None = None, head: bool = False) -> torch.Tensor:
    hidden, bias = model._embed(batch)
    for layer in range(1, (depth or model.num_layers) + 1):
        hidden = model.backbone.layer(layer, hidden, bias)
    return model.head(depth or model.num_layers, hidden, batch["attention_mask"]) if head else hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_task(args.task)
    model = build(args.backbone, spec.num_labels)
    split = load_split(spec, "dev", limit=args.examples, seed=0, data_dir=args.data_dir)
    tokenizer = model.backbone.tokenizer
    data = encode(split.examples, tokenizer, 128, spec.kind == "regression")
    never, always = entropy_rule(0.0), entropy_rule(float("inf"))
    print(f"{args.backbone}, {args.task} dev, {len(data)} examples, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        for batch_size in args.batch_sizes:
            batches = [collate(data, idx, tokenizer.pad_token_id, "cpu") for idx in batch_indices(len(data), batch_size)]
            candidates = {
                "full": lambda batches=batches: [model.full(b) for b in batches],
                "layers-only": lambda batches=batches: [layers_only(model, b) for b in batches],
                "no-exit": lambda batches=batches: [model.early_exit(b, never) for b in batches],
                "embeddings": lambda batches=batches: [model._embed(b) for b in batches],
                "floor@1": lambda batches=batches: [layers_only(model, b, 1, head=True) for b in batches],
                "exit@1": lambda batches=batches: [model.early_exit(b, always) for b in batches],
            }
            seconds = interleaved_medians(candidates, CpuClock(), repeats=args.repeats, warmup=1)
            full = seconds["full"]
            print(f"\nbatch size {batch_size}: " + ", ".join(
                f"{name} {value * 1e3:.1f} ms ({value / full:.3f} of full)" for name, value in seconds.items()))
            layers = model.num_layers
            print(f"  realization of a point that exits nowhere: {full / seconds['no-exit']:.3f}")
            print(f"  all exit at layer 1 ({layers}x saved layers): wall-clock {full / seconds['exit@1']:.2f}x, "
                  f"realization {full / seconds['exit@1'] / layers:.3f}; the floor (embeddings + layer 1 + head) "
                  f"allows {full / seconds['floor@1']:.2f}x, embeddings alone are "
                  f"{100 * seconds['embeddings'] / full:.1f} % of the full model")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                for b in batches:
                    model.early_exit(b, never)
            print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
