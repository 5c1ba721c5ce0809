"""LoRA stages (eebench.lora): adapters on the pretrained targets only, merged back to plain linears."""

from __future__ import annotations

import torch
from test_calm import _calm, _train_batch
from torch import nn

from eebench.lora import lora_stage
from eebench.runner import Job
from eebench.training import LoopTrainer, TrainConfig


def test_merged_weights_give_the_adapted_models_outputs_and_leave_the_rest_untouched():
    method, spec, backbone = _calm()
    _, batch = _train_batch(method, backbone, spec)
    model = method.model
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    with lora_stage(model, list(model.backbone.parameters()), rank=4, alpha=8.0, targets=("q_proj", "v_proj")) as trainable:
        assert trainable and all("lora_" in n for n, p in model.backbone.named_parameters() if p.requires_grad)
        with torch.no_grad():
            for parameter in trainable:
                parameter.normal_(0, 0.05)  # B starts at zero: make the adapters change something
            adapted = model.backbone.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    merged = model.backbone.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    after = model.state_dict()
    assert set(after) == set(before)  # same keys: checkpoints and decoding see plain modules
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("q_proj" in name or "v_proj" in name for name in changed)
    assert all(type(m.self_attn.q_proj) is nn.Linear for m in model.backbone.model.model.layers)
    assert all(p.requires_grad for p in model.parameters())


def test_a_lora_trainer_stage_trains_adapters_and_new_heads_but_not_the_frozen_rest():
    method, spec, backbone = _calm()
    encoded, _ = _train_batch(method, backbone, spec, n=8)
    config = TrainConfig(epochs=1, lr=1e-2, batch_size=4, max_seq_length=64, lora_rank=2, lora_targets=("o_proj",))
    trainer = LoopTrainer(method.model, encoded, config, 0, backbone.tokenizer.pad_token_id, "cpu", progress=False)
    embeddings = backbone.model.model.embed_tokens.weight.detach().clone()
    o_proj = backbone.model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    head = method.model.exit_classifier.weight.detach().clone()
    def loss(batch):  # the LM loss through the adapters, plus a term that moves the (non-backbone) head
        return method.anytime_loss(batch)[0] + method.model.exit_classifier.weight.square().sum()

    record = trainer.train(list(method.model.parameters()), loss, stage="lora")
    assert record["lora_rank"] == 2
    assert torch.equal(backbone.model.model.embed_tokens.weight, embeddings)
    assert not torch.equal(backbone.model.model.layers[0].self_attn.o_proj.weight, o_proj)
    assert not torch.equal(method.model.exit_classifier.weight, head)  # a parameter outside the backbone trains


def test_full_fine_tuning_job_ids_do_not_change_with_the_lora_fields():
    job = Job(method="calm", task="dolly", seed=0, backbone="tiny-llama")
    assert "lora_rank" not in job.resolved()["train"]
    lora = Job(method="calm", task="dolly", seed=0, backbone="tiny-llama", train=TrainConfig(lora_rank=8))
    assert lora.resolved()["train"]["lora_rank"] == 8 and lora.job_id != job.job_id
