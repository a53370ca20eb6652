"""The Ray Data path on a local Ray runtime started here (two workers): the same output as the
local path, and a worker killed mid-run loses no conversation and counts none twice."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from monitor.backtest.ray_runner import ReadShard, connect, read_tasks, run_on_ray
from monitor.backtest.read import FieldMap, record_from_json
from monitor.backtest.run import BacktestConfig, finish, prepare, run_backtest
from tests.backtest.helpers import (AUTOCAST_DIR, DATA, PID_DIR, autocast_tiny_parts, quantile_threshold, rule_yaml, short_conversations, slow_tiny_parts,
                                    tiny_parts, write_jsonl, write_policy)

ray = pytest.importorskip("ray", reason="ray[data] is the optional 'ray' extra: pip install 'sae-monitor[ray]'")


@pytest.fixture(scope="module")
def cluster():
    connect(None, num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    rows = short_conversations(60)
    files = [write_jsonl(tmp / "logs" / f"part-{k}.jsonl", rows[k::3] + (["{bad json"] if k == 1 else []))
             for k in range(3)]
    parts = tiny_parts()
    msgs = [r["messages"] for r in rows]
    cand = write_policy(tmp / "cand", rule_yaml("r.block", 3, quantile_threshold(parts, msgs, 3, 0.8)))
    old = write_policy(tmp / "old", rule_yaml("r.block", 3, quantile_threshold(parts, msgs, 3, 0.9)))
    return tmp, files, cand, old


def config(tmp, files, cand, old, out):
    return BacktestConfig(data=[str(tmp / "logs")], policies=str(cand), against=str(old), out=str(tmp / out),
                          batch_size=2, chunk_size=6)


def run_ray(cfg, factory, workers=2, parts=None, on_commit=None):
    versions, store, paths = prepare(cfg, parts or tiny_parts())
    run_on_ray(paths, versions, store, factory=factory, workers=workers, batch_size=cfg.batch_size,
               chunk_size=cfg.chunk_size, progress=on_commit, dtype=cfg.dtype)
    return finish(cfg, versions, store)


def test_ray_output_equals_local_and_survives_a_killed_worker(cluster, job):
    tmp, files, cand, old = job
    local = run_backtest(config(tmp, files, cand, old, "local"), tiny_parts())
    assert len(local.rows) == 61 and local.summary["diff"]["counts"]["newly_blocked"] > 0
    import shutil

    shutil.rmtree(PID_DIR, ignore_errors=True)
    killed: list[int] = []
    committed = threading.Event()

    def killer():
        committed.wait(120)
        for _ in range(200):
            pids = sorted(int(p.name) for p in PID_DIR.glob("*")) if PID_DIR.is_dir() else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)  # an actor process (it recorded its pid on start)
                killed.append(sum(commits))  # records committed when the worker died
                return
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    commits = []

    def on_commit(records, tokens):
        commits.append(records)
        committed.set()
        time.sleep(0.5 if len(commits) == 1 else 0)  # give the killer time while batches are in flight

    remote = run_ray(config(tmp, files, cand, old, "ray"), slow_tiny_parts, on_commit=on_commit)
    thread.join(5)
    assert killed, "no worker was killed: the run finished too fast to test recovery"
    assert killed[0] < 61, "the worker died while records were still to be scanned"
    assert sum(commits) == 61
    keys = [r["key"] for r in remote.rows]
    assert len(keys) == len(set(keys)) == 61
    assert rounded(remote.rows) == rounded(local.rows)
    assert remote.summary == local.summary


def rounded(rows):
    """Rows with activations to 5 decimals: Ray groups records into forward batches differently
    than the local run, and a batch's float sums differ in the last bits (~1e-7 relative)."""
    return [{k: ([{**f, "activation": round(f["activation"], 5)} for f in v] if k.endswith("_firings") else v)
             for k, v in r.items()} for r in rows]


def test_ray_resumes_a_run_started_locally(cluster, job):
    tmp, files, cand, old = job
    cfg = config(tmp, files, cand, old, "mixed")

    class Stop(Exception):
        pass

    def stop(records, tokens):
        raise Stop

    with pytest.raises(Stop):
        run_backtest(cfg, tiny_parts(), progress=stop)  # one chunk committed, then "killed"
    counted = []
    remote = run_ray(cfg, tiny_parts, workers=1, on_commit=lambda n, t: counted.append(n))
    assert sum(counted) == 61 - 6
    assert rounded(remote.rows) == rounded(run_backtest(config(tmp, files, cand, old, "ref"), tiny_parts()).rows)


def test_ray_actors_run_their_forwards_at_the_requested_dtype(cluster, job):
    """``dtype="bfloat16"`` reaches every actor: each forward an actor runs is under bfloat16
    autocast (recorded by the actors' model), every record arrives once; an unknown dtype is
    refused before any actor starts."""
    import shutil

    from monitor.backtest.scan import DtypeError

    tmp, files, cand, old = job
    shutil.rmtree(AUTOCAST_DIR, ignore_errors=True)
    cfg = BacktestConfig(**{**config(tmp, files, cand, old, "bf16").__dict__, "dtype": "bfloat16"})
    remote = run_ray(cfg, autocast_tiny_parts, workers=2)
    keys = [r["key"] for r in remote.rows]
    assert len(keys) == len(set(keys)) == 61 and remote.summary["dtype"] == "bfloat16"
    actors = [f for f in AUTOCAST_DIR.glob("*") if f.name != str(os.getpid())]
    states = [s for f in actors for s in f.read_text().split()]
    assert actors and states and set(states) == {"torch.bfloat16"}, states
    versions, store, paths = prepare(config(tmp, files, cand, old, "bad"), tiny_parts())
    with pytest.raises(DtypeError, match="--dtype"):
        run_on_ray(paths, versions, store, factory=tiny_parts, workers=1, batch_size=2, chunk_size=6,
                   dtype="float16")


def test_ray_with_the_default_model_matches_local(cluster, tmp_path, default_model):
    """Two actors, each loading the real default model + shipped SAE, on real conversations."""
    from monitor.backtest.run import default_parts
    from monitor.shipped import shipped_policies_dir

    lines = DATA.read_text().splitlines()[:6]
    data = write_jsonl(tmp_path / "real.jsonl", lines)
    cfg = BacktestConfig(data=[str(data)], policies=str(shipped_policies_dir()), out=str(tmp_path / "l"), batch_size=4)
    parts = default_parts()
    local = run_backtest(cfg, parts)
    remote = run_ray(BacktestConfig(**{**cfg.__dict__, "out": str(tmp_path / "r")}), default_parts, workers=2,
                     parts=parts)
    assert [r["candidate_decision"] for r in remote.rows] == [r["candidate_decision"] for r in local.rows]
    strip = [{k: v for k, v in r.items() if k != "candidate_firings"} for r in remote.rows]
    assert strip == [{k: v for k, v in r.items() if k != "candidate_firings"} for r in local.rows]
    assert [[f["rule"] for f in r["candidate_firings"]] for r in remote.rows] == \
           [[f["rule"] for f in r["candidate_firings"]] for r in local.rows]
    assert any(r["candidate_firings"] for r in local.rows)


def test_ray_read_shards_cover_every_record_once(tmp_path):
    """One file split for two Ray workers: four shards, together every record (problems
    included) exactly once, so a single big file still feeds every actor."""
    path = write_jsonl(tmp_path / "one.jsonl", short_conversations(9)[:5] + ["{bad"] + short_conversations(9)[5:])
    tasks = read_tasks([path], workers=2)
    assert len(tasks) == 4 and read_tasks([path] * 4, workers=2)[0]["shards"] == 1
    read = ReadShard(FieldMap(), frozenset({f"{path}:2"}))
    keys = [record_from_json(row["record"]).key for t in tasks for row in read(t)]
    assert sorted(keys) == sorted(f"{path}:{n}" for n in range(1, 11) if n != 2)
    assert min(len(read(t)) for t in tasks) >= 2
