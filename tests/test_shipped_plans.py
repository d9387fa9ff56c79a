"""The shipped 70B configs against the planner: the predictions written beside their settings (lines
`# plan <overrides>: peak ... days` in conf/experiment/*.yaml) and in docs/cluster.md are what `lemur-plan` says
today, to their printed rounding, and the shipped settings are the search's choice on the cluster they name first.
A change to the planner, a device constant or a config that moves a figure fails here until both are updated."""

import glob
import os
import re
from typing import List, Tuple

import pytest

from lemur_torch.config import check_values, load_config, validate
from lemur_torch.plan.cluster import resolve
from lemur_torch.plan.memory import GIB
from lemur_torch.plan.predict import Plan
from lemur_torch.plan.run import plan_run, setting_of, shape_of
from lemur_torch.plan.search import search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = r"(peak [\d.]+ GiB, [\d.]+ s/step, [\d,]+ tokens/s/device, MFU [\d.]+%, [\d.]+ days)"
CONFIG_LINE = re.compile(r"^# plan ((?:\S+=\S+ ?)+): " + FIGURES + r"$")
DOCS_LINE = re.compile(r"^(experiment=\S+(?: \S+=\S+)*): " + FIGURES + r"$")
SHIPPED = ("lemur_70b_pretrain", "lemur_70b_chat", "lemur_70b_pretrain_tpu_v4")


def figures(plan: Plan) -> str:
    """How the configs and docs print a plan."""
    return (
        f"peak {plan.memory.peak / GIB:.1f} GiB, {plan.step_time_s:.2f} s/step, "
        f"{plan.tokens_per_s_per_device:,.0f} tokens/s/device, MFU {100 * plan.mfu:.1f}%, {plan.days:.2f} days"
    )


def config_lines(name: str) -> List[Tuple[List[str], str]]:
    with open(os.path.join(ROOT, "conf", "experiment", f"{name}.yaml")) as f:
        found = [CONFIG_LINE.match(line.strip()) for line in f]
    return [([f"experiment={name}", *m.group(1).split()], m.group(2)) for m in found if m]


def docs_lines() -> List[Tuple[List[str], str]]:
    with open(os.path.join(ROOT, "docs", "cluster.md")) as f:
        found = [DOCS_LINE.match(line.strip()) for line in f]
    return [(m.group(1).split(), m.group(2)) for m in found if m]


def plan_of(args: List[str]) -> Plan:
    cfg = load_config(args)
    check_values(cfg)
    return plan_run(cfg, resolve(cfg.cluster))


def every_line() -> List[Tuple[List[str], str]]:
    names = [os.path.basename(p)[: -len(".yaml")] for p in glob.glob(os.path.join(ROOT, "conf", "experiment", "*"))]
    return [line for name in sorted(names) for line in config_lines(name)] + docs_lines()


@pytest.mark.parametrize("args, printed", every_line(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_printed_predictions_are_the_planners(args, printed):
    assert figures(plan_of(args)) == printed, " ".join(args)


def test_every_shipped_config_prints_its_predictions_and_the_docs_repeat_them():
    docs = {(" ".join(args), text) for args, text in docs_lines()}
    for name in SHIPPED:
        lines = config_lines(name)
        assert lines, f"conf/experiment/{name}.yaml has no '# plan ...' line"
        missing = [" ".join(args) for args, text in lines if (" ".join(args), text) not in docs]
        assert not missing, f"docs/cluster.md lacks {missing}"


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_settings_are_the_searchs_choice(name):
    """On the cluster a config names first, no fitting setting of its global batch is more than 1% faster
    (the search ranks settings within 1% by how few changes they need)."""
    args = config_lines(name)[0][0]
    cfg = load_config(args)
    cluster = resolve(cfg.cluster)
    shipped = plan_run(cfg, cluster)
    found = search(
        shape_of(cfg), setting_of(cfg, cluster), cluster, int(cfg.train.global_batch_tokens), int(cfg.train.max_steps)
    )
    assert shipped.fits and found
    assert shipped.step_time_s <= found[0].plan.step_time_s * 1.01, (name, found[0].overrides)


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_configs_pass_the_trainers_checks(name):
    # 64 processes: 8 GPU nodes, or 64 TPU hosts (one process each) of a v4-512 slice
    validate(load_config([f"experiment={name}"]), world_size=64)
