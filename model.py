"""The model: a Llama / Mistral / Qwen2 forward pass in one file, and greedy generation.

Reads a Hugging Face checkpoint folder (config.json + safetensors) and runs it with an
explicit KV cache (cache.py). The modules come in reading order: config, RMSNorm, RoPE,
Attention, FeedForward, TransformerBlock, Transformer, then loading and generation.

The attention layer is where the data meets the cache: it writes its RoPE'd keys and
values into the cache and gets back every entry it may attend to, with the mask of what
each query may see. The model knows no policy: policies.py records what it needs through
the cache (the queries) or through `attention=`, a function every attention layer calls
(H2O sums what each key receives in the prefill; KVzip scores a replay of the turn), then
asks the cache to keep what it chose.

Names of parameters follow Hugging Face (`q_proj`, `input_layernorm`, ...), so a
checkpoint loads with no renaming beyond the leading "model.".
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

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
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
    rope_scaling: dict | None     # only {"rope_type": "llama3", ...} (Llama-3.1 / 3.2)
    max_positions: int
    tie_word_embeddings: bool
    qkv_bias: bool                # Qwen2: bias on q/k/v projections
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None    # Mistral v0.1; prompts longer than it are refused

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} in config.json "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        n_heads = cfg["num_attention_heads"]
        # transformers >= 5 writes rope settings as `rope_parameters`; older files as rope_theta/rope_scaling
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope scaling type {rope_type!r} in config.json (supported: llama3)")
        sliding_window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding_window = None
        attention_bias = cfg.get("attention_bias", False)
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_positions=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=cfg.get("mlp_bias", False),
            sliding_window=sliding_window,
        )


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_fp32 = x.float()  # normalise in float32, like the reference implementation
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3.1's smooth long-context scaling when configured."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = args.rope_scaling
    if s is None:
        return inv_freq
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
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)

    def forward(self, x, cos, sin, cache: KVCache, attention=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # the cache stores k, v (and, while it records, q for a policy) and returns every
        # key and value this layer may attend to, with the mask of what each query may see
        keys, values, mask = cache.update(self.layer_idx, q, k, v)                     # (B, H_kv, S, D)
        if mask is not None and mask.shape[1] > 1:                                     # per KV head (ragged eviction):
            mask = mask.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)      # to its query heads (B, H, T, S)
        # a policy that reads this layer's attention gets it first (policies.Observer): it may compute the
        # output itself (H2O sums what each key receives as it goes) or only look (None)
        y = None if attention is None else attention(self.layer_idx, x, q, keys, values, mask)
        if y is None:
            # no mask: a one-token step sees every slot; a longer chunk starts the cache (T == S)
            # and is plainly causal, which lets attention skip the masked half of its work
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_heads != self.n_kv_heads)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, cache, attention=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        self.eos_ids: tuple[int, ...] = ()  # end-of-turn ids, set by load_model

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, batch_size, a.n_kv_heads, a.head_dim, capacity=capacity,
                       dtype=self.dtype, device=self.device, inv_freq=self.inv_freq)

    def forward(self, tokens: torch.Tensor, cache: KVCache, real: torch.Tensor | None = None,
                all_logits: bool = False, attention=None) -> torch.Tensor:
        """Run `tokens` (B, T) after what `cache` holds; return logits.

        `real` (B, T) marks real tokens (False = padding that nothing will attend to).
        Returns the logits of every position (B, T, V) when `all_logits`, else those of
        each row's last real token (B, V). Every attention layer calls `attention(layer, x, q, keys,
        values, mask)` (a policy's observer, policies.Observer) with its input x (B, T, dim) and uses
        what it returns as its output, or runs flash attention when it returns None.
        """
        B, T = tokens.shape
        if real is None:
            real = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        positions = cache.begin(real)                       # (B, T) original positions
        last = int(positions.max()) if T else 0
        if last >= self.args.max_positions:
            raise ValueError(f"the sequence reaches position {last}, past the model's context of "
                             f"{self.args.max_positions} tokens: shorten the prompt or --max-new-tokens")
        if self.args.sliding_window is not None and last >= self.args.sliding_window:
            raise ValueError(f"the sequence reaches position {last}, past the model's sliding window of "
                             f"{self.args.sliding_window}: sliding-window attention is not implemented")
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)
        x = self.embed_tokens(tokens)                       # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, attention)
        if not all_logits:                                  # only each row's last real token
            last_real = real.cumsum(1).argmax(1)            # index of the last True per row
            x = x[torch.arange(B, device=x.device), last_real][:, None]
        logits = self.lm_head(self.norm(x)).float()
        return logits if all_logits else logits[:, 0]


# ----------------------------------------------------------------------------- loading

def load_model(folder: str, device: str = "cpu", dtype: str | torch.dtype = "float32") -> Transformer:
    """Load a Hugging Face checkpoint folder straight into `dtype` on `device` (one copy in memory)."""
    from safetensors import SafetensorError, safe_open

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    config_path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"weights folder {folder!r} does not exist: run `make weights` "
                                f"(python weights/prepare.py) or see weights/README.md")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing: {folder!r} is not a Hugging Face checkpoint folder")
    config = _read_json(config_path)
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
    model.eos_ids = _eos_ids(folder, config)
    return model.eval().requires_grad_(False)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        names = sorted(set(_read_json(index)["weight_map"].values()))
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
    """Greedy decoding: prefill `tokens` (B, T) after what the cache holds, then one token at a time.

    Each row stops at its first stop id (kept out of the output) or after `max_new_tokens`;
    stop_ids=() never stops. Positions continue from the cache's, so a compressed cache keeps
    its original positions. A finished row leaves the batch (cache.select_rows), so it stops
    costing work; a caller that needs the rows again takes cache.checkpoint() before and
    restore()s after.

    `cuts` (decoding.Cuts) compresses while the answer grows; the loop only tells it where it
    is: after the prefill (start), after each decode forward (after_forward), and which rows
    remain (keep_rows) until the end (finish).
    """
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
