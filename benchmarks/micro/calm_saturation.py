"""Where does CALM's saturation measure exit, and what does the decaying threshold do to it?

    python benchmarks/micro/calm_saturation.py --checkpoint $EEBENCH_CACHE/checkpoints/<calm key>.pt

Saturation is cos(h_t^i, h_t^{i-1}) of raw residual states (every layer an exit point, as the suite runs it).
On teacher-forced Alpaca dev pairs (every response position; 100 pairs by default) this script reports, per
layer, the median of 1 - cos, and for constant thresholds lambda the layer a token would exit at (the first
i >= 2 with cos >= lambda, else L), the saved-layer speed-up L / mean exit layer and the share of tokens whose
exit-layer argmax equals layer L's ("consistent"). Teacher forcing leaves out what early exit does to later
tokens (their context keys/values come from propagated states), so consistency here is an optimistic proxy.

Then CALM's decay: lambda_t = 0.9 lambda + 0.1 exp(-tau t / N) (the paper's form; t5x's is 0.9 lambda + 0.1 lambda
exp(..)) falls towards 0.9 lambda within a few tokens. Cosines of consecutive layers sit in [0.9, 1] at almost
every layer, so once lambda_t < 0.9-something every token exits at its first defined point whatever lambda is:
the table prints lambda_t at a few steps of the task's N beside the exit profile at that threshold.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from calm_classifier_input import load_calm_on_alpaca  # this folder is on sys.path when run as a script

from eebench.evaluation import evaluator_for
from eebench.methods.calm import CALMConfig, CALMModel, decayed_threshold
from eebench.tasks import load_split


def collect(model: CALMModel, data, pairs: int, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """cos (n, L-1) of layers 2..L with the layer below, and argmax agreement (n, L) of layer i's head with L's,
    at every response position (labels != -100) of the first `pairs` pairs."""
    backbone, last = model.backbone, model.num_layers
    pad = backbone.tokenizer.pad_token_id
    cosines, agrees = [], []
    with torch.no_grad():
        for start in range(0, min(len(data), pairs), batch_size):
            batch = data.collate(list(range(start, min(len(data), pairs, start + batch_size))), pad, torch.device("cpu"))
            valid = batch["labels"][:, 1:] != -100
            states = torch.stack([hidden[:, :-1][valid] for _, hidden in backbone.forward_states(
                batch["input_ids"], batch["attention_mask"])], dim=1)  # (n, L, d)
            cosines.append(F.cosine_similarity(states[:, 1:], states[:, :-1], dim=-1))
            tops = torch.stack([backbone.logits(states[:, layer]).argmax(-1) for layer in range(last)], dim=1)
            agrees.append(tops == tops[:, -1:])
    return torch.cat(cosines), torch.cat(agrees)


def exit_profile(cosines: torch.Tensor, agrees: torch.Tensor, threshold: float) -> tuple[float, float, float]:
    """(mean exit layer, saved-layer speed-up, consistent share) for a constant threshold; exit points 2..L-1."""
    last = agrees.shape[1]
    candidates = cosines[:, :-1] >= threshold  # layers 2..L-1 (column j is layer j + 2)
    first = torch.where(candidates.any(1), candidates.float().argmax(1) + 2, last)  # argmax: the first True
    consistent = agrees.gather(1, (first - 1).unsqueeze(1)).float().mean().item()
    mean_exit = first.float().mean().item()
    return mean_exit, last / mean_exit, consistent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a calm .pt (default: the backbone as shipped)")
    parser.add_argument("--backbone", help="default: the suite's (smollm2); tiny-llama for a smoke run")
    parser.add_argument("--pairs", type=int, default=100, help="teacher-forced Alpaca dev pairs")
    parser.add_argument("--thresholds", type=float, nargs="+",
                        default=[0.999, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.95, 0.9])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, job, suite, spec = load_calm_on_alpaca(args.checkpoint, args.backbone)
    dev = evaluator_for(spec).encode_train(load_split(spec, "dev", suite.data_dir, args.pairs, 0).examples,
                                           model.backbone, job, spec)
    cosines, agrees = collect(model, dev, args.pairs)
    distance = (1 - cosines).median(0).values
    print(f"{len(cosines)} response positions of {min(args.pairs, len(dev))} pairs; layers 1..{agrees.shape[1]}")
    print("median 1 - cos(h^i, h^(i-1)) for i = 2..L: " + " ".join(f"{value:.3f}" for value in distance.tolist()))
    print("lambda   mean exit  saved-layer speed-up  consistent")
    for threshold in args.thresholds:
        mean_exit, speedup, consistent = exit_profile(cosines, agrees, threshold)
        print(f"{threshold:<7}  {mean_exit:9.1f}  {speedup:20.2f}  {consistent:10.3f}")
    steps, config = spec.max_new_tokens, CALMConfig()
    print(f"decayed lambda_t (paper form, tau {config.temperature}, N {steps}) at t = 0, N/8, N/4, N/2:")
    for threshold in args.thresholds[:3]:
        decayed = [decayed_threshold(threshold, t, steps, "paper", config.temperature)
                   for t in (0, steps // 8, steps // 4, steps // 2)]
        mean_exits = [exit_profile(cosines, agrees, value)[0] for value in decayed]
        print(f"lambda {threshold}: " + ", ".join(f"{value:.4f} (mean exit {layer:.1f})"
                                                  for value, layer in zip(decayed, mean_exits, strict=True)))


if __name__ == "__main__":
    main()
