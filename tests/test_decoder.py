"""Decoder stepping: full depth equals `model.generate`; every propagation mode equals a no-cache reference."""

from __future__ import annotations

import math

import pytest
import torch

from eebench import costs
from eebench.backbones import load_backbone
from eebench.methods.decoding import DecodeLimits, decode

PROMPTS = ["Hello there, how are you today?", "The capital of France is", "Write a poem about the sea", "A"]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-llama", seed=0)


def _batch(backbone, prompts):
    encoded = backbone.tokenizer(prompts, return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def _generate(backbone, ids, mask, n):
    with torch.no_grad():
        # eos id -1: generate runs n tokens without stopping and without forbidding EOS (min_new_tokens would)
        out = backbone.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, eos_token_id=-1,
                                      do_sample=False, pad_token_id=backbone.tokenizer.pad_token_id)
    return out[:, ids.shape[1]:].tolist()


def test_left_padding_and_decoder_kind(tiny):
    ids, mask = _batch(tiny, PROMPTS)
    assert tiny.kind == "decoder" and tiny.tokenizer.padding_side == "left"
    assert bool((mask[:, -1] == 1).all()) and bool((mask[:, 0] == 0).any())  # left-padded, lengths differ


@pytest.mark.parametrize("batched", [False, True])
def test_full_depth_equals_generate(tiny, batched):
    limits = DecodeLimits(max_new_tokens=16)
    groups = [PROMPTS] if batched else [[p] for p in PROMPTS]
    for prompts in groups:
        ids, mask = _batch(tiny, prompts)
        with torch.no_grad():
            out = decode(tiny, ids, mask, limits)
        assert out.tokens == _generate(tiny, ids, mask, 16)
        assert all(layers == [tiny.num_layers] * 16 for layers in out.token_layers)
        assert all(evals == [1] * 16 for evals in out.head_evals)


class PatternRule:
    """Exits row r's token at step t at layer 1 + (3r + t) mod (L - 1): every layer below L gets used."""

    extra_macs = 0.0

    def __init__(self, num_layers: int):
        self.exit_points = tuple(range(1, num_layers))
        self.span = num_layers - 1

    def start(self, batch_size, device):
        return {}

    def target(self, row: int, step: int) -> int:
        return 1 + (3 * row + step) % self.span

    def decide(self, layer, step, view, state):
        wanted = torch.tensor([self.target(r, step) for r in view.rows.tolist()])
        return wanted == layer


def _reference(backbone, ids, mask, generated, exits, mode):
    """No cache, whole sequence: token t exits at exits[t] (prompt tokens at L); at layer k > exits[t] its
    state stays h^{exits[t]}, and layer k's K/V for it come from that state (calm: through layer k's norm;
    raw: without it; copy: the exit layer's own K/V). Returns per layer (K, V) of shape (B, g, S, e)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
    info, last = backbone.info, backbone.num_layers
    sequence = torch.cat([ids, generated], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(generated)], dim=1)
    exit_layer = torch.cat([torch.full_like(ids, last), exits], dim=1)  # (B, S)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    hidden = backbone.embed(sequence)
    cos, sin = backbone.rotary(hidden, positions)
    size, length = sequence.shape
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None] & full_mask.bool()[:, None, :]
    exit_keys: dict = {}
    per_layer = []
    for k in range(1, last + 1):
        module = backbone.layers[k - 1]
        attention = module.self_attn
        normed = module.input_layernorm(hidden)

        def heads(x, width=info.head_dim):
            return x.view(size, length, -1, width).transpose(1, 2)
        queries = heads(attention.q_proj(normed))
        kv_input = normed
        frozen = exit_layer < k  # (B, S): tokens that exited below layer k
        if mode == "raw":
            kv_input = torch.where(frozen[..., None], hidden, normed)
        keys, values = heads(attention.k_proj(kv_input)), heads(attention.v_proj(kv_input))
        queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
        if mode == "copy":
            for e, (k_e, v_e) in exit_keys.items():
                take = (exit_layer == e)[:, None, :, None]
                keys, values = torch.where(take, k_e, keys), torch.where(take, v_e, values)
        exit_keys[k] = (keys, values)
        groups = info.num_heads // info.num_kv_heads
        scores = queries @ repeat_kv(keys, groups).transpose(-1, -2) * attention.scaling
        scores = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        context = (scores @ repeat_kv(values, groups)).transpose(1, 2).reshape(size, length, -1)
        updated = hidden + attention.o_proj(context)
        updated = updated + module.mlp(module.post_attention_layernorm(updated))
        hidden = torch.where(frozen[..., None], hidden, updated)
        per_layer.append((keys, values))
    return per_layer


@pytest.mark.parametrize("mode,fused", [("calm", False), ("calm", True), ("raw", False), ("copy", False)])
def test_propagation_equals_no_cache_reference(tiny, mode, fused):
    steps = 9
    ids, mask = _batch(tiny, PROMPTS[:3])
    rule = PatternRule(tiny.num_layers)
    with torch.no_grad():
        out = decode(tiny, ids, mask, DecodeLimits(max_new_tokens=steps), rule=rule, propagation=mode, fused=fused,
                     keep_cache=True)
        cache = out.extras["cache"][0]
        # Every token but the last was fed back: its column holds the keys/values of the step that produced
        # the NEXT token, so column of token j ran token_layers[j + 1] layers.
        generated = torch.tensor([row[:-1] for row in out.tokens])
        exits = torch.tensor([row[1:] for row in out.token_layers])
        reference = _reference(tiny, ids, mask, generated, exits, mode)
    assert exits.lt(tiny.num_layers).all()  # the pattern really exited early at every decoding step
    for layer_index, (keys, values) in enumerate(reference):
        columns = keys.shape[2]
        real = torch.cat([mask, torch.ones_like(generated)], dim=1).bool()[:, None, :, None]
        got_k, got_v = cache.keys[layer_index][:, :, :columns], cache.values[layer_index][:, :, :columns]
        assert torch.allclose(got_k * real, keys * real, atol=1e-4), f"layer {layer_index + 1} keys"
        assert torch.allclose(got_v * real, values * real, atol=1e-4), f"layer {layer_index + 1} values"


def test_modes_differ_and_fused_matches_unfused(tiny):
    ids, mask = _batch(tiny, PROMPTS[:2])
    rule = PatternRule(tiny.num_layers)
    outs = {}
    with torch.no_grad():
        for mode, fused in (("calm", True), ("calm", False), ("raw", False), ("copy", False)):
            outs[(mode, fused)] = decode(tiny, ids, mask, DecodeLimits(max_new_tokens=8), rule=rule, propagation=mode,
                                         fused=fused, keep_cache=True).extras["cache"][0]
    last = tiny.num_layers - 1
    assert torch.allclose(outs[("calm", True)].keys[last], outs[("calm", False)].keys[last], atol=1e-5)
    assert not torch.allclose(outs[("calm", False)].keys[last], outs[("raw", False)].keys[last], atol=1e-3)
    assert not torch.allclose(outs[("calm", False)].keys[last], outs[("copy", False)].keys[last], atol=1e-3)


def test_stop_token_and_stop_string_end_rows_during_decoding(tiny):
    ids, mask = _batch(tiny, PROMPTS[:1])
    with torch.no_grad():
        free = decode(tiny, ids, mask, DecodeLimits(max_new_tokens=12))
        stop_id = free.tokens[0][4]
        first = free.tokens[0].index(stop_id)
        stopped = decode(tiny, ids, mask, DecodeLimits(max_new_tokens=12, stop_token_ids=frozenset({stop_id})))
    assert stopped.tokens[0] == free.tokens[0][:first + 1]  # the stop token is kept, nothing after it
    text = free.text[0]
    assert len(text) > 6
    needle = text[len(text) // 2:len(text) // 2 + 3]
    with torch.no_grad():
        cut = decode(tiny, ids, mask, DecodeLimits(max_new_tokens=12, stop_strings=(needle,)))
    assert needle not in cut.text[0] and text.startswith(cut.text[0])
    assert len(cut.tokens[0]) < len(free.tokens[0])  # decoding stopped, not just the text cut


def test_oracle_keeps_the_full_models_tokens_at_fewer_layers(tiny):
    ids, mask = _batch(tiny, PROMPTS)
    with torch.no_grad():
        full = decode(tiny, ids, mask, DecodeLimits(max_new_tokens=10))
        oracle = decode(tiny, ids, mask, DecodeLimits(max_new_tokens=10), oracle_exit_points=range(1, tiny.num_layers))
    # with propagated states later tokens may differ from the full model's; the first step's may not
    assert [row[:2] for row in oracle.tokens] == [row[:2] for row in full.tokens]
    assert all(1 <= layer <= tiny.num_layers for row in oracle.token_layers for layer in row)


def test_decoder_flops_by_hand(tiny):
    info = tiny.info
    d, f, h, g, e, vocab, last = (info.hidden_size, info.intermediate_size, info.num_heads, info.num_kv_heads,
                                  info.head_dim, info.vocab_size, info.num_layers)
    layer = lambda n: d * h * e + 2 * d * g * e + h * e * d + 3 * d * f + 2 * n * h * e  # noqa: E731
    # two tokens after a 5-token prompt: the first at full depth, the second exits at layer 2 after 2 head evals
    expected = 2 * (last * layer(6) + 1 * d * vocab + 2 * layer(7) + 2 * d * vocab + (last - 2) * 2 * d * g * e + 10)
    got = costs.decoder_row_flops([last, 2], [1, 2], prompt_tokens=5, rule_macs=10, info=info)
    assert math.isclose(got, expected)
    no_propagation = costs.decoder_row_flops([last, 2], [1, 2], prompt_tokens=5, rule_macs=10, info=info, propagates=False)
    assert math.isclose(got - no_propagation, 2 * (last - 2) * 2 * d * g * e)
