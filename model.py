"""The model: a Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 forward pass in one file, and greedy generation.

Reads a Hugging Face checkpoint folder (config.json + safetensors; parameter names as HF's) and runs it
with an explicit KV cache (cache.py). In reading order: config, RMSNorm, RoPE, Attention, FeedForward,
TransformerBlock, Transformer, loading, generation. The families differ by switches in ModelArgs:
Qwen3 and Gemma 3 normalise q and k per head; Gemma 3 also uses (1 + weight) RMSNorm, scaled
embeddings, GeGLU, norms after attention and the MLP, and local (sliding-window) layers with their
own RoPE base. The attention layer writes its keys and values into the cache and gets back what it may
attend to, with the mask; the model knows no policy (policies.py reads through the cache, or through
`attention=`, a function every attention layer calls).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cache import KVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
ROPE_TYPES = ("default", "llama3", "linear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- config

@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    dim: int                      # hidden size
    n_layers: int
    n_heads: int                  # query heads
    n_kv_heads: int               # key/value heads (GQA when < n_heads)
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None     # {"rope_type": "llama3", ...} (Llama-3.1 / 3.2) or {"rope_type": "linear", ...}
    max_positions: int
    tie_word_embeddings: bool
    qkv_bias: bool                # Qwen2: bias on q/k/v projections
    o_bias: bool
    mlp_bias: bool
    windows: list                 # per layer: its sliding window (a query at p sees p - window < k <= p), or None
    qk_norm: bool = False         # Qwen3, Gemma 3: RMSNorm over each head's q and k, before RoPE
    gemma: bool = False           # Gemma 3: (1 + w) RMSNorm, GeGLU, embeddings x sqrt(dim), norms after attention, MLP
    local_rope_theta: float | None = None   # Gemma 3: the RoPE base of the local (sliding-window) layers
    attention_scale: float | None = None    # None: 1 / sqrt(head_dim); Gemma 3: query_pre_attn_scalar ** -0.5
    final_softcap: float | None = None      # output logits -> cap * tanh(logits / cap)
    compress_local: bool = True   # False: eviction leaves the local layers to their window (Gemma 3, as kvpress)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        model_type = cfg.get("model_type")
        if model_type == "gemma3" or "vision_config" in cfg:
            raise ValueError(f"model_type {model_type!r} has a vision tower (Gemma3ForConditionalGeneration); nanokv "
                             "runs text-only checkpoints (gemma3_text, Gemma3ForCausalLM)")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} in config.json "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        gemma = model_type == "gemma3_text"
        if gemma and cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported hidden_activation {cfg['hidden_activation']!r} in config.json "
                             "(Gemma 3 uses gelu_pytorch_tanh)")
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention is set in config.json: nanokv runs causal attention only")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings", "sliding_window"):
            if cfg.get(name) is not None and (type(cfg[name]) is not int or cfg[name] < 1):
                raise ValueError(f"config.json's {name} is {cfg[name]!r}, not a positive integer")
        n_heads = cfg["num_attention_heads"]
        if n_heads % (cfg.get("num_key_value_heads") or n_heads):
            raise ValueError(f"config.json's num_key_value_heads ({cfg['num_key_value_heads']}) does not divide "
                             f"num_attention_heads ({n_heads})")
        rope_theta, rope_scaling, local_theta = rope_settings(cfg, gemma)
        attention_bias = cfg.get("attention_bias", False)
        default_head_dim = {"gemma3_text": 256, "qwen3": 128}.get(model_type, cfg["hidden_size"] // n_heads)  # as HF
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or default_head_dim,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_positions=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", gemma),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=cfg.get("mlp_bias", False),
            windows=layer_windows(cfg, model_type),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            gemma=gemma,
            local_rope_theta=None if local_theta is None else float(local_theta),
            attention_scale=cfg.get("query_pre_attn_scalar", 256) ** -0.5 if gemma else None,
            # attn_logit_softcapping is not read: Gemma 3 replaced it by the q/k norms, and transformers ignores it
            final_softcap=cfg.get("final_logit_softcapping"),
            compress_local=not gemma,
        )


def rope_settings(cfg: dict, gemma: bool) -> tuple:
    """(base, scaling or None, the local layers' base or None), as transformers reads config.json. transformers
    >= 5 writes `rope_parameters` (Gemma 3: one per layer type); older files rope_theta / rope_scaling (and
    Gemma 3's rope_local_base_freq)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.json's rope settings are {rope!r}, not an object")
    rope = dict(rope)
    local = rope.pop("sliding_attention", None) or {}
    rope = dict(rope.pop("full_attention", None) or rope)
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 1e6 if gemma else 10000.0))
    local_theta = cfg.get("rope_local_base_freq", local.get("rope_theta", 10000.0)) if gemma else None
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r} in config.json (supported: llama3, linear)")
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope scaling type {local['rope_type']!r} for the sliding-window layers in "
                         "config.json (Gemma 3's local layers use plain RoPE)")
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if rope_type != "default" else None
    return rope_theta, scaling, local_theta


def layer_windows(cfg: dict, model_type: str) -> list:
    """Each layer's sliding window (None: global attention), as transformers reads config.json."""
    n, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if window is None:
        return [None] * n
    types = cfg.get("layer_types") if model_type != "mistral" else None    # Mistral: every layer slides
    if types is None and model_type == "gemma3_text":                   # older configs: every n-th layer is global
        pattern = cfg.get("sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    elif types is None and model_type in ("qwen2", "qwen3"):
        types = ["sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention" for i in range(n)]
    types = types or ["sliding_attention"] * n
    if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"unsupported layer_types in config.json: {sorted(set(types))} for {n} layers "
                         "(supported: sliding_attention, full_attention)")
    return [window if kind == "sliding_attention" else None for kind in types]


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x):
        x_fp32 = x.float()  # normalise in float32, like the reference implementation
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:      # Gemma: scale by (1 + weight) in float32, then cast
            return (x_fp32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x_fp32.to(x.dtype)


def rope_frequencies(args: ModelArgs, local: bool = False) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3.1's smooth long-context scaling or linear scaling when
    configured. local: those of Gemma 3's local layers (their own base, never scaled)."""
    dim = args.head_dim
    theta = args.local_rope_theta if local else args.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = None if local else args.rope_scaling
    if s is None:
        return inv_freq
    if s.get("rope_type", s.get("type")) == "linear":
        return inv_freq / s["factor"]
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T)."""
    freqs = positions[..., None].float() * inv_freq          # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                  # (B, T, D), rotate-half layout
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate (B, H, T, D) by position: HF's rotate-half convention (first half pairs with second)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = args.attention_scale
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        if args.qk_norm:                                                               # Qwen3, Gemma 3
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.gemma)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.gemma)

    def forward(self, x, cos, sin, cache: KVCache, attention=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)                      # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)                   # (B, T, H_kv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)                                      # per head, before RoPE
        q, k = q.transpose(1, 2), k.transpose(1, 2)                                    # (B, H, T, D), (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # the cache stores k, v (and, while it records, q for a policy) and returns every
        # key and value this layer may attend to, with the mask of what each query may see
        keys, values, mask = cache.update(self.layer_idx, q, k, v)                     # (B, H_kv, S, D)
        if mask is not None and mask.shape[1] > 1:                                     # per KV head (ragged eviction):
            mask = mask.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)      # to its query heads (B, H, T, S)
        # a policy that reads this layer's attention gets it first (policies.Observer): it computes the output
        # itself (H2O), or only looks (None; KVzip's replay). At 1 / sqrt(D): q carries any other scale (Gemma 3)
        scaled = q if attention is None or self.scale is None else q * (self.scale * math.sqrt(self.head_dim))
        y = None if attention is None else attention(self.layer_idx, x, scaled, keys, values, mask)
        if y is None:
            # no mask: a one-token step sees every slot; a longer chunk starts the cache (T == S)
            # and is plainly causal, which lets attention skip the masked half of its work
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                        # y: (B, H, T, D)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)
        self.gelu = args.gemma                       # Gemma: GeGLU with tanh-approximated GELU; else SwiGLU

    def forward(self, x):
        gate = F.gelu(self.gate_proj(x), approximate="tanh") if self.gelu else F.silu(self.gate_proj(x))
        return self.down_proj(gate * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps, args.gemma)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps, args.gemma)   # Gemma: on attention's output
        self.mlp = FeedForward(args)
        self.gemma = args.gemma
        if args.gemma:                                                                 # and two around the MLP
            self.pre_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps, gemma=True)
            self.post_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps, gemma=True)

    def forward(self, x, cos, sin, cache, attention=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache, attention)
        if self.gemma:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.gemma)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        local = rope_frequencies(args, local=True) if args.local_rope_theta is not None else None
        self.register_buffer("local_inv_freq", local, persistent=False)    # Gemma 3's local layers
        self.eos_ids: tuple[int, ...] = ()  # end-of-turn ids, set by load_model

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> KVCache:
        """An empty cache: each layer's sliding window, the layers eviction leaves alone, the RoPE frequencies."""
        a = self.args
        exempt = [w is not None and not a.compress_local for w in a.windows]
        return KVCache(a.n_layers, batch_size, a.n_kv_heads, a.head_dim, capacity=capacity, dtype=self.dtype,
                       device=self.device, inv_freq=self.inv_freq, windows=a.windows, exempt=exempt)

    def forward(self, tokens: torch.Tensor, cache: KVCache, real: torch.Tensor | None = None,
                all_logits: bool = False, attention=None) -> torch.Tensor:
        """Run `tokens` (B, T) after what `cache` holds (`real`: False for padding); logits of every position
        (B, T, V) with `all_logits`, else of each row's last real token (B, V). Every attention layer calls
        `attention(layer, x, q, keys, values, mask)` and uses what it returns, or flash attention for None."""
        B, T = tokens.shape
        if real is None:
            real = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        positions = cache.begin(real)                       # (B, T) original positions
        last = int(positions.max()) if T else 0
        if last >= self.args.max_positions:
            raise ValueError(f"the sequence reaches position {last}, past the model's context of "
                             f"{self.args.max_positions} tokens: shorten the prompt or --max-new-tokens")
        rope = rope_cos_sin(self.inv_freq, positions, self.dtype)          # cos, sin (B, 1, T, D)
        local = rope if self.local_inv_freq is None else rope_cos_sin(self.local_inv_freq, positions, self.dtype)
        x = self.embed_tokens(tokens)                       # (B, T, dim)
        if self.args.gemma:                                 # scaled by sqrt(dim), rounded to the model's dtype
            x = x * torch.tensor(self.args.dim ** 0.5, device=x.device).to(x.dtype)
        for layer, window in zip(self.layers, self.args.windows):
            x = layer(x, *(rope if window is None else local), cache, attention)
        if not all_logits:                                  # only each row's last real token
            last_real = real.cumsum(1).argmax(1)            # index of the last True per row
            x = x[torch.arange(B, device=x.device), last_real][:, None]
        logits = self.lm_head(self.norm(x))
        if self.args.final_softcap is not None:
            logits = torch.tanh(logits / self.args.final_softcap) * self.args.final_softcap
        logits = logits.float()
        return logits if all_logits else logits[:, 0]


# ----------------------------------------------------------------------------- loading

def load_model(folder: str, device: str = "cpu", dtype: str | torch.dtype = "float32") -> Transformer:
    """Load a Hugging Face checkpoint folder straight into `dtype` on `device` (one copy in memory)."""
    from safetensors import SafetensorError, safe_open

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    config = read_config(folder)
    args = ModelArgs.from_hf_config(config)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: p.shape for name, p in model.named_parameters()}  # tied head appears once

    state = {}
    for path in _safetensors_files(folder):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for hf_name in f.keys():
                    name = hf_name.removeprefix("model.")
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and args.tie_word_embeddings):
                        continue
                    if name not in expected:
                        raise ValueError(f"unexpected tensor {hf_name!r} in {path} (not a {args.model_type} weight)")
                    tensor = f.get_tensor(hf_name)
                    if tensor.shape != expected[name]:
                        raise ValueError(f"tensor {hf_name!r} in {path} has shape {tuple(tensor.shape)}, "
                                         f"config.json implies {tuple(expected[name])}")
                    state[name] = tensor.to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}): re-download or re-convert it") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"checkpoint in {folder!r} lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
    model.load_state_dict(state, strict=False, assign=True)  # completeness was checked above
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(args).to(device)
    if args.local_rope_theta is not None:
        model.local_inv_freq = rope_frequencies(args, local=True).to(device)
    model.eos_ids = _eos_ids(folder, config)
    return model.eval().requires_grad_(False)


def read_config(folder: str) -> dict:
    """A checkpoint folder's config.json (FileNotFoundError: no such folder or file; ValueError: malformed)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"weights folder {folder!r} does not exist: run `make weights` "
                                f"(python weights/prepare.py) or see weights/README.md")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {folder!r} is not a Hugging Face checkpoint folder")
    return _read_json(path)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path} is not a config: it nests deeper than Python's JSON reader allows") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object: re-download or re-convert it")
    return data


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = _read_json(index).get("weight_map")
        names = list(files.values()) if isinstance(files, dict) else []
        if not names or not all(isinstance(n, str) and os.path.basename(n) == n for n in names):
            raise ValueError(f"{index} has no weight_map from tensor names to file names: re-download it")
        names = sorted(set(names))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        names = ["model.safetensors"]
    else:
        names = sorted(n for n in os.listdir(folder) if n.startswith("model") and n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors weights in {folder!r} (only safetensors checkpoints are loaded)")
    for n in names:
        if not os.path.isfile(os.path.join(folder, n)):
            raise FileNotFoundError(f"shard {n!r} named by the index is missing from {folder!r}")
    return [os.path.join(folder, n) for n in names]


def _eos_ids(folder: str, config: dict) -> tuple[int, ...]:
    """End-of-turn ids: generation_config.json's eos_token_id (Llama-3 lists several), else config.json's."""
    ids = []
    gen_path = os.path.join(folder, "generation_config.json")
    for source in ([_read_json(gen_path)] if os.path.isfile(gen_path) else []) + [config]:
        eos = source.get("eos_token_id")
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(type(i) is int and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id in {folder!r} (generation_config.json or config.json) is not token ids: {ids}")
    return tuple(dict.fromkeys(ids))


# ----------------------------------------------------------------------------- generation

def pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (B, T) tokens and the (B, T) mask of real tokens."""
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    return tokens, torch.arange(width, device=device) < torch.tensor(list(map(len, rows)), device=device)[:, None]


@torch.no_grad()
def generate(model: Transformer, cache: KVCache, tokens: torch.Tensor, max_new_tokens: int,
             real: torch.Tensor | None = None, stop_ids=None, cuts=None) -> list[list[int]]:
    """Greedy decoding: prefill `tokens` (B, T) after what the cache holds, then one token at a time, each row
    until its first stop id (left out) or `max_new_tokens`. Positions continue from the cache's. A finished
    row leaves the batch (cache.select_rows: checkpoint before, restore after, to keep the rows). `cuts`
    (decoding.Cuts) compresses while the answer grows: the loop only tells it where it is."""
    stop = torch.tensor(list(model.eos_ids if stop_ids is None else stop_ids), device=tokens.device, dtype=torch.long)
    answers = [[] for _ in range(tokens.shape[0])]
    rows = list(range(tokens.shape[0]))                             # the original row of each live batch entry
    logits = model(tokens, cache, real)                              # (B, V)
    if cuts is not None:
        cuts.start(cache)
    for step in range(max_new_tokens):
        next_token = logits.argmax(-1)                               # (B_live,)
        finished = torch.isin(next_token, stop)
        for row, token, done in zip(rows, next_token.tolist(), finished.tolist()):
            if not done:
                answers[row].append(token)
        if bool(finished.any()):
            live = (~finished).nonzero()[:, 0]
            if len(live) == 0:
                break
            if cuts is not None:
                cuts.keep_rows(cache, live)
            cache.select_rows(live)
            rows = [rows[i] for i in live.tolist()]
            next_token = next_token[live]
        if step + 1 < max_new_tokens:
            logits = model(next_token[:, None], cache)               # decode forward number step + 1
            if cuts is not None:
                cuts.after_forward(cache, step + 1)
    if cuts is not None:
        cuts.finish(cache)
    return answers
