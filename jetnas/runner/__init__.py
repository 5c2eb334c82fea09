"""The runner: PostNAS stages and search candidates as library calls, the floor between the pieces (`jetnas.nas`,
`jetnas.train`, `jetnas.evaluation`, `jetnas.bench`) and their users (the `jetnas` commands and `jetnas run`).

Each stage is a typed recipe in, a typed result out (`recipes.py`, on the typed fields of `fields.py`;
`results.py`):

| stage | recipe | runner | result |
|---|---|---|---|
| super-network (step 1a) | `SupernetRecipe` | `supernet.run_supernet` | `SupernetResult` |
| placement search (step 1b) | `PlacementRecipe` | `supernet.run_placement` | `PlacementResult` |
| block selection (steps 2-3) | `BlockSearchRecipe` | `searches.run_blocks` | `BlockSearchResult` |
| shape search (step 4) | `ShapeSearchRecipe` | `searches.run_hardware` | `ShapeSearchResult` |
| training stage 1 / 2 | `TrainRecipe` | `training.run_training` | `TrainResult` |
| evaluation | `EvalRecipe` | `evaluate.run_eval` | `EvalResult` |
| throughput | `BenchRecipe` | `bench.run_bench` | `BenchResult` |

`candidates.CandidateRunner` runs one search candidate (train with the stage-1 recipe, evaluate, measure decode);
`measures.py` names the decode measurement; `models.py` loads models by name and converts and generates.

Modules here import torch and the floors below inside the functions that use them, so that the commands and the
pipeline, which import this package to read recipes, start without torch (`jetnas --help`, a misspelled recipe).
"""
