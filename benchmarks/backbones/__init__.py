"""Backbones, one file per kind: `encoder` (BERT-style, classification) and `decoder` (Llama-family, generation).

`load_backbone(name)` picks the kind from the name: the decoder names (``smollm2``, ``tiny-llama``) and any
folder or hub name of a Llama-family causal LM load a `DecoderBackbone`; everything else an `EncoderBackbone`.
"""

from __future__ import annotations

import torch

from eebench.backbones.decoder import (
    DECODER_DEFAULT,
    DecoderBackbone,
    DecoderBackboneError,
    DecoderInfo,
    KVCache,
    is_decoder_name,
    load_decoder,
)
from eebench.backbones.encoder import (
    OFFLINE_DEFAULT,
    POOLINGS,
    TINY_CONFIGS,
    BackboneError,
    BackboneInfo,
    EncoderBackbone,
    VectorPooler,
    attention_bias,
    checkpoint_pooling,
    keep_positions,
    load_encoder,
    minilm_path,
)


def load_backbone(name: str = OFFLINE_DEFAULT, seed: int = 0, dtype: torch.dtype = torch.float32,
                  pooling: str = "auto") -> EncoderBackbone | DecoderBackbone:
    """An encoder or a decoder by name (see the module docstrings of `encoder` and `decoder`)."""
    if is_decoder_name(name):
        return load_decoder(name, seed=seed, dtype=dtype)
    return load_encoder(name, seed=seed, dtype=dtype, pooling=pooling)


def backbone_names() -> list[str]:
    return [OFFLINE_DEFAULT, *TINY_CONFIGS, DECODER_DEFAULT, "tiny-llama"]


__all__ = [
    "DECODER_DEFAULT", "OFFLINE_DEFAULT", "POOLINGS", "TINY_CONFIGS", "BackboneError", "BackboneInfo", "DecoderBackbone",
    "DecoderBackboneError", "DecoderInfo", "EncoderBackbone", "KVCache", "VectorPooler", "attention_bias",
    "backbone_names", "checkpoint_pooling", "is_decoder_name", "keep_positions", "load_backbone", "load_decoder",
    "load_encoder", "minilm_path",
]
