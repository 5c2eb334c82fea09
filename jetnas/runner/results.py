"""Typed stage results: what each runner function returns, what later stages read from it, and its record.

A result's record (`to_record`) is the JSON object its command prints as the last stdout line, what `jetnas run`
keeps in pipeline.json and report.json, and what `from_record` reads back when a finished stage is reused: the
field names are the record's keys, in order. Later stages read the typed fields (`placement.placements`,
`blocks.best`, `stage1.model_dir`), never a chain of dictionary keys.

Nothing here imports torch (see `jetnas.runner.recipes`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class StageResult:
    """A stage's result; `to_record()` / `from_record()` convert to and from its JSON record."""

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict):
        return cls(**record)


@dataclass
class DataResult(StageResult):
    """Training text the teacher generated once for every stage (`jetnas run` with `data: {generate: N}`)."""

    path: str
    tokens: int


@dataclass
class SupernetResult(StageResult):
    """A trained super-network: its directory (`supernet.json`, `linear.safetensors`, `heldout.bin`), and the
    trainer's summary (steps, final_loss, tokens, seconds, tokens_per_s, eval, ...), flattened into the record."""

    out_dir: str
    teacher: str
    linear: str
    train: dict

    def to_record(self) -> dict:
        return {"out_dir": self.out_dir, "teacher": self.teacher, "linear": self.linear, **self.train}

    @classmethod
    def from_record(cls, record: dict) -> SupernetResult:
        rest = dict(record)
        return cls(rest.pop("out_dir"), rest.pop("teacher"), rest.pop("linear"), rest)


@dataclass
class PlacementResult(StageResult):
    """The searched placement: the best layers kept as attention (`placement`: attn / swa indices), its layer types
    with the super-network's linear block elsewhere, its objective against the baselines, and the outputs
    (`placements` json, `heatmap`, `comparison`)."""

    supernet: str
    budget: str
    placement: dict
    layer_types: str
    objective: float
    uniform_objective: float
    one_layer_objective: float
    evaluations: int
    layer_passes: int | None
    outputs: dict

    @property
    def placements(self) -> str:
        """The ranked placements file the block and shape searches fill."""
        return self.outputs["placements"]


@dataclass
class BlockSearchResult(StageResult):
    """Block selection: the best candidate (`best`, its `block_type` and `options`), the ranking and scores, and
    the model it implies: `layer_types` and `block_config` (the swa window included)."""

    out_dir: str
    teacher: str
    placement: dict
    best: str
    block_type: str
    options: dict
    ranked: list
    scores: dict
    outputs: dict
    layer_types: str
    block_config: dict


@dataclass
class ShapeSearchResult(StageResult):
    """The shape search: the chosen (heads, d_k, d_v) against the original, and the model it implies."""

    out_dir: str
    teacher: str
    placement: dict
    block: str
    chosen: dict
    chosen_name: str
    original: dict
    state_numbers: int
    block_type: str
    options: dict
    outputs: dict
    state_bytes: int
    layer_types: str
    block_config: dict


@dataclass
class TrainResult(StageResult):
    """A training stage: the saved model directory, its layer types and block options, and the run's numbers."""

    stage: int
    out_dir: str
    model_dir: str | None
    layer_types: str
    block_config: dict
    steps: int
    tokens: int
    final_loss: float | None
    tokens_per_s: float | None
    seconds: float
    eval: dict
    parameters: int
    trainable_parameters: int
    data: list
    outputs: dict
    #: with `cuda_graph`: how many steps replayed the captured step, and why it fell back if it did
    cuda_graph: dict | None = None
    #: a run resumed from a checkpoint: the step it resumed at; `seconds` is then the whole run's training time over
    #: every process (when the checkpoint recorded it), this one's alone in `seconds_this_process`
    resumed_at_step: int | None = None
    seconds_this_process: float | None = None


@dataclass
class EvalResult(StageResult):
    """Per task, the metrics of one model (`results`)."""

    model: str
    out_dir: str
    results: dict


@dataclass
class BenchResult(StageResult):
    """Throughput of one model: the last context's engine row (`summary`) and the outputs (bench.json, figure)."""

    model: str
    device: str
    out_dir: str
    summary: dict
    outputs: dict
