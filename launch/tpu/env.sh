# Sourced on every TPU VM worker before lemur-train (by train.sh). One process per host drives all its chips.
export PJRT_DEVICE=TPU
# Overlap FSDP's all-gathers and reduce-scatters with compute (the async collective flags torch_xla's
# production recipes use); an inherited LIBTPU_INIT_ARGS is kept and extends these.
export LIBTPU_INIT_ARGS="--xla_enable_async_all_gather=true \
--xla_enable_async_collective_permute=true \
--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true \
--xla_tpu_scoped_vmem_limit_kib=98304 ${LIBTPU_INIT_ARGS:-}"
# wandb/HF caches on the VM's disk; tokenizers' threads fight the data loader otherwise
export TOKENIZERS_PARALLELISM=false
export WANDB_MODE=${WANDB_MODE:-online}
