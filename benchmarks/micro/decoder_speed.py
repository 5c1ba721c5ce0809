"""Is layer-by-layer decoding as fast as `model.generate`, and does a saved layer save its share of time?

    python benchmarks/micro/decoder_speed.py --backbone smollm2 --data-dir ../shared/data/generation \\
        --prompts 8 --new-tokens 32 --batch-sizes 1 8 --exit-layers 20 15 8 --threads 2

On the same Alpaca prompts (chat template), interleaved medians of --repeats rounds after one warm-up:
  generate      HF `model.generate`, greedy, its own DynamicCache;
  full          eebench's `decode` at full depth (must give the same tokens; checked and printed);
  exit@k        every generated token exits at layer k (StaticExitRule) with CALM's fused K/V propagation;
  prefill       the prompt at full depth and the first token only (max_new_tokens = 1): what every method pays.
Reported per batch size: tokens/s of each, full / generate (target >= 0.97), and for each exit@k the wall-clock
speed-up, the FLOPs speed-up per token (`eebench.costs.decoder_row_flops`: layers, LM head and the propagated
K/V counted) and their ratio (target >= 0.9 at batch 1, >= 0.8 batched), twice: end to end (the clock includes
the prefill, which FLOPs per token leave out, so batched prompts dilute it) and per decoded token (the prefill's
median subtracted from every candidate's, FLOPs over tokens 2..T: what an exit can save). Flag: a ratio above 1.1
means the clock is not measuring what the FLOPs say (noise, or another job on the machine).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from eebench import costs
from eebench.backbones import load_backbone
from eebench.env import environment
from eebench.evaluation.generation import encode_prompts, prompt_batches
from eebench.methods.decoding import DecodeLimits, StaticExitRule, decode
from eebench.tasks import get_task, load_split
from eebench.timing import CpuClock, interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--task", default="alpaca")
    parser.add_argument("--data-dir", default="../shared/data/generation")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[20, 15, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # oversubscribed threads collapse small-GEMM decoding

    backbone = load_backbone(args.backbone)
    backbone.eval()
    info = backbone.info
    spec = get_task(args.task)
    dev = load_split(spec, "dev", args.data_dir, limit=args.prompts, seed=0)
    prompts = encode_prompts(dev.examples, backbone.tokenizer)
    pad = backbone.tokenizer.pad_token_id
    # No stop token: every row generates exactly --new-tokens, so every candidate does the same amount of work.
    # For generate: eos id -1 (None falls back to the model config's EOS; min_new_tokens would forbid EOS and
    # change its tokens), so both decode exactly --new-tokens per row with the same greedy choices.
    limits = DecodeLimits(max_new_tokens=args.new_tokens)
    no_stop = copy.deepcopy(backbone.model.generation_config)
    no_stop.update(pad_token_id=pad, do_sample=False, max_new_tokens=args.new_tokens, temperature=None, top_p=None,
                   top_k=None)
    no_stop.eos_token_id = -1
    rows = []
    for batch_size in args.batch_sizes:
        batches = prompt_batches(prompts, list(range(len(prompts))), batch_size, pad, limits, "cpu")
        outputs: dict[str, list] = {}

        def run_decode(rule, name, batches=batches, outputs=outputs):
            def run():
                outputs[name] = [decode(backbone, b.input_ids, b.attention_mask, limits, rule=rule) for b in batches]
            return run

        def run_generate(batches=batches, outputs=outputs):
            outputs["generate"] = [backbone.model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                                           generation_config=no_stop) for b in batches]

        first_only = DecodeLimits(max_new_tokens=1)
        prefill_batches = prompt_batches(prompts, list(range(len(prompts))), batch_size, pad, first_only, "cpu")

        def run_prefill(batches=prefill_batches, first_only=first_only):
            for b in batches:
                decode(backbone, b.input_ids, b.attention_mask, first_only)

        candidates = {"generate": run_generate, "full": run_decode(None, "full"), "prefill": run_prefill}
        for layer in args.exit_layers:
            candidates[f"exit@{layer}"] = run_decode(StaticExitRule(layer), f"exit@{layer}")
        with torch.inference_mode():
            seconds = interleaved_medians(candidates, CpuClock(), args.repeats, warmup=1)
        same = all(out.tokens == gen[:, b.input_ids.shape[1]:].tolist()
                   for out, gen, b in zip(outputs["full"], outputs["generate"], batches, strict=True))
        tokens = len(prompts) * args.new_tokens

        def flops_per_token(name, skip=0, outputs=outputs, tokens=tokens):
            """Mean FLOPs per token over tokens skip+1..T of every row (skip=1: the decoded ones only)."""
            total = sum(costs.decoder_row_flops(layers[skip:], evals[skip:], prompt + skip, macs, info)
                        for out in outputs[name] for layers, evals, prompt, macs in
                        zip(out.token_layers, out.head_evals, out.prompt_tokens, out.rule_macs, strict=True))
            return total / (tokens - skip * len(prompts))

        full_flops, full_decode_flops = flops_per_token("full"), flops_per_token("full", skip=1)
        prefill = seconds["prefill"]
        row = {"batch_size": batch_size, "tokens": tokens, "same_tokens_as_generate": same,
               "generate_tok_s": tokens / seconds["generate"], "full_tok_s": tokens / seconds["full"],
               "full_over_generate": seconds["generate"] / seconds["full"],
               "prefill_share_of_full": prefill / seconds["full"]}
        for layer in args.exit_layers:
            name = f"exit@{layer}"
            wall = seconds["full"] / seconds[name]
            flops = full_flops / flops_per_token(name)
            decode_wall = (seconds["full"] - prefill) / (seconds[name] - prefill)
            decode_flops = full_decode_flops / flops_per_token(name, skip=1)
            row[name] = {"wallclock_speedup": wall, "flops_speedup": flops, "saved_layer_speedup": info.num_layers / layer,
                         "wall_over_flops": wall / flops, "decode_wallclock_speedup": decode_wall,
                         "decode_flops_speedup": decode_flops, "decode_wall_over_flops": decode_wall / decode_flops,
                         "implausible": max(wall / flops, decode_wall / decode_flops) > 1.1}
        rows.append(row)
        print(json.dumps(row, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": environment("cpu"), "args": vars(args), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
