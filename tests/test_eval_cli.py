"""lemur-eval on real exports of this test session's runs: HumanEval end to end (base and chat), a checkpoint
through a temporary export, lm-eval tasks against lm-eval's own CLI, and batched generation against plain
one-prompt generate()."""

import glob
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import subprocess_env

from lemur_torch.eval import cli
from lemur_torch.eval.generation import cut_at_stop, encode_prompt, generate
from lemur_torch.eval.humaneval import check_program, extract_code, load_problems

FAST_EVAL = ["humaneval.max_new_tokens=24", "humaneval.batch_size=4", "sandbox.workers=2"]
SMOKE_EVAL = ["--limit", "3", *FAST_EVAL, "humaneval.n_samples=2", "humaneval.k=[1,2]"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """In-process generation on one thread, like the subprocess tests (OMP_NUM_THREADS=1): on a shared 2-core
    machine, two OpenMP threads spin-waiting on each other are several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def export_eval(smoke_run, tmp_path_factory):
    """lemur-eval's HumanEval on the smoke export: 3 problems x 2 samples, the paper's sampling protocol."""
    out = str(tmp_path_factory.mktemp("export_eval") / "out")
    assert cli.main([os.path.join(smoke_run, "hf"), "--out", out, *SMOKE_EVAL]) == 0
    return out


@pytest.mark.slow
def test_humaneval_end_to_end_on_the_smoke_export(export_eval):
    out = export_eval
    assert sorted(os.listdir(out)) == ["humaneval", "summary.json", "summary.md"]
    rows = read_jsonl(os.path.join(out, "humaneval", "results.jsonl"))
    problems = load_problems(3)
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for row, _problem in zip(rows, problems):
        assert row["n"] == 2 and len(row["samples"]) == 2
        assert row["correct"] == sum(s["passed"] for s in row["samples"])
        for s in row["samples"]:
            assert 1 <= s["tokens"] <= 24 and s["finish"] in ("stop", "eos", "length")
            assert s["result"] == "passed" or s["result"].startswith(("failed", "timed out"))
            assert not any(stop in s["completion"] for stop in ["\nclass", "\ndef", "\n#", "\nif", "\nprint"])
    metrics = json.load(open(os.path.join(out, "humaneval", "metrics.json")))
    assert metrics["problems"] == 3 and metrics["executions"] == 6 and not metrics["chat_template"]
    assert metrics["generated_tokens"] == sum(s["tokens"] for r in rows for s in r["samples"])
    assert {"pass@1", "pass@2"} <= set(metrics) and metrics["sandbox"]["pid_namespace"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [(r["task"], r["metric"]) for r in summary["rows"]] == [("humaneval", "pass@1"), ("humaneval", "pass@2")]
    assert summary["config"]["humaneval"]["temperature"] == 0.2  # the paper's protocol by default
    assert "| humaneval | pass@1 |" in open(os.path.join(out, "summary.md")).read()


@pytest.mark.slow
def test_scores_come_from_the_executions(smoke_run, tmp_path, monkeypatch):
    """The pipeline with a generator that returns the canonical solution as sample 0 and a broken one as
    sample 1: pass@1 = 0.5 and pass@2 = 1 on every problem, whatever the model."""
    from lemur_torch.eval import humaneval
    from lemur_torch.eval.generation import Generation

    def fake_generate(model, tokenizer, prompts, n_samples, **kw):
        by_prompt = {p["prompt"]: p for p in load_problems()}
        return [
            [Generation(by_prompt[p]["canonical_solution"], 1, "stop"), Generation("    return None\n", 1, "stop")]
            for p in prompts
        ]

    monkeypatch.setattr(humaneval, "generate", fake_generate)
    out = str(tmp_path / "out")
    assert (
        cli.main(
            [
                os.path.join(smoke_run, "hf"),
                "--limit",
                "5",
                "--out",
                out,
                *FAST_EVAL,
                "humaneval.n_samples=2",
                "humaneval.k=[1,2]",
            ]
        )
        == 0
    )
    metrics = json.load(open(os.path.join(out, "humaneval", "metrics.json")))
    assert metrics["pass@1"] == 0.5 and metrics["pass@2"] == 1.0 and metrics["solved_problems"] == 5
    for row in read_jsonl(os.path.join(out, "humaneval", "results.jsonl")):
        assert [s["passed"] for s in row["samples"]] == [True, False] and row["pass@1"] == 0.5


@pytest.mark.slow
def test_checkpoint_goes_through_a_temporary_export(smoke_run, export_eval):
    """A checkpoint folder gives the same (seeded, sampled) completions as the run's own export of the same
    step, the temporary export is removed, and the default output folder is <run_dir>/eval/<step>."""
    ckpt = os.path.join(smoke_run, "checkpoints", "step_00000004")
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "lemur-eval-export-*")))
    assert cli.main([ckpt, *SMOKE_EVAL]) == 0
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "lemur-eval-export-*"))) == before
    from_ckpt = read_jsonl(os.path.join(smoke_run, "eval", "step_00000004", "humaneval", "results.jsonl"))
    from_export = read_jsonl(os.path.join(export_eval, "humaneval", "results.jsonl"))
    completions = lambda rows: [s["completion"] for r in rows for s in r["samples"]]  # noqa: E731
    assert completions(from_ckpt) == completions(from_export) and len(completions(from_ckpt)) == 6


@pytest.mark.slow
def test_humaneval_through_the_chat_template(chat_smoke_run, tmp_path):
    from transformers import AutoTokenizer

    export = os.path.join(chat_smoke_run, "hf")
    out = str(tmp_path / "out")
    assert cli.main([export, "--limit", "2", "--out", out, *FAST_EVAL]) == 0
    metrics = json.load(open(os.path.join(out, "humaneval", "metrics.json")))
    assert metrics["chat_template"]
    tok = AutoTokenizer.from_pretrained(export)
    for row, problem in zip(read_jsonl(os.path.join(out, "humaneval", "results.jsonl")), load_problems(2)):
        sample = row["samples"][0]
        # the reply starts with Lemur's prefilled answer, which holds the prompt; the generated rest follows
        assert sample["reply"].startswith("Here is the completed function:\n\n\n" + problem["prompt"])
        assert problem["prompt"].strip() in sample["completion"]
        assert sample["finish"] in ("stop", "eos", "length")
    # the prompt the model saw: ChatML, as the chat stage trained it (expected text written out here)
    from lemur_torch.eval.humaneval import chat_prompt

    p = load_problems(1)[0]
    expected = (
        "<s><|im_start|>user\nComplete the following python function.\n\n\n"
        + p["prompt"].strip()
        + "<|im_end|>\n<|im_start|>assistant\nHere is the completed function:\n\n\n"
        + p["prompt"]
    )
    assert (
        chat_prompt(
            tok,
            p,
            "Complete the following python function.\n\n\n{prompt}",
            "Here is the completed function:\n\n\n{prompt}",
        )
        == expected
    )
    assert encode_prompt(tok, expected).count(tok.bos_token_id) == 1


@pytest.mark.slow  # runs the programs in the sandbox: processes
def test_code_extraction_from_chat_replies():
    p = load_problems(3)[2]  # truncate_number
    body = "    return number % 1.0\n"
    fenced = (
        "Sure! Here it is:\n```python\ndef helper():\n    pass\n```\nand\n"
        f"```python\ndef truncate_number(number: float) -> float:\n{body}```\nDone."
    )
    code = extract_code(fenced, p["entry_point"])
    assert code.startswith("def truncate_number") and "Done" not in code
    prose = f"The answer is below.\n\ndef truncate_number(number: float) -> float:\n{body}"
    assert extract_code(prose, p["entry_point"]).startswith("def truncate_number")
    from lemur_torch.eval.humaneval import chat_completion
    from lemur_torch.eval.sandbox import Sandbox

    results = Sandbox(workers=2).run_all(
        [
            check_program(p, chat_completion(extract_code(fenced, p["entry_point"]), p["entry_point"])),
            check_program(p, chat_completion(extract_code(body, p["entry_point"]), p["entry_point"])),  # a bare body
            check_program(p, chat_completion(extract_code("I cannot help.", p["entry_point"]), p["entry_point"])),
        ]
    )
    assert [r.passed for r in results] == [True, True, False]


@pytest.mark.slow
def test_batched_generation_matches_one_prompt_at_a_time(smoke_run):
    """Left-padded batches with per-row stop strings give exactly what plain generate() gives for each prompt
    alone, cut at the first stop string (float64, so padding cannot flip a greedy choice). A randomly
    initialised tiny Llama: unlike a briefly trained one, it does not answer every prompt the same way."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lemur_torch.config import load_config
    from lemur_torch.model import hf_llama_config

    tok = AutoTokenizer.from_pretrained(os.path.join(smoke_run, "hf"))
    config = hf_llama_config(load_config(["model=tiny"]).model)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    prompts = [p["prompt"] for p in load_problems(5)]  # different lengths: real left padding
    ref = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tok, prompt)])
        with torch.no_grad():
            new = model.generate(
                ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id, use_cache=True
            )[0, ids.shape[1] :]
        ref.append(
            tok.decode(ids[0].tolist() + new.tolist(), skip_special_tokens=True)[
                len(tok.decode(ids[0], skip_special_tokens=True)) :
            ]
        )
    stops = ["\ndef", ref[0][4:8]]  # the second cuts prompt 0 short: its row must stop while others go on
    got = generate(model, tok, prompts, max_new_tokens=20, stop=stops, batch_size=5)
    assert [g[0].text for g in got] == [cut_at_stop(r, stops) for r in ref]
    assert got[0][0].finish == "stop" and got[0][0].tokens < 20
    assert any(g[0].finish == "length" and g[0].tokens == 20 for g in got[1:])


LOCAL_TASK = """task: lemur_local_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_task_matches_lm_eval_cli(smoke_run, tmp_path, monkeypatch):
    """A local YAML task over a local JSON file, offline: lemur-eval --tasks gives lm_eval's own numbers, down
    to each document's log-likelihoods."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [
        {
            "question": f"What is {a} plus {b}?",
            "choices": [str(a + b), str(a + b + 1), f"{a * b + 7} apples"],
            "answer": i % 3,
        }
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (10, 3), (6, 1)])
    ]
    (tasks / "arith.json").write_text(json.dumps(docs))
    (tasks / "arith.yaml").write_text(LOCAL_TASK.format(data=tasks / "arith.json"))
    export = os.path.join(smoke_run, "hf")
    ours = tmp_path / "ours"
    assert (
        cli.main(
            [
                export,
                "--tasks",
                "lemur_local_arith",
                "--include-path",
                str(tasks),
                "--out",
                str(ours),
                "harness.batch_size=2",
            ]
        )
        == 0
    )
    theirs = tmp_path / "theirs"
    env = subprocess_env()
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "lm_eval"),
            "--model",
            "hf",
            "--model_args",
            f"pretrained={export},dtype=float32,add_bos_token=True",
            "--tasks",
            "lemur_local_arith",
            "--include_path",
            str(tasks),
            "--batch_size",
            "2",
            "--device",
            "cpu",
            "--log_samples",
            "--output_path",
            str(theirs),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    their_results = json.load(open(glob.glob(str(theirs / "**" / "results_*.json"), recursive=True)[0]))["results"]
    our_results = json.load(open(ours / "lm_eval" / "results.json"))["results"]
    for metric in ("acc,none", "acc_norm,none"):
        assert our_results["lemur_local_arith"][metric] == their_results["lemur_local_arith"][metric], metric
    their_samples = read_jsonl(glob.glob(str(theirs / "**" / "samples_lemur_local_arith_*.jsonl"), recursive=True)[0])
    our_samples = read_jsonl(ours / "lm_eval" / "samples_lemur_local_arith.jsonl")
    assert len(our_samples) == len(docs) == len(their_samples)
    for a, b in zip(sorted(our_samples, key=lambda s: s["doc_id"]), sorted(their_samples, key=lambda s: s["doc_id"])):
        assert a["doc_id"] == b["doc_id"]
        lls = lambda s: torch.tensor([float(r[0][0]) for r in s["resps"]])  # noqa: E731  (the CLI writes strings)
        assert torch.allclose(lls(a), lls(b), atol=1e-5), (lls(a), lls(b))
    summary = json.load(open(ours / "summary.json"))
    acc = [r for r in summary["rows"] if r["task"] == "lemur_local_arith" and r["metric"] == "acc"]
    assert (
        len(acc) == 1 and acc[0]["value"] == our_results["lemur_local_arith"]["acc,none"] and acc[0]["n"] == len(docs)
    )


def test_errors_name_the_path_or_key(tmp_path, capsys):
    assert cli.main([str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert cli.main([str(tmp_path), "humaneval.k=[1,5]"]) == 2
    assert "humaneval.k" in capsys.readouterr().err
    assert cli.main([str(tmp_path), "sandbox.workers=100"]) == 2
    assert "sandbox.workers" in capsys.readouterr().err
    assert cli.main([str(tmp_path), "humaneval.temperature=0", "humaneval.n_samples=5"]) == 2
    assert "humaneval.n_samples" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_prints_the_config():
    proc = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "lemur-eval"),
            "/some/export",
            "--cfg",
            "humaneval.n_samples=20",
            "humaneval.k=[1,10]",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"] == "/some/export" and cfg["humaneval"]["n_samples"] == 20 and cfg["humaneval"]["k"] == [1, 10]
    codex = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    assert cfg["humaneval"]["stop"] == codex and cfg["humaneval"]["chat"]["stop"] == codex
