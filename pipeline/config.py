"""The pipeline's configuration: plain dataclasses (``jobs/`` fills them through OmegaConf).

Every field is documented in ``configs/generate.yaml``. ``validate`` checks values and names
the offending key in its error.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

SEARCHERS = ("conflayers", "static", "swift", "none", "cached")
DRAFTERS = ("auto", "ngram", "corpus", "layerskip", "none")  # conflayers.drafts.auto.DRAFTERS (no torch import here)
FORMATS = ("records", "specbench", "gsm8k")
FILE_FORMATS = ("auto", "jsonl", "parquet", "csv")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16", "float64")
KERNELS = ("auto", "native", "onednn")  # conflayers.kernels.KERNELS (kept import-free for the driver)
COMPILE = ("auto", "on", "off")  # conflayers.compiled.COMPILE


@dataclass
class ModelConfig:
    source: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "auto"
    kernels: str = "auto"  # auto (fastest known for the device) | native (PyTorch's default) | onednn
    revision: Optional[str] = None  # a hub model's commit hash / tag / branch (pin it for reproducible runs)
    allow_pickle: bool = False  # load .bin/.pt (pickle) weights: only for checkpoints you trust
    trust_remote_code: bool = False  # run Python code from the model's repository: only for code you trust


@dataclass
class StorageConfig:
    endpoint_url: Optional[str] = None
    key: Optional[str] = None
    secret: Optional[str] = None
    region: Optional[str] = None
    anonymous: bool = False


@dataclass
class InputConfig:
    path: str = ""  # "" = the demo corpus bundled in pipeline/data/demo.jsonl
    format: str = "records"
    file_format: str = "auto"
    limit: int = 0


@dataclass
class OutputConfig:
    path: str = "outputs/generate"
    resume: bool = True


@dataclass
class GenerationSettings:
    max_tokens: int = 64
    max_tokens_limit: int = 4096
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    chat: bool = True


@dataclass
class SearchConfig:
    drafter: str = "auto"  # auto (per step: ngram / corpus / layerskip / none by the cost surface) | ngram | corpus | layerskip | none
    ngram_max: int = 3  # n-gram drafter: longest suffix looked up
    costs: Optional[str] = None  # cost-surface cache JSON; None: next to `registry` if set, else ~/.cache/conflayers
    searcher: str = "conflayers"
    skip_layers: list[int] = field(default_factory=lambda: [12, 16, 20, 24])
    stop_threshold: float = 0.8
    max_draft_len: int = 8
    knobs: dict[str, Any] = field(default_factory=dict)
    registry: Optional[str] = None  # skip-set registry (JSON, local path): read by `cached`, merged into at the end


@dataclass
class BaselineConfig:
    fraction: float = 0.1
    min_per_dataset: int = 2


@dataclass
class EngineConfig:
    max_batch: Any = "auto"  # rows in flight per actor: "auto" (measured, within kv_cache_gb) or an integer
    kv_cache_gb: Optional[float] = None  # KV budget per actor; None: half of free GPU memory on CUDA; CPU actors of a job:
    # half of their share of the node's memory less the model (pipeline.memory); elsewhere half of free memory
    prefill_tokens: int = 512  # tokens per prefill forward of joining rows (a decode step runs between chunks)
    threads: Optional[int] = None  # torch threads per CPU actor; None: ray.num_cpus_per_actor, or on a local
    # cluster the job starts itself, the machine's cores shared among the actors
    compile: str = "auto"  # compiled decode/verify steps: auto (measured at the actor's width, and only where the
    # run is long enough to pay back compiling) | on | off (conflayers.compiled)


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: $RAY_ADDRESS if set, else a local Ray
    concurrency: int = 1
    batch_size: int = 256
    num_cpus_per_actor: float = 1.0
    max_restarts: int = 3
    max_task_retries: int = -1  # -1: while the actor restarts (bounded by max_restarts); a node's loss must not
    # use up the retries in the seconds its actor takes to come back elsewhere
    batch_timeout_s: Optional[float] = None  # a batch still running after this long kills its actor (null: no limit) ...
    batch_attempts: int = 2  # ... and after this many timed-out attempts its rows are written as `timeout` error rows
    driver_ids: int = 100000  # resume filter: up to this many committed ids the driver ships them as one set (fast);
    # above, the filter searches hash buckets in Ray's object store (driver memory bounded; pipeline.idsets)
    memory_per_actor_gb: Optional[float] = None  # memory each actor declares to Ray; None: model bytes + KV budget
    # (+ 1 GiB), the KV budget split among the actors Ray may place on a node (pipeline.memory)
    coordinator_timeout_s: float = 2.0  # the longest an actor or the driver waits on the coordinator per call
    coordinator_retry_s: float = 30.0  # after a failed or timed-out call, the coordinator is left alone this long


@dataclass
class DebugConfig:
    crash_once_marker: Optional[str] = None  # tests: the first batch os._exit()s once if this file is absent
    hang_ids: list = field(default_factory=list)  # tests: a batch holding one of these ids hangs (every attempt)
    hang_once_marker: Optional[str] = None  # tests: the first batch hangs once if this file is absent
    driver_exit_at: Optional[str] = None  # tests: jobs.summarize's driver os._exit()s at before_commit | after_commit
    coordinator_hang_s: float = 0.0  # tests: the coordinator's first read sleeps this long (a hung handler)
    kill_coordinator_at: Optional[str] = None  # tests: the driver SIGKILLs the coordinator at `merge` (its final merge)


@dataclass
class ProgressConfig:
    interval_s: float = 30.0  # stderr not a terminal (logs, CI, ray job logs): a progress line this often; 0: none
    verbose: bool = False  # Ray's own log lines and Ray Data's progress output too (the jobs' -v flag)


@dataclass
class CorpusIndexConfig:
    enabled: bool = True  # drafter auto: corpus drafts (from the dataset's earlier outputs) among its choices
    max_tokens_indexed: int = 1048576  # per dataset per actor (~64 bytes a token); the oldest outputs go first
    learn_prompts: bool = False  # index prompt + output (default: outputs only)
    path: Optional[str] = None  # saved indexes (local or s3://); None: <search.registry's dir>/corpus, else not saved
    share_tokens: int = 262144  # most tokens of pooled outputs an actor takes from the coordinator per message


@dataclass
class JobSections:
    """The sections every job shares (the generation job, the scheduled summarization job)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    engine: EngineConfig = field(default_factory=EngineConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    corpus_index: CorpusIndexConfig = field(default_factory=CorpusIndexConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    fail_fast: bool = False


@dataclass
class PipelineConfig(JobSections):
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def shared_sections(cfg: JobSections) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(JobSections)}


def check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {msg}")


def validate(cfg: PipelineConfig) -> PipelineConfig:
    check(cfg.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {cfg.model.dtype!r}")
    check(cfg.model.device in DEVICES, "model.device", f"must be one of {DEVICES}, got {cfg.model.device!r}")
    check(bool(cfg.model.source), "model.source", "must not be empty")
    check(cfg.model.kernels in KERNELS, "model.kernels", f"must be one of {KERNELS}, got {cfg.model.kernels!r}")
    # YAML (files and key=value overrides alike) reads a bare on / off as a boolean
    cfg.engine.compile = {"True": "on", "False": "off"}.get(str(cfg.engine.compile), cfg.engine.compile)
    check(cfg.engine.compile in COMPILE, "engine.compile", f"must be one of {COMPILE}, got {cfg.engine.compile!r}")
    check(cfg.input.format in FORMATS, "input.format", f"must be one of {FORMATS}, got {cfg.input.format!r}")
    check(cfg.input.file_format in FILE_FORMATS, "input.file_format",
           f"must be one of {FILE_FORMATS}, got {cfg.input.file_format!r}")
    check(cfg.input.limit >= 0, "input.limit", f"must be >= 0 (0 = all rows), got {cfg.input.limit}")
    check(bool(cfg.output.path), "output.path", "must not be empty")
    g = cfg.generation
    check(g.max_tokens_limit >= 1, "generation.max_tokens_limit", f"must be >= 1, got {g.max_tokens_limit}")
    check(1 <= g.max_tokens <= g.max_tokens_limit, "generation.max_tokens",
           f"must be in [1, generation.max_tokens_limit={g.max_tokens_limit}], got {g.max_tokens}")
    check(g.temperature >= 0, "generation.temperature", f"must be >= 0, got {g.temperature}")
    check(0 < g.top_p <= 1, "generation.top_p", f"must be in (0, 1], got {g.top_p}")
    check(g.top_k >= 0, "generation.top_k", f"must be >= 0, got {g.top_k}")
    s = cfg.search
    check(s.drafter in DRAFTERS, "search.drafter", f"must be one of {DRAFTERS}, got {s.drafter!r}")
    check(s.ngram_max >= 1, "search.ngram_max", f"must be >= 1, got {s.ngram_max}")
    check(s.searcher in SEARCHERS, "search.searcher", f"must be one of {SEARCHERS}, got {s.searcher!r}")
    check(0 <= s.stop_threshold <= 1, "search.stop_threshold", f"must be in [0, 1], got {s.stop_threshold}")
    check(s.max_draft_len >= 1, "search.max_draft_len", f"must be >= 1, got {s.max_draft_len}")
    check(s.searcher != "cached" or bool(s.registry), "search.registry",
          "the cached searcher reads its skip sets from a registry: set search.registry to its JSON file")
    check(s.registry is None or not s.registry.startswith("s3://"), "search.registry",
           "must be a local path (the registry is a local JSON file)")
    check(all(isinstance(i, int) and i >= 0 for i in s.skip_layers), "search.skip_layers",
           f"must be a list of layer indices, got {s.skip_layers!r}")
    c = cfg.corpus_index
    check(c.max_tokens_indexed >= 2, "corpus_index.max_tokens_indexed", f"must be >= 2, got {c.max_tokens_indexed}")
    check(c.share_tokens >= 1, "corpus_index.share_tokens", f"must be >= 1, got {c.share_tokens}")
    b = cfg.baseline
    check(0 <= b.fraction <= 1, "baseline.fraction", f"must be in [0, 1], got {b.fraction}")
    check(b.min_per_dataset >= 0, "baseline.min_per_dataset", f"must be >= 0, got {b.min_per_dataset}")
    r = cfg.ray
    check(r.concurrency >= 1, "ray.concurrency", f"must be >= 1, got {r.concurrency}")
    check(r.batch_size >= 1, "ray.batch_size", f"must be >= 1, got {r.batch_size}")
    e = cfg.engine
    check(e.max_batch == "auto" or (isinstance(e.max_batch, int) and not isinstance(e.max_batch, bool)
                                     and e.max_batch >= 1),
           "engine.max_batch", f"must be auto or an integer >= 1, got {e.max_batch!r}")
    check(e.kv_cache_gb is None or e.kv_cache_gb > 0, "engine.kv_cache_gb", f"must be > 0, got {e.kv_cache_gb}")
    check(e.prefill_tokens >= 1, "engine.prefill_tokens", f"must be >= 1, got {e.prefill_tokens}")
    check(e.threads is None or e.threads >= 1, "engine.threads", f"must be >= 1 or null, got {e.threads}")
    check(r.num_cpus_per_actor > 0, "ray.num_cpus_per_actor", f"must be > 0, got {r.num_cpus_per_actor}")
    check(r.max_restarts >= -1, "ray.max_restarts", f"must be >= -1 (-1 = forever), got {r.max_restarts}")
    check(r.max_task_retries >= -1, "ray.max_task_retries", f"must be >= -1, got {r.max_task_retries}")
    check(r.batch_timeout_s is None or r.batch_timeout_s > 0, "ray.batch_timeout_s",
          f"must be > 0 seconds or null (no limit), got {r.batch_timeout_s}")
    check(r.batch_attempts >= 1, "ray.batch_attempts", f"must be >= 1, got {r.batch_attempts}")
    check(r.driver_ids >= 0, "ray.driver_ids", f"must be >= 0, got {r.driver_ids}")
    check(r.memory_per_actor_gb is None or r.memory_per_actor_gb > 0, "ray.memory_per_actor_gb",
          f"must be > 0 or null (computed), got {r.memory_per_actor_gb}")
    check(r.coordinator_timeout_s > 0, "ray.coordinator_timeout_s", f"must be > 0, got {r.coordinator_timeout_s}")
    check(r.coordinator_retry_s >= 0, "ray.coordinator_retry_s", f"must be >= 0, got {r.coordinator_retry_s}")
    check(cfg.debug.kill_coordinator_at in (None, "merge"), "debug.kill_coordinator_at",
          f"must be null or merge, got {cfg.debug.kill_coordinator_at!r}")
    check(cfg.progress.interval_s >= 0, "progress.interval_s", f"must be >= 0 (0: no lines), got {cfg.progress.interval_s}")
    check(r.batch_timeout_s is None or r.max_task_retries == -1 or r.batch_attempts <= r.max_task_retries,
          "ray.batch_attempts", f"must be <= ray.max_task_retries ({r.max_task_retries}): a batch's timed-out "
          f"attempts are retries, and the attempt after the last one writes its rows as timeout error rows")
    return cfg
