"""The five plain policies keep exactly what they kept before eviction became ragged.

tests/fixtures/kept_sets.json holds digests of every layer's kept mask, made by
tests/fixtures/make_kept_sets.py at commit f10fa5c (uniform budgets, one validity mask shared by
all heads), on the default model and 3 of the paper's prompts: the five policies at
r in {0.25, 0.5, 0.75, 0.9}, and with a whitelist, fair eviction and debias 0.5 at r = 0.5.
The fair and debias digests were made again at 01ecfa7, when fair eviction took the paper's
rounding of the spans' budgets (the earlier span floor(b len / L), the later the rest).
Today's code must reproduce every digest bit for bit. About 2 minutes on one CPU thread.

The digests hold for the CPU they were made on. K-norm in layer 0 ranks near-ties (a token repeated
at two positions: its keys differ only by float32 rounding) whose order follows the vector unit's
rounding, so on another kind of CPU a few of them differ even for f10fa5c's own code. Where a digest
differs from the fixture, the test therefore runs f10fa5c's model.py, cache.py and policies.py (from
git) on this machine and requires today's digest to equal theirs: the same code change is caught on
every CPU (for the fair and debias digests, 01ecfa7's code). Without git and that commit, a differing
digest fails as before.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from conftest import ROOT, SHARED_DATA

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
sys.path.insert(0, FIXTURES)
FIXTURE_COMMIT = "f10fa5c"
FAIR_FIXTURE_COMMIT = "01ecfa7"           # the fair and debias digests: the paper's rounding of the spans' budgets


def fixture_commit(name: str) -> str:
    return FAIR_FIXTURE_COMMIT if "+fair" in name or "+debias" in name else FIXTURE_COMMIT


def digests_of_the_fixture_commit(n_prompts: int, commit: str = FIXTURE_COMMIT) -> dict | None:
    """kept_digests() computed by a fixture commit's core on this machine, or None without git or that commit."""
    with tempfile.TemporaryDirectory() as old:
        for name in ("model.py", "cache.py", "policies.py"):
            shown = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:{name}"], capture_output=True,
                                   text=True)
            if shown.returncode != 0:
                return None
            with open(os.path.join(old, name), "w") as f:
                f.write(shown.stdout)
        script = (f"import sys, json, torch; torch.set_num_threads(1); sys.path.insert(0, {old!r}); "
                  "import model, cache, policies; "                # the old core, imported before the fixture script
                  f"sys.path.insert(0, {FIXTURES!r}); import make_kept_sets; "
                  f"print(json.dumps(make_kept_sets.kept_digests({n_prompts})))")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


def test_plain_policies_keep_what_they_kept_before(default_model_folder):
    if not os.path.isfile(os.path.join(SHARED_DATA, "sys_ifeval_shuffled.jsonl")):
        pytest.skip("the paper's data is not at ../shared/data/paper")
    import make_kept_sets
    with open(make_kept_sets.OUT) as f:
        expected = json.load(f)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # as the fixture was made
    try:
        got = make_kept_sets.kept_digests(len(expected))
    finally:
        torch.set_num_threads(threads)
    assert got.keys() == expected.keys()
    changed = [(key, name) for key in expected for name in expected[key] if got[key][name] != expected[key][name]]
    if changed:                                    # this CPU's rounding, or a change in the code? ask the old code
        old = {commit: digests_of_the_fixture_commit(len(expected), commit)
               for commit in sorted({fixture_commit(name) for _, name in changed})}
        assert None not in old.values(), f"{len(changed)} kept sets changed, e.g. {changed[:5]} (and no git to tell why)"
        changed = [(key, name) for key, name in changed if got[key][name] != old[fixture_commit(name)][key][name]]
    assert not changed, f"{len(changed)} kept sets changed, e.g. {changed[:5]}"
