"""GPU discipline without a GPU: every tensor the core creates lives on the device of the model and cache.

Inside `torch.device("meta")` a tensor made without an explicit device= lands on meta, and any
operation that mixes it with the CPU tensors of the model and cache raises. So each protocol run
here, with the model and cache on the CPU, fails on the first tensor created on the wrong device
(on a GPU that tensor would sit on the CPU and cost a transfer, or fail the same way). Python
lists and scalars are fine: only tensors are checked.
"""
import pytest
import torch

from decoding import Cuts, Decoding
from model import generate
from policies import ALLOCATIONS, POLICIES, Compression, compress, prefill
from reference import REPLAY

L, USER = 30, 6


def tokens(model, rows, n, seed):
    return torch.randint(0, model.args.vocab_size, (rows, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("allocation", list(ALLOCATIONS))
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
def test_prefill_compress_and_answer_create_nothing_off_device(tiny_model, policy, allocation):
    """The system prefill (H2O: with its observer), compress with a whitelist and fair partitions, and
    generation, for a ragged batch of two rows."""
    system, user = tokens(tiny_model, 2, L, 1), tokens(tiny_model, 2, USER, 2)
    real = torch.arange(L)[None] < torch.tensor([[L], [L - 7]])
    specs = [Compression(policy, 0.5, allocation=allocation, whitelist=[3, 4]),
             Compression(policy, 0.6, allocation=allocation, partitions=[(0, 10), (10, L - 7)])]
    cache = tiny_model.new_cache(2)
    with torch.device("meta"):
        compressed = prefill(tiny_model, cache, system, specs, real=real, replay=REPLAY, explain=True)
        compressed.keep_rate(1)
        generate(tiny_model, cache, user, 4, stop_ids=[])
    assert all(k.device.type == "cpu" for k in cache.keys)


@pytest.mark.parametrize("allocation", list(ALLOCATIONS))
def test_decode_cuts_with_rerotation_create_nothing_off_device(tiny_model, allocation):
    prompt = tokens(tiny_model, 2, 20, 3)
    real = torch.arange(20)[None] < torch.tensor([[20], [14]])
    decoding = Decoding(Compression("snapkv", allocation=allocation, options={"window": 4}, whitelist=[2],
                                    partitions=[(0, 8), (8, 12)]), target=10, interval=4, buffer=4, rerotate=True)
    cuts = Cuts(decoding, log=True, explain=True)
    cache = tiny_model.new_cache(2)
    with torch.device("meta"):
        generate(tiny_model, cache, prompt, 14, real=real, stop_ids=[], cuts=cuts)
    assert cuts.log and set(cuts.kept_at_end) == {0, 1}


def test_query_aware_compression_creates_nothing_off_device(tiny_model):
    system, user = tokens(tiny_model, 2, L, 4), tokens(tiny_model, 2, USER, 5)
    cache = tiny_model.new_cache(2)
    with torch.device("meta"):
        cache.record_queries()
        tiny_model(system, cache)
        tiny_model(user[:, :-1], cache)
        compress(cache, Compression("h2o", 0.5), system_len=[L, L])
        generate(tiny_model, cache, user[:, -1:], 3, stop_ids=[])
