"""Is a batch-size-1 exit head memory-bound where early exit runs it? One head and one layer, hot and cold.

    python benchmarks/micro/head_cache.py --tokens 25

hot: the same call repeated (weights and code stay in cache, what a micro-benchmark of the head alone sees);
cold: each call after streaming a buffer larger than the last-level cache (`--flush-mb`), so weights and code come
back from memory. Inside early exit a head runs right after a layer that streamed ~7 MB of weights, between the
two. The printed ratios set against the bytes (pooler d x d vs a layer's weights) say whether the heads' cost at a
point that exits nowhere is their memory traffic (see profile_exit.py's weight-bytes bound). Median of `--repeats`
calls per cell, two rounds; run it with every other process of yours paused.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from eebench.backbones import load_backbone
from eebench.methods import build_method
from eebench.tasks import get_task


def median_us(function: Callable[[], object], flush: torch.Tensor | None, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.add_(1.0)  # writes every byte of the buffer: the caches now hold it, not the model
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--tokens", type=int, default=25, help="sequence length of the one example")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--flush-mb", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone, seed=0)
    model = build_method("deebert").attach(backbone, get_task("sst2")).eval()
    ids = torch.randint(1000, 2000, (1, args.tokens))
    mask = torch.ones(1, args.tokens, dtype=torch.long)
    flush = torch.ones(args.flush_mb * 1024 * 1024 // 4)
    head = model.heads[0]
    with torch.inference_mode():
        hidden, bias = model.backbone.embed(ids, mask)
        weights = model.backbone.summary_weights(mask, hidden.dtype)
        steps = {
            "head (summary, pooler, classifier, read-back)":
                lambda: head.classifier(head.pool(model.backbone.summarize_weighted(hidden, weights))).tolist(),
            f"layer ({args.tokens} tokens)": lambda: model.backbone.layer(1, hidden, bias),
        }
        for step in steps.values():
            step()
        cells: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
        for _ in range(2):
            for name, step in steps.items():
                cells[name].append((median_us(step, None, args.repeats), median_us(step, flush, args.repeats)))
    head_bytes = sum(p.numel() for p in head.parameters()) * 4
    layer_bytes = sum(p.numel() for p in backbone.layers[0].parameters()) * 4
    print(f"{args.backbone}, one example of {args.tokens} tokens, {args.threads} threads, median of {args.repeats} "
          f"calls, flush {args.flush_mb} MB")
    for name, rounds in cells.items():
        print(f"  {name:46s} hot {' / '.join(f'{hot:7.1f}' for hot, _ in rounds)} us   "
              f"cold {' / '.join(f'{cold:7.1f}' for _, cold in rounds)} us")
    (head_hot, head_cold), (layer_hot, layer_cold) = ([statistics.mean(c) for c in zip(*rounds, strict=True)]
                                                      for rounds in cells.values())
    print(f"  head / layer: bytes {head_bytes / layer_bytes:.3f}, time hot {head_hot / layer_hot:.3f}, "
          f"time cold {head_cold / layer_cold:.3f}")


if __name__ == "__main__":
    main()
