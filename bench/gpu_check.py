"""GPU acceptance check (`make gpu-check`): lemur-torch's accelerator paths, proven in minutes on one GPU.

One line per item, printed as it runs; bench/results/gpu_check.json at the end (or --out). Items:
- attention: the three document-masked kernels behind lemur_torch.attention's seam (flash varlen: flash-attn,
  else torch's varlen kernel; transformers' SDPA with the [B,1,S,S] document mask; compiled FlexAttention with
  its block mask) at Llama-2-70B's layer shapes (64 heads of 128, 8 KV heads, 4096-token rows, micro-batch 2,
  several documents per row), bf16 forward and backward: each one's largest error against an fp32 reference
  (within twice the error of PyTorch's own bf16 attention, flash-attn's test criterion), and its time;
- train: Llama-2-70B's shapes cut to a few layers, FSDP2 on one GPU, compiled, full and selective (op-level
  `selective` where the backend has it, else every 2nd layer) activation checkpointing, through the project's
  backend and Trainer.train_step: tokens/s, MFU against the dense bf16 peak, peak memory, and lemur-plan's
  prediction for the same configuration on one such GPU (`plan.run.plan_run`; in the dry run for one H100, a
  figure that only shows the call works);
- float8 rowwise and tensorwise (`parallel.float8`, wired by the backend as in a real run: converted before
  checkpointing, compile and fully_shard, the scales precomputed after each optimizer step): speed-up over bf16
  and the loss difference over the same steps (3% from step 10 on, as the CPU tests);
- sync-free: one step under torch.cuda.set_sync_debug_mode("error") (no host read inside a step); a failure
  names the line of lemur_torch that synchronised;
- checkpoint: an asynchronous save (async_pinned) of that state: time training was blocked vs a synchronous save;
- export: the HF export loaded by transformers on the GPU, its logits against the trained model's.

Exit status: 0 with figures; 1 when a correctness check fails (a kernel's error, float8's loss, a host sync,
an incomplete checkpoint, the export's logits); 2 without CUDA (use --dry-run). `--dry-run` runs every item at
tiny shapes on CPU, with the CPU stand-in kernels, and says which items need CUDA and were skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import types

import torch
import torch.nn.functional as F
from results_io import write_result  # bench/ is on sys.path: this script's folder
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from lemur_torch import attention, commit
from lemur_torch.batch import document_ids, varlen_boundaries
from lemur_torch.checkpoint import META, Checkpointer, step_dir_name
from lemur_torch.config import load_config
from lemur_torch.config.schema import ActivationCheckpointing
from lemur_torch.data import build_loader
from lemur_torch.export import export_model
from lemur_torch.metrics import mfu, peak_flops
from lemur_torch.model import flops_per_token
from lemur_torch.optim import build_optimizer, build_scheduler
from lemur_torch.parallel.fsdp import FsdpBackend
from lemur_torch.plan.cluster import resolve
from lemur_torch.plan.run import plan_run
from lemur_torch.tokenizer import build_tokenizer
from lemur_torch.trainer import StopSignal, Trainer

GIB = 2**30
# Llama-2-70B's attention layer; several documents per 4096-token row (they sum to the row)
ATTN_GPU = dict(heads=64, kv_heads=8, head_dim=128, docs=[[1024, 700, 1372, 1000], [2048, 512, 1536]])
ATTN_CPU = dict(heads=4, kv_heads=2, head_dim=32, docs=[[16, 20, 28], [40, 24]])
FLOAT8_TOLERANCE = 0.03
# op-level selective activation checkpointing where the backend has it, else every 2nd layer
SELECTIVE_AC = (
    ["parallel.activation_checkpointing=selective"]
    if "selective" in ActivationCheckpointing.__members__
    else ["parallel.activation_checkpointing=every_n", "parallel.ac_every_n=2"]
)


class Report:
    def __init__(self, device: str, dry_run: bool):
        self.result = {"device": device, "dry_run": dry_run, "items": {}, "failures": [], "skipped": []}
        self.started = time.perf_counter()

    def line(self, name: str, text: str, ok: bool = True, **figures) -> None:
        took = time.perf_counter() - self.started
        print(f"[{took:6.1f}s] {name}: {text}" + ("" if ok else "  <-- FAIL"), flush=True)
        self.result["items"][name] = {"ok": ok, "text": text, **figures}
        if not ok:
            self.result["failures"].append(name)

    def skip(self, name: str, why: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {name}: skipped ({why})", flush=True)
        self.result["items"][name] = {"skipped": why}
        self.result["skipped"].append(name)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- attention ---------------------------------------------------------------------------------------------


def check_attention(rep: Report, device, dry: bool) -> None:
    shape = ATTN_CPU if dry else ATTN_GPU
    H, KV, D, docs = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["docs"]
    B, S = len(docs), sum(docs[0])
    doc_lens = torch.zeros(B, S, dtype=torch.int32)
    for row, lens in enumerate(docs):
        doc_lens[row, : len(lens)] = torch.tensor(lens)
    cu, longest = varlen_boundaries(doc_lens)
    cu = cu.to(device)
    doc = document_ids(cu, B, S)
    mask = attention.document_causal_mask(doc)
    block_mask = attention.document_block_mask(doc)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, S, D, generator=g).to(device) for n in (H, KV, KV))
    dout = torch.randn(B, S, H, D, generator=g).to(device)
    scale = D**-0.5
    hf_module = types.SimpleNamespace(num_key_value_groups=H // KV, is_causal=True, training=True)
    varlen = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)

    def math_sdpa(q_, k_, v_):  # PyTorch's own attention, row by row (the fp32 scores of a row are 4 GiB)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            rows = [
                F.scaled_dot_product_attention(
                    q_[b : b + 1], k_[b : b + 1], v_[b : b + 1], attn_mask=mask[b : b + 1], scale=scale, enable_gqa=True
                )
                for b in range(B)
            ]
        return torch.cat(rows).transpose(1, 2)

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    flash = attention.VARLEN_REFERENCE if dry else attention.find_kernel("flash", "cuda")
    flex = attention.FLEX_REFERENCE if dry else attention.find_kernel("flex", "cuda")
    kernels = {
        "flash": flash
        and (lambda q_, k_, v_: attention.varlen_attention(flash, None, q_, k_, v_, None, scaling=scale, **varlen)[0]),
        "sdpa": lambda q_, k_, v_: sdpa_attention_forward(hf_module, q_, k_, v_, mask, scaling=scale)[0],
        "flex": flex
        and (lambda q_, k_, v_: attention.flex_attention(flex, None, q_, k_, v_, block_mask, scaling=scale)[0]),
    }
    names = {
        "flash": flash.name if flash else None,
        "sdpa": "transformers SDPA, document mask",
        "flex": flex and flex.name,
    }

    def run(fn, dtype):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(dtype))
        return [out.detach().float()] + [t.grad.float() for t in leaves]

    ref = run(math_sdpa, torch.float32)
    base = [(a - r).abs().max().item() for a, r in zip(run(math_sdpa, torch.bfloat16), ref)]
    sync(device)
    for name, fn in kernels.items():
        item = f"attention {name}"
        if fn is None:
            rep.skip(item, "no flash varlen kernel on this GPU (Ampere or newer, flash-attn or torch varlen)")
            continue
        got = run(fn, torch.bfloat16)  # also the warm-up (flex compiles here)
        errors = [(a - r).abs().max().item() for a, r in zip(got, ref)]
        limits = [2 * b + 1e-4 for b in base]
        ok = all(e <= lim for e, lim in zip(errors, limits))
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            run(fn, torch.bfloat16)
        sync(device)
        ms = (time.perf_counter() - t0) / 3 * 1000
        parts = ", ".join(f"{w} {e:.1e}/{lim:.1e}" for w, e, lim in zip(("out", "dq", "dk", "dv"), errors, limits))
        where = " (CPU stand-in)" if dry and name != "sdpa" else ""
        rep.line(
            item,
            f"{names[name]}{where}: fwd+bwd {ms:.1f} ms; max error/limit {parts}",
            ok,
            kernel=names[name],
            fwd_bwd_ms=ms,
            errors=dict(zip(("out", "dq", "dk", "dv"), errors)),
            limits=dict(zip(("out", "dq", "dk", "dv"), limits)),
        )


# -- training ----------------------------------------------------------------------------------------------


class Capture:
    """The metrics sink the Trainer logs into: keeps each step's metrics."""

    enabled = True

    def __init__(self):
        self.rows = []

    def log_step(self, metrics):
        self.rows.append(metrics)

    def info(self, message):
        pass


def base_overrides(dry: bool, layers: int, steps: int, run_dir: str):
    common = [
        "model.pretrained=null",
        "data=sample",  # built in: the GPU machine needs no network
        "train.micro_batch_size=1",
        f"train.max_steps={steps}",
        "train.hang_timeout_s=null",
        "optim.warmup_steps=5",
        "log.wandb_mode=disabled",
        "log.console=false",
        "log.every_steps=1",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
        "checkpoint.export_at_end=false",
        "parallel.mixed_precision=bf16",
        f"run_dir={run_dir}",
    ]
    if dry:  # CPU: eager (compile on CPU is covered by tests/test_float8.py and costs minutes here)
        return ["model=tiny", "train.seq_len=64", "train.global_batch_tokens=64", "model.attention=sdpa", *common]
    return [
        "experiment=lemur_70b_pretrain",
        f"model.num_hidden_layers={layers}",
        "train.seq_len=4096",
        "train.global_batch_tokens=4096",
        "model.attention=auto",
        "parallel.compile=true",
        "checkpoint.export_dtype=bfloat16",
        *common,
    ]


# lemur-plan's device kinds by the name torch.cuda gives the GPU (specific parts first)
PLAN_DEVICES = (("H100 PCIe", "h100_pcie"), ("H100", "h100_sxm"), ("H200", "h200"), ("B200", "b200"))


def planner_prediction(overrides, device_name: str):
    """lemur-plan's figures for the same configuration on one GPU of this kind (in the dry run: one H100), None
    for a GPU the planner does not know, or the planner's error. Called before any Run: the planner shards the
    model on a fake process group, which it creates only in a process that has none."""
    kind = "h100_sxm" if device_name == "cpu" else next((k for n, k in PLAN_DEVICES if n in device_name), None)
    if kind is None:
        return None
    try:
        cfg = load_config([*overrides, f"cluster.device={kind}", "cluster.devices=1"])
        return {"device": kind, **plan_run(cfg, resolve(cfg.cluster)).to_json()}
    except Exception as exc:  # noqa: BLE001  the planner's failure is reported, never fatal to the check
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_overrides(overrides, recipe: str):
    return [*overrides, f"parallel.float8={recipe}"]


class Run:
    """One training configuration: the backend (FSDP2, float8 per `recipe`), model, optimizer, Trainer."""

    def __init__(self, overrides, recipe: str, initial=None):
        self.cfg = load_config(run_overrides(overrides, recipe))
        self.backend = FsdpBackend(self.cfg)
        self.device = self.backend.device
        self.model = self.backend.setup_model(self.cfg, init_weights=initial is None)
        if initial is not None:  # the first run's init: the same weights, without drawing them again
            set_model_state_dict(self.model, initial, options=StateDictOptions(full_state_dict=True))
        self.optimizer = build_optimizer(self.model, self.cfg.optim, self.device.type)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.train.max_steps)
        t = self.cfg.train
        self.tokenizer = build_tokenizer(self.cfg.data)
        self.loader = build_loader(self.cfg.data, self.tokenizer, t.seq_len, t.micro_batch_size, 0, 1, t.seed)
        self.logger = Capture()
        checkpointer = Checkpointer(self.cfg, self.backend, log=lambda message: None)
        checkpointer.run_id = "gpu-check"
        self.trainer = Trainer(
            self.cfg, self.backend, self.model, self.optimizer, self.scheduler, self.loader, checkpointer,
            self.logger, StopSignal(),
        )  # fmt: skip
        self.batches = self.backend.device_batches(iter(self.loader))

    def initial_state(self):
        """The weights as initialised, full, on the host: a copy (on CPU the state dict's tensors are the live
        parameters)."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().clone() for k, v in state.items()}

    def step(self) -> None:
        tr = self.trainer
        micro = [next(self.batches) for _ in range(tr.grad_accum)]
        tr.train_step(micro, started=time.perf_counter())

    def settle(self) -> None:
        self.trainer.read_in_flight()

    def train(self, steps: int, timed_from: int):
        """`steps` steps; tokens/s over the steps from `timed_from` on (the first compile), peak memory."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(steps):
            if i == timed_from:
                self.settle()
                sync(self.device)
                t0 = time.perf_counter()
            self.step()
        self.settle()
        sync(self.device)
        elapsed = time.perf_counter() - t0
        tokens = (steps - timed_from) * self.cfg.train.global_batch_tokens
        losses = [row["loss"] for row in self.logger.rows]
        peak = torch.cuda.max_memory_allocated() / GIB if self.device.type == "cuda" else None
        return {"tokens_per_s": tokens / elapsed, "losses": losses, "peak_gib": peak}

    def close(self) -> None:
        self.trainer.checkpointer.close()
        for attr in ("trainer", "optimizer", "scheduler", "model", "batches"):
            setattr(self, attr, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def describe_training(rep: Report, name: str, run: Run, figures, dry: bool, predicted) -> None:
    cfg, device_name = run.cfg, run.backend.device_kind
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    util = mfu(figures["tokens_per_s"], fpt, peak_flops("auto", device_name), 1)
    p = cfg.parallel
    ac = f"every_{p.ac_every_n}" if p.activation_checkpointing == "every_n" else p.activation_checkpointing
    text = f"AC {ac}; {figures['tokens_per_s']:,.0f} tokens/s"
    text += f", MFU {util:.1%} (dense bf16 peak)" if util is not None else ", MFU n/a (no peak for this device)"
    text += f", peak {figures['peak_gib']:.1f} GiB" if figures["peak_gib"] is not None else ""
    if predicted and "error" not in predicted:
        where = " for one H100, not this CPU" if dry else ""
        planned_mfu = f"{predicted['mfu']:.1%}" if predicted["mfu"] is not None else "n/a"
        text += (
            f"; planner{where}: {predicted['tokens_per_s_per_device']:,.0f} tokens/s, MFU {planned_mfu}, "
            f"peak {predicted['peak_memory_gib']:.1f} GiB"
        )
    else:
        text += "; planner: " + (
            predicted["error"] if predicted else f"no prediction (no device kind for {device_name})"
        )
    rep.line(
        name,
        f"{run.backend.float8 if run.backend.float8_plan.enabled else 'bf16'}; {text}",
        tokens_per_s=figures["tokens_per_s"],
        mfu=util,
        peak_gib=figures["peak_gib"],
        losses=figures["losses"],
        max_rel_loss_diff_to_full_ac=figures.get("max_rel_loss_diff_to_full_ac"),
        planner=predicted,
        attention=run.backend.attention,
    )


def check_sync_free(rep: Report, run: Run, item: str = "sync-free step") -> None:
    """One step with any host synchronisation an error (CUDA's sync debug mode); the step before is settled. A
    failure names the last line of lemur_torch on the way to the synchronising call."""
    if run.device.type != "cuda":
        rep.skip(item, "needs CUDA: torch.cuda.set_sync_debug_mode")
        return
    run.settle()
    micro = [next(run.batches) for _ in range(run.trainer.grad_accum)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run.trainer.train_step(micro)
        ok, text = True, "no host synchronisation between the forward and the end of the optimizer step"
    except RuntimeError as exc:
        package = f"{os.sep}lemur_torch{os.sep}"
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if package in f.filename]
        if frames:
            path = "lemur_torch" + os.sep + frames[-1].filename.rsplit(package, 1)[1]
            where = f" at {path}:{frames[-1].lineno} ({frames[-1].line})"
        else:
            where = ""
        ok, text = False, f"host synchronisation{where}: {str(exc).splitlines()[0]}"
        run.optimizer.zero_grad(set_to_none=True)  # the step stopped before its update
    finally:
        torch.cuda.set_sync_debug_mode(0)
    run.settle()
    rep.line(item, text, ok)


def check_checkpoint(rep: Report, run: Run, root: str) -> None:
    """A synchronous save, then an asynchronous one (async_pinned) overlapping a training step: how long each
    held the loop. The backend's state as the trainer saves it (model, optimizer, loader, scheduler)."""
    state_bytes = sum(p.numel() * p.element_size() * 3 for p in run.model.parameters())  # params + 2 moments
    free = shutil.disk_usage(root).free
    if free < 1.5 * state_bytes:
        rep.skip("checkpoint", f"{free / GIB:.0f} GiB free on {root}, a save needs ~{state_bytes / GIB:.0f} GiB")
        return
    tr = run.trainer
    run.settle()
    blocked = {}
    for mode in ("none", "async_pinned"):
        run.cfg.checkpoint.async_mode = mode
        run.cfg.checkpoint.dir = os.path.join(root, f"ckpt_{mode}")
        ckpt = Checkpointer(run.cfg, run.backend, log=lambda message: None)
        ckpt.run_id = "gpu-check"
        tr.checkpointer, tr.last_saved_step = ckpt, -1
        sync(run.device)
        t0 = time.perf_counter()
        tr.save()
        saved = tr.step
        # training goes on while an asynchronous save writes; the Trainer logs the save's figures (ckpt_*) with
        # the first step after it is written
        trained = 0
        while trained < 30 and not any(row.get("ckpt_step") == saved for row in run.logger.rows):
            run.step()
            run.settle()
            trained += 1
        sync(run.device)
        loop = time.perf_counter() - t0
        ckpt.finalize()
        rows = [row for row in run.logger.rows if row.get("ckpt_step") == saved] or [ckpt.stats()]
        path = os.path.join(run.cfg.checkpoint.dir, step_dir_name(saved))
        blocked[mode] = dict(
            {k: v for k, v in rows[-1].items() if k.startswith("ckpt_")},
            steps_during_save=trained,
            loop_s=loop,
            complete=commit.is_complete(path, META),
        )
        ckpt.close()
        shutil.rmtree(run.cfg.checkpoint.dir, ignore_errors=True)
    a, s = blocked["async_pinned"], blocked["none"]
    ok = a["complete"] and s["complete"]
    rep.line(
        "checkpoint",
        f"async_pinned held training {a['ckpt_blocked_s']:.2f}s (written in {a['ckpt_write_s']:.1f}s while "
        f"{a['steps_during_save']} steps trained) vs {s['ckpt_blocked_s']:.2f}s for a synchronous save; "
        f"~{state_bytes / GIB:.1f} GiB of state" + ("" if ok else "; a checkpoint is not complete (no meta.json)"),
        ok,
        **{f"{mode}_{k}": v for mode, fig in blocked.items() for k, v in fig.items()},
    )


def check_export(rep: Report, run: Run, root: str) -> None:
    """The HF export (the backend's export_hf), loaded by plain transformers on the same device; its logits on one
    document against the trained model's. The bf16 kernels differ (flash vs SDPA): compared by SQNR."""
    from transformers import LlamaForCausalLM

    out = os.path.join(root, "hf")
    run.cfg.checkpoint.export_dtype = "bfloat16"
    export_model(run.backend, run.model, run.cfg, run.tokenizer, out)
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(run.device).eval()
    L = run.cfg.train.seq_len  # the training shape: the compiled layers see no new sequence length
    ids = torch.randint(3, run.cfg.model.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "position_ids": torch.arange(L).view(1, L), "doc_lens": torch.tensor([[L]])}
    batch = {
        k: v.to(run.device) if torch.is_tensor(v) else v for k, v in attention.with_varlen_boundaries(batch).items()
    }
    trained = run.model(**attention.forward_kwargs(batch)).logits.detach().float()  # grad mode: no recompile
    with torch.no_grad():
        loaded = hf(input_ids=batch["input_ids"]).logits.float()
    sqnr = (20 * torch.log10(trained.norm() / (trained - loaded).norm().clamp(min=1e-30))).item()
    agree = (trained.argmax(-1) == loaded.argmax(-1)).float().mean().item()
    # a wrong export (a missing, swapped or transposed weight) is near 0 dB; bf16 kernel noise is ~40 dB. Argmax
    # agreement is a figure only: a barely trained model's top logits are near ties that bf16 noise may flip
    ok = sqnr >= 25
    rep.line(
        "export",
        f"transformers loads the export on {run.device.type}; logits vs the trained model: SQNR {sqnr:.1f} dB "
        f"(>= 25), argmax agreement {agree:.1%}",
        ok,
        sqnr_db=sqnr,
        argmax_agreement=agree,
    )
    del hf
    shutil.rmtree(out, ignore_errors=True)


def loss_difference(reference, got, from_step=10):
    diffs = [abs(g - r) / r for g, r in zip(got[from_step - 1 :], reference[from_step - 1 :])]
    return max(diffs) if diffs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every item at tiny shapes on CPU")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of Llama-2-70B's shape")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", help="result JSON (default bench/results/gpu_check.json)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device here; `--dry-run` runs every item at tiny shapes on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda") if cuda else torch.device("cpu")
    steps = args.steps if cuda else 10  # the loss is compared from step 10 on
    rep = Report(torch.cuda.get_device_name() if cuda else "cpu", args.dry_run)
    if args.dry_run:
        print("dry run: tiny shapes on CPU, CPU stand-ins for the flash and flex kernels, eager (no compile)")
    root = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        check_attention(rep, device, args.dry_run)
        overrides = base_overrides(args.dry_run, args.layers, steps, os.path.join(root, "run"))
        full = [*overrides, "parallel.activation_checkpointing=full"]
        selective = [*overrides, *SELECTIVE_AC]
        trained = {"bf16, full AC": (full, "none"), "bf16, selective AC": (selective, "none")}
        trained.update({f"float8 {r}, full AC": (full, r) for r in ("rowwise", "tensorwise")})
        planned = {k: planner_prediction(run_overrides(*v), rep.result["device"]) for k, v in trained.items()}
        run = Run(full, "none")
        initial = run.initial_state()
        bf16 = run.train(steps, timed_from=min(5, steps - 2))
        describe_training(rep, "train bf16, full AC", run, bf16, args.dry_run, planned["bf16, full AC"])
        check_sync_free(rep, run)
        check_checkpoint(rep, run, root)
        check_export(rep, run, root)
        run.close()
        run = Run(selective, "none", initial)
        figures = run.train(steps, min(5, steps - 2))
        figures["max_rel_loss_diff_to_full_ac"] = loss_difference(bf16["losses"], figures["losses"], from_step=1)
        describe_training(rep, "train bf16, selective AC", run, figures, args.dry_run, planned["bf16, selective AC"])
        run.close()
        for recipe in ("rowwise", "tensorwise"):
            run = Run(full, recipe, initial)
            figures = run.train(steps, min(5, steps - 2))
            name = f"float8 {recipe}, full AC"
            describe_training(rep, f"train {name}", run, figures, args.dry_run, planned[name])
            if recipe == "tensorwise":  # the float8 all-gather's scales are precomputed after each step
                check_sync_free(rep, run, "sync-free step, float8 tensorwise")
            run.close()
            worst = loss_difference(bf16["losses"], figures["losses"])
            speedup = figures["tokens_per_s"] / bf16["tokens_per_s"]
            rep.line(
                f"float8 {recipe}",
                f"x{speedup:.2f} bf16's tokens/s; loss within {worst:.2%} of bf16's from step 10 to {steps} "
                f"(<= {FLOAT8_TOLERANCE:.0%})" + (" [emulated on CPU: the speed-up means nothing]" if not cuda else ""),
                worst <= FLOAT8_TOLERANCE,
                speedup=speedup,
                max_rel_loss_diff=worst,
            )
        if not cuda:
            for item in ("compile", "flash and flex kernels", "sync-free step"):
                if item not in rep.result["skipped"]:
                    rep.skip(item, "needs CUDA: the dry run ran eager with the CPU stand-in kernels")
    except Exception:  # noqa: BLE001  an item that crashes is a failure, reported with the figures so far
        traceback.print_exc()
        rep.result["failures"].append("crashed: " + traceback.format_exc().strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    rep.result["seconds"] = time.perf_counter() - rep.started
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rep.result, f, indent=1)
    else:
        write_result("gpu_check", rep.result)
    failures = rep.result["failures"]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failures) if failures else 'all checks passed'} "
          f"in {rep.result['seconds']:.0f}s")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
