"""What `steerer bank build` will cost, from the model's config.json alone (no weights, no tokenizer).

The feature layout is chosen here, up front, and `probes.features.featurise` writes exactly this layout
(`FeatureLayout`): the plan's disk and RAM figures are the writer's own arithmetic, not a separate guess.
A model whose every-third-layer cache would not fit the disk budget keeps fewer candidate layers: token
readings (what flag thresholds, warnings and steering directions are fitted on) at the candidate layers
only, and the fixed positions (what the probes are chosen on) at the same layers instead of every layer.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

GiB = 1024**3
FP16 = 2
N_POSITIONS = 13  # probes.dataset.POSITIONS: last prompt, first, ten body deciles, end
PROMPT_TOKENS = 260  # mean chat prompt of the corpus (system + aids + request), measured on the default model
CORPUS_ROW_BYTES = 3_000  # gzip'd text row (messages, response, token ids) in the corpus
YIELD = 1.25  # generated responses per kept one (class caps discard some; the default model's corpus: ~1.0)
DISK_BUDGET = 19 * GiB  # features; the corpus, bank and reports take the rest of 20 GiB
LONG_TASK_BUDGET, OTHER_BUDGET = 160, 112  # probes.corpus.CorpusConfig token budgets
IFEVAL_ROWS = 300  # upper bound on IFEval prompts mapped onto the tasks (reliability stage) without IFEval's data
STEER_CELLS = 17  # 4 layers x 3 strengths + baseline + probe comparison (probes.steering defaults)
STEER_PROMPTS = 20


@dataclass(frozen=True)
class ModelShape:
    """The numbers the plan needs, read from config.json."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def n_params(self) -> int:
        """Dense decoder parameter count (attention with grouped KV, gated MLP, embeddings, norms)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h
        return self.num_layers * per_layer + self.vocab_size * h * (1 if self.tied else 2) + h


def shape_from_config(path: str | Path) -> ModelShape:
    """A model folder or config.json path -> its shape; one clear error when something is missing."""
    path = Path(path)
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    c = json.loads(config.read_text())
    c = c.get("text_config", c)
    try:
        heads = int(c["num_attention_heads"])
        return ModelShape(str(c.get("model_type", "?")), int(c["num_hidden_layers"]), int(c["hidden_size"]),
                          int(c.get("intermediate_size", 4 * int(c["hidden_size"]))), int(c["vocab_size"]), heads,
                          int(c.get("num_key_value_heads") or heads), bool(c.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise ValueError(f"{config} lacks {exc.args[0]!r}: not a decoder config this plan can read") from None


@dataclass(frozen=True)
class FeatureLayout:
    """What the feature cache stores per response (fp16): every POSITION at `position_layers`, every pass at
    `token_layers`. `position_layers` None = every layer (the layout of the shipped bank's cache)."""

    num_layers: int
    hidden_size: int
    token_layers: tuple[int, ...]
    position_layers: tuple[int, ...] | None = None

    @property
    def stored_position_layers(self) -> tuple[int, ...]:
        return tuple(range(self.num_layers)) if self.position_layers is None else self.position_layers

    def row_bytes(self, passes: int) -> int:
        """Bytes one response takes on disk: its positions, `passes` token readings, and its offset."""
        values = N_POSITIONS * len(self.stored_position_layers) + passes * len(self.token_layers)
        return values * self.hidden_size * FP16 + 8

    def loaded_bytes(self, rows: int, passes: int) -> int:
        """RAM one task's data takes once loaded (`probes.features.load_features`): positions widened to
        every layer in fp32, token readings kept in fp16."""
        return rows * (N_POSITIONS * self.num_layers * self.hidden_size * 4
                       + passes * len(self.token_layers) * self.hidden_size * FP16)


def default_token_layers(num_layers: int) -> tuple[int, ...]:
    """Every third layer and the last: enough for per-token monitors, a fraction of the storage."""
    return tuple(sorted({*range(0, num_layers, 3), num_layers - 1}))


def spread_layers(num_layers: int, k: int) -> tuple[int, ...]:
    """k candidate layers spread over the middle-to-late third of the stack, where probes read best."""
    lo, hi = round(0.35 * (num_layers - 1)), round(0.85 * (num_layers - 1))
    if k <= 1:
        return (hi,)
    return tuple(sorted({round(lo + (hi - lo) * i / (k - 1)) for i in range(k)}))


def feature_layout(num_layers: int, hidden_size: int, rows: int, passes: int,
                   budget: int = DISK_BUDGET) -> FeatureLayout:
    """The layout for `rows` responses of about `passes` readings each: the default one when it fits `budget`;
    else positions at the token layers only; else fewer, spread, candidate layers (at least two)."""
    full = FeatureLayout(num_layers, hidden_size, default_token_layers(num_layers))
    if rows * full.row_bytes(passes) <= budget:
        return full
    for k in range(len(full.token_layers), 1, -1):
        layers = full.token_layers if k == len(full.token_layers) else spread_layers(num_layers, k)
        layout = FeatureLayout(num_layers, hidden_size, layers, layers)
        if rows * layout.row_bytes(passes) <= budget:
            return layout
    return FeatureLayout(num_layers, hidden_size, spread_layers(num_layers, 2), spread_layers(num_layers, 2))


def task_budget(task: str) -> int:
    """The corpus's token budget of one task (the long one for tasks whose label needs the whole response)."""
    from steerer.tasks import TOKEN_BUDGET, get_task

    return LONG_TASK_BUDGET if get_task(task).token_budget > TOKEN_BUDGET else OTHER_BUDGET


def mean_passes(tasks: list[str]) -> int:
    """Readings per response at most: its token budget plus the end reading, averaged over the tasks."""
    return math.ceil(sum(task_budget(t) + 1 for t in tasks) / len(tasks))


def device_flops(device: str) -> float:
    """Sustained fp32 matmul FLOP/s of this device, measured in a fraction of a second (torch imported lazily:
    the plan itself needs no torch)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return NOMINAL_GPU_FLOPS
    n = 512
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev)
    (a @ a).sum().item()  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        (a @ a).sum().item()
        reps += 1
    return reps * 2 * n**3 / (time.perf_counter() - start)


NOMINAL_GPU_FLOPS = 2e14  # assumed for a CUDA plan made where no GPU is present (a data-centre GPU, bf16)
EFFICIENCY = 0.5  # share of matmul throughput a build sustains (the default model's corpus: ~0.5 on this CPU)


def machine_ram_bytes() -> int:
    """Physical memory of this machine (what a CPU build can hold)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_fits(shape: ModelShape, ram_bytes: int, share: float = 0.8) -> bool:
    """A CPU build holds the fp32 weights in RAM beside everything else: the model fits when its weights take at
    most `share` of this machine's memory (an 8B model's 32 GB never fit a 24 GiB machine)."""
    return shape.n_params * 4 <= share * ram_bytes


def resolve_plan_device(device: str, shape: ModelShape | None = None, ram_bytes: int | None = None) -> tuple[str, str]:
    """The device the build plans for and why. `auto`: CUDA when this machine has it; else the CPU when the model
    fits this machine's RAM; else CUDA (the plan is then for the GPU machine the build needs, and a run here is
    refused, `check_runnable`)."""
    if device != "auto":
        return device, "asked"
    import torch

    if torch.cuda.is_available():
        return "cuda", "auto: CUDA is available"
    ram = ram_bytes if ram_bytes is not None else machine_ram_bytes()
    if shape is None or cpu_fits(shape, ram):
        return "cpu", "auto: no CUDA here"
    return "cuda", (f"auto: no CUDA here, and the fp32 weights ({shape.n_params * 4 / GiB:.1f} GiB) do not fit this "
                    f"machine's {ram / GiB:.0f} GiB of RAM: planned for a CUDA device")


def check_runnable(plan: Plan, ram_bytes: int | None = None) -> None:
    """Refuse (one line) a build this machine cannot run: a CUDA plan without CUDA, or a CPU plan whose peak RAM
    exceeds this machine's memory. Before anything is written."""
    import torch

    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"this build needs a CUDA device ({plan.device_note}); none is available here: run it on a "
                         "GPU machine, or pass --device cpu on one with enough RAM")
    ram = ram_bytes if ram_bytes is not None else machine_ram_bytes()
    if plan.device.startswith("cpu") and plan.peak_ram_bytes > ram:
        raise ValueError(f"this build needs ~{plan.peak_ram_bytes / GiB:.1f} GiB of RAM on the CPU and this machine "
                         f"has {ram / GiB:.1f} GiB: run it on a CUDA device (--device cuda)")


@dataclass(frozen=True)
class GivenCorpus:
    """An existing corpus a build starts from (`--corpus`): what its manifest says about the requested tasks."""

    folder: Path
    model: str
    fingerprint: str | None
    rows: dict[str, int]  # kept rows per requested task
    ifeval: bool  # it holds IFEval's responses (the reliability stage generates none)


def read_given_corpus(folder: str | Path, tasks: list[str] | tuple[str, ...]) -> GivenCorpus:
    """The corpus folder's manifest, checked to be a corpus holding every task in `tasks` (one line otherwise).
    Which model made it is checked by the build once the model is loaded (its fingerprint needs the weights)."""
    from probes.ifeval import FILE as IFEVAL_FILE

    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"--corpus {folder}: no manifest.json there, so not a corpus (make one with `steerer probes "
                         "corpus` or `steerer bank build`)")
    manifest = json.loads(manifest_path.read_text())
    have = manifest.get("tasks") or {}
    missing = [t for t in tasks if t not in have or not (folder / f"{t}.jsonl.gz").is_file()]
    if missing:
        raise ValueError(f"--corpus {folder} lacks task(s) {', '.join(missing)} (it holds "
                         f"{', '.join(have) or 'none'}): pass --tasks among those")
    return GivenCorpus(folder.resolve(), str(manifest.get("model", "?")), manifest.get("fingerprint"),
                       {t: int(have[t]["n"]) for t in tasks}, (folder / IFEVAL_FILE).is_file())


@dataclass(frozen=True)
class Plan:
    model: str
    device: str
    tasks: list[str]
    per_task: int
    rows: int
    generated_rows: int
    generated_tokens: int
    forward_tokens: int
    forward_passes: int
    n_params: int
    weights_bytes: int
    feature_bytes: int
    disk_bytes: int
    peak_ram_bytes: int
    device_memory_bytes: int
    flops: float
    device_flops: float
    seconds: float
    layout: dict
    stages: dict
    device_note: str = ""
    corpus: str | None = None  # `--corpus`: the given corpus folder (no corpus generation priced)

    def to_json(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        return [
            f"plan: {self.model} on {self.device}{f' ({self.device_note})' if self.device_note else ''}, "
            + (f"{len(self.tasks)} tasks, {self.rows} rows from the given corpus {self.corpus} (none generated)"
               if self.corpus else f"{len(self.tasks)} tasks x {self.per_task} = {self.rows} rows "
                                   f"(~{self.generated_rows} generated)"),
            f"  generated tokens <= {self.generated_tokens:,}; forward tokens {self.forward_tokens:,} in "
            f"~{self.forward_passes:,} batched passes; {self.flops:.3g} FLOP",
            f"  disk {g(self.disk_bytes)} (features {g(self.feature_bytes)}: token layers "
            f"{self.layout['token_layers']}, position layers {self.layout['position_layers'] or 'all'})",
            f"  peak RAM {g(self.peak_ram_bytes)}; device memory {g(self.device_memory_bytes)}; "
            f"time ~{self.seconds / 3600:.1f} h at {self.device_flops / 1e9:.0f} GFLOP/s "
            f"{'assumed (no GPU here)' if self.device_flops == NOMINAL_GPU_FLOPS else 'measured'}",
            "  stages: " + ", ".join(f"{k} ~{v['seconds'] / 60:.0f} min" for k, v in self.stages.items()),
        ]


def ifeval_rows(tasks: list[str]) -> int:
    """IFEval prompts the reliability stage generates for these tasks: the mapped rows when IFEval's data is
    beside the checkout, else `IFEVAL_ROWS` if IFEval covers any of them; none for tasks it never asks (a
    team's own rules, char_count)."""
    from probes import ifeval

    try:
        return sum(1 for row in ifeval.mapped_rows() if row["task"] in tasks)
    except FileNotFoundError:
        return IFEVAL_ROWS if set(tasks) & set(ifeval.MAPPED.values()) else 0


def make_plan(model: str, shape: ModelShape, tasks: list[str], per_task: int, device: str = "cpu",
              batch_size: int = 48, flops: float | None = None, weight_bytes_per_param: int | None = None,
              steer_prompts: int = STEER_PROMPTS, device_note: str = "", corpus: GivenCorpus | None = None) -> Plan:
    """The build's figures. Upper bounds where the model decides (every response at its token budget);
    compute time from matmul throughput measured now (a busy machine measures slow) at `EFFICIENCY`.
    `corpus` (`--corpus`): rows are the given corpus's, nothing is generated for it (nor for IFEval when it
    holds IFEval's responses)."""
    rows = sum(corpus.rows.values()) if corpus else per_task * len(tasks)
    task_rows = max(corpus.rows.values()) if corpus else per_task
    passes = mean_passes(tasks)
    layout = feature_layout(shape.num_layers, shape.hidden_size, rows, passes)
    generated_rows = 0 if corpus else math.ceil(rows * YIELD)
    generated_tokens = generated_rows * (passes - 1)
    seq = PROMPT_TOKENS + passes
    steer_tokens = len(tasks) * STEER_CELLS * steer_prompts * seq
    n_ifeval = ifeval_rows(tasks)
    ifeval_generated = 0 if corpus and corpus.ifeval else n_ifeval
    ifeval_tokens = (n_ifeval + ifeval_generated) * seq  # generated (unless given), then teacher-forced
    given_ifeval = n_ifeval - ifeval_generated  # given IFEval responses are featurised with the corpus
    feature_bytes = (rows + given_ifeval) * layout.row_bytes(passes)
    stage_tokens = {"corpus": generated_rows * seq, "features": (rows + given_ifeval) * seq, "probes": 0, "warnings": 0,
                    "steering": steer_tokens, "reliability": ifeval_tokens}
    forward_tokens = sum(stage_tokens.values())
    forward_passes = (math.ceil(generated_rows / batch_size) * passes + rows + given_ifeval
                      + math.ceil(len(tasks) * STEER_CELLS * steer_prompts / batch_size) * passes
                      + math.ceil(ifeval_generated / batch_size) * passes + n_ifeval)
    on_cpu = device.startswith("cpu")
    per_param = weight_bytes_per_param or (4 if on_cpu else 2)  # load_model: fp32 on CPU; bf16/fp16 on a GPU
    weights = shape.n_params * per_param
    kv = batch_size * seq * shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * per_param
    capture = 4096 * len(set(layout.stored_position_layers) | set(layout.token_layers)) * shape.hidden_size * 4 * 2
    per_task_ram = layout.loaded_bytes(task_rows, passes)
    host_data = max(capture, 2 * per_task_ram)  # training holds a task's data and a fold's copy of it
    device_memory = weights + max(kv, capture)
    peak_ram = host_data + (device_memory if on_cpu else 0)
    speed = flops if flops is not None else device_flops(device)
    total_flops = 2.0 * shape.n_params * forward_tokens
    seconds = total_flops / (EFFICIENCY * speed)
    train_seconds = rows * 0.05  # probe choice: logistic fits over the candidate layers
    stages = {k: {"forward_tokens": v, "seconds": round(2.0 * shape.n_params * v / (EFFICIENCY * speed)
                                                        + (train_seconds if k in ("probes", "warnings") else 0), 1)}
              for k, v in stage_tokens.items()}
    disk = feature_bytes + (rows if corpus else generated_rows) * CORPUS_ROW_BYTES + n_ifeval * CORPUS_ROW_BYTES \
        + 64 * 1024**2  # a given corpus is copied into DIR
    return Plan(model, device, list(tasks), per_task, rows, generated_rows, generated_tokens, forward_tokens,
                forward_passes, shape.n_params, weights, feature_bytes, disk, peak_ram, device_memory, total_flops,
                speed, round(seconds + 2 * train_seconds, 1),
                {"token_layers": list(layout.token_layers),
                 "position_layers": None if layout.position_layers is None else list(layout.position_layers),
                 "row_bytes": layout.row_bytes(passes), "passes_per_row": passes}, stages, device_note,
                str(corpus.folder) if corpus else None)
