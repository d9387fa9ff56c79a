"""lemur-report: the curves of a run's metrics.jsonl in a PNG (the plotted data checked against the file, read
here independently) and a summary; `make train` ends by writing it."""

import json
import os
import shutil
import subprocess

import matplotlib.image
import pytest

from lemur_torch.eval import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def merged_by_step(path):
    """The reference reading: every line of a step merged, later lines winning, key by key."""
    steps = {}
    for line in open(path):
        try:
            row = json.loads(line)
        except ValueError:  # the torn line
            continue
        steps.setdefault(row["step"], {}).update(row)
    return steps


def lines_of(fig, title):
    ax = next(a for a in fig.axes if a.get_title() == title)
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


@pytest.mark.slow
def test_report_of_the_smoke_run_with_a_resume_and_validation(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("checkpoints", "hf", "eval", "wandb*"))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    with open(run / "metrics.jsonl", "a") as f:
        # a resumed job re-logs step 3 with other values, validation lines come separately; a torn last line
        f.write(json.dumps(dict(rows[2], loss=1.5, **{"loss/code": 1.25})) + "\n")
        for step, code, text in ((2, 7.5, 8.5), (4, 6.5, 7.0)):
            f.write(
                json.dumps({"step": step, "val/loss/code": code, "val/loss/text": text, "val/loss": (code + text) / 2})
                + "\n"
            )
        f.write('{"step": 5, "loss": 1')
    assert report.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "validation loss: all 6.7500 at step 4 (best 6.7500), code 6.5000" in out
    image = matplotlib.image.imread(run / "report.png")
    assert image.shape[0] > 500 and image.shape[1] > 500

    steps = merged_by_step(run / "metrics.jsonl")
    fig = report.build_figure(report.read_metrics(str(run / "metrics.jsonl")))
    train = lines_of(fig, "training loss")
    assert set(train) == {"all", "code", "text"}
    assert train["all"] == (sorted(steps), [steps[s]["loss"] for s in sorted(steps)])
    assert train["all"][1][2] == 1.5  # the resumed job's step 3
    assert train["code"][1][2] == 1.25
    text_steps = [s for s in sorted(steps) if steps[s].get("loss/text") is not None]
    assert train["text"] == (text_steps, [steps[s]["loss/text"] for s in text_steps])
    val = lines_of(fig, "validation loss")
    assert val == {"all": ([2, 4], [8.0, 6.75]), "code": ([2, 4], [7.5, 6.5]), "text": ([2, 4], [8.5, 7.0])}
    assert lines_of(fig, "learning rate")["lr"][1] == [steps[s]["lr"] for s in sorted(steps)]
    assert lines_of(fig, "tokens/s")["tokens/s"][1] == [steps[s]["tokens_per_s"] for s in sorted(steps)]
    assert lines_of(fig, "MFU") == {}  # CPU: no peak FLOP/s, so no MFU, and the panel says so
    assert steps[4]["loss"] == train["all"][1][-1]  # the validation line of step 4 did not replace its training values


def test_validation_sources_are_dashed_under_their_domains(tmp_path):
    """Validation logs val/loss/<domain> and val/loss/<source>; with one source per domain both curves are equal,
    and the domain's (a training domain) must stay visible on top."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "loss": 3.0, "loss/code": 3.0}) + "\n")
        f.write(json.dumps({"step": 2, "val/loss": 2.5, "val/loss/code": 2.5, "val/loss/stdlib_code": 2.5}) + "\n")
    fig = report.build_figure(report.read_metrics(str(tmp_path / "metrics.jsonl")))
    ax = next(a for a in fig.axes if a.get_title() == "validation loss")
    order = [line.get_label() for line in ax.lines]
    assert order.index("stdlib_code") < order.index("code")
    style = {line.get_label(): line.get_linestyle() for line in ax.lines}
    assert style["stdlib_code"] == "--" and style["code"] == "-"


def test_mfu_is_drawn_when_known(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(
                json.dumps(
                    {"step": step, "loss": 3.0 - step / 10, "lr": 1e-4, "tokens_per_s": 1e5, "mfu": 0.4 + step / 100}
                )
                + "\n"
            )
    fig = report.build_figure(report.read_metrics(str(tmp_path / "metrics.jsonl")))
    assert lines_of(fig, "MFU")["MFU"] == ([1, 2, 3, 4, 5], [0.4 + s / 100 for s in range(1, 6)])
    assert "MFU: median 44.0%" in report.summarize(report.read_metrics(str(tmp_path / "metrics.jsonl")))


@pytest.mark.slow
def test_report_takes_the_training_overrides(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(smoke_run, "metrics.jsonl"), run / "metrics.jsonl")
    assert report.main(["experiment=smoke", f"run_dir={run}"]) == 0
    assert os.path.exists(run / "report.png")
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


@pytest.mark.slow
def test_make_train_ends_with_the_report():
    # -o: treat the venv stamp as up to date (a fresh clone would otherwise print the install recipe too)
    # under `make test` the parent make's MAKEFLAGS/MAKELEVEL would make this one print "Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = (
        subprocess.run(
            [
                "make",
                "-n",
                "--no-print-directory",
                "-o",
                ".venv/.installed",
                "train",
                "ARGS=train.max_steps=7 run_dir=/tmp/x",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    commands = [line for line in out if "/lemur-train " in line or "/lemur-report " in line]
    assert len(commands) == 2, out
    assert commands[0].endswith("lemur-train experiment=smoke train.max_steps=7 run_dir=/tmp/x")
    assert commands[1].endswith("lemur-report experiment=smoke train.max_steps=7 run_dir=/tmp/x")
