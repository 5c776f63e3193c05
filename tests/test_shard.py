"""Sharded sweeps: torchrun ranks each run a share of the batches, rank 0 merges.

The end-to-end tests start `torchrun --standalone --nproc-per-node 2` (gloo, CPU) on the
tiny random model of test_cli.py and compare with one process running the same command:
summary.json byte for byte, and every record. One of them SIGKILLs rank 1 after its first
record and reruns the same command.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import evaluate
import leak
from experiment import RunFolder, Shard, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCEPTANCE = ["--policy", "tova,snapkv", "--ratios", "0,0.5", "--limit", "8"]
SMALL = ["--max-new-tokens", "6", "--batch-size", "2"]      # 16 batches: 8 per rank


# ----------------------------------------------------------------------------- ranks from the environment

def test_rank_comes_from_torchrun_or_srun():
    assert Shard.from_env({}) == Shard(0, 1, 0)
    assert Shard.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(3, 4, 1)
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert Shard.from_env(srun) == Shard(0, 1, 0)          # a plain sbatch step: no rendezvous, one process
    assert Shard.from_env({**srun, "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}) == Shard(5, 8, 1)
    assert Shard(1, 2, 1).device("cuda") == "cuda:1" and Shard().device("cuda") == "cuda"
    with pytest.raises(UsageError, match="RANK=2 is not a rank of WORLD_SIZE=2"):
        Shard.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(UsageError, match="must be integers"):
        Shard.from_env({"RANK": "x", "WORLD_SIZE": "2"})


# ----------------------------------------------------------------------------- files of any world size

def record(job, n=2, turn=0):
    return {"job": job, "records_in_job": n, "turn": turn}


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("".join(lines))


def test_folder_reads_every_world_size_and_drops_cut_short_jobs_everywhere(tmp_path):
    line = lambda r: json.dumps(r, sort_keys=True) + "\n"
    write_lines(tmp_path / "run.json", ["{}"])
    write_lines(tmp_path / "records.jsonl", [line(record("a")), line(record("a", turn=1)), line(record("b"))])
    write_lines(tmp_path / "records.rank1.jsonl", [line(record("c")), line(record("c", turn=1)), '{"job": "d", "rec'])
    write_lines(tmp_path / "records.rank3.jsonl", [line(record("e", n=1))])
    write_lines(tmp_path / "other.rank1.jsonl", [line(record("z", n=1))])               # not this script's
    folder = RunFolder(str(tmp_path), {}, "records.jsonl", Shard(0, 2, 0))
    assert folder.records_path == str(tmp_path / "records.rank0.jsonl")
    assert [os.path.basename(p) for p in folder.record_files()] == \
        ["records.jsonl", "records.rank1.jsonl", "records.rank3.jsonl"]
    folder.check()
    assert folder.complete == {"a", "c", "e"} and folder.torn
    folder.start()                                                                       # b and the torn d go
    rows = [json.loads(l) for p in folder.record_files() for l in open(p)]
    assert sorted(r["job"] for r in rows) == ["a", "a", "c", "c", "e"]


def test_a_job_in_two_files_is_kept_once_or_refused_when_they_differ(tmp_path):
    write_lines(tmp_path / "run.json", ["{}"])
    write_lines(tmp_path / "records.rank0.jsonl", [json.dumps(record("a", n=1)) + "\n"])
    write_lines(tmp_path / "records.rank1.jsonl", [json.dumps(record("a", n=1)) + "\n"])
    folder = RunFolder(str(tmp_path), {}, "records.jsonl")
    folder.check()
    assert folder.complete == {"a"} and folder.records == [record("a", n=1)]
    folder.start()                                                     # the copy in the later file goes
    assert [open(p).read() for p in folder.record_files()] == [json.dumps(record("a", n=1), sort_keys=True) + "\n", ""]
    write_lines(tmp_path / "records.rank1.jsonl", [json.dumps({**record("a", n=1), "response": "other"}) + "\n"])
    with pytest.raises(UsageError, match="holds two different records of job 'a'"):
        RunFolder(str(tmp_path), {}, "records.jsonl").check()


def test_rank_files_without_run_json_are_refused(tmp_path):
    write_lines(tmp_path / "records.rank1.jsonl", [json.dumps(record("a", n=1)) + "\n"])
    with pytest.raises(UsageError, match="records.rank1.jsonl exists without run.json"):
        RunFolder(str(tmp_path), {}, "records.jsonl").check()


# ----------------------------------------------------------------------------- two processes against one

def torchrun(script, *argv, wait=True):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(ROOT, script), *argv]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stdout, stderr


def all_records(out):
    """Every record line of every records file in `out`, as sorted JSON strings (duplicates kept)."""
    names = [n for n in os.listdir(out) if n.endswith(".jsonl")]
    return sorted(line for n in names for line in open(os.path.join(out, n)))


def summary_bytes(out):
    with open(os.path.join(out, "summary.json"), "rb") as f:
        return f.read()


@pytest.mark.parametrize("script", ["evaluate", "leak"])
def test_two_ranks_write_the_summary_of_one_process(tmp_path, tiny_chat, script):
    fewer = ["--remedy", "none,fair", "--attack", "repeat-previous"] if script == "leak" else []   # test time
    argv = [*ACCEPTANCE, *SMALL, *fewer, "--model", tiny_chat]
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    {"evaluate": evaluate, "leak": leak}[script].main([*argv, "--out", single])
    stdout, _ = torchrun(f"{script}.py", *argv, "--out", sharded)
    assert summary_bytes(sharded) == summary_bytes(single)
    assert all_records(sharded) == all_records(single)
    names = sorted(n for n in os.listdir(sharded) if n.endswith(".jsonl"))
    assert len(names) == 2 and all(".rank" in n for n in names)           # each rank wrote its own file
    assert not [n for n in os.listdir(sharded) if n.endswith(".lock")]     # each rank's lock went with it
    assert stdout.count("wrote ") == 1                                     # rank 0 alone merged and reported


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among `parent`'s children (read from /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"RANK={rank}".encode() in f.read().split(b"\0"):
                        return int(pid)
        except (OSError, IndexError, ValueError):
            continue
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank's pid in /proc")
def test_sigkill_one_rank_then_rerun_loses_and_duplicates_nothing(tmp_path, tiny_chat):
    argv = ["--policy", "tova,snapkv", "--ratios", "0,0.5", "--limit", "4", "--max-new-tokens", "16",
            "--batch-size", "1", "--model", tiny_chat]                                          # 8 batches a rank
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    evaluate.main([*argv, "--out", whole])

    process = torchrun("evaluate.py", *argv, "--out", killed, wait=False)
    rank1_file, pid, deadline = os.path.join(killed, "responses.rank1.jsonl"), None, time.time() + 240
    while time.time() < deadline and process.poll() is None:
        pid = pid or rank_pid(process.pid, 1)
        if pid and os.path.isfile(rank1_file) and os.path.getsize(rank1_file) > 0:
            os.kill(pid, signal.SIGKILL)                                   # after its first batch
            break
        time.sleep(0.005)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0, "rank 1 finished before the kill: the test did not kill it mid-run"
    rank1_jobs = {json.loads(line)["job"] for line in open(rank1_file) if line.endswith("\n")}
    assert 0 < len(rank1_jobs) < 8, "the kill did not land mid-run"
    assert not os.path.exists(os.path.join(killed, "summary.json"))

    _, stderr = torchrun("evaluate.py", *argv, "--out", killed)           # the same command resumes
    assert "resuming" in stderr
    assert summary_bytes(killed) == summary_bytes(whole)
    assert all_records(killed) == all_records(whole)                      # nothing lost, nothing twice

    os.remove(os.path.join(killed, "summary.json"))                       # one process reads the ranks' files
    evaluate.main([*argv, "--out", killed])
    assert summary_bytes(killed) == summary_bytes(whole)
    assert all_records(killed) == all_records(whole)


def test_a_refusal_on_the_ranks_is_one_line(tmp_path, tiny_chat):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"other": 1}')
    process = torchrun("evaluate.py", *ACCEPTANCE, *SMALL, "--model", tiny_chat, "--out", str(out), wait=False)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "holds a run with other settings" in errors[0], stderr[-2000:]
    assert sorted(os.listdir(out)) == ["run.json"]
