"""LoRA for any method's training stage (peft): the stage trains low-rank adapters on the pretrained
backbone's target linears instead of its weights, and the adapters are merged back when it ends.

Used by `LoopTrainer` when `TrainConfig.lora_rank > 0`, so every method gets it without code of its own
(the ConsistentEE paper fine-tunes Llama-2-7B with LoRA; CALM's anytime loss works the same way). After the
merge the model has its original module types and state-dict keys: decoding, the fused K/V weights and the
checkpoint cache see plain linears whose weights are W + (alpha / r) B A.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn


def _outermost_pretrained(model: nn.Module, given: set[int]) -> list[nn.Module]:
    """The outermost transformers.PreTrainedModel submodules holding any of the `given` parameters."""
    from transformers import PreTrainedModel

    found: list[nn.Module] = []
    covered: set[int] = set()  # modules() is pre-order: a parent comes before what it contains
    for module in model.modules():
        if id(module) not in covered and isinstance(module, PreTrainedModel) and any(
                id(p) in given for p in module.parameters()):
            found.append(module)
            covered.update(id(m) for m in module.modules())
    return found


def _merge_and_unload(module: nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, layer.get_base_layer())


@contextmanager
def lora_stage(model: nn.Module, params: Sequence[nn.Parameter], rank: int, alpha: float,
               targets: Sequence[str], dropout: float = 0.0) -> Iterator[list[nn.Parameter]]:
    """Yield what the stage optimises: adapters (rank `rank`, scale alpha / rank) on the modules named
    `targets` (e.g. q_proj, v_proj) of the pretrained models among `params`, plus the `params` outside them
    (new heads) unchanged. The pretrained weights are frozen meanwhile; on exit the adapters are merged and
    removed and every parameter gets its former requires_grad."""
    from peft import LoraConfig, inject_adapter_in_model

    given = {id(p) for p in params}
    pretrained = _outermost_pretrained(model, given)
    inside = {id(p) for m in pretrained for p in m.parameters()}
    others = [p for p in params if id(p) not in inside]
    trainable_before = {p: p.requires_grad for m in pretrained for p in m.parameters()}
    for parameter in trainable_before:
        parameter.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, bias="none")
    try:
        for module in pretrained:
            inject_adapter_in_model(config, module)
        adapters = [p for m in pretrained for name, p in m.named_parameters() if "lora_" in name]
        if pretrained and not adapters:
            raise ValueError(f"LoRA: no module named any of {list(targets)} in {type(pretrained[0]).__name__}; "
                             "set TrainConfig.lora_targets to its linear layers' names (e.g. q_proj, v_proj)")
        yield adapters + others
    finally:
        for module in pretrained:
            _merge_and_unload(module)
        for parameter, was_trainable in trainable_before.items():
            parameter.requires_grad_(was_trainable)


@contextmanager
def lora_adapters(root: nn.Module, target_pattern: str, rank: int, alpha: float, dropout: float = 0.0
                  ) -> Iterator[list[nn.Parameter]]:
    """LoRA (peft) on the linears of `root` whose names match the regex `target_pattern` (e.g. r"heads\\.\\d+"),
    for a method's own modules: yields the adapters; the targets' weights are frozen meanwhile; on exit the
    adapters are merged and removed (the modules are plain linears again, with W + (alpha / r) B A)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_pattern, lora_dropout=dropout, bias="none")
    before = {p: p.requires_grad for p in root.parameters()}
    inject_adapter_in_model(config, root)
    try:
        adapters = [p for name, p in root.named_parameters() if "lora_" in name]
        if not adapters:
            raise ValueError(f"LoRA: no module of {type(root).__name__} matches {target_pattern!r}")
        for parameter in before:
            parameter.requires_grad_(False)
        yield adapters
    finally:
        _merge_and_unload(root)
        if hasattr(root, "peft_config"):  # peft's bookkeeping of the adapters just merged: the next stage starts clean
            del root.peft_config
        for parameter, trainable in before.items():
            parameter.requires_grad_(trainable)
