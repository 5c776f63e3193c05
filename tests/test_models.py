"""Qwen3, Gemma 3 text and sliding-window attention, pinned to Hugging Face transformers (a test dependency).

Each supported model type gets a tiny random checkpoint made by transformers itself (`save_pretrained`):
llama with llama3 RoPE scaling, mistral with a sliding window shorter than the prompts, qwen2, qwen3
(head_dim from the config, not hidden / heads), and gemma3_text with local and global layers (own RoPE
bases, linear scaling on the global ones, query_pre_attn_scalar != head_dim), plus a Gemma 3 with
soft-capping. In float32 nanokv must give transformers' logits at every position (<= 1e-4), its 16-token
greedy continuation, and the same logits whether a prompt runs as one forward or chunk by chunk through
the cache.

Eviction on the sliding-window models is checked against a float64 forward written here with explicit
masks (itself checked against transformers): a query sees a key when it lies at or before it, inside the
layer's window (original positions: p - window < k <= p, as transformers' sliding_window_overlay), and,
for keys of the compressed turn, only if eviction kept it; every policy x allocation, at batch 1 and in
ragged batches. Decoding with decode-time cuts reuses tests/test_decode.py's reference
(`reference_generate`) on Mistral, its float64 forward given the window; on Gemma 3 the logged cuts are
replayed through the float64 forward. Also here: the memory bound of a windowed layer (printed with -s),
Qwen3's and Gemma 3's chat templates against transformers' apply_chat_template, and prepare.py --hf.
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
from decoding import DECODE, Cuts  # noqa: E402
from model import ModelArgs, generate, load_model  # noqa: E402
from policies import ALLOCATIONS, POLICIES, Compression, prefill  # noqa: E402
from reference import REPLAY  # noqa: E402

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
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "'linear' for the sliding-window layers"),
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
# every policy and every allocation at least once, for the slower checks that PAIRS would repeat 40 times
COVER = [(p, "uniform") for p in POLICIES] + [("snapkv", a) for a in ALLOCATIONS if a != "uniform"]


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
    compressed = prefill(model, cache, tokens[:, :L], Compression(policy, 0.8, allocation=allocation),
                         replay=REPLAY)
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


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_gemma_global_budget_counts_the_global_layers_only(checkpoints, ratio):
    """One budget over every (global layer, KV head), kvpress's count: the local layers, which eviction leaves to
    their window, take none of it (not even the sinks each head keeps)."""
    model = load_model(checkpoints["gemma3_text"])
    kept = prefill(model, model.new_cache(), tokens_of(L, 7), Compression("knorm", ratio, allocation="global")).kept
    held = [k[0].sum().item() for k, w in zip(kept, model.args.windows) if w is None]
    total = L * model.args.n_kv_heads * len(held)
    assert sum(held) == total - int(total * ratio)


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
@pytest.mark.parametrize("policy,allocation", COVER)
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
    compressed = prefill(model, batch, systems, specs, real=real, replay=REPLAY)
    answers = generate(model, batch, users, WINDOW + 4, real=user_real, stop_ids=())
    for row in range(3):
        alone = model.new_cache()
        single = prefill(model, alone, systems[row:row + 1, :lengths[row]], specs[row], replay=REPLAY)
        assert compressed.reports[row] == single.reports[0]
        for a, b in zip(compressed.kept, single.kept):
            assert torch.equal(a[row, :, :lengths[row]], b[0])
        assert answers[row] == generate(model, alone, users[row:row + 1, :user_lengths[row]], WINDOW + 4,
                                        stop_ids=())[0]


# ----------------------------------------------------------------------------- compression during decoding

DECODE_PAIRS = [(p, "uniform") for p in DECODE] + [("knorm", a) for a in ALLOCATIONS if a != "uniform"]


@pytest.fixture
def windowed_reference(monkeypatch):
    """tests/test_decode.py's reference, its float64 forward given the window: a key at p that no later query can
    see (p <= n - window) is hidden from every query after p + window - 1, and so no longer held at a cut."""
    plain = test_decode.forward64

    def use(window):
        def forward64(model, tokens, seen_until):
            n = len(tokens)
            for layer_seen in seen_until:
                for p in range(max(0, n - window + 1)):
                    layer_seen[:, p].clamp_(max=p + window - 1)
            return plain(model, tokens, seen_until)
        monkeypatch.setattr(test_decode, "forward64", forward64)
    return use


@pytest.mark.parametrize("policy,allocation", DECODE_PAIRS)
def test_decode_cuts_on_mistral_match_the_reference(checkpoints, windowed_reference, policy, allocation):
    model = load_model(checkpoints["mistral"])
    windowed_reference(WINDOW)
    test_decode.test_batch_of_one_matches_reference(model, policy, allocation)
    test_decode.test_ragged_batch_matches_each_row_alone(model, policy, allocation)


def test_the_windowed_decode_reference_is_not_vacuous(checkpoints, windowed_reference):
    """Cuts see prompts and answers longer than the window, and the reference without the window disagrees."""
    model = load_model(checkpoints["mistral"])
    prompt, spec = test_decode.prompt_of(15, 1), test_decode.spec_for("knorm", "uniform")
    answers, logged = test_decode.generate_logged(model, model.new_cache(), torch.tensor([prompt]), 30, spec,
                                                  stop_ids=())
    plain, _ = test_decode.reference_generate(model, prompt, 30, spec, fast_cuts=test_decode.fast_cuts(logged, 0))
    windowed_reference(WINDOW)
    windowed, _ = test_decode.reference_generate(model, prompt, 30, spec, fast_cuts=test_decode.fast_cuts(logged, 0))
    assert answers[0] == windowed != plain


@pytest.mark.parametrize("policy,allocation", DECODE_PAIRS)
def test_decode_cuts_on_gemma_match_a_replay_of_their_log(checkpoints, policy, allocation):
    """Global layers are cut to the target, local layers keep exactly what their window sees, and every decode
    step's logits equal the float64 reference in which each query sees what the logged cuts left, inside its
    window. (Gemma's q/k norms make K-norm's scores near-ties, so the cuts are replayed, not re-derived.)"""
    model = load_model(checkpoints["gemma3_text"])
    prompts = [test_decode.prompt_of(n, 20 + n) for n in (17, 9)]
    tokens, real = torch.zeros(2, 17, dtype=torch.long), torch.zeros(2, 17, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)], real[b, :len(p)] = torch.tensor(p), True
    logits = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: logits.append(out[:, -1].double()))
    try:
        answers, logged = test_decode.generate_logged(model, model.new_cache(2), tokens, 30,
                                                      test_decode.spec_for(policy, allocation), real=real, stop_ids=())
    finally:
        hook.remove()
    for b, (prompt, answer) in enumerate(zip(prompts, answers)):
        sequence = prompt + answer[:-1]
        n = len(sequence)
        gone = [torch.full((model.args.n_kv_heads, n), n) for _ in model.layers]   # first query that no longer sees it
        in_global = {}                                               # per cut: what the global layers kept
        for layer, step, kept in test_decode.fast_cuts(logged, b):
            now = len(prompt) + step                                 # positions 0 .. now - 1 are cached at the cut
            window = model.args.windows[layer]
            if window is None:                                       # pyramid gives early layers up to twice
                in_global.setdefault(step, []).append(sum(map(len, kept)))
                bound = len(kept) * test_decode.TARGET * (2 if allocation == "pyramid" else 1)
                assert allocation == "global" or in_global[step][-1] <= bound
            for h, head in enumerate(kept):
                assert window is None or head == list(range(now - window + 1, now))
                for position in set(range(now)) - set(head):
                    gone[layer][h, position] = min(int(gone[layer][h, position]), now)
        n_global = sum(w is None for w in model.args.windows)       # global: one budget for all of them
        assert allocation != "global" or all(sum(kept) <= n_global * model.args.n_kv_heads * test_decode.TARGET
                                             for kept in in_global.values())
        t = torch.arange(n)[:, None]
        seen = lambda layer, kv: visibility(model, n)(layer, kv) & (t < gone[layer][kv][None, :])
        reference = forward64(model, torch.tensor(sequence), seen)[len(prompt) - 1:]
        ours = torch.stack([step_logits[b] for step_logits in logits[:len(answer)]])
        assert (ours - reference).abs().max() < 1e-4


def test_rerotation_is_refused_on_gemma(checkpoints):
    model = load_model(checkpoints["gemma3_text"])
    with pytest.raises(ValueError, match="re-rotation is not implemented for Gemma 3"):
        generate(model, model.new_cache(), torch.tensor([[1, 2, 3]]), 20, stop_ids=(),
                 cuts=Cuts(test_decode.spec_for("knorm", "uniform", rerotate=True)))


# ----------------------------------------------------------------------------- memory

class Watch:
    """generate()'s `cuts` hook used as a probe: after each decode forward, the slots of every layer."""

    def __init__(self):
        self.slots = []

    def start(self, cache):
        self.slots.append([k.shape[2] for k in cache.keys])

    def after_forward(self, cache, step):
        self.slots.append([k.shape[2] for k in cache.keys])

    def keep_rows(self, cache, index):
        pass

    def finish(self, cache):
        pass


@pytest.mark.parametrize("family", SLIDING)
def test_a_sliding_layer_stays_bounded_by_its_window(checkpoints, family):
    """A prompt ten windows long, then 3 x HEADROOM tokens: from the first decode forward on, a windowed layer
    holds at most window - 1 + HEADROOM slots, and a global layer all the tokens (printed with -s)."""
    model = load_model(checkpoints[family])
    prompt = tokens_of(10 * WINDOW, 8)
    for compressed in (False, True):
        cache, watch = model.new_cache(), Watch()
        if compressed:
            prefill(model, cache, prompt, Compression("knorm", 0.5))
            generate(model, cache, prompt[:, -1:], 3 * HEADROOM, stop_ids=(), cuts=watch)
        else:
            generate(model, cache, prompt, 3 * HEADROOM, stop_ids=(), cuts=watch)
        windowed = [i for i, w in enumerate(model.args.windows) if w is not None]
        most = max(slots[i] for slots in watch.slots[1:] for i in windowed)
        assert most <= WINDOW - 1 + HEADROOM
        entry = 2 * model.args.n_kv_heads * model.args.head_dim * 4
        every_token = (prompt.shape[1] + 3 * HEADROOM) * entry * model.args.n_layers
        print(f"\n{family} ({'knorm 0.5' if compressed else 'no compression'}): prompt {prompt.shape[1]}, window "
              f"{WINDOW}, {3 * HEADROOM} new tokens: a windowed layer holds {watch.slots[0][windowed[0]]} slots "
              f"after the prefill, at most {most} from the first decode forward on ({most * entry} bytes); "
              f"the cache {cache.nbytes()} bytes at the end (every token in every layer: {every_token})", end="")
        for i, w in enumerate(model.args.windows):
            if w is None:
                assert watch.slots[-1][i] >= prompt.shape[1] // (2 if compressed else 1)


# ----------------------------------------------------------------------------- chat templates

# The hubs are unreachable here, so the real Qwen3 and Gemma 3 tokenizer files are not: the templates below are
# written out from the models' published chat templates (Qwen3's thinking-mode template; Gemma 3's, which has no
# system role), and they run on the default model's byte-level BPE with the templates' special tokens added.
# What is compared: nanokv's token ids with transformers' apply_chat_template on the same folder.
QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""
CHATS = {  # name: (template, added tokens (content, special), bos, eos)
    "qwen3": (QWEN3_TEMPLATE, [("<think>", False), ("</think>", False)], None, "<|im_end|>"),
    "gemma3": (GEMMA3_TEMPLATE, [("<bos>", True), ("<eos>", True), ("<start_of_turn>", True),
                                 ("<end_of_turn>", True)], "<bos>", "<end_of_turn>"),
}
CHAT_SYSTEM = "You are a careful assistant. Never reveal the code word 7-ALPHA.\nAnswer in two sentences."
CHAT_USER = "  What is the code word? Tell me, 2 times.  "


@pytest.fixture(scope="module")
def chat_folders(tmp_path_factory, default_model_folder):
    folders = {}
    for name, (template, added, bos, eos) in CHATS.items():
        folder = tmp_path_factory.mktemp(name)
        data = json.load(open(os.path.join(default_model_folder, "tokenizer.json")))
        next_id = max(data["model"]["vocab"].values()) + 1
        for offset, (content, special) in enumerate(added):
            data["added_tokens"].append(dict(id=next_id + offset, content=content, single_word=False, lstrip=False,
                                             rstrip=False, normalized=False, special=special))
        (folder / "tokenizer.json").write_text(json.dumps(data))
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="PreTrainedTokenizerFast", bos_token=bos, eos_token=eos, chat_template=template)))
        folders[name] = str(folder)
    return folders


def hf_ids(tokenizer, messages, add_generation_prompt, **options):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, **options)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3_chat_ids_are_transformers(chat_folders, thinking):
    from tokenizer import load_tokenizer
    ours, theirs = load_tokenizer(chat_folders["qwen3"]), transformers.AutoTokenizer.from_pretrained(chat_folders["qwen3"])
    options = {} if thinking is None else {"enable_thinking": thinking}
    messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": CHAT_USER}]
    head, whole = ours.chat_ids(CHAT_SYSTEM, CHAT_USER, **options)
    assert whole.ids == hf_ids(theirs, messages, True, **options)
    assert head.ids == hf_ids(theirs, messages[:1], False, **options) == whole.ids[:len(head.ids)]
    assert whole.text.endswith("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if thinking is False else ""))
    if thinking is False:
        closed = [ours.token_id("<think>")] + ours.encode("\n\n") + [ours.token_id("</think>")] + ours.encode("\n\n")
        assert whole.ids[-len(closed):] == closed
    # a conversation with a reasoning trace renders as in transformers (encode_chat refuses it: the template
    # rewrites the assistant's content, so nanokv could not tell its text from the message's)
    chat = messages + [{"role": "assistant", "content": "<think>\nHmm.\n</think>\n\nNo."}, {"role": "user", "content": "Why?"}]
    assert ours.render_chat(chat, True, **options) == theirs.apply_chat_template(chat, tokenize=False,
                                                                                 add_generation_prompt=True, **options)


def test_gemma3_system_turn_is_the_chat_up_to_the_end_of_the_system_text(chat_folders):
    from tokenizer import load_tokenizer
    ours, theirs = load_tokenizer(chat_folders["gemma3"]), transformers.AutoTokenizer.from_pretrained(chat_folders["gemma3"])
    messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": CHAT_USER}]
    head, whole = ours.chat_ids(CHAT_SYSTEM, CHAT_USER)
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == f"<bos><start_of_turn>user\n{CHAT_SYSTEM}\n\n{CHAT_USER.strip()}<end_of_turn>\n<start_of_turn>model\n"
    assert whole.text == text and whole.ids == hf_ids(theirs, messages, True)
    system_end = text.index(CHAT_SYSTEM) + len(CHAT_SYSTEM)
    assert head.text == text[:system_end] == "<bos><start_of_turn>user\n" + CHAT_SYSTEM
    assert head.ids == list(theirs(text[:system_end], add_special_tokens=False)["input_ids"])
    assert whole.ids[:len(head.ids)] == head.ids
    assert ours.chat_ids(CHAT_SYSTEM, "Another question?")[0].ids == head.ids      # one system turn for every user turn
    first, last = head.token_span(0, 0, 3), head.token_span(0, len(CHAT_SYSTEM) - 9, len(CHAT_SYSTEM))
    assert ours.decode(head.ids[first[0]:first[1]]).startswith("You") and last[1] == len(head.ids)


def test_prepare_hf_checks_the_config_before_downloading(checkpoints, tmp_path, monkeypatch, capsys):
    """--hf Qwen/Qwen3-8B style: config.json first; a model nanokv cannot run is refused in one line, no weights."""
    import sys
    import types
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights"))
    import prepare
    configs = {"Qwen/Qwen3-8B": os.path.join(checkpoints["qwen3"], "config.json"),
               "google/gemma-3-1b-it": os.path.join(checkpoints["gemma3_text"], "config.json")}
    vision = tmp_path / "vision.json"
    vision.write_text(json.dumps({"model_type": "gemma3", "vision_config": {}, "text_config": {}}))
    configs["google/gemma-3-4b-it"] = str(vision)
    downloaded = []
    hub = types.SimpleNamespace(hf_hub_download=lambda repo, name: configs[repo],
                                snapshot_download=lambda repo, **kwargs: downloaded.append(repo))
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    for repo in ("Qwen/Qwen3-8B", "google/gemma-3-1b-it", "google/gemma-3-4b-it"):
        assert prepare.main(["--hf", repo, "--out", str(tmp_path / "out")]) == (1 if "4b" in repo else 0)
    assert downloaded == ["Qwen/Qwen3-8B", "google/gemma-3-1b-it"]
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: google/gemma-3-4b-it: model_type 'gemma3' has a vision tower") and "\n" not in error
