"""Qwen3, Gemma 3 text and sliding-window attention, pinned to Hugging Face transformers (a test dependency).

Each supported model type gets a tiny random checkpoint made by transformers itself (`save_pretrained`):
llama with llama3 RoPE scaling, mistral with a sliding window shorter than the prompts, qwen2, qwen3
(head_dim from the config, not hidden / heads), and gemma3_text with local and global layers (own RoPE
bases, linear scaling on the global ones, query_pre_attn_scalar != head_dim), plus a Gemma 3 with
soft-capping. In float32 nanokv must give transformers' logits at every position (<= 1e-4), its 16-token
greedy continuation, and the same logits whether a prompt runs as one forward or chunk by chunk through
the cache.

Eviction on the sliding-window models is checked against a float64 forward written here with explicit
masks: a query sees a key when it lies at or before it, inside the layer's window (original positions:
p - window < k <= p, as transformers' sliding_window_overlay), and, for keys of the compressed turn,
only if eviction kept it. Decoding with decode-time cuts reuses tests/test_decode.py's reference
(`reference_generate`), its float64 forward given the window.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import test_decode  # noqa: E402
from cache import HEADROOM  # noqa: E402
from decoding import DECODE, Cuts, Decoding  # noqa: E402
from model import ModelArgs, generate, load_model  # noqa: E402
from policies import ALLOCATIONS, POLICIES, Compression, prefill  # noqa: E402

WINDOW = 16
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
GEMMA = dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW, rope_theta=1e6, rope_local_base_freq=1e4,
             layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
             rope_scaling={"rope_type": "linear", "factor": 2.0})
FAMILIES = {
    "llama31": ("LlamaConfig", dict(rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW, rope_theta=10000.0)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, rope_theta=1e6)),
    "gemma3_text": ("Gemma3TextConfig", GEMMA),
    "gemma3_softcap": ("Gemma3TextConfig", dict(GEMMA, attn_logit_softcapping=4.0, final_logit_softcapping=3.0)),
    # (transformers ignores attn_logit_softcapping in Gemma 3, and so does nanokv: only the final one caps)
}
SLIDING = ["mistral", "gemma3_text"]


def make_checkpoint(folder, family: str, seed: int = 0) -> str:
    """A random checkpoint saved by transformers, with weights large enough that every part matters."""
    config_class, settings = FAMILIES[family]
    config = getattr(transformers, config_class)(**dict(COMMON, **settings))
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    gemma = config_class.startswith("Gemma")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):         # Gemma scales by (1 + weight)
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    hf.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: make_checkpoint(root / family, family) for family in FAMILIES}


def hf_model(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def tokens_of(n, seed, batch=1, vocab=128):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- pinned to transformers

@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_at_every_position_match_transformers(checkpoints, family):
    ours, theirs = load_model(checkpoints[family]), hf_model(checkpoints[family])
    tokens = tokens_of(3 * WINDOW, 1, batch=2)                   # longer than the window
    expected = theirs(tokens).logits
    logits = ours(tokens, ours.new_cache(2), all_logits=True)
    assert (logits - expected).abs().max() <= 1e-4
    assert expected.abs().max() > 1.0                            # not a near-zero model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_continuation_matches_transformers(checkpoints, family):
    ours, theirs = load_model(checkpoints[family]), hf_model(checkpoints[family])
    prompt = tokens_of(WINDOW + 9, 2)
    theirs.generation_config.eos_token_id = None
    expected = theirs.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
    assert generate(ours, ours.new_cache(), prompt, 16, stop_ids=())[0] == expected.tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_and_decode_through_the_cache_equal_one_forward(checkpoints, family):
    model = load_model(checkpoints[family])
    tokens = tokens_of(3 * WINDOW + 5, 3, batch=2)
    full = model(tokens, model.new_cache(2), all_logits=True)
    cache = model.new_cache(2, capacity=8)                        # forces the buffers to grow, and forgetting
    steps = [model(tokens[:, :11], cache, all_logits=True), model(tokens[:, 11:30], cache, all_logits=True)]
    steps += [model(tokens[:, t:t + 1], cache, all_logits=True) for t in range(30, tokens.shape[1])]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("family", SLIDING + ["qwen3"])
def test_padded_rows_equal_rows_run_alone(checkpoints, family):
    model = load_model(checkpoints[family])
    lengths = [2 * WINDOW + 3, WINDOW + 1, 7]
    tokens = tokens_of(max(lengths), 4, batch=3)
    real = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    cache = model.new_cache(3)
    batched = model(tokens, cache, real=real)
    answers = generate(model, cache, tokens[:, :5], 2 * WINDOW, stop_ids=())     # decodes past the window
    for row, L in enumerate(lengths):
        alone = model.new_cache()
        assert (model(tokens[row:row + 1, :L], alone)[0] - batched[row]).abs().max() <= 1e-5
        assert generate(model, alone, tokens[row:row + 1, :5], 2 * WINDOW, stop_ids=())[0] == answers[row]


def test_config_switches(checkpoints):
    """What each family turns on, read from the files transformers wrote."""
    args = {f: load_model(checkpoints[f]).args for f in FAMILIES}
    assert args["qwen3"].head_dim == 24 and args["qwen3"].qk_norm and not args["qwen3"].qkv_bias
    assert args["mistral"].windows == [WINDOW] * 4 and args["mistral"].compress_local
    gemma = args["gemma3_text"]
    assert gemma.windows == [WINDOW, None, WINDOW, None] and not gemma.compress_local
    assert (gemma.rope_theta, gemma.local_rope_theta, gemma.rope_scaling["factor"]) == (1e6, 1e4, 2.0)
    assert gemma.attention_scale == 24 ** -0.5 and gemma.tie_word_embeddings
    assert args["gemma3_softcap"].final_softcap == 3.0 and args["gemma3_text"].final_softcap is None
    assert all(a.windows == [None] * 4 for f, a in args.items() if f not in SLIDING + ["gemma3_softcap"])


def test_hub_style_gemma_config_loads_the_same(checkpoints, tmp_path):
    """Gemma 3's configs on the hub predate transformers 5: rope_theta, rope_local_base_freq, rope_scaling and
    sliding_window_pattern instead of rope_parameters and layer_types."""
    folder = tmp_path / "gemma"
    folder.mkdir()
    os.symlink(os.path.join(checkpoints["gemma3_text"], "model.safetensors"), folder / "model.safetensors")
    config = json.load(open(os.path.join(checkpoints["gemma3_text"], "config.json")))
    for key in ("rope_parameters", "layer_types"):
        config.pop(key)
    config.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 2.0},
                  sliding_window_pattern=2)
    (folder / "config.json").write_text(json.dumps(config))
    tokens = tokens_of(40, 5)
    a, b = load_model(checkpoints["gemma3_text"]), load_model(str(folder))
    assert a.args == b.args
    assert torch.equal(a(tokens, a.new_cache()), b(tokens, b.new_cache()))


@pytest.mark.parametrize("edit, message", [
    (dict(model_type="gemma3", vision_config={}), "has a vision tower"),
    (dict(model_type="qwen3_moe"), "unsupported model_type 'qwen3_moe'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "unsupported rope scaling type 'yarn'"),
    (dict(hidden_activation="gelu"), "unsupported hidden_activation 'gelu'"),
    (dict(use_bidirectional_attention=True), "causal attention only"),
    (dict(layer_types=["chunked_attention"] * 4), "unsupported layer_types"),
])
def test_what_is_not_supported_is_one_line(checkpoints, edit, message):
    config = json.load(open(os.path.join(checkpoints["gemma3_text"], "config.json")))
    with pytest.raises(ValueError, match=message) as error:
        ModelArgs.from_hf_config(dict(config, **edit))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- eviction with sliding windows

L, USER = 40, 7
PAIRS = [(p, a) for p in POLICIES for a in ALLOCATIONS]


def forward64(model, tokens, visible):
    """Float64 forward of tokens (n,) at positions 0 .. n-1; visible(layer, kv_head) -> (n, n): query t sees key s.

    Every family's switches written out plainly: per-head q/k norms before RoPE, Gemma's (1 + w) norms, four
    norms per block, GeGLU, embeddings x sqrt(dim), query_pre_attn_scalar, the local layers' own RoPE base.
    Returns the logits (n, V).
    """
    a = model.args
    n, group = len(tokens), a.n_heads // a.n_kv_heads

    def norm(x, module):
        x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + a.norm_eps)
        return x * (1 + module.weight.double()) if a.gemma else x * module.weight.double()

    def linear(x, lin):
        return x @ lin.weight.double().T + (0 if lin.bias is None else lin.bias.double())

    def rope(x, inv_freq):                                                   # (n, heads, D)
        angle = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq.double()[None]
        cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    x = model.embed_tokens.weight.double()[tokens]
    if a.gemma:
        x = x * math.sqrt(a.dim)
    scale = a.attention_scale or a.head_dim ** -0.5
    for i, block in enumerate(model.layers):
        att, h = block.self_attn, norm(x, block.input_layernorm)
        q = linear(h, att.q_proj).view(n, a.n_heads, a.head_dim)
        k = linear(h, att.k_proj).view(n, a.n_kv_heads, a.head_dim)
        v = linear(h, att.v_proj).view(n, a.n_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = norm(q, att.q_norm), norm(k, att.k_norm)
        local = a.windows[i] is not None and model.local_inv_freq is not None
        q, k = rope(q, model.local_inv_freq if local else model.inv_freq), rope(k, model.local_inv_freq if local else model.inv_freq)
        out = torch.zeros(n, a.n_heads, a.head_dim, dtype=torch.float64)
        for head in range(a.n_heads):
            kv = head // group
            logits = (q[:, head] @ k[:, kv].T * scale).masked_fill(~visible(i, kv), -math.inf)
            out[:, head] = logits.softmax(-1) @ v[:, kv]
        y = linear(out.reshape(n, -1), att.o_proj)
        mlp = block.mlp
        if a.gemma:
            x = x + norm(y, block.post_attention_layernorm)
            h = norm(x, block.pre_feedforward_layernorm)
            x = x + norm(linear(F.gelu(linear(h, mlp.gate_proj), approximate="tanh") * linear(h, mlp.up_proj),
                                mlp.down_proj), block.post_feedforward_layernorm)
        else:
            x = x + y
            h = norm(x, block.post_attention_layernorm)
            x = x + linear(F.silu(linear(h, mlp.gate_proj)) * linear(h, mlp.up_proj), mlp.down_proj)
    logits = linear(norm(x, model.norm), model.lm_head)
    return logits if a.final_softcap is None else torch.tanh(logits / a.final_softcap) * a.final_softcap


def visibility(model, n, system_len=0, kept=None, windows=True):
    """visible(layer, kv_head) (n, n): causal, inside the layer's window (t - s < window), and a query after the
    compressed turn sees that turn's keys only where eviction kept them (kept: per layer (H_kv, system_len))."""
    t, s = torch.arange(n)[:, None], torch.arange(n)[None, :]

    def visible(layer, kv):
        seen = s <= t
        if windows and model.args.windows[layer] is not None:
            seen = seen & (t - s < model.args.windows[layer])
        if kept is not None:
            held = torch.ones(n, dtype=torch.bool)
            held[:system_len] = kept[layer][kv, :system_len]
            seen = seen & ((t < system_len) | held[None, :])
        return seen
    return visible


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_float64_reference_is_transformers(checkpoints, family):
    """The reference below is trusted because it gives transformers' logits, windows and all."""
    model, theirs = load_model(checkpoints[family]), hf_model(checkpoints[family])
    tokens = tokens_of(3 * WINDOW, 1)
    reference = forward64(model, tokens[0], visibility(model, tokens.shape[1]))
    assert (reference - theirs(tokens).logits[0].double()).abs().max() <= 1e-4


@pytest.mark.parametrize("family", SLIDING)
@pytest.mark.parametrize("policy,allocation", PAIRS)
def test_eviction_and_windows_match_the_float64_reference(checkpoints, family, policy, allocation):
    """The system turn (longer than the window) compressed, then a user turn as one chunk and one more token:
    every query sees exactly the kept entries inside its window."""
    model = load_model(checkpoints[family])
    tokens = tokens_of(L + USER, 7)
    cache = model.new_cache()
    compressed = prefill(model, cache, tokens[:, :L], Compression(policy, 0.8, allocation=allocation))
    ours = torch.cat([model(tokens[:, L:-1], cache, all_logits=True)[0], model(tokens[:, -1:], cache, all_logits=True)[0]])
    kept = [k[0] for k in compressed.kept]
    reference = forward64(model, tokens[0], visibility(model, L + USER, L, kept))[L:]
    assert (ours.double() - reference).abs().max() < 1e-4
    for layer, window in enumerate(model.args.windows):
        if window is not None and policy != "full":              # what no later query can see is gone
            assert not kept[layer][:, :L - window + 1].any()
        if window is not None and not model.args.compress_local:  # Gemma 3: a local layer keeps its whole window
            assert kept[layer][:, L - window + 1:].all()
    if policy != "full":                                           # and eviction did cut inside a window or a global layer
        assert any(not k[:, max(0, L - (w or L) + 1):].all() for k, w in zip(kept, model.args.windows))


@pytest.mark.parametrize("family", SLIDING)
def test_eviction_hides_what_it_should(checkpoints, family):
    """Not vacuous: the same logits without the window, or with the evicted entries visible, are far off."""
    model = load_model(checkpoints[family])
    tokens = tokens_of(L + USER, 7)
    cache = model.new_cache()
    kept = [k[0] for k in prefill(model, cache, tokens[:, :L], Compression("knorm", 0.8)).kept]
    ours = model(tokens[:, L:], cache, all_logits=True)[0].double()
    right = forward64(model, tokens[0], visibility(model, L + USER, L, kept))[L:]
    windowless = forward64(model, tokens[0], visibility(model, L + USER, L, kept, windows=False))[L:]
    everything = forward64(model, tokens[0], visibility(model, L + USER))[L:]
    assert (ours - right).abs().max() < 1e-4
    assert (ours - windowless).abs().max() > 1e-3 and (ours - everything).abs().max() > 1e-3


@pytest.mark.parametrize("family", SLIDING)
@pytest.mark.parametrize("policy,allocation", PAIRS)
def test_batched_rows_compress_and_answer_like_rows_alone(checkpoints, family, policy, allocation):
    model = load_model(checkpoints[family])
    gen = torch.Generator().manual_seed(11)
    lengths, user_lengths = [L, 29, 12], [USER, 4, 6]
    systems = torch.randint(0, 128, (3, L), generator=gen)
    users = torch.randint(0, 128, (3, USER), generator=gen)
    real = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    user_real = torch.arange(USER)[None] < torch.tensor(user_lengths)[:, None]
    specs = [Compression(policy, r, whitelist=[5], allocation=allocation) for r in (0.8, 0.5, 0.3)]
    batch = model.new_cache(3)
    compressed = prefill(model, batch, systems, specs, real=real)
    answers = generate(model, batch, users, WINDOW + 4, real=user_real, stop_ids=())
    for row in range(3):
        alone = model.new_cache()
        single = prefill(model, alone, systems[row:row + 1, :lengths[row]], specs[row])
        assert compressed.reports[row] == single.reports[0]
        for a, b in zip(compressed.kept, single.kept):
            assert torch.equal(a[row, :, :lengths[row]], b[0])
        assert answers[row] == generate(model, alone, users[row:row + 1, :user_lengths[row]], WINDOW + 4,
                                        stop_ids=())[0]
