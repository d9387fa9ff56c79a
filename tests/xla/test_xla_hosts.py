"""Two processes standing in for two hosts of a pod (each its own SPMD program on its own 4 CPU devices; the
CPU PJRT client has no multi-host runtime), joined by the backend's CPU process group as the hosts of a pod
are. A stop signal that reaches one host only stops both at the same step, with one complete checkpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from xla_helpers import LAYERS, XLA, artifacts, driver_cmd, read_metrics, xla_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COLLECTIVES = r"""
import json, sys, torch
import torch_xla.distributed.spmd as xs
from lemur_torch.config import load_config
from lemur_torch.parallel.xla.backend import XlaSpmdBackend
b = XlaSpmdBackend(load_config(json.loads(sys.argv[1])))
t = torch.zeros(8, 4).to(b.device)
xs.mark_sharding(t, b.mesh, ("fsdp", None))  # imports torchax where installed, as every real run does
b.barrier()
print("RESULT", b.rank, b.world_size, b.dp_rank, b.dp_size,
      b.broadcast_object({"resume": f"chosen by rank {b.rank}"})["resume"],
      b.any_process([b.rank == 1, False, True]), flush=True)
b.shutdown()
"""


def _launch(rank: int, port: int, cmd):
    env = xla_env()
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_host_collectives():
    """barrier, broadcast_object (issue 11's resume choice goes through it) and any_process across hosts."""
    port = _free_port()
    procs = [_launch(rank, port, [sys.executable, "-c", COLLECTIVES, json.dumps(XLA)]) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]
    results = [next(line for line in o.splitlines() if line.startswith("RESULT")) for o in outputs]
    for rank, line in enumerate(results):
        # two hosts, each one data shard of its own (replicas in this stand-in), rank 0's choice, OR of flags
        assert line == f"RESULT {rank} 2 0 1 chosen by rank 0 [True, False, True]", results


def _last_step(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return max((json.loads(line)["step"] for line in f if line.endswith("\n")), default=0)
    except FileNotFoundError:
        return 0


def test_stop_signal_on_one_host_stops_both_at_the_same_step():
    import torch.distributed.checkpoint as dcp

    from lemur_torch.checkpoint import list_checkpoints

    run_dir = os.path.join(artifacts(), "hosts")
    port = _free_port()
    overrides = [
        *XLA,
        "train.max_steps=500",
        f"run_dir={run_dir}",
        "checkpoint.every_steps=0",
        "checkpoint.export_at_end=false",
    ]
    procs = [
        _launch(rank, port, driver_cmd(os.path.join(artifacts(), f"hosts{rank}.json"), overrides)) for rank in (0, 1)
    ]
    try:
        deadline = time.time() + 400
        while time.time() < deadline and all(p.poll() is None for p in procs) and _last_step(run_dir) < 2:
            time.sleep(0.5)
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
        procs[1].send_signal(signal.SIGTERM)  # host 1 only
        outputs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [124, 124], [o[-3000:] for o in outputs]
    ckpts = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    assert len(ckpts) == 1, ckpts
    with open(os.path.join(ckpts[0], "meta.json")) as f:
        step = json.load(f)["step"]
    assert f"stop signal honoured: checkpoint at step {step}" in outputs[0], outputs[0][-3000:]
    assert step < 500 and max(m["step"] for m in read_metrics(run_dir)) == step
    # both hosts took part in that one save (each writes its own RNG state) and it is complete
    assert sorted(os.listdir(os.path.join(ckpts[0], "rng"))) == ["rank_0.pt", "rank_1.pt"]
    saved = dcp.FileSystemReader(ckpts[0]).read_metadata().state_dict_metadata
    assert len([k for k in saved if k.startswith("model.")]) == 1 + 9 * LAYERS + 2, sorted(saved)
    # both dispatched exactly the steps up to it
    for rank in (0, 1):
        with open(os.path.join(artifacts(), f"hosts{rank}.json")) as f:
            assert len(json.load(f)["steps"]) == step
