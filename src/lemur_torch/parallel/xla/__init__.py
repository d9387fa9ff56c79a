"""torch_xla SPMD backend: FSDPv2 (`SpmdFullyShardedDataParallel`) over a (fsdp, tensor) device mesh.

One process per host drives every local device; SPMD turns the single-device program into a sharded one.
Runs on TPU pods (PJRT_DEVICE=TPU) and, for tests, on the CPU PJRT device with CPU_NUM_DEVICES virtual
devices. The modules, and why they look the way they do:

- rules.py: the config rules (precision, the mesh over the devices and hosts, the global batch over the hosts,
  scan_layers' limits), light enough for the gate, which runs them without importing torch_xla.
- tpu.py: PJRT's device type and the chip's name (MFU's key), from the TPU VM's accelerator type.
- attention.py: mask-free implementations (per-document masks from position_ids on the device; Pallas flash
  attention on TPU), so a training step is one graph; what `model.attention` means here.
- backend.py (`XlaSpmdBackend`, the only module that needs torch_xla to import, with those it uses):
  - Hosts: every host runs the same program on its own share of the data (`dp_rank` = host index). What a
    host decides alone (a stop signal, the resume checkpoint, the guard it reads) is agreed over a CPU (gloo)
    process group across the hosts (Backend.any_process / broadcast_object / barrier): SPMD collectives
    cover only the compiled step. The CPU PJRT client has no multi-host runtime, so in tests processes
    started with RANK/WORLD_SIZE stand in for hosts (see `_join_hosts`).
  - Mesh: (fsdp, tensor) over `xr.global_runtime_device_count()` devices; `parallel.xla_tensor` sizes the
    tensor axis (1 = pure FSDP, the fastest choice whenever the model fits). With tensor > 1 the attention
    and MLP projections are split Megatron-style over `tensor` before FSDPv2 shards the rest over `fsdp`.
  - Model: FSDPv2 wraps each decoder layer with activation checkpointing inside the wrap
    (`auto_wrapper_callable`), the only order that works with FSDPv2; or, with `parallel.scan_layers`, the
    decoder layers run as one torch_xla scan (scan.py).
  - Batches: sent synchronously with `send_cpu_data_to_device`, each host's rows spread over its own devices
    (`minibatch`), sharded over both mesh axes as torch_xla requires of per-host input; the model reshards
    them to `fsdp` at its first layer. No MpDeviceLoader: its prefetch thread would run the stateful loader
    ahead of the step, so a checkpoint would record a loader position past the batches actually trained on.
  - Steps: nothing here syncs with the host; `step_done` cuts the step's one graph and launches it
    asynchronously (the trainer reads the step's metrics one step later).
  - Compilation: a persistent compilation cache (`parallel.xla_cache_dir`, per host), so a restarted job
    loads its step programs instead of compiling them again.
- materialise.py: the model built on the meta device by lemur_torch.model, then materialised one parameter
  at a time straight into its shards: each host computes (name-seeded init, equal to the FSDP backend's
  values) or reads (HF safetensors by byte range from a folder, gs:// or the hub: lemur_torch.weights) only
  the slices its own devices hold, so no host reads the whole model and no device holds an unsharded tensor.
- scan.py: the decoder layers as one torch_xla scan (one layer traced and compiled, looped over stacked
  weights), so tracing and compiling do not grow with depth (80 layers at 70B).
- checkpoint.py: torch.distributed.checkpoint with torch_xla's SPMD planners (the save planner corrected to
  write every chunk once), keys exactly those of the HF model (FSDPv2's `_orig_module.` segments stripped)
  and the optimizer state keyed by the same names (the layout of get_optimizer_state_dict), so a checkpoint
  written here is read on any mesh, by the FSDP backend and by lemur-export in a plain torch environment,
  and vice versa. Export: the same DCP save of the weights, then each host assembles some of the
  safetensors files from it: no program is compiled and no host holds more than one output file.

Importing this package (or rules, tpu, attention) never imports torch_xla: lemur_torch.parallel.build_backend
imports backend.py only when the config names this backend.
"""
