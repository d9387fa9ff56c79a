"""lemur-eval's config schema: the types, choices and ranges. The values (with their sources) are in
conf/lemur_eval.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from lemur_torch.eval.sandbox import SandboxLimits
from lemur_torch.fields import Choice, bounded


class EvalDtype(Choice):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class ChatPromptConfig:
    # the user message; {prompt} is the HumanEval prompt (signature + docstring)
    user: str = "{prompt}"
    # text the assistant's reply starts with (prefilled); may contain {prompt}; "" = the model writes it all
    assistant_prefix: str = ""
    # stop strings applied to the generated part of the reply
    stop: List[str] = field(default_factory=list)


@dataclass
class HumanEvalConfig:
    n_samples: int = bounded(1, ge=1)
    # 0 = greedy decoding
    temperature: float = bounded(0.0, ge=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    max_new_tokens: int = bounded(512, ge=1)
    # pass@k for each k <= n_samples
    k: List[int] = field(default_factory=lambda: [1])
    stop: List[str] = field(default_factory=list)
    # prompts (x samples) per generate() call
    batch_size: int = bounded(16, ge=1)
    chat: ChatPromptConfig = field(default_factory=ChatPromptConfig)


@dataclass
class SandboxConfig(SandboxLimits):
    # parallel executions; 0 = one per CPU core
    workers: int = bounded(0, ge=0, le=64)
    # let programs import the evaluator's site-packages (numpy, ...); HumanEval needs the standard library only
    site_packages: bool = False


@dataclass
class HarnessConfig:
    batch_size: int = bounded(8, ge=1)
    # null = each task's own default
    num_fewshot: Optional[int] = bounded(None, ge=0)
    # folder of extra task YAML files (local tasks)
    include_path: Optional[str] = None
    # null = when the tokenizer has a chat_template
    apply_chat_template: Optional[bool] = None
    # null = the tokenizer's own behaviour
    add_bos_token: Optional[bool] = None
    bootstrap_iters: int = bounded(100000, ge=0)
    log_samples: bool = True


@dataclass
class EvalConfig:
    model: str = "???"
    tasks: List[str] = field(default_factory=lambda: ["humaneval"])
    out_dir: Optional[str] = None
    limit: Optional[int] = bounded(None, ge=1)
    seed: int = 1234
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    dtype: EvalDtype = EvalDtype.auto
    humaneval: HumanEvalConfig = field(default_factory=HumanEvalConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)


ConfigStore.instance().store(name="lemur_eval_schema", node=EvalConfig)
