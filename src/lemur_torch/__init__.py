"""lemur-torch: the Lemur recipe (continued pretraining + ChatML tuning of Llama-2) on FSDP2 and torch_xla."""

__version__ = "0.1.0"
