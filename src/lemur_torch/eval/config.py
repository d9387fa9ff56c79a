"""lemur-eval's config schema: the types. The values (with their sources) are in conf/lemur_eval.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from lemur_torch.eval.sandbox import SandboxLimits


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
    n_samples: int = 1
    # 0 = greedy decoding
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    # pass@k for each k <= n_samples
    k: List[int] = field(default_factory=lambda: [1])
    stop: List[str] = field(default_factory=list)
    # prompts per generate() call
    batch_size: int = 16
    chat: ChatPromptConfig = field(default_factory=ChatPromptConfig)


@dataclass
class SandboxConfig(SandboxLimits):
    # parallel executions; 0 = one per CPU core
    workers: int = 0
    # let programs import the evaluator's site-packages (numpy, ...); HumanEval needs the standard library only
    site_packages: bool = False


@dataclass
class HarnessConfig:
    batch_size: int = 8
    # null = each task's own default
    num_fewshot: Optional[int] = None
    # folder of extra task YAML files (local tasks)
    include_path: Optional[str] = None
    # auto = when the tokenizer has a chat_template | true | false
    apply_chat_template: str = "auto"
    add_bos_token: Optional[bool] = None
    bootstrap_iters: int = 100000
    log_samples: bool = True


@dataclass
class EvalConfig:
    model: str = "???"
    tasks: List[str] = field(default_factory=lambda: ["humaneval"])
    out_dir: Optional[str] = None
    limit: Optional[int] = None
    seed: int = 1234
    device: str = "auto"
    dtype: str = "auto"
    humaneval: HumanEvalConfig = field(default_factory=HumanEvalConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)


ConfigStore.instance().store(name="lemur_eval_schema", node=EvalConfig)
