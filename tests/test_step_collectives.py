"""Object collectives (pickled messages through every rank, on the host) are counted in a real training run on 2
gloo ranks by wrapping torch.distributed: none in an optimizer step, only in checkpoint saves (the loader's lane
positions are gathered there) and at start-up."""

import os
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FAST

from lemur_torch.checkpoint import Checkpointer
from lemur_torch.config import load_config
from lemur_torch.train import build_and_fit
from lemur_torch.trainer import Trainer

OBJECT_COLLECTIVES = (
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
)


def _counting_run(rank, size, run_dir, out, port):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size), OMP_NUM_THREADS="1"
    )
    counts = {"step": 0, "in_save": False, "per_step": {}, "saves": 0}

    def counted(fn):
        def call(*args, **kwargs):
            if counts["in_save"]:
                counts["saves"] += 1
            elif counts["step"]:  # start-up (the sources' listing) is before the first step
                counts["per_step"][counts["step"]] = counts["per_step"].get(counts["step"], 0) + 1
            return fn(*args, **kwargs)

        return call

    for name in OBJECT_COLLECTIVES:
        for module in (dist, dist.distributed_c10d):
            setattr(module, name, counted(getattr(module, name)))
    fetch, save = Trainer.next_micro_batches, Checkpointer.save

    def step(self, *args, **kwargs):  # a step begins with the fetch of its micro-batches
        counts["step"] = self.step + 1
        return fetch(self, *args, **kwargs)

    def saving(self, *args, **kwargs):
        counts["in_save"] = True
        try:
            return save(self, *args, **kwargs)
        finally:
            counts["in_save"] = False

    Trainer.next_micro_batches, Checkpointer.save = step, saving
    cfg = load_config(
        [*FAST, f"run_dir={run_dir}", "model.num_hidden_layers=1", "train.max_steps=4", "checkpoint.every_steps=2"]
    )
    build_and_fit(cfg)
    with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
        pickle.dump(counts, f)


@pytest.mark.slow
def test_no_object_collective_in_a_step_on_two_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (2, str(tmp_path / "run"), str(tmp_path), port)
    # spawn: whole training runs (threads included) in the children; a fork of this threaded process can hang
    mp.start_processes(_counting_run, args=args, nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        counts = pickle.load(open(tmp_path / f"{rank}.pkl", "rb"))
        assert counts["step"] == 4
        assert counts["per_step"] == {}, f"rank {rank}: object collectives per step outside saves"
        assert counts["saves"] >= 2, "the wrapping sees the saves' gathers of the loader's positions"
    assert (
        torch.load(tmp_path / "run" / "checkpoints" / "step_00000004" / "extra_state.pt", weights_only=False)["loader"][
            "rows"
        ]
        == 4 * 2 * 2
    )
