"""The paper's data files: downloaded once from the paper's repository, checked, cached.

The files are from *The Pitfalls of KV Cache Compression* by Alex Chen, Renato Geh,
Aditya Grover, Guy Van den Broeck and Daniel Israel (arXiv 2510.00231), published in
https://github.com/Itisalex2/pitfalls-of-kv-cache-compression (commit fc0f5df, folder
kv_cache_compression/benchmarks/) under CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/). The attack texts are RaccoonBench's
prompt-extraction attacks as shipped in that repository (their own licence is not stated
there). nanokv does not ship or commit these files; it fetches them from the pinned commit
and keeps each one only if its sha256 is the one pinned in `FILES` below.

The files, by their name in the cache folder:

    sys_ifeval.jsonl                  539 IFEval prompts, each split into a system directive and a user task
    sys_ifeval_shuffled.jsonl         the same records shuffled; its first 100 are the leakage runs' prompts
    defense_template.json             defense templates with a $system_prompt slot (standard_defense, ...)
    attacks/<category>__promptN.txt   prompt-extraction attacks; the paper uses attacks/plain__prompt1.txt

The cache folder is $NANOKV_DATA when set, else data/paper/ in the project (ignored by git).
Without network, copy the files there by hand under these names; they are checked the same way.

    python paperdata.py           download what is missing, check every file, print where each one is
    python paperdata.py --check   check the files already there, no network
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPOSITORY = "Itisalex2/pitfalls-of-kv-cache-compression"
COMMIT = "fc0f5df3f1a524a8cac4cf6b56fbec103fcdd1aa"
BENCHMARKS = "kv_cache_compression/benchmarks"  # the files' folder in the repository
CREDIT = ("The paper's data: Chen, Geh, Grover, Van den Broeck, Israel, \"The Pitfalls of KV Cache Compression\" "
          f"(arXiv 2510.00231), https://github.com/{REPOSITORY} at commit {COMMIT[:7]}, CC BY 4.0; "
          "attack texts from RaccoonBench as shipped there.")
PROJECT_CACHE = Path(__file__).resolve().parent / "data" / "paper"
TIMEOUT_S = 60

# name in the cache folder -> (path under BENCHMARKS in the repository, sha256 of the file).
# The paper's scripts read ifeval/inputs/, raccoon/defenses/ and raccoon/attacks/singular_attacks/;
# inside the last, the attacks keep RaccoonBench's layout, <Category>/promptN (no extension).
FILES = {
    "sys_ifeval.jsonl":
        ("ifeval/inputs/sys_ifeval.jsonl",
         "1342acbe3979bc54297f504f8fe7449f7456a9c8c1690afaa7346a8dcf8b6fa3"),
    "sys_ifeval_shuffled.jsonl":
        ("ifeval/inputs/sys_ifeval_shuffled.jsonl",
         "775602f57a3d326b99fef8d60c6d677265bc14b992b2cc7cd147e8a9c52317d5"),
    "defense_template.json":
        ("raccoon/defenses/defense_template.json",
         "cea7e98713c2b84ad7e6e9a396d48c3e10ba389f92682ce5b3a44a113ce20c66"),
    "attacks/cognitive_hacking__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Cognitive Hacking/prompt1",
         "f44dc69c162c74ea0cd41f7994325ed762729a400334d45ad2addbc35307bc1c"),
    "attacks/cognitive_hacking__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Cognitive Hacking/prompt2",
         "63b62c1063fb0681ee42facea7f5fc708048cd3ba0c1af44ebe5e6164f1c126b"),
    "attacks/cognitive_hacking__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Cognitive Hacking/prompt3",
         "a9351436ae7c45aaafef9f381c6b4fcfddea900a1b4b88b4b56781a8081ea587"),
    "attacks/context_ignoring_attack__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Context Ignoring Attack/prompt1",
         "aeb41b43e726f89e77701be3cb4494534774267eae7241c11d27f134e277b3fe"),
    "attacks/context_ignoring_attack__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Context Ignoring Attack/prompt2",
         "6aa66c6516259896651baba486ca1356061c4f14878fb8c9cd262ef6cd5b3d99"),
    "attacks/context_ignoring_attack__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Context Ignoring Attack/prompt3",
         "9e641a5ce9cabd808f92e1713112f66732771ebcb25ec9710f8f3586442bcff9"),
    "attacks/context_manipulation_attack__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Context Manipulation Attack/prompt1",
         "9b5198086f8ba49a830cff3cf81e92cbabb24c96f9cb2480a0eb8e516a2fbd9f"),
    "attacks/context_manipulation_attack__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Context Manipulation Attack/prompt3",
         "61c6f33b5eea31978c770848ddc64fbb0007475b7f4469aed2ea7a8f34c0cdea"),
    "attacks/context_manipulation_attack__prompt4.txt":
        ("raccoon/attacks/singular_attacks/Context Manipulation Attack/prompt4",
         "d24d7065b10cc73c1679f31907ac3aa78facb4609620d43d6319b59f163d0ecd"),
    "attacks/defined_dictionary_attack__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Defined Dictionary Attack/prompt1",
         "327a17f2104633c222097942b4543931c004e3e8de6fb3b1b250072c4381baaf"),
    "attacks/defined_dictionary_attack__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Defined Dictionary Attack/prompt2",
         "5b0a6c5ac1da8b5fc7f75d549692751483219b4681449137b785eb24b223642a"),
    "attacks/defined_dictionary_attack__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Defined Dictionary Attack/prompt3",
         "92317157d08c2e6ab93735a6640678bf7eff9731014666a7ea634b209b03f3a2"),
    "attacks/distractor_instructions_attack__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Distractor Instructions Attack/prompt1",
         "712d06534306d7c34d28cea9ab5680bd233212e3ce1770bfe7d99de978b772df"),
    "attacks/distractor_instructions_attack__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Distractor Instructions Attack/prompt2",
         "e24f84d7e94f8b74aa3b0ba7eacacbaa8f2a0bf8daa9b002b4060560550723c0"),
    "attacks/distractor_instructions_attack__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Distractor Instructions Attack/prompt3",
         "0319566b1c116687667cb8326feebc6b6f9851eda9479d79d5f1191c7348b9a1"),
    "attacks/few_shot_prompt__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Few Shot Prompt/prompt1",
         "7117472e2b0f0e633b2203e32ff716052d422939016e9e3f2b1137977a64becf"),
    "attacks/few_shot_prompt__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Few Shot Prompt/prompt2",
         "91cc4afbad4a35c288bd415e0d158e32879a523f8e19a6fb78f68f3fdebb917e"),
    "attacks/few_shot_prompt__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Few Shot Prompt/prompt3",
         "09abce8c66ce90a34875ea1608669e0b506a80c1469a83129a243e224c990b93"),
    "attacks/fill_in_the_blank_attack__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Fill in the Blank Attack/prompt1",
         "0955110a1330e492be408f0e1fe94e5968def56261ad7212c321a2390f2f9c73"),
    "attacks/fill_in_the_blank_attack__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Fill in the Blank Attack/prompt2",
         "39af283d848e1c9ba758c9b6dc27e392d7518ac7915a43a42927c165bade219f"),
    "attacks/fill_in_the_blank_attack__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Fill in the Blank Attack/prompt3",
         "9cb963fde8354e0de0103f7969dc1b13107e604441763c0eaad3934657979bd9"),
    "attacks/instruction_repetition_attack__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Instruction Repetition Attack/prompt1",
         "66e3313052d42031c2a533ea05b5b031d4f2fb3c3c391adfa981b3df1b3fef4d"),
    "attacks/instruction_repetition_attack__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Instruction Repetition Attack/prompt2",
         "46092d91040403f4af558afd17340620cecb5e281837d7143f40dc90a528dcc1"),
    "attacks/instruction_repetition_attack__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Instruction Repetition Attack/prompt3",
         "41254673fba8190b9823b92ef019d3dcce9deb34eec2f5843990721cb96bf8ab"),
    "attacks/obfuscation__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Obfuscation/prompt1",
         "01c66c2c158ae9527565e31440b0f8dcc18f1735fd44757c2472b7b4e8ce8ce6"),
    "attacks/obfuscation__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Obfuscation/prompt2",
         "fd3faf0e70e7fdd0c6b9f624962c296829841d3f4fe4ff0b12baf44de1fb3cdb"),
    "attacks/obfuscation__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Obfuscation/prompt3",
         "20d4361e5a2a07e7a145cc56f21f632b5bb75e6927ab95cfd59ea1525c8b1936"),
    "attacks/obfuscation__prompt4.txt":
        ("raccoon/attacks/singular_attacks/Obfuscation/prompt4",
         "d4d3e7e97675d2284d1fc6facfe292398e3714a911521b71969319cc716fe68b"),
    "attacks/payload_splitting__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Payload Splitting/prompt1",
         "4a386afcde2b77022b9fea8f69cba39b0370357910eb5e9a43c94705fbe434b9"),
    "attacks/payload_splitting__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Payload Splitting/prompt2",
         "dc70a96e5ca383e94ccd75350150475a780ceaebf7faec45581b6145a89590cd"),
    "attacks/payload_splitting__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Payload Splitting/prompt3",
         "c0c5d3f6db6951ab66a88ee0ecee86879f61b0469af0858247bb43f9ec0ba50d"),
    "attacks/plain__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Plain/prompt1",
         "896f5bded22d54e4e931e806d60fa99015bfb7af73c00886bbde70ed51643182"),
    "attacks/prefix_injection_attack__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Prefix Injection Attack/prompt1",
         "da90c73b36217e4ff664919468c0c0f9be9e10896c36b6f781d62a4100230676"),
    "attacks/prefix_injection_attack__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Prefix Injection Attack/prompt2",
         "0a82083a91aa4de49318419b137c5c4eb2cb6939eece96fdeb1c1bcad9b27216"),
    "attacks/prefix_injection_attack__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Prefix Injection Attack/prompt3",
         "be2ceec40f0bf4d83bb0c1090aa59d8a50d4a097878ee6f1223ad476b2c701c5"),
    "attacks/refusal_suppression_attack__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Refusal Suppression Attack/prompt1",
         "29139e47f2676b3e65ad9e86926a9fa03052e22765d99b145eb3c3efb6db12f5"),
    "attacks/refusal_suppression_attack__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Refusal Suppression Attack/prompt2",
         "41f5393b686fea927a538e151f41a06bf0a0470fb4bac36b1ba851b8d873efe5"),
    "attacks/refusal_suppression_attack__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Refusal Suppression Attack/prompt3",
         "65a894d774c4fe9351872770ad2c685ae804584f0d53c978aad1055b1f5b626b"),
    "attacks/special_case_attack__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Special Case Attack/prompt1",
         "547e525eef72e7b1f48969a9040b087aa5ae45a849a8b8c624a40b4de65a55ca"),
    "attacks/special_case_attack__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Special Case Attack/prompt2",
         "c7857e479f55b668ef54b0538a5990ecf0f49a0cc60ef6023324d75c19f52874"),
    "attacks/special_case_attack__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Special Case Attack/prompt3",
         "27a32c6b957052a65ac5cad9d6fc804bb78047cbc71d7c1ee25148286fa812ad"),
    "attacks/translation__prompt1.txt":
        ("raccoon/attacks/singular_attacks/Translation/prompt1",
         "cd8f53815ace6bec2bc9a9008e4186fe92a021f873539cb0c9fd6335f471b7d9"),
    "attacks/translation__prompt2.txt":
        ("raccoon/attacks/singular_attacks/Translation/prompt2",
         "676d44cc6f28b1b4bb3586d4568eeb9a9e6fd92dc95981f99de095848a80eea1"),
    "attacks/translation__prompt3.txt":
        ("raccoon/attacks/singular_attacks/Translation/prompt3",
         "5f35c9a689a2e0633ee805b07e53a9c8a4ece28bf2fab5e829a944e3dc6983cd"),
}


class PaperDataError(ValueError):
    """A paper file could not be had (offline, wrong checksum, unknown name): one line, what and how to fix."""


def cache_folder(folder=None) -> Path:
    """`folder` if given, else $NANOKV_DATA, else data/paper/ in the project."""
    if folder is not None:
        return Path(folder)
    return Path(os.environ["NANOKV_DATA"]) if os.environ.get("NANOKV_DATA") else PROJECT_CACHE


def source_url(name: str) -> str:
    """Where `name` is downloaded from: the raw file at the pinned commit."""
    path_in_repository = f"{BENCHMARKS}/{FILES[name][0]}"
    return f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}/{urllib.parse.quote(path_in_repository)}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def paper_file(name: str, cache_dir=None, download: bool = True) -> str:
    """The path of the verified local copy of `name` (a key of FILES), downloading it when it is
    not in the cache folder yet. Raises PaperDataError (one line) when the file cannot be had."""
    if name not in FILES:
        raise PaperDataError(f"unknown paper file {name!r}; the files are sys_ifeval.jsonl, "
                             "sys_ifeval_shuffled.jsonl, defense_template.json and attacks/<category>__promptN.txt "
                             "(python paperdata.py lists them)")
    folder = cache_folder(cache_dir)
    if folder.exists() and not folder.is_dir():
        raise PaperDataError(f"the paper's data folder {folder} is a file, not a folder: point NANOKV_DATA (or --dir) "
                             "at a folder")
    path = folder / name
    upstream, expected = FILES[name]
    by_hand = (f"place {BENCHMARKS}/{upstream} from https://github.com/{REPOSITORY} (commit {COMMIT[:7]}) "
               f"at {path} by hand, or set NANOKV_DATA to a folder that holds the paper's files")
    if path.exists():
        if not path.is_file():
            raise PaperDataError(f"{path} is not a file; remove it, then {by_hand}")
        found = sha256(path.read_bytes())
        if found != expected:
            raise PaperDataError(f"{path} has sha256 {found[:12]}..., not the pinned {expected[:12]}...: delete it to "
                                 f"download it again, or {by_hand}")
        return str(path)
    if not download:
        raise PaperDataError(f"{path} is missing: run python paperdata.py to download it, or {by_hand}")

    url = source_url(name)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError and timeouts are OSErrors
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        raise PaperDataError(f"cannot download {name} from {url} ({reason}); {by_hand}") from None
    found = sha256(data)
    if found != expected:
        raise PaperDataError(f"the download of {name} has sha256 {found[:12]}..., not the pinned {expected[:12]}... "
                             f"(nothing was written); {by_hand}")
    _write_whole(path, data)
    return str(path)


def _write_whole(path: Path, data: bytes):
    """Write `data` to `path` so that `path` never holds part of it: a temporary file, then a rename."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as e:
        raise PaperDataError(f"cannot write into {path.parent} ({e.strerror or e}); "
                             "set NANOKV_DATA to a writable folder") from None
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as e:
        os.unlink(temporary)
        if isinstance(e, OSError):
            raise PaperDataError(f"cannot write {path} ({e.strerror or e}); "
                                 "set NANOKV_DATA to a writable folder") from None
        raise


def attack_names() -> list[str]:
    """The paper's attack files, as names for paper_file ("attacks/plain__prompt1.txt", ...)."""
    return [name for name in FILES if name.startswith("attacks/")]


def paper_attacks_dir(cache_dir=None, download: bool = True) -> str:
    """The folder holding all the paper's verified attack files (downloaded when missing)."""
    for name in attack_names():
        paper_file(name, cache_dir, download)
    return str(cache_folder(cache_dir) / "attacks")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check the files already there (no network)")
    parser.add_argument("--dir", help="the cache folder (default: $NANOKV_DATA, else data/paper/ in the project)")
    args = parser.parse_args(argv)
    print(CREDIT)
    try:
        for name in FILES:
            print(f"{name}: {paper_file(name, args.dir, download=not args.check)}", flush=True)
    except PaperDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
