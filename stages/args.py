"""Argument groups of the offline stages (LLaMA-Factory style: one concern per dataclass).

The online config (pipeline.config) composes these with the training groups; stages never parse
YAML themselves. Each field's meaning is in the docstring under it; each group refuses, when built,
a value outside its field's range (`bounded`) or `Literal` choices. They live here, not in
pipeline.config, because stages take them and stages may not import pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stages.templates import check_template_name
from stages.values import FieldError, bounded, check_fields
from store.faiss_index import IndexRule


@dataclass(kw_only=True)
class ModelArgs:
    """The model to load and how it is fine-tuned."""

    model_name_or_path: str = ""
    """Local directory of a causal LM (config, weights, tokenizer), or its hub id (`org/name`), fetched into the Hugging Face cache (or found there when HF_HUB_OFFLINE is set)."""
    adapter_name_or_path: str | None = None
    """A saved peft adapter or Trainer checkpoint directory to load on top of the model, or its hub id."""
    model_revision: str = "main"
    """Hub revision (branch, tag or commit) of a model or adapter given by hub id."""
    cache_dir: str | None = None
    """Cache folder of hub models and datasets; default HF_HUB_CACHE (models) and the datasets cache."""
    hf_hub_token: str | None = field(default=None, repr=False)
    """Hugging Face token for private or gated hub repositories; default HF_TOKEN or the stored login."""
    ms_hub_token: str | None = field(default=None, repr=False)
    """ModelScope token (with USE_MODELSCOPE_HUB set)."""
    finetuning_type: Literal["lora", "full"] = "lora"
    """`lora` (train LoRA adapters) or `full` (train every weight)."""
    lora_rank: int = bounded(8, low=1, high=65536)
    """LoRA rank r."""
    lora_alpha: int | None = bounded(None, low=1, high=10**6)
    """LoRA scaling alpha; default 2 * lora_rank."""
    lora_dropout: float = bounded(0.0, low=0, high=0.999)
    """Dropout on the LoRA branch."""
    lora_target: str | list[str] = "all"
    """Module names to adapt, comma-separated; `all` means every linear layer but the LM head."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint; off unless set."""
    attn_implementation: str | None = None
    """`eager`, `sdpa`, ...; None lets transformers choose."""
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """float32, bfloat16 or float16 for loading weights; `auto` keeps the checkpoint's dtype."""
    new_special_tokens: list[str] = field(default_factory=list)
    """Special tokens added to the tokenizer where it lacks them, the model's embeddings resized to match (comma-separated string accepted); a run adds its named template's own (e.g. `<|eot_id|>`)."""
    train_from_scratch: bool = False
    """Train the checkpoint's architecture from new weights (drawn from the training seed) instead of its trained ones; offline signals are still computed with the checkpoint's weights, refreshed ones with the model being trained. Full fine-tuning only."""
    freeze_gate: bool = False
    """Mixture-of-experts models: keep the routers' weights (and their LoRA adapters) frozen while training; an error on a model with no router."""

    def __post_init__(self):
        if isinstance(self.new_special_tokens, str):
            self.new_special_tokens = [t.strip() for t in self.new_special_tokens.split(",") if t.strip()]
        check_fields(self)
        if self.train_from_scratch and self.finetuning_type != "full":
            raise FieldError("train_from_scratch", " trains new weights, so LoRA adapters on them would leave the "
                             "random base frozen", "set finetuning_type: full (as DataFlex's examples that use it do)")


@dataclass(kw_only=True)
class DataArgs:
    """Which datasets (each a domain) and how they are tokenized."""

    dataset: list[str] = field(default_factory=list)
    """Dataset names from dataset_info.json (comma-separated string accepted); each is a domain."""
    dataset_dir: str = "data"
    """Folder holding dataset_info.json and the data files."""
    allow_outside_dataset_dir: bool = False
    """Let dataset_info.json entries name files outside dataset_dir (an absolute path, or one through `..`); off, such an entry is refused, so a shared dataset_info.json cannot make a run read files elsewhere."""
    stage: Literal["pt", "sft"] = "sft"
    """`pt` (plain text, every token trained) or `sft` (prompt masked from labels)."""
    template: str | None = None
    """`default` (flexfeed's plain template), `chat` (the tokenizer's chat template) or a LLaMA-Factory template name (`llama3`, `qwen`, ...; its `default` is `lf_default`; list in docs/data.md); None picks chat when the tokenizer has one."""
    cutoff_len: int = bounded(1024, low=1, high=10**7)
    """Truncate tokenized samples to this many tokens."""
    max_samples: int | None = bounded(None, low=1, high=10**12)
    """Keep at most this many rows per dataset."""
    preprocessing_num_workers: int | None = bounded(None, low=1, high=1024)
    """Tokenize in this many processes (datasets' map with num_proc, as LLaMA-Factory); the token ids are the same as in one process."""
    eval_dataset: list[str] = field(default_factory=list)
    """Evaluation dataset names: evaluated every `eval_steps` under `eval_strategy` (`eval_loss`), and the selectors' target (their own store, gradients and embeddings) unless target_dataset is set."""
    target_dataset: list[str] = field(default_factory=list)
    """Target dataset names, what selectors aim at, when it should differ from eval_dataset (then eval_dataset is only evaluated)."""
    val_size: float = bounded(0.0, low=0, high=10**12)
    """Hold out this share (below 1) or this many rows (1 or more) of the training rows, drawn with `seed`, as the evaluation set (as LLaMA-Factory's val_size); they are never trained on, and are no selection target."""
    eval_on_each_dataset: bool = False
    """Evaluate each evaluation dataset (or, with val_size, each domain's held-out rows) on its own: `eval_<name>_loss` and no overall `eval_loss`."""
    val_dataset: list[str] = field(default_factory=list)
    """Validation dataset names, one per domain you want measured: per-domain loss at the end of training (default: the evaluation set, else the target)."""

    def __post_init__(self):
        check_fields(self)
        if self.template is not None:
            check_template_name(self.template)
        if self.val_size >= 1 and not float(self.val_size).is_integer():
            raise FieldError("val_size", f" is {self.val_size!r}: a share must be below 1, a row count whole",
                             "write e.g. 0.1 (a tenth of the rows) or 200 (rows)")
        if self.val_size and self.eval_dataset:
            raise FieldError("val_size", " and eval_dataset are both set: both name the evaluation set",
                             "keep one; to aim the selectors at eval_dataset while evaluating on held-out rows, "
                             "name it target_dataset")
        if self.eval_on_each_dataset and not (self.val_size or self.eval_dataset):
            raise FieldError("eval_on_each_dataset", " is set but there is no evaluation set",
                             "set eval_dataset or val_size, or drop eval_on_each_dataset")


@dataclass(kw_only=True)
class RunnerArgs:
    """Where offline stages run: a Dask LocalCluster here, or an existing scheduler."""

    scheduler: str | None = None
    """Address of an existing Dask scheduler: offline stages run there, and training decisions score their signals'
    shards there; None: stages start a LocalCluster on this machine, decisions score in the training processes."""
    n_workers: int | None = bounded(None, low=1, high=4096)
    """LocalCluster worker processes; default: cores // threads_per_worker (at least 1)."""
    threads_per_worker: int = bounded(1, low=1, high=1024)
    """Torch threads per worker process."""
    retries: int = bounded(2, low=0, high=100)
    """Dask retries per shard task."""
    max_in_flight: int | None = bounded(None, low=1, high=10**6)
    """Shard tasks submitted at once (bounds driver memory); default 2 * workers."""

    def __post_init__(self):
        check_fields(self)


@dataclass(kw_only=True)
class EmbedArgs:
    """The embedding stage (section `embed:`)."""

    backend: Literal["auto", "hf", "vllm", "sentence-transformers"] = "auto"
    """`auto`, `hf`, `vllm` or `sentence-transformers`."""
    model_name_or_path: str | None = None
    """Embedding model; default the training model."""
    pooling: Literal["last", "mean"] = "last"
    """`last` (last real token) or `mean` (over real tokens)."""
    layer: int = -1
    """Hidden-state layer to pool (hf backend); -1 is the last."""
    batch_size: int = bounded(16, low=1, high=10**5)
    """Rows per forward pass."""
    max_length: int | None = None
    """Truncate inputs for embedding; default cutoff_len."""

    def __post_init__(self):
        check_fields(self)


@dataclass(kw_only=True)
class LossArgs:
    """The per-sample loss stage (section `loss:`)."""

    model_name_or_path: str | None = None
    """Model to score with (e.g. a DoReMi reference model); default the training model."""
    adapter_name_or_path: str | None = None
    """Adapter/checkpoint to score with; default the model's adapter, if any."""
    batch_size: int = bounded(16, low=1, high=10**5)
    """Rows per forward pass."""
    signal: str = "loss"
    """Signal name to store under (`loss` for the training model, `ref_loss` for a reference)."""

    def __post_init__(self):
        check_fields(self)


@dataclass(kw_only=True)
class GradsArgs:
    """The gradient-feature stage (section `grads:`)."""

    proj_dim: int = bounded(8192, low=1, high=2**20)
    """Dimension of the projected gradient features."""
    proj_type: Literal["rademacher", "gaussian"] = "rademacher"
    """`rademacher` or `gaussian`."""
    proj_structure: Literal["kronecker", "sparse"] = "kronecker"
    """`kronecker` (per-weight P_a^T G P_c: a LoRA factor's rank side kept whole, the other side hashed; a dense projection's accuracy, memory O(rows + columns)) or `sparse` (count sketch, a dense projection's accuracy, memory O(LoRA params)); see docs/grads.md."""
    seed: int = 0
    """Projection seed: same seed, same features on any machine."""
    grad_type: Literal["adam", "sgd"] = "adam"
    """`adam` (LESS's preconditioned update, needs checkpoints with optimizer state) or `sgd`."""
    checkpoints: list[str] = field(default_factory=list)
    """Checkpoint directories (one signal each); empty means the model as loaded."""
    normalize: bool = True
    """L2-normalise features (LESS scores by cosine)."""
    batch_size: int = bounded(16, low=1, high=10**5)
    """Rows per batched backward."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the features."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """The forward and backward run under this autocast dtype (`bfloat16`: faster on hardware with bf16 units, about 1e-2 relative error against float32, printed by bench/grads.py); per-sample products, Adam and the projection stay float32."""
    nice_num_samples: int = bounded(4, low=1, high=4096)
    """NICE: completions sampled per target prompt for its policy-gradient feature (DataFlex `mc_samples`); from 2 on, each sample's baseline is the mean reward of the others."""
    nice_temperature: float = bounded(1.0, low=0.0, low_open=True, high=100.0)
    """NICE: sampling temperature of those completions (plain sampling, no top-k/top-p; DataFlex `generation_temperature`)."""
    nice_max_new_tokens: int = bounded(32, low=1, high=10**6)
    """NICE: most tokens generated per completion (DataFlex `max_new_tokens`)."""
    nice_max_prompt_tokens: int | None = bounded(None, low=1, high=10**7)
    """NICE: a longer target prompt keeps only its last this many tokens before sampling (DataFlex `max_prompt_length`); None keeps it whole."""
    nice_reward: str = "stages.grads.rewards:token_f1"
    """NICE: reward function `package.module:function`, reward(prompt_ids, completion_ids, reference_ids) -> float (used when nice_reward_backend is `function`)."""
    nice_reward_backend: Literal["function", "transformers", "vllm", "api"] = "function"
    """NICE: who scores a completion: `function` (nice_reward), or a judge model: `transformers` (nice_reward_model, CPU or GPU), `vllm` (nice_reward_model, needs vllm and a GPU) or `api` (an OpenAI-compatible chat-completions endpoint); see docs/nice.md."""
    nice_reward_model: str | None = None
    """NICE: the judge checkpoint of the transformers and vllm backends (a causal LM answering a score, or a sequence-classification reward model; DataFlex `hf_model_name_or_path`)."""
    nice_reward_temperature: float = bounded(0.0, low=0.0, high=100.0)
    """NICE: the judge's sampling temperature (transformers, vllm); 0 is greedy (DataFlex `vllm_temperature`)."""
    nice_reward_top_p: float = bounded(1.0, low=0.0, low_open=True, high=1.0)
    """NICE: the judge's top-p when it samples (DataFlex `vllm_top_p`)."""
    nice_reward_top_k: int = bounded(0, low=0, high=10**6)
    """NICE: the judge's top-k when it samples; 0 is off (DataFlex `vllm_top_k`, whose -1 is off)."""
    nice_reward_seed: int = 0
    """NICE: the judge's sampling seed (DataFlex `vllm_seed`)."""
    nice_reward_max_new_tokens: int = bounded(16, low=1, high=10**6)
    """NICE: most tokens a generative judge writes; its first number is the score (DataFlex `vllm_max_tokens`)."""
    nice_reward_max_model_len: int | None = bounded(None, low=16, high=10**7)
    """NICE: the judge's context length: a longer judge prompt keeps its last this many tokens (DataFlex `vllm_max_model_len`); None: the model's own."""
    nice_reward_tensor_parallel_size: int = bounded(1, low=1, high=1024)
    """NICE: GPUs the vllm judge is split over (DataFlex `vllm_tensor_parallel_size`)."""
    nice_reward_gpu_memory_utilization: float = bounded(0.9, low=0.0, low_open=True, high=1.0)
    """NICE: share of GPU memory the vllm judge may take (DataFlex `vllm_gpu_memory_utilization`)."""
    nice_reward_api_url: str | None = None
    """NICE: the api judge's chat-completions URL, e.g. https://api.openai.com/v1/chat/completions (DataFlex `api_url`)."""
    nice_reward_api_key_env: str = "DF_API_KEY"
    """NICE: name of the environment variable holding the api judge's key (DataFlex `api_key`); never the key itself."""
    nice_reward_api_model: str | None = None
    """NICE: the api judge's model name (DataFlex `model_name`)."""
    nice_reward_api_temperature: float = bounded(0.0, low=0.0, high=2.0)
    """NICE: the api judge's temperature (DataFlex `temperature`)."""
    nice_reward_api_timeout_s: float = bounded(60.0, low=0.0, low_open=True, high=3600.0)
    """NICE: seconds to wait for one api judge reply (each request is tried 3 times)."""

    def _check_nice(self) -> None:
        """Cross-field checks of the NICE reward settings (stages.grads.reward_models owns the rules)."""
        from stages.grads.reward_models import check_reward_args

        check_reward_args(self)

    def __post_init__(self):
        check_fields(self)
        self._check_nice()


@dataclass(kw_only=True)
class IndexArgs:
    """The FAISS index stage (section `index:`)."""

    signal: str = "embed"
    """Name of the signal to index."""
    flat_max_rows: int = bounded(100_000, low=1, high=10**12)
    """Exact IndexFlatIP up to this many rows, IVF above."""
    sq8_min_rows: int = bounded(1_000_000, low=1, high=10**12)
    """IVF with 8-bit scalar-quantised vectors (a quarter of float32's memory) from this many rows."""
    pq_min_rows: int = bounded(20_000_000, low=1, high=10**12)
    """IVF with product-quantised vectors (one byte per 8 dims) from this many rows: a 10M-row index fits in memory."""
    nprobe: int | None = bounded(None, low=1, high=65536)
    """IVF lists a search probes; default max(8, nlist // 64). A build prints its recall@10 against exact search."""

    def __post_init__(self):
        check_fields(self)

    def rule(self) -> IndexRule:
        """The store's size rule and search setting these fields configure."""
        return IndexRule(flat_max_rows=self.flat_max_rows, sq8_min_rows=self.sq8_min_rows,
                         pq_min_rows=self.pq_min_rows, nprobe=self.nprobe)


@dataclass(kw_only=True)
class StoreArgs:
    """The signal store."""

    store: str = "store"
    """Store directory (one per dataset fingerprint)."""
    shard_rows: int = bounded(4096, low=1, high=10**8)
    """Rows per shard: the unit of work, writing, staleness and verification."""

    def __post_init__(self):
        check_fields(self)
