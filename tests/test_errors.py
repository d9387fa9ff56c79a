"""The error hierarchy: exit statuses by class, one line per error, errors that cross processes intact."""

from __future__ import annotations

import pickle

import pytest

from lemur_torch import train
from lemur_torch.errors import (
    BadInputError,
    ConfigError,
    DataConfigError,
    DataReadError,
    Hang,
    InputError,
    LemurError,
    NonFiniteError,
    Preempted,
)


@pytest.mark.parametrize(
    "exc, status, line",
    [
        (ConfigError("train.seq_len", "too long"), 2, "config error at 'train.seq_len': too long"),
        (DataConfigError("source 'code': no files"), 2, "data error: source 'code': no files"),
        (BadInputError("a.jsonl:3: malformed"), 2, "data error: a.jsonl:3: malformed"),
        (NonFiniteError("5 steps"), 3, "aborted: 5 steps"),
        (DataReadError("gs://b/x: 503"), 4, "aborted on a data read error: gs://b/x: 503; the last completed step"),
        (Preempted(7, 124), 124, "stop signal honoured: checkpoint at step 7"),
        (Hang(1, 9, 60.0, 125), 125, "lemur-train rank 1: step watchdog: no progress"),
    ],
)
def test_status_and_line_come_from_the_class(exc, status, line):
    assert exc.exit_code == status
    assert exc.one_line().startswith(line) and "\n" not in exc.one_line()
    back = pickle.loads(pickle.dumps(exc))  # a DataLoader worker, an object broadcast between ranks
    assert type(back) is type(exc) and str(back) == str(exc) and back.exit_code == status


def test_input_errors_are_value_errors_and_share_a_base():
    for exc in (ConfigError("k", "m"), DataConfigError("d"), BadInputError("b")):
        assert isinstance(exc, InputError) and isinstance(exc, ValueError) and isinstance(exc, LemurError)


def test_a_worker_traceback_is_cut_to_its_message():
    wrapped = DataConfigError(
        "Caught DataConfigError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        "  File \"x.py\", line 1\nlemur_torch.errors.DataConfigError: source 'code': gone"
    )
    assert wrapped.one_line() == "data error: source 'code': gone"


class _Custom(LemurError):
    exit_code = 77


def test_main_maps_an_error_by_its_class_not_its_text(monkeypatch, capsys):
    """A message that reads like another class's (the old main matched "config error" by text) does not matter."""

    def fail(cfg):
        raise _Custom("config error at 'x': looks like a config error but is not one")

    monkeypatch.setattr(train, "build_and_fit", fail)
    status = train.main(["experiment=smoke", "log.wandb_mode=disabled"])
    assert status == 77
    assert capsys.readouterr().err.strip() == "config error at 'x': looks like a config error but is not one"


def test_main_exits_quietly_with_the_preempt_status(monkeypatch, capsys):
    def preempt(cfg):
        raise Preempted(3, 124)

    monkeypatch.setattr(train, "build_and_fit", preempt)
    assert train.main(["experiment=smoke", "log.wandb_mode=disabled"]) == 124
    assert capsys.readouterr().err == ""
