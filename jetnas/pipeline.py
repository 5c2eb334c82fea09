"""`jetnas run RECIPE.yaml`: the whole PostNAS pipeline, stage after stage, each stage resumable and reused.

    data -> supernet -> placement -> blocks -> hardware -> stage1 -> stage2 -> eval -> bench -> report

A recipe is a YAML mapping: `name`, `teacher`, `out_dir`, optional `device` and `seed`, `data` (a path / `hf:` spec;
`{generate: TOKENS}` for text sampled from the teacher; or `{path: SPEC}` with optional `generate: {tokens: N,
weight: W}` and `recall: [...]` sources mixed in, see `check_data_section`), and `stages`: one mapping per stage
whose keys are the fields of that stage's typed recipe (`jetnas.runner.recipes`; the flags of its command in
snake_case), or `skip`. Loading a recipe checks every key, type and range, so a recipe that loads runs. Every stage
writes under `out_dir/<stage>/`; `out_dir/pipeline.json` records each finished stage's result and the arguments it
ran with. Running the recipe again reuses finished stages whose arguments are unchanged, resumes an interrupted
stage from its own checkpoints, and reruns a changed stage and everything after it.

What flows between stages (typed results, `jetnas.runner.results`): the searched placement (`placement` ->
`blocks`, `hardware`, `stage1`), the best linear block (`blocks` -> `hardware`, `stage1`), the chosen block shape
(`hardware` -> `stage1`), the trained model (`stage1` -> `stage2` -> `eval`, `bench`). A skipped stage passes on what
the recipe gives instead (e.g. with `placement: skip`, `stage1` needs `layer_types`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jetnas.files import write_json_atomic
from jetnas.runner.fields import Recipe as StageRecipe
from jetnas.runner.fields import check_value, default_of
from jetnas.runner.bench import run_bench
from jetnas.runner.evaluate import run_eval
from jetnas.runner.recipes import (
    BenchRecipe,
    BlockSearchRecipe,
    EvalRecipe,
    PlacementRecipe,
    ShapeSearchRecipe,
    SupernetRecipe,
    TrainRecipe,
)
from jetnas.runner.results import (
    BenchResult,
    BlockSearchResult,
    DataResult,
    EvalResult,
    PlacementResult,
    ShapeSearchResult,
    StageResult,
    SupernetResult,
    TrainResult,
)
from jetnas.runner.searches import run_blocks, run_hardware
from jetnas.runner.supernet import run_placement, run_supernet
from jetnas.runner.retention import TRAINING_OUTPUTS, drop_checkpoints
from jetnas.runner.training import build_recall_data, generate_data, run_training
from jetnas.validation import read_json

STAGES = ("supernet", "placement", "blocks", "hardware", "stage1", "stage2", "eval", "bench")
TOP_LEVEL = {"name", "description", "teacher", "out_dir", "device", "seed", "data", "stages", "compare_placements"}


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: its typed recipe, the runner that runs it, its result, the recipe fields the pipeline
    sets itself (a YAML recipe must not set them), fields fixed for the stage, and whether it also runs on the
    teacher (evaluation and throughput are reported hybrid against teacher)."""

    recipe: type[StageRecipe]
    run: Callable[[StageRecipe], StageResult]
    result: type[StageResult]
    wired: frozenset[str]
    fixed: dict = field(default_factory=dict)
    with_teacher: bool = False


SPECS: dict[str, StageSpec] = {
    "supernet": StageSpec(SupernetRecipe, run_supernet, SupernetResult,
                          frozenset({"teacher", "data", "out_dir", "device", "seed"})),
    "placement": StageSpec(PlacementRecipe, run_placement, PlacementResult,
                           frozenset({"supernet", "out_dir", "device"})),
    "blocks": StageSpec(BlockSearchRecipe, run_blocks, BlockSearchResult,
                        frozenset({"teacher", "placement", "data", "out_dir", "device", "seed"})),
    "hardware": StageSpec(ShapeSearchRecipe, run_hardware, ShapeSearchResult,
                          frozenset({"teacher", "placement", "data", "out_dir", "device", "seed"})),
    "stage1": StageSpec(TrainRecipe, run_training, TrainResult,
                        frozenset({"stage", "teacher", "model", "data", "out_dir", "device", "seed"}), {"stage": 1}),
    "stage2": StageSpec(TrainRecipe, run_training, TrainResult,
                        frozenset({"stage", "teacher", "model", "out_dir", "device", "seed"}), {"stage": 2}),
    "eval": StageSpec(EvalRecipe, run_eval, EvalResult, frozenset({"model", "out_dir", "device"}), with_teacher=True),
    "bench": StageSpec(BenchRecipe, run_bench, BenchResult, frozenset({"model", "out_dir", "device"}),
                       with_teacher=True),
}


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, the stage and the key."""


@dataclass
class Recipe:
    """A loaded recipe: the top level, and per stage its arguments as written (checked), None when skipped."""

    name: str
    teacher: str
    out_dir: Path
    data: str | dict | None
    stages: dict[str, dict | None]
    device: str | None = None
    seed: int = 0
    source: str = "<recipe>"
    #: also train other placements into final hybrids by the same stage 1 / stage 2 / evaluation, so the search is
    #: judged on final models (`Pipeline.compare_placements`): True, the placement search's own baselines (uniform,
    #: one-layer ranking); or `{name: layer types}`, placements named in the recipe (a search that ran elsewhere,
    #: its result committed: the searched placement is then stage 1's `layer_types`)
    compare_placements: bool | dict[str, str] = False

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        path = Path(path)
        if not path.exists():
            raise RecipeError(f"recipe {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text())
        for item in overrides or []:
            apply_override(raw, item, str(path))
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<recipe>") -> Recipe:
        if not isinstance(raw, dict):
            raise RecipeError(f"{source}: a recipe is a mapping, got {type(raw).__name__}")
        unknown = set(raw) - TOP_LEVEL
        if unknown:
            raise RecipeError(f"{source}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(TOP_LEVEL)}")
        for key in ("name", "teacher"):
            if not raw.get(key):
                raise RecipeError(f"{source}: {key!r} is required")
        seed = raw.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise RecipeError(f"{source}: seed must be an integer, got {seed!r}")
        stages_raw = raw.get("stages") or {}
        if not isinstance(stages_raw, dict):
            raise RecipeError(f"{source}: 'stages' must be a mapping of stage -> arguments")
        unknown = set(stages_raw) - set(STAGES)
        if unknown:
            raise RecipeError(f"{source}: unknown stage(s) {sorted(unknown)}; the stages are {list(STAGES)}")
        stages: dict[str, dict | None] = {}
        for stage in STAGES:
            args = stages_raw.get(stage, "skip")
            if args in ("skip", False, None):
                stages[stage] = None
                continue
            if args is True:
                args = {}
            if not isinstance(args, dict):
                raise RecipeError(f"{source}: stages.{stage} must be a mapping of arguments or 'skip', got {args!r}")
            validate_arguments(stage, args, source)
            stages[stage] = dict(args)
        data = raw.get("data")
        if isinstance(data, dict):
            check_data_section(data, source)
            check_answer_weights(data, stages, source)
        compare = raw.get("compare_placements", False)
        if isinstance(compare, dict):
            check_placements(compare, stages, source)
        elif not isinstance(compare, bool):
            raise RecipeError(f"{source}: compare_placements must be true, false or a mapping of name -> layer "
                              f"types, got {compare!r}")
        elif compare and any(stages[s] is None for s in ("placement", "stage1", "eval")):
            raise RecipeError(f"{source}: compare_placements trains the placement search's baselines by stage1 and "
                              f"evaluates them: placement, stage1 and eval must run")
        return cls(compare_placements=compare, name=str(raw["name"]), teacher=str(raw["teacher"]),
                   out_dir=Path(raw.get("out_dir") or f"runs/{raw['name']}"), data=data,
                   stages=stages, device=raw.get("device"), seed=seed, source=source)



def check_placements(compare: dict, stages: dict[str, dict | None], source: str) -> None:
    """`compare_placements: {name: layer types}`: named placements beside stage 1's own, each a layer-types spec
    (`jetnas.models.layer_types`) with the same layer count; stage 1 and the evaluation must run."""
    if not compare:
        raise RecipeError(f"{source}: compare_placements is an empty mapping: name at least one placement")
    if stages["stage1"] is None or stages["eval"] is None:
        raise RecipeError(f"{source}: compare_placements trains each placement by stage1 and evaluates it: stage1 "
                          f"and eval must run")
    searched = stages["stage1"].get("layer_types")
    if stages["placement"] is None and not searched:
        raise RecipeError(f"{source}: compare_placements as a mapping needs stages.stage1.layer_types (the searched "
                          f"placement the others are compared with) or the placement stage")
    counts = {}
    for name, spec in {**({"stage1.layer_types": searched} if searched else {}), **compare}.items():
        if not isinstance(spec, str) or not spec.strip():
            raise RecipeError(f"{source}: compare_placements.{name} must be a layer-types string such as "
                              f"'gdn*7,attn,gdn*22', got {spec!r}")
        counts[name] = _layer_count(spec)
    # (the types themselves are checked against the layer registry when the pipeline starts: that needs torch,
    # which loading a recipe, e.g. for --check, does not import)
    if len(set(counts.values())) > 1:
        raise RecipeError(f"{source}: compare_placements: the placements have different layer counts {counts}")
    slugs = [_slug(str(name)) for name in compare]
    if "" in slugs or len(set(slugs)) < len(slugs):
        raise RecipeError(f"{source}: compare_placements: the names {sorted(map(str, compare))} must give distinct "
                          f"folder names (letters and digits)")


def _layer_count(spec: str) -> int:
    """The number of layers a layer-types spec gives, without the layer registry: entries are comma-separated, a
    `KEY=VALUE` piece without `:` continues the entry before it (`jetnas.models.layer_types.split_entries`), and
    `ENTRY*N` repeats an entry."""
    count = 0
    for piece in (p.strip() for p in spec.split(",")):
        if "=" in piece and ":" not in piece and count:
            # an option of the previous entry; a repeat written after it applies to that entry
            m = re.match(r"^.+\*(\d+)$", piece)
            count += int(m.group(1)) - 1 if m else 0
            continue
        m = re.match(r"^.+\*(\d+)$", piece)
        count += int(m.group(1)) if m else 1
    return count


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def apply_override(raw: dict, item: str, source: str) -> None:
    """`stages.supernet.steps=10` or `out_dir=runs/x`: set one key (the value parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. stages.supernet.steps=10")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child in (None, "skip", True):
            child = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {item!r}: {part!r} in {source} is {child!r}, not a mapping")
        node[part] = child
        node = child
    node[parts[-1]] = yaml.safe_load(value)


#: what a wired field holds while a recipe is checked before anything ran (the real value comes from the recipe's
#: top level or an earlier stage)
_WIRED_PLACEHOLDER = "<set by the pipeline>"


def validate_arguments(stage: str, args: dict, source: str) -> None:
    """Every key must be a field of the stage's recipe that the pipeline does not set itself, every value of the
    field's type and in its range, and the stage's recipe must accept them together (its `check`): what `--check`
    promises, that a recipe which loads runs."""
    spec = SPECS[stage]
    allowed = [f.name for f in dataclasses.fields(spec.recipe) if f.name not in spec.wired]
    for key, value in args.items():
        if key in spec.wired:
            raise RecipeError(f"{source}: stages.{stage}.{key} is set by the pipeline (from the recipe's top level or "
                              f"an earlier stage); remove it")
        if key not in allowed:
            raise RecipeError(f"{source}: stages.{stage}.{key} is not an argument of `{stage}`; allowed: "
                              f"{sorted(allowed)}")
        _, problem = check_value(spec.recipe, key, value)
        if problem:
            raise RecipeError(f"{source}: stages.{stage}.{key} {problem}, got {value!r}")
    # the whole stage recipe, wired fields standing in: its cross-field checks and its required fields
    wired = {name: _WIRED_PLACEHOLDER for name in spec.wired
             if name not in spec.fixed and _field_type_is_text(spec.recipe, name)}
    try:
        spec.recipe(**{**wired, **spec.fixed, **args})
    except ValueError as err:
        raise RecipeError(f"{source}: stages.{stage}: {err}") from err
    except TypeError as err:  # a required field the recipe does not give
        missing = [f.name for f in dataclasses.fields(spec.recipe)
                   if f.default is dataclasses.MISSING and f.name not in {**wired, **spec.fixed, **args}]
        raise RecipeError(f"{source}: stages.{stage} needs {', '.join(missing)}") from err


def _field_type_is_text(cls: type[StageRecipe], name: str) -> bool:
    return check_value(cls, name, _WIRED_PLACEHOLDER)[1] is None


def _missing_output(result: dict) -> str | None:
    """What a finished stage produced and later stages read, if it is gone: a model directory without its
    safetensors weights, or the generated training data file. A run continued from a copy of its small outputs (as
    dev/gpu_session.sh does across machines) has the records but not these, so the stage must run again."""
    if not isinstance(result, dict):
        return None
    model_dir = result.get("model_dir")
    if model_dir and not any(Path(model_dir).glob("*.safetensors")):
        return f"model {model_dir} (no weights)"
    if result.get("path") and not Path(result["path"]).exists():
        return f"file {result['path']}"
    return None


#: `data: {recall: {...}}` (or a list of up to `MAX_RECALL` such mappings: several kinds of retrieval-bearing
#: documents, e.g. long ones for needle-like recall and short dense ones for associative recall): the keys of
#: `jetnas.train.recall_data.RecallConfig` a recipe may set, besides `corpus` (the articles) and `weight` (its share
#: of the training mixture)
RECALL_KEYS = {"documents", "doc_tokens", "min_distance", "max_distance", "kinds", "queries", "entries",
               "answer_tokens", "max_articles"}
MAX_RECALL = 4
#: `data: {path: ..., generate: {tokens, weight, ...}}`'s optional keys: `length` new tokens a sample (default the
#: device's `generation_defaults`) and `special: false` (the teacher never samples its special tokens but EOS)
GENERATE_OPTIONS = ("length", "special")


def recall_sections(data: dict) -> list[dict]:
    """`data.recall` as a list of mappings (none, one, or several)."""
    recall = data.get("recall")
    return [] if recall is None else list(recall) if isinstance(recall, list) else [recall]


def recall_stage_name(index: int) -> str:
    """The pipeline stage that builds the `index`-th recall source: recall, recall2, recall3, ..."""
    return "recall" if index == 0 else f"recall{index + 1}"


# Stages whose output is a function of their arguments (the teacher's text, sampled with the recipe's seed; the
# same tokens on the same kind of device; the recall documents): a lost one is remade without rerunning the stages
# that used it.
REPRODUCIBLE = {"data", *(recall_stage_name(i) for i in range(MAX_RECALL))}


def check_answer_weights(data: dict, stages: dict[str, dict | None], source: str) -> None:
    """A training stage with `answer_weight` != 1 weights the recall documents' answer tokens: refuse it now (at
    `--check`, before any stage runs) when the recipe's data has no `recall` and the stage reads the recipe's data
    (a stage with its own `data` is checked when it starts, against its files)."""
    if recall_sections(data):
        return
    for stage in ("stage1", "stage2"):
        args = stages.get(stage) or {}
        weight = args.get("answer_weight", 1)
        if weight != 1 and "data" not in args:
            raise RecipeError(f"{source}: stages.{stage}.answer_weight={weight!r} weights the answer tokens of recall "
                              f"documents, but data has no recall section to build them from")


def check_data_section(data: dict, source: str) -> None:
    """`data` as a mapping: the text, `{generate: TOKENS}` (sampled from the teacher, the whole data) or `{path: SPEC}`;
    with a path, optionally `generate: {tokens: N, weight: W}` (N tokens sampled from the teacher, mixed in at weight
    W: broad text in the teacher's own distribution beside the corpus; optionally `length` and `special`, see
    `GENERATE_OPTIONS`) and `recall: {corpus: ARTICLES.jsonl(.gz),
    weight: W, documents: N, doc_tokens: T, ...}` or a list of such (retrieval-bearing documents built from those
    articles, mixed in at weight W). The weights are shares of the mixture: each in (0, 1), their sum < 1, the rest
    is the text's."""
    unknown = set(data) - {"generate", "path", "recall", "heldout"}
    if unknown or ("generate" not in data and "path" not in data):
        raise RecipeError(f"{source}: data must be a path / hf: spec, or a mapping with generate: TOKENS or path: "
                          f"SPEC (plus generate: {{tokens: N, weight: W}} beside a path, and recall: {{...}}), got "
                          f"{data!r}")
    total = 0.0
    generate = data.get("generate")
    if isinstance(generate, dict):
        if "path" not in data:
            raise RecipeError(f"{source}: data.generate={generate!r} mixes generated text into data.path, and data "
                              f"has no path; for generated text alone give generate: TOKENS")
        if not {"tokens", "weight"} <= set(generate) <= {"tokens", "weight", *GENERATE_OPTIONS}:
            raise RecipeError(f"{source}: data.generate takes tokens and weight (the generated text's share of the "
                              f"mixture), optionally {' and '.join(GENERATE_OPTIONS)}, got keys {sorted(generate)}")
        total += _check_weight(generate["weight"], "data.generate", source)
        length = generate.get("length")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise RecipeError(f"{source}: data.generate.length={length!r} must be a positive integer (new tokens a "
                              f"sample)")
        if not isinstance(generate.get("special", True), bool):
            raise RecipeError(f"{source}: data.generate.special={generate['special']!r} must be true or false")
        generate = generate["tokens"]
        where = "data.generate.tokens"
    elif "path" in data and generate is not None:
        raise RecipeError(f"{source}: data.generate={generate!r} beside data.path: give generate: {{tokens: N, weight: "
                          f"W}}, W the generated text's share of the mixture")
    else:
        where = "data.generate"
    if generate is not None and (isinstance(generate, bool) or not isinstance(generate, int) or generate < 1):
        raise RecipeError(f"{source}: {where}={generate!r} must be a positive integer (tokens to generate)")
    recalls = data.get("recall")
    if recalls is not None:
        if isinstance(recalls, list) and not 1 <= len(recalls) <= MAX_RECALL:
            raise RecipeError(f"{source}: data.recall as a list holds 1 to {MAX_RECALL} mappings, got {len(recalls)}")
        for i, recall in enumerate(recall_sections(data)):
            where = "data.recall" if not isinstance(recalls, list) else f"data.recall[{i}]"
            if not isinstance(recall, dict) or not {"corpus", "documents"} <= set(recall):
                raise RecipeError(f"{source}: {where} needs corpus (articles .jsonl(.gz)) and documents, got "
                                  f"{recall!r}")
            bad = set(recall) - RECALL_KEYS - {"corpus", "weight"}
            if bad:
                raise RecipeError(f"{source}: {where}: unknown key(s) {sorted(bad)}; allowed: "
                                  f"{sorted(RECALL_KEYS | {'corpus', 'weight'})}")
            total += _check_weight(recall.get("weight", 0.2), where, source)
    if total >= 1:
        named = "the generated text's and recall sources'" if isinstance(data.get("generate"), dict) else \
            "the recall sources'"
        raise RecipeError(f"{source}: {named} weights add up to {total:g}: they must leave the text a share (sum < 1)")


def _check_weight(weight, where: str, source: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < 1:
        raise RecipeError(f"{source}: {where}.weight={weight!r} must be a fraction in (0, 1)")
    return float(weight)


def _fingerprint(kwargs: dict) -> str:
    return hashlib.sha256(json.dumps(kwargs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Comparison:
    """A stage run on the hybrid and on the teacher (evaluation, throughput): the report puts them side by side."""

    hybrid: StageResult
    teacher: StageResult

    def to_record(self) -> dict:
        return {"hybrid": self.hybrid.to_record(), "teacher": self.teacher.to_record()}


@dataclass
class Done:
    """The typed results of the stages finished (or reused) so far in this run: what later stages read."""

    data: DataResult | None = None
    #: the recall sources' documents, in the recipe's order
    recalls: list[DataResult] = field(default_factory=list)
    supernet: SupernetResult | None = None
    placement: PlacementResult | None = None
    blocks: BlockSearchResult | None = None
    hardware: ShapeSearchResult | None = None
    stage1: TrainResult | None = None
    stage2: TrainResult | None = None
    eval: Comparison | None = None
    bench: Comparison | None = None


class Pipeline:
    """Runs a recipe's stages in order, reusing finished ones (see the module docstring)."""

    def __init__(self, recipe: Recipe, redo: tuple[str, ...] = (), keep_checkpoints: bool = True):
        """`keep_checkpoints=False`: a training stage's optimizer checkpoints are deleted as soon as it has finished
        and written its model (`jetnas.runner.retention`): later stages read the model, and a run's peak disk use
        stays one stage's checkpoints."""
        for stage in redo:
            if stage not in STAGES and stage != "data":
                raise RecipeError(f"--redo {stage!r}: not a stage; the stages are {['data', *STAGES]}")
        self.recipe, self.redo, self.keep_checkpoints = recipe, set(redo), keep_checkpoints
        #: bytes of optimizer checkpoints deleted per finished training stage (keep_checkpoints off)
        self.checkpoints_deleted: dict[str, int] = {}
        self.out = recipe.out_dir
        self.state_path = self.out / "pipeline.json"
        self.state = read_json(self.state_path) if self.state_path.exists() else {"stages": {}}
        self.done = Done()
        #: every run's record in the order run (eval and bench as hybrid / teacher pairs): report.json's results
        self.records: dict[str, dict] = {}
        self.changed = False  # once a stage reruns, every later stage reruns too
        # what the pipeline sets in each stage's recipe, from the recipe's top level and earlier stages
        self._wiring: dict[str, Callable[[dict, str | None], dict]] = {
            "supernet": self._supernet_args, "placement": self._placement_args, "blocks": self._search_args,
            "hardware": self._hardware_args, "stage1": self._stage1_args, "stage2": self._stage2_args,
            "eval": self._model_args, "bench": self._model_args}

    def _save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_path, self.state)

    def _log(self, msg: str) -> None:
        print(f"[jetnas run {self.recipe.name}] {msg}", file=sys.stderr, flush=True)

    def _run(self, name: str, kwargs: dict, run: Callable[[dict], StageResult], result: type[StageResult],
             upstream: bool = True, kind: str | None = None, reads_earlier: bool = True) -> StageResult:
        """Run (or reuse) one stage; its record in pipeline.json is written when it finishes. `upstream=False`:
        the stage depends on nothing earlier (the teacher's own evaluation), only its arguments decide.
        `reads_earlier=False`: the stage reads nothing an earlier stage made (the recall documents, built from the
        corpus), so whether it is reused is decided by its arguments alone, while its rerun still makes every later
        stage rerun (they read its output)."""
        fingerprint = _fingerprint(kwargs)
        record = self.state["stages"].get(name)
        stale = self.changed and upstream and reads_earlier
        current = bool(record) and record.get("fingerprint") == fingerprint and not stale and name not in self.redo
        gone = _missing_output(record["result"]) if current else None
        if current and not gone:
            try:
                reused = result.from_record(record["result"])
            except TypeError:  # a record another version of jetnas wrote, with other fields: run it again
                reused = None
            if reused is not None:
                self._log(f"{name}: reusing the finished result in {self.state_path}")
                self.records[name] = record["result"]
                return reused
        if gone:
            self._log(f"{name}: finished before, but its {gone} is gone (a run directory copied without it?): "
                      "running it again")
        self.changed = self.changed or (upstream and not (gone and name in REPRODUCIBLE))
        self._log(f"{name}: running")
        start = time.perf_counter()
        spec = SPECS.get(kind or name)
        resumable = spec is not None and "resume" in {f.name for f in dataclasses.fields(spec.recipe)}
        if resumable and ((record and not current) or name in self.redo):
            # it ran before under other arguments (or --redo, or a changed stage before it): its folder holds that
            # run, which must not be continued (the trainer would refuse it anyway); it is moved aside, not deleted.
            # --redo also starts over a stage that never finished (no record): its folder may hold a run cut short
            # under other arguments, e.g. stage 1's alignment phase, which would otherwise refuse to resume
            outcome = run({**kwargs, "resume": False})
        else:
            outcome = run(kwargs)
        self.state["stages"][name] = {"fingerprint": fingerprint, "arguments": kwargs, "result": outcome.to_record(),
                                      "seconds": round(time.perf_counter() - start, 1),
                                      "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._save_state()
        self.records[name] = outcome.to_record()
        self._log(f"{name}: done in {time.perf_counter() - start:.1f}s")
        if not self.keep_checkpoints and (kind or name) in TRAINING_OUTPUTS:
            freed = drop_checkpoints(kwargs["out_dir"], TRAINING_OUTPUTS[kind or name])
            if freed:
                self.checkpoints_deleted[name] = freed
                self._log(f"{name}: deleted its optimizer checkpoints ({freed / 1e9:.2f} GB; --keep-checkpoints keeps "
                          f"them)")
        return outcome

    # -- data ---------------------------------------------------------------------------------------------------

    def prepare_data(self) -> str | None:
        """The training data every stage uses: the recipe's spec as is; or teacher text generated once into
        `out_dir/data/train.bin`; or the recipe's path mixed with teacher text generated once into
        `out_dir/data/generated.bin` (`generate: {tokens, weight}`) and with retrieval-bearing documents built once
        into `out_dir/data/recall.bin`, `recall2.bin`, ... (`recall`, `jetnas.train.recall_data`): the spec
        `PATH:1-sum(weights),generated.bin:W,recall.bin:W1,...` (`jetnas.train.mixture`), each source with its own
        held-out tail and `heldout/<term>/<file name>` metrics in the training stages."""
        data = self.recipe.data
        if not isinstance(data, dict):
            return data
        generate = data.get("generate")
        parts, total = [], 0.0
        if isinstance(generate, dict):
            options = {k: generate[k] for k in GENERATE_OPTIONS if k in generate}
            generated = self._generate(int(generate["tokens"]), "generated.bin", **options)
            total += float(generate["weight"])
            parts.append(f"{generated.path}:{float(generate['weight']):g}")
            text = str(data["path"])
        elif generate is not None:
            text = self._generate(int(generate), "train.bin").path
        else:
            text = str(data["path"])
        for i, recall in enumerate(recall_sections(data)):
            options = {k: v for k, v in recall.items() if k != "weight"}
            kwargs = {"teacher": self.recipe.teacher, "seed": self.recipe.seed, **options}
            name = recall_stage_name(i)
            target = str(self.out / "data" / f"{name}.bin")
            # the recall documents come from the corpus, not from the teacher's text: a rerun data stage (another
            # generated text) does not make them stale (2026-12-07: 82 s of a GPU session rebuilt them for nothing)
            result = self._run(name, kwargs, lambda kw, target=target: build_recall_data(target=target, **kw),
                               DataResult, reads_earlier=False)
            self.done.recalls.append(result)
            weight = float(recall.get("weight", 0.2))
            total += weight
            parts.append(f"{result.path}:{weight:g}")
        if not parts:
            return text
        return ",".join([f"{text}:{1 - total:g}", *parts])

    def _generate(self, tokens: int, file: str, **options) -> DataResult:
        """The "data" stage: `tokens` tokens of teacher text (the recipe's seed) in `out_dir/data/<file>`, sampled
        once and reused like any stage; `options` (`GENERATE_OPTIONS`: length, special) as the recipe gives them, so
        a recipe without them keeps its fingerprint."""
        from jetnas.train.data import SAMPLER

        target = str(self.out / "data" / file)
        # the sampler is part of the stage's arguments (not of generate_data's): text another sampler made for the
        # same seed is other text, so a record of it must not be reused, nor its lost file remade by this one
        kwargs = {"teacher": self.recipe.teacher, "tokens": tokens, "seed": self.recipe.seed, "sampler": SAMPLER,
                  **options}
        self.done.data = self._run("data", kwargs, lambda kw: generate_data(
            target=target, device=self.recipe.device, **{k: v for k, v in kw.items() if k != "sampler"}), DataResult)
        return self.done.data

    # -- what each stage is given -------------------------------------------------------------------------------

    def stage_kwargs(self, stage: str, data: str | None) -> dict:
        """The recipe's arguments for `stage` plus what the pipeline wires in (the fields in `SPECS[stage].wired`)."""
        args = dict(self.recipe.stages[stage] or {})
        common = {"out_dir": str(self.out / stage), "device": self.recipe.device}
        return {**args, **common, **SPECS[stage].fixed, **self._wiring[stage](args, data)}

    def _supernet_args(self, args: dict, data: str | None) -> dict:
        return {"teacher": self.recipe.teacher, "data": data, "seed": self.recipe.seed}

    def _placement_args(self, args: dict, data: str | None) -> dict:
        if self.done.supernet is None:
            raise self._skipped("supernet", "out_dir")
        return {"supernet": self.done.supernet.out_dir}

    def _search_args(self, args: dict, data: str | None) -> dict:
        return {"teacher": self.recipe.teacher, "data": data, "seed": self.recipe.seed,
                "placement": self._placement()}

    def _hardware_args(self, args: dict, data: str | None) -> dict:
        kwargs = self._search_args(args, data)
        if self.done.blocks is not None and "block" not in args:
            kwargs["block"] = self._chosen_block()
        return kwargs

    def _chosen_block(self) -> str:
        """Block selection's winner as the hardware search's block, with the options it was selected with (the
        teacher's matched shape among them): its name alone would give the block's default shape, so the shape
        search would start from one that block selection never trained (2026-12-07: JetBlock's value dim 2x)."""
        from jetnas.models.layer_types import BlockSpec

        blocks = self.done.blocks
        return BlockSpec(blocks.best, blocks.block_type, tuple((blocks.options or {}).items())).written()

    def _stage1_args(self, args: dict, data: str | None) -> dict:
        kwargs = {"teacher": self.recipe.teacher, "data": data, "seed": self.recipe.seed, "model": None}
        if "layer_types" not in args:
            kwargs["layer_types"] = self._layer_types()
        if "block_config" not in args:
            # the chosen shape (hardware), else the chosen block's options (blocks); both carry the swa window
            chosen = self.done.hardware or self.done.blocks
            if chosen is not None:
                kwargs["block_config"] = chosen.block_config
            elif self.done.placement is not None and "swa_window" not in args:
                kwargs["swa_window"] = self._supernet_window()
        return kwargs

    def _stage2_args(self, args: dict, data: str | None) -> dict:
        return {"data": args.get("data", data), "teacher": self.recipe.teacher, "seed": self.recipe.seed,
                "model": self._model()}

    def _model_args(self, args: dict, data: str | None) -> dict:
        return {"model": self._model()}

    def _supernet_window(self) -> int:
        """The sliding window the super-network (and so the searched placement) used."""
        args = self.recipe.stages["supernet"] or {}
        return int(args["swa_window"]) if "swa_window" in args else default_of(SupernetRecipe, "swa_window")

    def _skipped(self, stage: str, key: str) -> RecipeError:
        return RecipeError(f"{self.recipe.source}: a later stage needs the {stage!r} stage's {key}, but {stage!r} is "
                           f"skipped and the recipe gives no replacement")

    def _placement(self) -> str:
        """The placement for blocks/hardware: the placement stage's placements.json, or stage1's layer_types."""
        if self.done.placement is not None:
            return self.done.placement.placements
        given = (self.recipe.stages["stage1"] or {}).get("layer_types")
        if not given:
            raise self._skipped("placement", "placements")
        return given

    def _layer_types(self) -> str:
        """stage1's per-layer types: the searched placement with the chosen block in the linear layers."""
        if self.done.placement is None:
            raise RecipeError(f"{self.recipe.source}: stage1 needs layer_types when the placement stage is skipped")
        block = self.done.blocks.best if self.done.blocks is not None else "jet"
        return ",".join(block if t not in ("attn", "swa") else t for t in self.done.placement.layer_types.split(","))

    def _model(self) -> str:
        trained = self.done.stage2 or self.done.stage1
        if trained is None:
            raise RecipeError(f"{self.recipe.source}: eval/bench/stage2 need a trained model: stage1 is skipped")
        return trained.model_dir

    # -- running ------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        self._check_placement_types()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.resolved.yaml").write_text(yaml.safe_dump(
            {"name": self.recipe.name, "teacher": self.recipe.teacher, "out_dir": str(self.out),
             "device": self.recipe.device, "seed": self.recipe.seed, "data": self.recipe.data,
             "stages": {s: ("skip" if a is None else a) for s, a in self.recipe.stages.items()}}, sort_keys=False))
        data = self.prepare_data()
        with_teacher: list[tuple[str, dict]] = []
        for stage in STAGES:
            if self.recipe.stages[stage] is None:
                self._log(f"{stage}: skipped by the recipe")
                continue
            spec = SPECS[stage]
            kwargs = self.stage_kwargs(stage, data)
            result = self._run(stage, kwargs, lambda kw, spec=spec: spec.run(spec.recipe(**kw)), spec.result)
            setattr(self.done, stage, result)
            if spec.with_teacher:
                with_teacher.append((stage, kwargs))
        # The teacher through the same stages (evaluation, throughput), for the report's side-by-side. They run
        # last: they depend on nothing earlier, so on a machine whose time may end (a GPU session; the trained
        # weights cannot leave it) everything that needs the hybrid's weights is done first, and the teacher's
        # side can finish on any later machine.
        for stage, kwargs in with_teacher:
            spec = SPECS[stage]
            teacher = self._run(f"{stage}_teacher", {**kwargs, "model": self.recipe.teacher,
                                                     "out_dir": str(self.out / f"{stage}_teacher")},
                                lambda kw, spec=spec: spec.run(spec.recipe(**kw)), spec.result, upstream=False)
            result = Comparison(getattr(self.done, stage), teacher)
            self.records[stage] = result.to_record()
            setattr(self.done, stage, result)
        if self.recipe.compare_placements:
            self.compare_placements(data)
        from jetnas.report import write_pipeline_report

        paths = write_pipeline_report(self.recipe, self.records, self.state, self.out)
        trained = self.done.stage2 or self.done.stage1
        return {"recipe": self.recipe.name, "out_dir": str(self.out),
                "model": trained.model_dir if trained is not None else None, **paths}

    def _check_placement_types(self) -> None:
        """The placements of `compare_placements: {name: layer types}` against the layer registry, before anything
        trains: a typo in one found after the searched placement's training would cost that training."""
        if not isinstance(self.recipe.compare_placements, dict):
            return
        from jetnas.models.layer_types import resolve_layer_types

        for name, spec in self.recipe.compare_placements.items():
            try:
                resolve_layer_types(spec, None)
            except ValueError as err:
                raise RecipeError(f"{self.recipe.source}: compare_placements.{name}: {err}") from None

    def compare_placements(self, data: str | None) -> dict:
        """The paper's claim on final models: every baseline of the placement search's comparison (uniform
        placement, one-layer ranking: `comparison.json`), or the placements the recipe names, trained into a hybrid
        by the searched placement's own stage 1 (and stage 2) and evaluated by its evaluation, under
        `out_dir/compare/<name>/`; each reused like any stage. Writes `compare/placements.json` and `.md` (per placement: its layers and every task's metrics, the
        searched hybrid's and the teacher's beside them); returns the table's rows."""
        searched = self.done.eval.hybrid if isinstance(self.done.eval, Comparison) else self.done.eval
        teacher = self.done.eval.teacher if isinstance(self.done.eval, Comparison) else None
        if isinstance(self.recipe.compare_placements, dict):
            # named in the recipe: the searched placement is the one stage 1 trained
            placements = {name: (types, _attention_layers(types))
                          for name, types in self.recipe.compare_placements.items()}
            trained = (self.recipe.stages["stage1"] or {}).get("layer_types") or self._layer_types()
            rows = {"searched": {**_attention_layers(trained), "results": searched.results}}
        else:
            comparison = read_json(Path(self.done.placement.outputs["comparison"]))
            block = self.done.blocks.best if self.done.blocks is not None else "jet"
            placements = {name: (",".join(t if t in ("attn", "swa") else block for t in entry["layer_types"]),
                                 {"attn": entry["attn"], "swa": entry.get("swa", [])})
                          for name, entry in comparison.items() if not name.startswith("searched")}
            rows = {"searched": {**_layers(self.done.placement.placement), "results": searched.results}}
        for name, (types, layers) in placements.items():
            slug = _slug(name)
            model = self._train_and_evaluate(slug, self.out / "compare" / slug, types, data)
            rows[name] = {**layers, "results": model.results}
        if teacher is not None:
            rows["teacher"] = {"attn": None, "swa": None, "results": teacher.results}
        table = placement_table(rows)
        write_json_atomic(self.out / "compare" / "placements.json", rows)
        (self.out / "compare" / "placements.md").write_text(
            "# Placements trained into final hybrids\n\nThe searched placement and the search's baselines, each "
            "trained by the same stage 1 / stage 2 recipe and evaluated the same way.\n\n" + table + "\n")
        self._log(f"placements compared on final models: {self.out / 'compare' / 'placements.md'}")
        return rows

    def _train_and_evaluate(self, slug: str, where: Path, layer_types: str, data: str | None) -> StageResult:
        """One placement through stage 1, stage 2 (unless skipped) and the evaluation, with the recipe's arguments."""
        s1 = {**self.stage_kwargs("stage1", data), "layer_types": layer_types, "out_dir": str(where / "stage1")}
        spec = SPECS["stage1"]
        trained = self._run(f"compare:{slug}:stage1", s1, lambda kw: spec.run(spec.recipe(**kw)), spec.result,
                            kind="stage1")
        if self.recipe.stages["stage2"] is not None:
            spec = SPECS["stage2"]
            s2 = {**self.stage_kwargs("stage2", data), "model": trained.model_dir, "out_dir": str(where / "stage2")}
            trained = self._run(f"compare:{slug}:stage2", s2, lambda kw: spec.run(spec.recipe(**kw)), spec.result,
                                kind="stage2")
        spec = SPECS["eval"]
        ev = {**self.stage_kwargs("eval", data), "model": trained.model_dir, "out_dir": str(where / "eval")}
        return self._run(f"compare:{slug}:eval", ev, lambda kw: spec.run(spec.recipe(**kw)), spec.result, kind="eval")

    def write_report(self) -> dict:
        """report.md / report.json from the finished stages recorded in pipeline.json, running nothing."""
        if not self.state["stages"]:
            raise RecipeError(f"{self.state_path}: no finished stage recorded (is {self.out} a run directory?)")
        for stage, record in self.state["stages"].items():
            result = record["result"]
            if SPECS.get(stage) is not None and SPECS[stage].with_teacher:
                teacher = self.state["stages"].get(f"{stage}_teacher")
                if teacher is None:
                    continue
                result = {"hybrid": result, "teacher": teacher["result"]}
            self.records[stage] = result
        from jetnas.report import write_pipeline_report

        return write_pipeline_report(self.recipe, self.records, self.state, self.out)


def _layers(placement: dict) -> dict:
    return {"attn": placement.get("attn", []), "swa": placement.get("swa", [])}


def _attention_layers(layer_types: str) -> dict:
    """The full-attention and sliding-window layer indices of a layer-types spec."""
    from jetnas.models.layer_types import resolve_layer_types

    types = resolve_layer_types(layer_types, None)[0]
    return {kind: [i for i, t in enumerate(types) if t == kind] for kind in ("attn", "swa")}


def placement_table(rows: dict[str, dict]) -> str:
    """Markdown: one row per placement (its attn / swa layers), one column per task metric of the evaluation."""
    columns = []
    for row in rows.values():
        for task, metrics in row["results"].items():
            for metric in metrics:
                if (task, metric) not in columns and isinstance(metrics[metric], (int, float)):
                    columns.append((task, metric))
    header = ["placement", "attn", "swa"] + [f"{task.rsplit('/', 1)[-1]} {metric}" for task, metric in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [name, "" if row["attn"] is None else ", ".join(map(str, row["attn"])),
                 "" if row["swa"] is None else ", ".join(map(str, row["swa"]))]
        for task, metric in columns:
            value = row["results"].get(task, {}).get(metric)
            cells.append("" if value is None else f"{value:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shipped_recipes() -> dict[str, Path]:
    """The recipes that come with jetnas (`jetnas/configs/*.yaml`), by name."""
    return {p.stem: p for p in sorted((Path(__file__).resolve().parent / "configs").glob("*.yaml"))}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe file, or a shipped recipe by name (`quickstart`, see `configs/`); a name that is neither is refused
    with the shipped names (and the closest one)."""
    path = Path(path)
    if not path.exists() and not path.suffix:
        shipped = shipped_recipes()
        if path.name not in shipped:
            import difflib

            close = difflib.get_close_matches(path.name, list(shipped), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"recipe {str(path)!r} is neither a file nor a shipped recipe; {hint}shipped: "
                              f"{', '.join(shipped)}")
        path = shipped[path.name]
    return Recipe.load(path, overrides)
