"""Where does early exit's wall-clock go? The per-layer overhead of every layer-wise exit rule, on real dev examples.

    python benchmarks/micro/profile_exit.py --task sst2 --data-dir ../shared/data/glue --examples 64

Each rule runs on its own method's real network shape (`attach` of DeeBERT, PABEE, PCEE, BERxiT, ConsistentEE;
weights untrained: cost does not depend on them, and every classifier is set to agree on class 0 so that PABEE's
patience can fire). Times, at each batch size:
  full           the full model: embeddings, L layers, the final head;
  layers-only    the same L layers with nothing else, the floor any early-exit method can reach at no exit;
  embeddings     the embedding layer alone (a cost no exit can save);
  floor@k        embeddings + layers 1..k + k heads (k = 1, 2): the least an example exiting at layer k can cost;
  no-exit RULE   `early_exit` with the rule at a setting that never fires: every head, every decision, no saving;
                 full / no-exit is the realization such a point gets (1.0 = the heads and decisions are free);
  heads@L RULE   embeddings + all L layers + all L exit heads of the rule's network, no decision, the summary
                 weights computed once per batch as `early_exit` does: what a point that exits nowhere cannot
                 avoid (a rule must read every head to decide), so
                 (full / no-exit) / (full / heads@L) is the share of that floor the rule reaches;
  exit@k RULE    `early_exit` with the rule at a setting that fires at the earliest layer it can (k = 1; PABEE's
                 patience needs two agreeing layers, k = 2); (full / exit@k) / (full / floor@k) is the share of
                 what the floor allows that the clock gives.
Timing is PAIRED: each candidate runs on each batch right next to its own run of the full model (which goes first
alternates; candidate order rotates), and a ratio is the median over all (round, batch) pairs, with its
interquartile range. On a shared 2-core VM whole-pass times spread 30-45 % between repeats (other tenants), while
adjacent runs of ~10 ms see the same machine. Run it with every other process of yours paused.
Beside the clock, a weight-bytes ratio, bytes(full) / bytes(no-exit) (MiniLM's d x d pooler is 0.084 of a layer:
0.936): the bound a point that exits nowhere would have if a layer were memory-bound at batch size 1. It is not
(a ~25-token example is ~44 M MACs per layer, ~3.8 ms on this VM's 2 cores): the measured floors exceed it
(0.94-0.95; until commit 924976f heads@L recomputed the summary weights at every head, 7 small ops per layer,
and read 0.92-0.93, under it).
Then a torch.profiler table of the entropy rule's no-exit run (self CPU time per op), so the remaining time has names.

Every call is timed by the runner's clock (`eebench.timing.clock_for`): perf_counter on a CPU, CUDA events on a
GPU (`--device cuda`), where `--exit-decision late` times the one-layer-late decisions (`MultiExitModel.early_exit`:
no host sync per layer; exit@k then runs k+1 layers). `--architecture FOLDER` builds the backbone from FOLDER's
config and tokenizer with random weights (the time does not depend on them): for a machine without the weights,
such as the lent GPU machine (benchmarks/micro/gpu_check.sh prepares and runs that check).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
from collections.abc import Callable, Sequence

import torch

from eebench.backbones import EncoderBackbone, checkpoint_pooling, load_backbone
from eebench.methods import build_method
from eebench.methods.exits import MultiExitModel, set_decision_lag
from eebench.tasks import get_task, load_split
from eebench.timing import Clock, clock_for
from eebench.training import batch_indices, collate, encode

NEVER = 10**6
# rule -> (method whose network and rule it is, knob that never fires, knob firing at the earliest layer k, k)
RULES: dict[str, tuple[str, dict, dict, int]] = {
    "entropy": ("deebert", {"entropy_threshold": 0.0}, {"entropy_threshold": math.inf}, 1),
    "patience": ("pabee", {"patience": NEVER}, {"patience": 1}, 2),
    "confident-streak": ("pcee", {"patience": NEVER, "threshold": 0.0}, {"patience": 1, "threshold": math.inf}, 1),
    "lte": ("berxit", {"lte_threshold": 0.0}, {"lte_threshold": 2.0}, 1),
    "policy": ("consistentee", {"alpha": 0.1, "exit_threshold": 1.0}, {"alpha": 0.1, "exit_threshold": -1.0}, 1),
}


def build(method_name: str, backbone, task) -> tuple[object, MultiExitModel]:
    method = build_method(method_name)
    model = method.attach(backbone, task).eval()
    with torch.no_grad():  # every head says class 0 with the same margin: patience can fire, cost is unchanged
        for head in model.heads:
            head.classifier.weight.zero_()
            head.classifier.bias.copy_(torch.linspace(1.0, 0.0, head.classifier.out_features))
    return method, model


def layers_only(model: MultiExitModel, batch, depth: int | None = None, heads: int = 0) -> torch.Tensor:
    """Embeddings + layers 1..depth, plus the exit heads of the last `heads` of them (the floor of an exit there:
    a rule reads at least one head, PABEE's patience the heads of the two layers that agree)."""
    depth = depth or model.num_layers
    hidden, bias = model._embed(batch)
    # the summary weights once per batch, as `early_exit` computes them (`model.head` would redo them per layer)
    weights = model.backbone.summary_weights(batch["attention_mask"], hidden.dtype)
    for layer in range(1, depth + 1):
        hidden = model.backbone.layer(layer, hidden, bias)
        if layer > depth - heads:
            model.heads[layer - 1](model.backbone.summarize_weighted(hidden, weights))
    return hidden


def architecture_only(folder: str, seed: int = 0) -> EncoderBackbone:
    """An encoder with `folder`'s config.json, tokenizer and pooling, and random weights (no weight file needed)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    return EncoderBackbone(f"{folder} (random weights)", model, AutoTokenizer.from_pretrained(folder),
                           checkpoint_pooling(folder))


def weight_bytes_bound(model: MultiExitModel) -> float:
    """bytes(full) / bytes(no-exit) of the weights each reads once: L layers + the last head, against L layers + all
    L heads (Linear weights and biases of each head, a pooler shared by several heads counted once per head: after
    a 7 MB layer it is back in memory, not cache)."""
    def head_bytes(head) -> int:
        return sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel())
                   for m in head.modules() if isinstance(m, torch.nn.Linear)) * 4
    layer_bytes = sum(p.numel() for p in model.backbone.layers.parameters()) * 4
    heads = [head_bytes(head) for head in model.heads]
    return (layer_bytes + heads[-1]) / (layer_bytes + sum(heads))


def early_exit_with(model: MultiExitModel, rule) -> Callable[[object], object]:
    return lambda batch: model.early_exit(batch, rule)


def paired_times(reference: Callable[[object], object], candidates: dict[str, Callable[[object], object]],
                 batches: Sequence, rounds: int, clock: Clock | None = None
                 ) -> dict[str, list[tuple[float, float]]]:
    """(candidate seconds, reference seconds) of every candidate on every batch, each candidate timed right next to
    its own run of the reference (which goes first alternates), `rounds` times; candidate order rotates per batch
    and round. Adjacent pairs share the machine's state of that moment, so their ratio cancels slow drift."""
    names = list(candidates)
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    clock = clock or clock_for("cpu")

    def seconds(function, batch) -> float:
        clock.start()
        function(batch)
        return clock.stop()

    for batch in batches:  # warm-up, not counted
        reference(batch)
        for name in names:
            candidates[name](batch)
    for round_index in range(rounds):
        for index, batch in enumerate(batches):
            shift = (round_index + index) % len(names)
            for position, name in enumerate(names[shift:] + names[:shift]):
                if (position + round_index) % 2:
                    ref = seconds(reference, batch)
                    pairs[name].append((seconds(candidates[name], batch), ref))
                else:
                    cand = seconds(candidates[name], batch)
                    pairs[name].append((cand, seconds(reference, batch)))
    return pairs


def paired_ratio(pairs: list[tuple[float, float]], invert: bool = False) -> tuple[float, float, float]:
    """Median and interquartile range of candidate / reference over the pairs (reference / candidate if invert)."""
    ratios = sorted((b / a) if invert else (a / b) for a, b in pairs)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), quartiles[0], quartiles[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--architecture", metavar="FOLDER", default=None,
                        help="instead of --backbone: FOLDER's config and tokenizer with random weights")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--exit-decision", choices=("now", "late"), default="now",
                        help="late: decide one layer late (the GPU mode without per-layer host syncs)")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_task(args.task)
    backbone = architecture_only(args.architecture) if args.architecture else load_backbone(args.backbone, seed=0)
    built = {rule: (RULES[rule], *build(RULES[rule][0], backbone, spec)) for rule in args.rules}
    device = torch.device(args.device)
    for _, _, model in built.values():
        model.to(device)
        set_decision_lag(model, 1 if args.exit_decision == "late" else 0)
    reference = next(iter(built.values()))[2]
    split = load_split(spec, "dev", limit=args.examples, seed=0, data_dir=args.data_dir)
    tokenizer = backbone.tokenizer
    data = encode(split.examples, tokenizer, 128, spec.kind == "regression")
    print(f"{backbone.name}, {args.task} dev, {len(data)} examples, {torch.get_num_threads()} threads, "
          f"{args.rounds} paired rounds, {device}, exit decision {args.exit_decision}")
    with torch.inference_mode():
        for batch_size in args.batch_sizes:
            batches = [collate(data, idx, tokenizer.pad_token_id, device) for idx in batch_indices(len(data), batch_size)]
            candidates: dict[str, Callable] = {
                "layers-only": lambda b: layers_only(reference, b),
                "embeddings": reference._embed,
                "floor@1": lambda b: layers_only(reference, b, 1, heads=1),
                "floor@2": lambda b: layers_only(reference, b, 2, heads=2),
            }
            for rule, ((_, never, earliest, layer), method, model) in built.items():
                candidates[f"heads@L {rule}"] = functools.partial(layers_only, model, heads=model.num_layers)
                candidates[f"no-exit {rule}"] = early_exit_with(model, method.exit_rule(never))
                candidates[f"exit@{layer} {rule}"] = early_exit_with(model, method.exit_rule(earliest))
            pairs = paired_times(reference.full, candidates, batches, args.rounds, clock_for(device))
            layers = reference.num_layers
            full_ms = statistics.median(ref for _, ref in pairs["layers-only"]) * len(batches) * 1e3
            print(f"\nbatch size {batch_size}: full {full_ms:.1f} ms per pass (median batch x batches); paired "
                  "medians, of full: " + ", ".join(f"{name} {paired_ratio(pairs[name])[0]:.3f}"
                                                   for name in ("layers-only", "embeddings", "floor@1", "floor@2")))
            for rule, ((method_name, _, _, _), _, model) in built.items():
                realization, low, high = paired_ratio(pairs[f"no-exit {rule}"], invert=True)
                allows = paired_ratio(pairs[f"heads@L {rule}"], invert=True)[0]
                print(f"  realization of a point that exits nowhere: {realization:.3f} [{low:.3f}, {high:.3f}] "
                      f"({rule}, {method_name}); its floor (embeddings + {layers} layers + {layers} heads) allows "
                      f"{allows:.3f}, share {realization / allows:.3f}" + (  # memory-bound at batch size 1 only
                          f"; weight-bytes bound {weight_bytes_bound(model):.3f}" if batch_size == 1 else ""))
            for rule, ((_, _, _, layer), _, _) in built.items():
                speedup = paired_ratio(pairs[f"exit@{layer} {rule}"], invert=True)[0]
                allows = paired_ratio(pairs[f"floor@{layer}"], invert=True)[0]
                late = f", decided one layer late: runs {layer + 1}" if args.exit_decision == "late" else ""
                print(f"  all exit at layer {layer} ({layers / layer:.0f}x saved layers{late}), {rule}: wall-clock "
                      f"{speedup:.2f}x; the floor (embeddings + {layer} layer(s) + {layer} head(s)) allows {allows:.2f}x;"
                      f" share of the floor reached {speedup / allows:.3f}")
            if not args.no_profile and "entropy" in built:
                (_, never, _, _), method, model = built["entropy"]
                rule = method.exit_rule(never)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                    for b in batches:
                        model.early_exit(b, rule)
                print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
