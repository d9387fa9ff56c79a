"""lemur-torch: the Lemur recipe (continued pretraining + ChatML tuning of Llama-2) on FSDP2 and torch_xla."""

import logging

__version__ = "0.1.0"

# transformers imports torchao (the float8 extra) at import whenever it is installed, and torchao logs a warning
# at import for each CUDA kernel library it cannot load (all of them on a machine without CUDA) and for each enum
# it registers with torch's pytree: five lines of noise on every process's stderr, ahead of the gate's one-line
# errors. Their errors still show; float8 reports what it runs on itself (parallel/float8.py).
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
