"""Tokenisation, batching and the optimisation loop that every method's `fit` borrows.

Methods say WHAT to minimise and over WHICH parameters (`Trainer.train(params, loss_fn)`); this module
owns HOW: AdamW, linear decay, gradient clipping, seeded shuffling, progress and the NaN check.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from eebench.tasks import Example


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings shared by all methods of a suite (a method's stages each reuse them)."""

    epochs: float = 2.0
    lr: float = 5e-5
    batch_size: int = 32
    max_seq_length: int = 128
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-8
    # LoRA (eebench.lora): 0 = every pretrained weight is fine-tuned; r > 0 = rank-r adapters on lora_targets,
    # merged into the weights after each stage
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.0


LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout")


def train_settings(config: TrainConfig) -> dict:
    """`config` as a dict for job ids and checkpoint keys; the LoRA fields only when LoRA is on, so the ids
    of full fine-tuning jobs stored before LoRA existed still hold."""
    settings = asdict(config)
    if not config.lora_rank:
        for name in LORA_FIELDS:
            del settings[name]
    return settings


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Encoded:
    """Tokenised examples: ragged token lists, kept unpadded so that each batch pads to its own longest."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: torch.Tensor  # (N,) int64 for classification, float32 for regression

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> torch.Tensor:
        """(N,) real token count per example (what the FLOPs counter charges)."""
        return torch.tensor([len(ids) for ids in self.input_ids], dtype=torch.long)

    def collate(self, indices: Sequence[int], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        return collate(self, indices, pad_id, device)


@dataclass
class LMEncoded:
    """Causal-LM training examples: prompt + reference response (+ EOS) as one token list each, with the number
    of prompt tokens, so that the loss covers the response only (labels -100 on the prompt)."""

    input_ids: list[list[int]]
    prompt_lengths: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, indices: Sequence[int], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Right-padded (B, S_max) input_ids, attention_mask and labels (-100 on prompt and padding), index (B,).
        Right padding is exact for training: causal attention never lets a real token see later padding."""
        width = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        labels = torch.full((len(indices), width), -100, dtype=torch.long)
        for row, i in enumerate(indices):
            tokens = torch.tensor(self.input_ids[i])
            n = len(tokens)
            ids[row, :n], mask[row, :n] = tokens, 1
            labels[row, self.prompt_lengths[i]:n] = tokens[self.prompt_lengths[i]:]
        index = torch.as_tensor(indices, dtype=torch.long)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
                "index": index.to(device)}


def encode(examples: Sequence[Example], tokenizer, max_seq_length: int, regression: bool) -> Encoded:
    firsts = [e.text_a for e in examples]
    seconds = [e.text_b for e in examples]
    pairs = seconds[0] is not None if seconds else False
    out = tokenizer(firsts, seconds if pairs else None, truncation=True, max_length=max_seq_length)
    token_types = out.get("token_type_ids") or [[0] * len(ids) for ids in out["input_ids"]]
    dtype = torch.float32 if regression else torch.long
    labels = torch.tensor([e.label for e in examples], dtype=dtype)
    return Encoded(list(out["input_ids"]), list(token_types), labels)


def collate(data: Encoded, indices: Sequence[int], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A padded batch (B, S_max of these examples) plus `labels` (B,) and `index` (B,) into `data`."""
    width = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(indices), width), dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        types[row, :n] = torch.tensor(data.token_type_ids[i])
        mask[row, :n] = 1
    index = torch.as_tensor(indices, dtype=torch.long)
    return {"input_ids": ids.to(device), "token_type_ids": types.to(device), "attention_mask": mask.to(device),
            "labels": data.labels[index].to(device), "index": index.to(device)}


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None = None) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class LoopTrainer:
    """The runner's implementation of `eebench.methods.Trainer`."""

    def __init__(self, model: nn.Module, data: Encoded | LMEncoded, config: TrainConfig, seed: int, pad_id: int,
                 device: torch.device | str, progress: bool = True, stage_cache: StageCache | None = None):
        self.model, self.data, self.config, self.seed = model, data, config, seed
        self.pad_id, self.device, self.progress = pad_id, device, progress
        self.stage_cache = stage_cache
        self.stages: list[dict] = []

    def cached(self, name: str, signature: dict, run: Callable[[], object], part: str | None = None) -> bool:
        """Run `run()` (training stages that change the model) once per (job settings, name, signature);
        later calls, e.g. from another job of an alpha sweep, restore the model's weights instead.
        `part`: the submodule the stages train (e.g. "backbone"); only it is stored and restored, so methods
        with different modules around one backbone share the stage (ConsistentEE from CALM's anytime stage).
        Returns True when restored. The restored stages are listed in `stages` with their original cost."""
        if self.stage_cache is None:
            run()
            return False
        # Under the stage's lock: jobs of two checkpoints that share a stage (on other workers) train it once.
        with self.stage_cache.lock(name, signature):
            restored = self.stage_cache.load(self.model, name, signature, self.device, part)
            if restored is not None:
                self.stages.extend({**stage, "from_cache": True} for stage in restored)
                return True
            first = len(self.stages)
            run()
            self.stage_cache.save(self.model, name, signature, self.stages[first:], part)
            return False

    def batches(self, shuffle: bool = False, generator: torch.Generator | None = None,
                batch_size: int | None = None) -> Iterator[dict]:
        """`batch_size` None = the suite's (`config.batch_size`)."""
        if shuffle and generator is None:
            generator = torch.Generator().manual_seed(self.seed)
        size = batch_size or self.config.batch_size
        for indices in batch_indices(len(self.data), size, generator if shuffle else None):
            yield self.data.collate(indices, self.pad_id, self.device)

    def train(self, params: Iterable[nn.Parameter], loss_fn: Callable[[dict], torch.Tensor], *,
              stage: str, epochs: float | None = None, lr: float | None = None, batch_size: int | None = None,
              clip_params: Iterable[nn.Parameter] | None = None) -> dict[str, float | str]:
        """One stage. `epochs`, `lr`, `batch_size`: None = the suite's (a method's release may use its own per
        stage). `clip_params`: the parameters whose joint gradient norm is clipped to `max_grad_norm`; None =
        the trained ones. A release that clips `model.parameters()` also counts gradients that reach frozen
        parts in that norm (DeeBERT's stage 2), so its steps are clipped harder."""
        config = self.config
        epochs = config.epochs if epochs is None else epochs
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"stage '{stage}': batch_size must be >= 1 or None (the suite's), got {batch_size}")
        unique = list({id(p): p for p in params if p.requires_grad}.values())  # shared modules appear twice
        if not unique:
            raise ValueError(f"stage '{stage}': no trainable parameters were given")
        stage_seed = self.seed * 1000 + len(self.stages)  # re-seeded per stage, as DeeBERT's script does
        torch.manual_seed(stage_seed)  # before LoRA: its A matrices are drawn from the stage seed too
        if config.lora_rank:
            from eebench.lora import lora_stage

            with lora_stage(self.model, unique, config.lora_rank, config.lora_alpha, config.lora_targets,
                            config.lora_dropout) as trainable:
                return self._optimise(trainable, loss_fn, stage, epochs, lr, stage_seed, batch_size, clip_params)
        return self._optimise(unique, loss_fn, stage, epochs, lr, stage_seed, batch_size, clip_params)

    def _optimise(self, unique: list[nn.Parameter], loss_fn, stage: str, epochs: float, lr: float | None,
                  stage_seed: int, batch_size: int | None = None,
                  clip_params: Iterable[nn.Parameter] | None = None) -> dict[str, float | str]:
        config = self.config
        batch_size = batch_size or config.batch_size
        # Listed here, inside a LoRA stage, so that `model.parameters()` includes the adapters being trained.
        clipped = unique if clip_params is None else list({id(p): p for p in clip_params}.values())
        generator = torch.Generator().manual_seed(stage_seed)
        steps_per_epoch = math.ceil(len(self.data) / batch_size)
        total_steps = max(1, math.ceil(epochs * steps_per_epoch))
        optimizer = torch.optim.AdamW(unique, lr=lr or config.lr, eps=config.adam_eps, weight_decay=config.weight_decay)
        # imported here: transformers.optimization pulls in its Trainer utilities and peft, ~4 s of start-up that
        # every evaluation-only process (and each subprocess test) would otherwise pay
        from transformers import get_linear_schedule_with_warmup

        schedule = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
        self.model.train()
        started, step, running = time.perf_counter(), 0, float("nan")
        logged: dict[str, float] = {}
        bar = tqdm(total=total_steps, desc=stage, disable=not self.progress, leave=False, unit="step")
        while step < total_steps:
            for step_in_epoch, batch in enumerate(self.batches(shuffle=True, generator=generator, batch_size=batch_size)):
                batch["step_in_epoch"] = step_in_epoch  # mini-batch index within the epoch (BERxiT alternates on it)
                loss = loss_fn(batch)
                if isinstance(loss, tuple):  # (loss, {name: float}): training statistics the method logs
                    loss, stats = loss
                    for key, value in stats.items():
                        logged[key] = logged.get(key, 0.0) + float(value)
                if not torch.isfinite(loss):
                    bar.close()
                    raise NonFiniteLossError(
                        f"stage '{stage}', step {step + 1}/{total_steps}: the loss is {loss.item()}. The model diverged: "
                        f"lower the learning rate (now {lr or config.lr}) or check the data labels. "
                        "Nothing was cached or recorded for this job.")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(clipped, config.max_grad_norm)
                optimizer.step()
                schedule.step()
                self.model.zero_grad(set_to_none=True)  # frozen parts may have received gradients too
                running = loss.item() if math.isnan(running) else 0.9 * running + 0.1 * loss.item()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
                if step >= total_steps:
                    break
        bar.close()
        self.model.eval()
        record = {"stage": stage, "steps": total_steps, "epochs": epochs, "batch_size": batch_size, "final_loss": running,
                  "seconds": time.perf_counter() - started, **({"lora_rank": config.lora_rank} if config.lora_rank else {})}
        record.update({f"mean_{key}": value / total_steps for key, value in logged.items()})
        self.stages.append(record)
        return record


class StageCache:
    """Weights after a named training stage, shared by the jobs that agree on everything before it.

    `context` is what every job of the group shares (backbone, task data, seed, training settings); a stage's
    `signature` is what else determines it. Files: DIR/stage-<key>.pt (whole model state) + .json (its stages,
    written last, so a crash leaves no half-entry that looks complete)."""

    def __init__(self, directory: Path, context: dict):
        self.directory, self.context = Path(directory), context

    def _path(self, name: str, signature: dict) -> Path:
        from hashlib import sha256
        key = sha256(json.dumps({"context": self.context, "stage": name, "signature": signature},
                                sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.directory / f"stage-{key}.pt"

    def load(self, model: nn.Module, name: str, signature: dict, device, part: str | None = None) -> list[dict] | None:
        """Restore the stage into `model` (only the keys under `part`, if given; a file holding the whole
        model, as one saved without `part` does, serves too). None when the stage is not cached."""
        path = self._path(name, signature)
        meta = path.with_suffix(".json")
        if not (path.exists() and meta.exists()):
            return None
        state = torch.load(path, map_location=device, weights_only=True)
        if part is None:
            model.load_state_dict(state)
        else:
            prefix = f"{part}."
            model.get_submodule(part).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return json.loads(meta.read_text())

    def save(self, model: nn.Module, name: str, signature: dict, stages: list[dict], part: str | None = None) -> None:
        from eebench.store import atomic_write_text, atomic_write_with
        path = self._path(name, signature)
        state = model.state_dict() if part is None else {
            f"{part}.{k}": v for k, v in model.get_submodule(part).state_dict().items()}
        atomic_write_with(path, lambda handle: torch.save(state, handle))
        atomic_write_text(path.with_suffix(".json"), json.dumps(stages))

    def lock(self, name: str, signature: dict):
        from eebench.locks import path_lock
        return path_lock(self._path(name, signature).with_suffix(".lock"))
