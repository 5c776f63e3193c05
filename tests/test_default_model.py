"""Checks on the real default model (SmolLM2-135M-Instruct, prepared by weights/prepare.py)."""
import pytest
import torch

from model import generate, load_model
from policies import Compression, prefill

PROMPTS = [
    ("You are a helpful assistant.", "What is the capital of France?"),
    ("Answer in one short sentence.", "Why is the sky blue?"),
    ("You are a pirate. Always answer like a pirate.", "Describe your ship, please."),
]


@pytest.fixture(scope="module")
def default(default_model_folder):
    from tokenizer import load_tokenizer
    return load_model(default_model_folder), load_tokenizer(default_model_folder)


def test_paris(default):
    """This alone catches a Q/K permutation bug: the permuted model ends its turn at once."""
    model, tok = default
    enc = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    answer = tok.decode(generate(model, model.new_cache(), torch.tensor([enc.ids]), 20)[0])
    assert "Paris" in answer


def test_logits_and_greedy_match_transformers(default, default_model_folder):
    transformers = pytest.importorskip("transformers")
    model, tok = default
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_folder, torch_dtype=torch.float32).eval()
    for system, user in PROMPTS:
        ids = torch.tensor([tok.chat_ids(system, user)[1].ids])
        ours = model(ids, model.new_cache())
        with torch.no_grad():
            theirs = hf(ids).logits[:, -1]
            hf_out = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=list(model.eos_ids))
        assert (ours - theirs).abs().max() < 1e-4
        hf_answer = [t for t in hf_out[0, ids.shape[1]:].tolist() if t not in model.eos_ids]
        assert generate(model, model.new_cache(), ids, 24)[0] == hf_answer


@pytest.mark.parametrize("policy", ["streaming_llm", "h2o", "knorm", "snapkv", "tova"])
def test_mildly_compressed_system_turn_still_answers(default, policy):
    model, tok = default
    system, full = tok.chat_ids(
        "You are a helpful assistant for a travel agency. You answer questions about geography, cities and "
        "countries. Answer briefly, truthfully and in English. If you do not know the answer, say so. "
        "Never make up facts.", "What is the capital of France?")
    cache = model.new_cache()
    prefill(model, cache, torch.tensor([system.ids]), Compression(policy, 0.25))
    answer = generate(model, cache, torch.tensor([full.ids[len(system.ids):]]), 20)[0]
    assert "Paris" in tok.decode(answer)
