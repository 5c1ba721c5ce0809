"""An eebench decoder method at one operating point as an lm-evaluation-harness model (`--model eebench`).

`generate_until` decodes with the method's own `generate` (greedy, per-sequence exits, `eebench.methods.decoding`),
so an lm-eval score is the score of exactly what eebench measures; every request's per-token exit layers, LM-head
evaluations and seconds are kept in `request_stats`, keyed by (task name, doc id): lm-eval may copy or cache
request objects, so statistics attached to them would be lost.

`loglikelihood` and `loglikelihood_rolling` run the FULL model (every layer, the model's own LM head) whatever
the knob: scoring a given continuation is one teacher-forced pass in which every position is computed at
once, and there is no next-token decision to exit from. Early exit applies to what the model generates, so the
knob changes generation scores only (stated in the README and in every record: `loglikelihood: full depth`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from eebench.methods.decoding import DecodeLimits
from eebench.methods.protocol import Knob

MAX_PROMPT_TOKENS = 1024  # as `eebench run` (evaluation/generation.py): the prompt's end is kept
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default when a task sets no max_gen_toks
LOGLIKELIHOOD_READING = "full depth"


@dataclass
class RequestStats:
    """What one generation request cost: T = generated tokens (a stop token included)."""

    task: str
    doc_id: int
    text: str
    tokens: list[int]
    token_layers: list[int]          # (T,) layers run per token, 1..L
    head_evals: list[int]            # (T,) LM-head evaluations per token
    rule_macs: float                 # the exit rule's own MACs over the request
    prompt_tokens: int
    seconds: float                   # this request's share of its batch's decoding wall time
    propagation: str = "calm"        # how skipped layers got keys/values (costs differ for "copy")


@dataclass
class GenerationLog:
    """Per-request statistics of every `generate_until` call of one model instance, and the wall time spent."""

    requests: dict[tuple[str, int], RequestStats] = field(default_factory=dict)
    seconds: float = 0.0
    loglikelihood_requests: int = 0


def parse_knob(text: str | None) -> Knob | None:
    """`"full"` / `""` / None -> None (the full model); `"threshold:0.8"` or `"threshold=0.8"` (several joined by
    `;`) -> {"threshold": 0.8}."""
    if text is None or str(text).strip().lower() in ("", "full", "none"):
        return None
    knob: Knob = {}
    for part in str(text).split(";"):
        name, sep, value = part.replace("=", ":").partition(":")
        try:
            knob[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"knob '{text}': write NAME:VALUE (e.g. threshold:0.8), several joined by ';', or 'full'")
    return knob


class EEBenchLM(LM):
    """A trained eebench decoder method at one knob (None = the full model) behind lm-eval's `LM` interface.

    Build it from a prepared job (`from_prepared`, how `eebench lm-eval` sweeps knobs over one loaded
    checkpoint), or let lm-eval build it from `--model_args` (`__init__`: method, suite, backbone, knob, seed,
    cache_dir, data_dir; any other key=value is a method config setting, e.g. confidence=classifier)."""

    def __init__(self, method: str = "calm", suite: str | None = None, backbone: str | None = None,
                 knob: str | None = None, seed: int = 0, cache_dir: str | None = None, data_dir: str | None = None,
                 device: str | None = None, batch_size: int | str | None = 8, max_batch_size: int | None = None,
                 **method_config):
        super().__init__()
        from eebench.lmeval.sweep import checkpoint_job
        from eebench.runner import prepare_job

        job = checkpoint_job(method, method_config, suite=suite, backbone=backbone, seed=int(seed),
                             device=device or "cpu", data_dir=data_dir)
        self._setup(prepare_job(job, cache_dir, progress=False), parse_knob(knob), _batch_size(batch_size))

    @classmethod
    def from_prepared(cls, prepared, knob: Knob | None, batch_size: int = 8) -> EEBenchLM:
        """The model of an already trained job (`eebench.runner.prepare_job`) at `knob`."""
        model = cls.__new__(cls)
        LM.__init__(model)
        model._setup(prepared, knob, batch_size)
        return model

    def _setup(self, prepared, knob: Knob | None, batch_size: int) -> None:
        if prepared.spec.kind != "generation":
            raise ValueError(f"the lm-eval adapter wraps decoder methods; job {prepared.job.describe()} is a "
                             f"{prepared.spec.kind} job")
        self.prepared, self.knob, self.batch_size = prepared, knob, max(1, int(batch_size))
        self.backbone, self.method = prepared.backbone, prepared.method
        self.tokenizer = self.backbone.tokenizer
        self._device = torch.device(prepared.job.device)
        self.log = GenerationLog()

    # --- chat template (lm-eval's --apply_chat_template) ----------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.backbone.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The rendered conversation; it holds any BOS already, so contexts are tokenised without special tokens
        (`eebench.tasks.generation.render_prompt` renders `eebench run`'s prompts the same way)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # --- generation -----------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding of every request at this model's knob, in batches of similar prompt length."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[DecodeLimits, list[int]] = {}  # requests decoded with the same limits batch together
        for position, request in enumerate(requests):
            groups.setdefault(self._limits(dict(request.args[1] or {})), []).append(position)
        for limits, positions in groups.items():
            prompts = {p: self._encode(requests[p].args[0])[-MAX_PROMPT_TOKENS:] for p in positions}
            ordered = sorted(positions, key=lambda p: -len(prompts[p]))  # little padding within a batch
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start:start + self.batch_size]
                for p, stats in zip(chunk, self._generate([prompts[p] for p in chunk], limits), strict=True):
                    request = requests[p]
                    stats.task, stats.doc_id = request.task_name or "", int(request.doc_id or 0)
                    self.log.requests[(stats.task, stats.doc_id)] = stats
                    answers[p] = stats.text
        return [answer or "" for answer in answers]

    def _limits(self, gen_kwargs: dict) -> DecodeLimits:
        if gen_kwargs.pop("do_sample", False) or float(gen_kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise ValueError("eebench decodes greedily (its exit rules and costs are defined for greedy decoding); "
                             "set do_sample: false and temperature: 0 in the task's generation_kwargs")
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        # EOS (and the instruct model's end-of-turn ids) always stop, tested during decoding, not afterwards.
        return DecodeLimits(max_new, frozenset(self.backbone.stop_token_ids()), tuple(s for s in until if s))

    def _generate(self, prompts: Sequence[list[int]], limits: DecodeLimits) -> list[RequestStats]:
        from eebench.evaluation.generation import (
            prompt_batches,  # the left padding `eebench run` decodes with
        )

        batch, = prompt_batches(list(prompts), list(range(len(prompts))), len(prompts), self.tokenizer.pad_token_id,
                                limits, self._device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.method.generate(batch, self.knob)
        seconds = time.perf_counter() - started
        self.log.seconds += seconds
        total = max(1, sum(len(t) for t in out.tokens))
        return [RequestStats("", 0, out.text[i], out.tokens[i], out.token_layers[i], out.head_evals[i],
                             float(out.rule_macs[i]), int(out.prompt_tokens[i]), seconds * len(out.tokens[i]) / total,
                             out.propagation)
                for i in range(len(prompts))]

    # --- scoring (full depth, see the module docstring) -----------------------------------------------------

    def _log_probs(self, ids: list[int]) -> torch.Tensor:
        """(S - 1, V) next-token log-probabilities of the full model at positions 0..S-2 of `ids`."""
        input_ids = torch.tensor([ids], device=self._device)
        with torch.inference_mode():
            (_, hidden), = self.backbone.forward_states(input_ids, torch.ones_like(input_ids), {self.backbone.num_layers})
            return F.log_softmax(self.backbone.logits(hidden[0, :-1]).float(), dim=-1)

    def _prefix(self) -> list[int]:
        token = self.tokenizer.bos_token_id
        return [token if token is not None else self.tokenizer.eos_token_id]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """log P(continuation | context) and whether greedy decoding would produce it, at full depth. Trailing
        spaces of the context belong to the continuation (the tokeniser joins them to the next word)."""
        results = []
        for request in requests:
            context, continuation = request.args
            stripped = context.rstrip(" ")
            continuation = context[len(stripped):] + continuation
            context_ids = self._encode(stripped) if stripped else self._prefix()
            whole = self._encode(stripped + continuation) if stripped else self._prefix() + self._encode(continuation)
            target = whole[len(context_ids):]
            results.append(self._score(whole[-(MAX_PROMPT_TOKENS + 1):], len(target)))
        self.log.loglikelihood_requests += len(requests)
        return results

    def _score(self, ids: list[int], n_target: int) -> tuple[float, bool]:
        if n_target == 0:
            return 0.0, True
        log_probs = self._log_probs(ids)[-n_target:]
        target = torch.tensor(ids[-n_target:], device=log_probs.device)
        picked = log_probs.gather(1, target[:, None]).squeeze(1)
        return float(picked.sum()), bool((log_probs.argmax(-1) == target).all())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log P(text) at full depth, in windows of at most MAX_PROMPT_TOKENS predicted tokens each."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for request in requests:
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self._encode(request.args[0]), prefix_token=self._prefix()[0],
                max_seq_len=MAX_PROMPT_TOKENS, context_len=1))
            results.append(sum(self._score(context + target, len(target))[0] for context, target in windows))
        self.log.loglikelihood_requests += len(requests)
        return results


def _batch_size(value: int | str | None) -> int:
    if value in (None, "", "auto"):
        return 8  # "auto" probes GPU memory in lm-eval's HF model; decoding batches here are per request group
    return int(str(value).split(":")[0])


register_model("eebench")(EEBenchLM)
