"""70B on the meta device over a 512-rank fake process group: the real FSDP2 wrapping, no memory."""

import json
import subprocess
import sys

from lemur_torch.config import load_config
from lemur_torch.model import count_params


def test_llama2_70b_shards_over_512_ranks():
    # its own process: the fake process group is process-global
    proc = subprocess.run(
        [sys.executable, "-m", "lemur_torch.plan", "--world-size", "512", "model=llama2_70b"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    total = count_params(load_config(["model=llama2_70b"]).model)
    assert report["total_params"] == total == 68_976_648_192
    # FSDP2 shards every parameter on dim 0 (padded): each rank holds total/512 up to one row per tensor
    cfg = load_config(["model=llama2_70b"]).model
    max_rounding = (cfg.num_hidden_layers * 9 + 3) * max(cfg.hidden_size, cfg.intermediate_size)
    assert abs(report["local_params"] - total / 512) <= max_rounding
    assert 1.9 < report["state_gib_per_rank"] < 2.1  # RECIPE.md: ~2.2 GB = 2.0 GiB of fp32 state per rank
