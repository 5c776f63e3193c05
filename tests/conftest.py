"""Shared test helpers: tiny random checkpoints written as Hugging Face folders."""
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data", "paper")
DEFAULT_WEIGHTS = os.path.join(ROOT, "weights", "smollm2-135m-instruct")

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            rope_theta=10000.0, max_position_embeddings=1024)


def write_tiny_checkpoint(folder, model_type="llama", seed=0, **overrides):
    """A random checkpoint (config.json + model.safetensors) with Hugging Face tensor names."""
    from model import ModelArgs, Transformer
    config = dict(TINY, model_type=model_type, **overrides)
    args = ModelArgs.from_hf_config(config)
    torch.manual_seed(seed)
    model = Transformer(args)
    state = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            value = 1 + 0.1 * torch.randn_like(p)
        else:
            value = 0.15 * torch.randn_like(p)
        state[name if name == "lm_head.weight" else "model." + name] = value.contiguous()
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from model import load_model
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama")
    return load_model(folder)


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory, default_model_folder):
    """A tiny random model with the default model's tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("tiny-chat") / "model"
    write_tiny_checkpoint(folder, vocab_size=49152, tie_word_embeddings=True, eos_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(default_model_folder, name), folder)
    return str(folder)


def records(out, name="responses.jsonl"):
    """The records an experiment wrote to `out`, in file order."""
    with open(os.path.join(out, name)) as f:
        return [json.loads(line) for line in f]


def answers(out, name="responses.jsonl"):
    """{(job, turn): response}, failing on a duplicated record."""
    rs = records(out, name)
    by_answer = {(r["job"], r.get("turn", "task")): r["response"] for r in rs}
    assert len(by_answer) == len(rs), "a record is duplicated"
    return by_answer


@pytest.fixture(scope="session")
def default_model_folder():
    if not os.path.isfile(os.path.join(DEFAULT_WEIGHTS, "model.safetensors")):
        pytest.skip("default weights not prepared (run: python weights/prepare.py)")
    return DEFAULT_WEIGHTS
