"""What a run's checkpoints hold and whether they are whole: `vlm ckpt list` rows, `vlm ckpt inspect` reports.

Validity: a tag without a manifest is *incomplete* (its save never finished); one whose
files differ from the manifest's sizes or sha256 is *corrupt*, and the message names the
file; one with a file that needs a pickled global outside the allow-list of tensors and
plain data (or a manifest name leaving the directory) is *unsafe*, and the message names
the file and the global. Built on vlm.checkpoint's discovery (discover.py), verification
(verify.py) and safe loading (safeload.py): nothing here unpickles a file any other way."""
from __future__ import annotations

import json
from pathlib import Path

from vlm.checkpoint.discover import find_root, read_latest, tag_dirs
from vlm.checkpoint.layout import LATEST, MANIFEST, TRAINER_STATE, UnsafeCheckpointError, inside
from vlm.checkpoint.safeload import check_files, load, load_trainer_state
from vlm.checkpoint.verify import verify


def check(ckpt: Path, *, checksums: bool = True) -> tuple[str, str | None]:
    """-> (status, problem): ("ok", None), ("incomplete", why), ("corrupt", which file) or
    ("unsafe", which file needs which global). Every .pt file is proved safe to load (without
    reading its tensors), whatever the manifest says: whoever wrote the file could rewrite it.
    Without checksums, the files are compared to the manifest by size only."""
    try:
        check_files(ckpt)
    except UnsafeCheckpointError as e:
        return "unsafe", f"{e.path.relative_to(ckpt)} needs {e.needs}, not tensors or plain data: never loaded"
    except ValueError:
        pass  # unreadable: the manifest check below names the file that differs
    if not (ckpt / MANIFEST).is_file():
        return "incomplete", f"no {MANIFEST}: the save did not finish"
    try:
        json.loads((ckpt / MANIFEST).read_text())["files"]
    except (ValueError, KeyError) as e:
        return "corrupt", f"{MANIFEST} is unreadable ({e})"
    try:
        verify(ckpt, checksums=checksums)
    except UnsafeCheckpointError as e:
        return "unsafe", str(e)
    except ValueError as e:
        return "corrupt", str(e).split(": ", 1)[-1]
    return "ok", None


def _trainer_state(ckpt: Path) -> tuple[dict | None, str | None]:
    if not (ckpt / TRAINER_STATE).is_file():
        return None, f"no {TRAINER_STATE}"
    try:
        return load_trainer_state(ckpt), None
    except Exception as e:  # a torn or foreign file: report it, never crash a listing
        return None, f"{TRAINER_STATE} is unreadable ({type(e).__name__}: {e})"


def _step(ckpt: Path, state: dict | None) -> int | None:
    if state is not None:
        return state.get("step")
    try:
        return json.loads((ckpt / MANIFEST).read_text())["step"]
    except (OSError, ValueError, KeyError):
        tail = ckpt.name.rsplit("_", 1)[-1]
        return int(tail) if tail.isdigit() else None


def _files(ckpt: Path) -> dict[str, int]:
    return {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*")) if p.is_file()}


def describe_tag(ckpt: Path, *, latest: str | None, checksums: bool = True) -> dict:
    """One row of `vlm ckpt list`."""
    status, problem = check(ckpt, checksums=checksums)
    state, state_problem = _trainer_state(ckpt) if status != "unsafe" else (None, None)
    if status == "ok" and state_problem:
        status, problem = "corrupt", state_problem
    return {"tag": ckpt.name, "step": _step(ckpt, state),
            "samples_seen": state.get("samples_seen") if state else None,
            "world_size": state.get("world_size") if state else None,
            "bytes": sum(_files(ckpt).values()), "status": status, "problem": problem,
            "latest": ckpt.name == latest, "path": str(ckpt)}


def list_tags(run_dir: str, *, checksums: bool = True) -> tuple[list[dict], str | None]:
    """Every tag under the run, newest step first, and the tag `latest` names."""
    root = find_root(run_dir)
    tags = tag_dirs(root)
    if not tags:
        raise FileNotFoundError(f"no checkpoints under {root}")
    latest = read_latest(root)
    rows = [describe_tag(d, latest=latest, checksums=checksums) for d in tags]
    rows.sort(key=lambda r: (r["step"] if r["step"] is not None else -1, r["tag"]), reverse=True)
    return rows, latest


def _param_shapes(ckpt: Path, stage: int) -> dict[str, tuple]:
    """Parameter name -> shape, from the model-states file's shape table (no weights loaded)."""
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    states = load(ckpt / name, mmap=True)
    shapes = {}
    for group in states.get("param_shapes") or []:
        shapes.update({k: tuple(v) for k, v in group.items()})
    shapes.update({k: tuple(v) for k, v in (states.get("frozen_param_shapes") or {}).items()})
    if not shapes:  # written without a shape table: count the module's tensors
        shapes = {k: tuple(v.shape) for k, v in states["module"].items() if k not in states.get("buffer_names", ())}
    return shapes


def _component(name: str, objective_names: list[str]) -> str:
    parts = name.split(".")
    if parts[0] == "objectives" and len(parts) > 1 and parts[1].isdigit():
        i = int(parts[1])
        return f"objective {i} ({objective_names[i] if i < len(objective_names) else '?'})"
    return ".".join(parts[:2])


def _model_summary(ckpt: Path, state: dict) -> dict:
    from math import prod

    from vlm.checkpoint.export import zero_stage

    objectives = [o["name"] for o in state["config"]["objectives"]]
    shapes = _param_shapes(ckpt, zero_stage(state))
    by_component: dict[str, int] = {}
    for name, shape in shapes.items():
        key = _component(name, objectives)
        by_component[key] = by_component.get(key, 0) + prod(shape)
    model = sum(n for k, n in by_component.items() if k.startswith("model"))
    return {"parameters": sum(by_component.values()), "model_parameters": model, "by_component": by_component,
            "tensors": len(shapes)}


def inspect_checkpoint(ckpt: Path, *, checksums: bool = True) -> dict:
    """The report of `vlm ckpt inspect`: validity, every file's size and, when its trainer
    state reads, the step, ZeRO stage, precision, objectives and parameter counts."""
    from vlm.checkpoint.export import zero_stage

    status, problem = check(ckpt, checksums=checksums)
    out = {"path": str(ckpt), "tag": ckpt.name, "status": status, "problem": problem,
           "checksums": checksums, "files": _files(ckpt)}
    if status == "unsafe":
        return out
    state, state_problem = _trainer_state(ckpt)
    if state is None:
        out.update(status="corrupt" if status == "ok" else status, problem=problem or state_problem)
        return out
    cfg = state["config"]
    out.update({"step": state.get("step"), "samples_seen": state.get("samples_seen"),
                "world_size": state.get("world_size"), "zero_stage": zero_stage(state),
                "precision": cfg["train"].get("precision"),
                "objectives": [{"name": o["name"], "weight": o.get("weight")} for o in cfg["objectives"]],
                "model_config": cfg["model"]})
    try:
        out["model"] = _model_summary(ckpt, state)
    except Exception as e:  # report, do not crash: the manifest check says which file is bad
        out["model"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def inspect_target(path: str, tag: str) -> Path:
    """A checkpoint dir as given, or RUN_DIR's tag (whole or not: inspect reports on it)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint or run directory not found: {path}")
    if any((p / name).is_file() for name in (MANIFEST, TRAINER_STATE)) or any(p.glob("*model_states.pt")):
        return p
    root = find_root(path)
    where = root
    if tag == "latest":
        tag, where = read_latest(root), root / LATEST
        if tag is None:
            raise FileNotFoundError(f"{root} has no 'latest' file: pass --tag (vlm ckpt list {path} shows the tags)")
    ckpt = inside(root, tag, what="checkpoint tag", where=where, tag=True)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"no checkpoint {tag} under {root} (vlm ckpt list {path} shows the tags)")
    return ckpt
