"""The launch scripts themselves: shell syntax, the Slurm directives preemption depends on, and that each job
script's experiment composes and validates for the world size the script asks for (nodes x processes per node),
so a node count that does not divide the global batch fails here rather than after a day in the queue."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from lemur_torch.config import load_config, validate

REPO = Path(__file__).resolve().parents[1]
SBATCH = sorted((REPO / "launch" / "slurm").glob("*.sbatch"))
SHELL = [REPO / "launch" / "torchrun.sh", REPO / "launch" / "slurm" / "job.sh", *SBATCH]


@pytest.mark.parametrize("script", SHELL, ids=lambda p: p.name)
@pytest.mark.slow
def test_shell_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _directives(text: str) -> dict:
    found = {}
    for line in text.splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            found[m.group(1)] = m.group(2) or ""
    return found


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_preemption_directives_and_world_size(script):
    text = script.read_text()
    d = _directives(text)
    assert d.get("signal", "").startswith("B:USR1@"), "the early warning must reach the batch shell (job.sh)"
    assert "requeue" in d and d.get("open-mode") == "append"
    assert 'launch/slurm/job.sh"' in text
    experiment = re.search(r'EXPERIMENT="?\$\{EXPERIMENT:-(\w+)\}|EXPERIMENT=(\w+)', text)
    experiment = experiment.group(1) or experiment.group(2)
    assert (REPO / "conf" / "experiment" / f"{experiment}.yaml").exists(), experiment
    if "gpus-per-node" in d:
        world = int(d["nodes"]) * int(d["gpus-per-node"])
        overrides = []
    else:  # the CPU script: one process per srun task, and the overrides it adds itself
        world = int(d["ntasks"]) * int(re.search(r"NPROC_PER_NODE:-(\d+)", text).group(1))
        overrides = re.search(r"^set -- (.*) \"\$@\"$", text, re.M).group(1).split()
    cfg = load_config([f"experiment={experiment}", *overrides])
    validate(cfg, world)


@pytest.mark.parametrize("config", sorted((REPO / "launch" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_only_launch(config):
    c = yaml.safe_load(config.read_text())
    # lemur-train owns FSDP2 and precision: accelerate must not wrap the model or cast it
    assert c["distributed_type"] in ("NO", "MULTI_GPU"), c["distributed_type"]
    assert c["mixed_precision"] == "no" and "fsdp_config" not in c and "deepspeed_config" not in c
    assert c["num_processes"] % c["num_machines"] == 0
