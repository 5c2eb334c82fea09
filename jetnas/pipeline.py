"""`jetnas run RECIPE.yaml`: the whole PostNAS pipeline, stage after stage, each stage resumable and reused.

    data -> supernet -> placement -> blocks -> hardware -> stage1 -> stage2 -> eval -> bench -> report

A recipe is a YAML mapping: `name`, `teacher`, `out_dir`, optional `device` and `seed`, `data` (a path / `hf:`
spec, or `{generate: TOKENS}` for text sampled from the teacher), and `stages`: one mapping per stage whose keys are
the flags of that stage's command (`jetnas supernet`, `jetnas search placement`, ...; snake_case), or `skip`.
Every stage writes under `out_dir/<stage>/`; `out_dir/pipeline.json` records each finished stage's result and the
arguments it ran with. Running the recipe again reuses finished stages whose arguments are unchanged, resumes an
interrupted stage from its own checkpoints, and reruns a changed stage and everything after it.

What flows between stages: the searched placement (`placement` -> `blocks`, `hardware`, `stage1`), the best linear
block (`blocks` -> `hardware`, `stage1`), the chosen block shape (`hardware` -> `stage1`), the trained model
(`stage1` -> `stage2` -> `eval`, `bench`). A skipped stage passes on what the recipe gives instead (e.g. with
`placement: skip`, `stage1` needs `layer_types`).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

STAGES = ("supernet", "placement", "blocks", "hardware", "stage1", "stage2", "eval", "bench")
TOP_LEVEL = {"name", "description", "teacher", "out_dir", "device", "seed", "data", "stages"}


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: the command function it calls and the arguments the pipeline fills in itself."""

    command: str  # "module:function"
    wired: frozenset[str]  # parameters set by the pipeline (a recipe must not set them)

    def function(self) -> Callable[..., dict]:
        module, name = self.command.split(":")
        return getattr(importlib.import_module(module), name)


SPECS: dict[str, StageSpec] = {
    "supernet": StageSpec("jetnas.commands.nas:supernet", frozenset({"teacher", "data", "out_dir", "device", "seed"})),
    "placement": StageSpec("jetnas.commands.nas:search_placement", frozenset({"supernet", "out_dir", "device"})),
    "blocks": StageSpec("jetnas.commands.stages:search_blocks",
                        frozenset({"teacher", "placement", "data", "out_dir", "device", "seed"})),
    "hardware": StageSpec("jetnas.commands.stages:search_hardware",
                          frozenset({"teacher", "placement", "data", "out_dir", "device", "seed"})),
    "stage1": StageSpec("jetnas.commands.stages:train",
                        frozenset({"stage", "teacher", "model", "data", "out_dir", "device", "seed"})),
    "stage2": StageSpec("jetnas.commands.stages:train",
                        frozenset({"stage", "teacher", "model", "out_dir", "device", "seed"})),
    "eval": StageSpec("jetnas.commands.evaluate:evaluate", frozenset({"model", "out_dir", "device"})),
    "bench": StageSpec("jetnas.commands.bench:bench", frozenset({"model", "out_dir", "device"})),
}


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, the stage and the key."""


@dataclass
class Recipe:
    name: str
    teacher: str
    out_dir: Path
    data: str | dict | None
    stages: dict[str, dict | None]  # stage -> its arguments, None when skipped
    device: str | None = None
    seed: int = 0
    source: str = "<recipe>"

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "Recipe":
        path = Path(path)
        if not path.exists():
            raise RecipeError(f"recipe {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text())
        for item in overrides or []:
            apply_override(raw, item, str(path))
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<recipe>") -> "Recipe":
        if not isinstance(raw, dict):
            raise RecipeError(f"{source}: a recipe is a mapping, got {type(raw).__name__}")
        unknown = set(raw) - TOP_LEVEL
        if unknown:
            raise RecipeError(f"{source}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(TOP_LEVEL)}")
        for key in ("name", "teacher"):
            if not raw.get(key):
                raise RecipeError(f"{source}: {key!r} is required")
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
        if isinstance(data, dict) and set(data) - {"generate", "heldout"}:
            raise RecipeError(f"{source}: data must be a path / hf: spec or {{generate: TOKENS}}, got {data!r}")
        return cls(name=str(raw["name"]), teacher=str(raw["teacher"]),
                   out_dir=Path(raw.get("out_dir") or f"runs/{raw['name']}"), data=data,
                   stages=stages, device=raw.get("device"), seed=int(raw.get("seed", 0)), source=source)


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


def validate_arguments(stage: str, args: dict, source: str) -> None:
    """Every key must be a parameter of the stage's command that the pipeline does not set itself."""
    spec = SPECS[stage]
    try:
        params = inspect.signature(spec.function()).parameters
    except (ImportError, AttributeError) as err:
        raise RecipeError(f"{source}: stage {stage!r} needs {spec.command}, which is not available: {err}") from err
    for key in args:
        if key in spec.wired:
            raise RecipeError(f"{source}: stages.{stage}.{key} is set by the pipeline (from the recipe's top level or "
                              f"an earlier stage); remove it")
        if key not in params:
            allowed = sorted(set(params) - spec.wired)
            raise RecipeError(f"{source}: stages.{stage}.{key} is not an argument of `{stage}`; allowed: {allowed}")


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


# Stages whose output is a function of their arguments (the teacher's text, sampled with the recipe's seed; the
# same tokens on the same kind of device): a lost one is remade without rerunning the stages that used it.
REPRODUCIBLE = {"data"}


def _fingerprint(kwargs: dict) -> str:
    return hashlib.sha256(json.dumps(kwargs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    """Runs a recipe's stages in order, reusing finished ones (see the module docstring)."""

    def __init__(self, recipe: Recipe, redo: tuple[str, ...] = ()):
        for stage in redo:
            if stage not in STAGES and stage != "data":
                raise RecipeError(f"--redo {stage!r}: not a stage; the stages are {['data', *STAGES]}")
        self.recipe, self.redo = recipe, set(redo)
        self.out = recipe.out_dir
        self.state_path = self.out / "pipeline.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"stages": {}}
        self.results: dict[str, dict] = {}
        self.changed = False  # once a stage reruns, every later stage reruns too

    def _save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.state, indent=2, default=str))
        tmp.replace(self.state_path)

    def _log(self, msg: str) -> None:
        print(f"[jetnas run {self.recipe.name}] {msg}", file=sys.stderr, flush=True)

    def _run(self, stage: str, fn: Callable[..., dict], kwargs: dict, upstream: bool = True) -> dict:
        """Run (or reuse) one stage; its record in pipeline.json is written when it finishes. `upstream=False`:
        the stage depends on nothing earlier (the teacher's own evaluation), only its arguments decide."""
        fingerprint = _fingerprint(kwargs)
        record = self.state["stages"].get(stage)
        stale = self.changed and upstream
        current = bool(record) and record.get("fingerprint") == fingerprint and not stale and stage not in self.redo
        gone = _missing_output(record["result"]) if current else None
        if current and not gone:
            self._log(f"{stage}: reusing the finished result in {self.state_path}")
            self.results[stage] = record["result"]
            return record["result"]
        if gone:
            self._log(f"{stage}: finished before, but its {gone} is gone (a run directory copied without it?): "
                      "running it again")
        self.changed = self.changed or (upstream and not (gone and stage in REPRODUCIBLE))
        self._log(f"{stage}: running")
        start = time.perf_counter()
        result = fn(**kwargs)
        self.state["stages"][stage] = {"fingerprint": fingerprint, "arguments": kwargs, "result": result,
                                       "seconds": round(time.perf_counter() - start, 1),
                                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._save_state()
        self.results[stage] = result
        self._log(f"{stage}: done in {time.perf_counter() - start:.1f}s")
        return result

    # -- data ---------------------------------------------------------------------------------------------------

    def prepare_data(self) -> str | None:
        """The training data every stage uses: the recipe's spec as is, or teacher text generated once into
        `out_dir/data/train.bin`."""
        data = self.recipe.data
        if not isinstance(data, dict):
            return data
        target = self.out / "data" / "train.bin"
        kwargs = {"teacher": self.recipe.teacher, "tokens": int(data["generate"]), "seed": self.recipe.seed}
        return self._run("data", lambda **kw: _generate_data(target=str(target), device=self.recipe.device, **kw),
                         kwargs)["path"]

    # -- the stages ---------------------------------------------------------------------------------------------

    def stage_kwargs(self, stage: str, data: str | None) -> dict:
        """The recipe's arguments for `stage` plus what the pipeline wires in from earlier stages."""
        r, args = self.recipe, dict(self.recipe.stages[stage] or {})
        common = {"out_dir": str(self.out / stage), "device": r.device}
        if stage == "supernet":
            return {**args, **common, "teacher": r.teacher, "data": data, "seed": r.seed}
        if stage == "placement":
            return {**args, **common, "supernet": self._require("supernet", "out_dir")}
        if stage in ("blocks", "hardware"):
            kwargs = {**args, **common, "teacher": r.teacher, "data": data, "seed": r.seed,
                      "placement": self._placement()}
            if stage == "hardware" and "blocks" in self.results and "block" not in args:
                kwargs["block"] = self.results["blocks"]["best"]
            return kwargs
        if stage == "stage1":
            kwargs = {**args, **common, "stage": 1, "teacher": r.teacher, "data": data, "seed": r.seed, "model": None}
            if "layer_types" not in args:
                kwargs["layer_types"] = self._layer_types()
            if "block_config" not in args:
                # the chosen shape (hardware), else the chosen block's options (blocks); both carry the swa window
                for source in ("hardware", "blocks"):
                    if source in self.results:
                        kwargs["block_config"] = self.results[source]["block_config"]
                        break
                else:
                    if "placement" in self.results and "swa_window" not in args:
                        kwargs["swa_window"] = self._supernet_window()
            return kwargs
        if stage == "stage2":
            args.setdefault("data", data)
            return {**args, **common, "stage": 2, "teacher": r.teacher, "seed": r.seed, "model": self._model()}
        if stage in ("eval", "bench"):
            return {**args, **common, "model": self._model()}
        raise AssertionError(stage)

    def _supernet_window(self) -> int:
        """The sliding window the super-network (and so the searched placement) used."""
        args = self.recipe.stages["supernet"] or {}
        if "swa_window" in args:
            return int(args["swa_window"])
        return inspect.signature(SPECS["supernet"].function()).parameters["swa_window"].default

    def _require(self, stage: str, key: str):
        if stage not in self.results:
            raise RecipeError(f"{self.recipe.source}: a later stage needs the {stage!r} stage's {key}, but "
                              f"{stage!r} is skipped and the recipe gives no replacement")
        return self.results[stage][key]

    def _placement(self) -> str:
        """The placement for blocks/hardware: placement stage's placements.json, or stage1's layer_types."""
        if "placement" in self.results:
            return self.results["placement"]["outputs"]["placements"]
        given = (self.recipe.stages["stage1"] or {}).get("layer_types")
        if given:
            return given
        return self._require("placement", "placements")

    def _layer_types(self) -> str:
        """stage1's per-layer types: the searched placement with the chosen block in the linear layers."""
        block = self.results["blocks"]["best"] if "blocks" in self.results else "jet"
        if "placement" in self.results:
            return ",".join(block if t not in ("attn", "swa") else t
                            for t in self.results["placement"]["layer_types"].split(","))
        raise RecipeError(f"{self.recipe.source}: stage1 needs layer_types when the placement stage is skipped")

    def _model(self) -> str:
        for stage in ("stage2", "stage1"):
            if stage in self.results:
                return self.results[stage]["model_dir"]
        raise RecipeError(f"{self.recipe.source}: eval/bench/stage2 need a trained model: stage1 is skipped")

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.resolved.yaml").write_text(yaml.safe_dump(
            {"name": self.recipe.name, "teacher": self.recipe.teacher, "out_dir": str(self.out),
             "device": self.recipe.device, "seed": self.recipe.seed, "data": self.recipe.data,
             "stages": {s: ("skip" if a is None else a) for s, a in self.recipe.stages.items()}}, sort_keys=False))
        data = self.prepare_data()
        for stage in STAGES:
            if self.recipe.stages[stage] is None:
                self._log(f"{stage}: skipped by the recipe")
                continue
            kwargs = self.stage_kwargs(stage, data)
            if stage == "eval":
                self._run_eval(kwargs)
            elif stage == "bench":
                self._run_bench(kwargs)
            else:
                self._run(stage, SPECS[stage].function(), kwargs)
        from jetnas.report import write_pipeline_report

        paths = write_pipeline_report(self.recipe, self.results, self.state, self.out)
        return {"recipe": self.recipe.name, "out_dir": str(self.out), "model": self.results.get(
            "stage2", self.results.get("stage1", {})).get("model_dir"), **paths}

    def write_report(self) -> dict:
        """report.md / report.json from the finished stages recorded in pipeline.json, running nothing."""
        if not self.state["stages"]:
            raise RecipeError(f"{self.state_path}: no finished stage recorded (is {self.out} a run directory?)")
        for stage, record in self.state["stages"].items():
            result = record["result"]
            if stage in ("eval", "bench"):
                teacher = self.state["stages"].get(f"{stage}_teacher")
                if teacher is None:
                    continue
                result = {"hybrid": result, "teacher": teacher["result"]}
            self.results[stage] = result
        from jetnas.report import write_pipeline_report

        return write_pipeline_report(self.recipe, self.results, self.state, self.out)

    def _run_eval(self, kwargs: dict) -> None:
        """The final model and the teacher on the same tasks."""
        fn = SPECS["eval"].function()
        hybrid = self._run("eval", fn, kwargs)
        teacher = self._run("eval_teacher", fn, {**kwargs, "model": self.recipe.teacher,
                                                  "out_dir": str(self.out / "eval_teacher")}, upstream=False)
        self.results["eval"] = {"hybrid": hybrid, "teacher": teacher}

    def _run_bench(self, kwargs: dict) -> None:
        fn = SPECS["bench"].function()
        hybrid = self._run("bench", fn, kwargs)
        teacher = self._run("bench_teacher", fn, {**kwargs, "model": self.recipe.teacher,
                                                   "out_dir": str(self.out / "bench_teacher")}, upstream=False)
        self.results["bench"] = {"hybrid": hybrid, "teacher": teacher}


def _generate_data(teacher: str, tokens: int, seed: int, target: str, device: str | None) -> dict:
    from jetnas.commands.models import _device
    from jetnas.models.teachers import load_teacher
    from jetnas.train.data import teacher_generated

    dev = _device(device)
    model, tokenizer, spec = load_teacher(teacher, device=dev)
    stream = teacher_generated(model, tokenizer, spec.eos_token_id, tokens, seed=seed, name=spec.name)
    path = stream.save(target)
    return {"path": str(path), "tokens": len(stream)}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe file, or a shipped recipe by name (`quickstart`, see `configs/`)."""
    path = Path(path)
    if not path.exists() and not path.suffix:
        shipped = Path(__file__).resolve().parent / "configs" / f"{path.name}.yaml"
        if shipped.exists():
            path = shipped
    return Recipe.load(path, overrides)
