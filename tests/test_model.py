"""model.py: the forward pass, the cache's append path, loading, and errors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, write_tiny_checkpoint
from model import generate, load_model

VARIANTS = {
    "llama-gqa-untied": dict(model_type="llama"),
    "qwen2-bias-tied": dict(model_type="qwen2", tie_word_embeddings=True),
    "llama31-rope-scaling": dict(model_type="llama", tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "mistral": dict(model_type="mistral", sliding_window=None),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", **VARIANTS[request.param])
    return load_model(folder)


def test_decode_through_cache_equals_one_full_forward(variant):
    tokens = torch.randint(0, variant.args.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    full = variant(tokens, variant.new_cache(2), all_logits=True)
    cache = variant.new_cache(2, capacity=8)                      # forces the buffers to grow
    steps = [variant(tokens[:, :11], cache, all_logits=True)]
    steps += [variant(tokens[:, 11:20], cache, all_logits=True)]  # a second chunk after a prefill
    steps += [variant(tokens[:, t:t + 1], cache, all_logits=True) for t in range(20, 37)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_padded_rows_equal_rows_run_alone(variant):
    gen = torch.Generator().manual_seed(2)
    lengths = [9, 14]
    tokens = torch.randint(0, variant.args.vocab_size, (2, 14), generator=gen)
    real = torch.arange(14)[None] < torch.tensor(lengths)[:, None]
    batched = variant(tokens, variant.new_cache(2), real=real)
    for row, L in enumerate(lengths):
        alone = variant(tokens[row:row + 1, :L], variant.new_cache(1))
        assert torch.allclose(batched[row], alone[0], atol=1e-5, rtol=0)


def test_bias_and_tying_are_loaded(tmp_path):
    model = load_model(write_tiny_checkpoint(tmp_path / "q", model_type="qwen2", tie_word_embeddings=True))
    attn = model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-llama31"])
def test_golden_logits_from_transformers(name):
    """Logits of fixtures made once by Hugging Face transformers (tests/fixtures/make_golden.py)."""
    folder = os.path.join(ROOT, "tests", "fixtures", name)
    assert os.path.isdir(folder), f"the tracked fixture {folder} is missing (restore it: git checkout -- tests/fixtures)"
    golden = load_file(os.path.join(folder, "golden.safetensors"))
    model = load_model(folder)
    ids = golden["input_ids"]
    logits = model(ids, model.new_cache(ids.shape[0]), all_logits=True)
    assert (logits - golden["logits"]).abs().max() < 1e-4


def test_bfloat16_runs_close_to_float32(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "ckpt")
    tokens = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(3))
    fp32 = load_model(folder)(tokens, load_model(folder).new_cache())
    model = load_model(folder, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.new_cache().keys[0].dtype == torch.bfloat16
    assert (model(tokens, model.new_cache()) - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_sharded_checkpoint_loads(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "one")
    state = load_file(os.path.join(folder, "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for file, part in shards.items():
        save_file({n: state[n] for n in part}, str(sharded / file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in shards.items() for n in part}}))
    (sharded / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    tokens = torch.arange(10)[None]
    a, b = load_model(folder), load_model(str(sharded))
    assert torch.equal(a(tokens, a.new_cache()), b(tokens, b.new_cache()))


def test_generate_stops_at_stop_id_and_respects_max_new_tokens(tiny_model):
    prompt = torch.arange(5)[None]
    free = generate(tiny_model, tiny_model.new_cache(), prompt, 8, stop_ids=[])[0]
    assert len(free) == 8
    stopped = generate(tiny_model, tiny_model.new_cache(), prompt, 8, stop_ids=[free[3]])[0]
    assert stopped == free[:free.index(free[3])]


# ----------------------------------------------------------------------------- errors: one clear line

def _break(tmp_path, edit):
    folder = write_tiny_checkpoint(tmp_path / "ckpt")
    edit(folder)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_model(folder)
    return str(err.value)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def _edit_config(key, value):
    def edit(folder):
        path = os.path.join(folder, "config.json")
        config = json.load(open(path))
        config[key] = value
        json.dump(config, open(path, "w"))
    return edit


def _edit_tensors(change):
    def edit(folder):
        path = os.path.join(folder, "model.safetensors")
        state = load_file(path)
        change(state)
        save_file(state, path)
    return edit


def test_unsupported_model_type(tmp_path):
    assert "unsupported model_type 'gpt2'" in _break(tmp_path, _edit_config("model_type", "gpt2"))


def test_unsupported_rope_scaling(tmp_path):
    msg = _break(tmp_path, _edit_config("rope_scaling", {"rope_type": "yarn", "factor": 4.0}))
    assert "unsupported rope scaling type 'yarn'" in msg


def test_missing_tensor_is_named(tmp_path):
    msg = _break(tmp_path, _edit_tensors(lambda s: s.pop("model.layers.1.mlp.up_proj.weight")))
    assert "layers.1.mlp.up_proj.weight" in msg


def test_unexpected_tensor_is_named(tmp_path):
    msg = _break(tmp_path, _edit_tensors(lambda s: s.update({"model.layers.9.extra": torch.zeros(2)})))
    assert "model.layers.9.extra" in msg


def test_wrong_shape_is_named(tmp_path):
    msg = _break(tmp_path, _edit_tensors(lambda s: s.update({"model.norm.weight": torch.ones(3)})))
    assert "model.norm.weight" in msg and "shape" in msg


def test_corrupt_safetensors(tmp_path):
    def corrupt(folder):
        with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
            f.write(b"\xff" * 16)
    assert "not a readable safetensors file" in _break(tmp_path, corrupt)


def test_prompt_longer_than_context_is_refused(tmp_path):
    model = load_model(write_tiny_checkpoint(tmp_path / "c", max_position_embeddings=16))
    with pytest.raises(ValueError, match="past the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long), model.new_cache())

