"""Fault injection for `jetnas train --stage 1` (tests/train/test_fault_injection.py runs this script).

One process imports jetnas once, then forks each training run as a child process that executes `jetnas.cli.main`
(the `jetnas` command, without paying ~5 s of interpreter start and imports per run; nothing runs a torch op in
this parent before forking, and OMP_NUM_THREADS=1 keeps it free of thread pools). Each faulty child is killed with
SIGKILL, either by this parent after a random delay, or by itself at a random point inside a write: a checkpoint
file half written, a checkpoint complete but its manifest not yet written, just before or after its publishing
rename, in the middle of rotating an old checkpoint away, halfway through a log line, while the final model
directory is written. Between runs the newest checkpoint is damaged at random (bytes flipped, a file truncated or
deleted, state.json garbled). The library has no hook for any of this: the children patch its functions.

Usage: python fault_server.py PLAN.json, with PLAN = {"args": [...jetnas arguments without --out-dir...],
"reference": DIR, "run": DIR, "logs": DIR, "kills": N, "seed": S, "report": FILE}. Writes the report (JSON).
"""

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import jetnas.cli
import jetnas.train.stages
import jetnas.train.trainer
from jetnas.train import checkpoint

HOOKS = ("write", "manifest", "publish-before", "publish-after", "rotate", "log", "model")
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "manifest.json")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def install_hook(hook: str, nth: int, rng: random.Random) -> None:
    """Make this (child) process kill itself at the `nth` occurrence of `hook`."""
    count = {"n": 0}

    def due() -> bool:
        count["n"] += 1
        return count["n"] == nth

    if hook == "write":
        original = checkpoint._write_safetensors

        def write(tensors, path, metadata=None):
            original(tensors, path, metadata)
            if due():  # the file half on disk, as a kill mid-write leaves it
                with open(path, "r+b") as f:
                    f.truncate(int(path.stat().st_size * rng.random()))
                die()

        checkpoint._write_safetensors = write
    elif hook == "manifest":
        original_manifest = checkpoint.write_manifest

        def manifest(directory, names=None, extra=None):
            if due():
                die()
            return original_manifest(directory, names, extra)

        checkpoint.write_manifest = manifest
    elif hook.startswith("publish"):
        original_publish = checkpoint._publish

        def publish(tmp, final):
            if hook == "publish-before" and due():
                die()
            original_publish(tmp, final)
            if hook == "publish-after" and due():
                die()

        checkpoint._publish = publish
    elif hook == "rotate":
        original_remove = checkpoint._remove

        def remove(path):
            if not due():
                return original_remove(path)
            doomed = path.with_name(path.name + ".killed.deleting")
            os.replace(path, doomed)
            next(doomed.iterdir()).unlink()  # part of the old checkpoint gone, then the kill
            die()

        checkpoint._remove = remove
    elif hook == "log":
        def log(self, record):
            line = json.dumps(record) + "\n"
            with open(self.out / "log.jsonl", "a") as f:
                if due():
                    f.write(line[: rng.randrange(1, len(line) - 1)])
                    f.flush()
                    die()
                f.write(line)

        jetnas.train.trainer.Trainer._log = log
    elif hook == "model":
        original_json = jetnas.train.stages.write_json_atomic

        def write_json(path, value):
            if Path(path).name == "jetnas_stage.json" and due():  # the weights written, the directory not renamed
                die()
            original_json(path, value)

        jetnas.train.stages.write_json_atomic = write_json
    else:
        raise ValueError(hook)


def spawn(args: list[str], log: Path, hook: tuple | None, seed: int) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if hook is not None:
                install_hook(hook[0], hook[1], random.Random(seed))
            code = jetnas.cli.main(args)
        except BaseException:  # noqa: BLE001 - the child reports any failure through its exit code and log
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    return pid


def wait(pid: int, kill_after: float | None) -> tuple[str, int]:
    """("exit", code) or ("killed", signal)."""
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    else:
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed", os.WTERMSIG(status)
    return "exit", os.WEXITSTATUS(status)


def damage(ckpt: Path, rng: random.Random) -> str:
    """Damage one file of a checkpoint at random; returns what was done."""
    name = rng.choice(FILES)
    path = ckpt / name
    kind = rng.choice(["flip", "truncate", "delete"] + (["garble"] if name.endswith(".json") else []))
    data = bytearray(path.read_bytes())
    if kind == "flip":
        at = rng.randrange(len(data))
        for i in range(at, min(at + 64, len(data))):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        path.write_bytes(bytes(data[: rng.randrange(len(data))]))
    elif kind == "delete":
        path.unlink()
    else:
        at = rng.randrange(len(data) - 8)
        data[at : at + 8] = b"#garble#"
        path.write_bytes(bytes(data))
    return f"{kind} {name}"


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    rng = random.Random(plan["seed"])
    logs = Path(plan["logs"])
    logs.mkdir(parents=True, exist_ok=True)
    args, run_dir = plan["args"], Path(plan["run"])
    start = time.monotonic()
    outcome = wait(spawn([*args, "--out-dir", plan["reference"]], logs / "reference.log", None, 0), None)
    assert outcome == ("exit", 0), (outcome, (logs / "reference.log").read_text()[-3000:])
    reference_seconds = time.monotonic() - start
    runs, corruptions, kills, i = [], [], 0, 0
    while kills < plan["kills"] and i < 4 * plan["kills"]:
        i += 1
        newest = checkpoint.latest_checkpoint(run_dir)
        finished = runs and runs[-1]["outcome"] == ["exit", 0]
        # damage the newest checkpoint one run in three, and always once the run has finished (so it goes on)
        if newest is not None and (finished or rng.random() < 1 / 3):
            corruptions.append({"run": i, "checkpoint": newest.name, "damage": damage(newest, rng)})
        if i % 2:
            # every kind of kill inside a write in turn, at the n-th occurrence of its event in this run: a save
            # writes 3 safetensors files, one manifest, publishes once, rotates one old checkpoint away; a step logs
            # one line; a run writes one model
            hook = HOOKS[(i // 2) % len(HOOKS)]
            nth = {"write": rng.randint(1, 6), "log": rng.randint(1, 8), "model": 1}.get(hook, rng.randint(1, 2))
            hook, kill_after = (hook, nth), 60.0
        else:  # anywhere in the run, loading included (the reference run's time, less a margin for the run to end)
            hook, kill_after = None, rng.uniform(0.1, 0.8 * reference_seconds)
        log = logs / f"run{i:03d}.log"
        outcome = wait(spawn([*args, "--out-dir", str(run_dir)], log, hook, rng.randrange(1 << 30)), kill_after)
        kills += outcome[0] == "killed"
        runs.append({"run": i, "hook": hook, "kill_after": kill_after, "outcome": list(outcome)})
        assert outcome[0] == "killed" or outcome == ("exit", 0), (outcome, log.read_text()[-3000:])
    final_log = logs / "final.log"
    outcome = wait(spawn([*args, "--out-dir", str(run_dir)], final_log, None, 0), None)
    assert outcome == ("exit", 0), (outcome, final_log.read_text()[-3000:])
    runs.append({"run": "final", "outcome": list(outcome)})
    texts = {p.name: p.read_text(errors="replace") for p in sorted(logs.glob("run*.log")) + [final_log]}
    for c in corruptions:
        later = [t for name, t in texts.items() if name == "final.log" or int(name[3:6]) >= c["run"]]
        c["caught"] = any(f"skipping damaged checkpoint {c['checkpoint']}: " in t for t in later)
    report = {"runs": runs, "corruptions": corruptions, "kills": kills,
              "stale_locks_taken_over": sum(t.count("taking over the lock of pid") for t in texts.values()),
              "cut_log_lines_dropped": sum(t.count("dropping its cut last line") for t in texts.values()),
              "seconds": round(time.monotonic() - start, 1), "reference_seconds": round(reference_seconds, 2)}
    Path(plan["report"]).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
