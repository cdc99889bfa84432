"""`vlm ckpt list|inspect|export`: what a run's checkpoints hold, whether they are whole,
and a single-file fp32 export of the model for evaluation or sharing.

Validity follows vlm/checkpoint/store.py: a tag without a manifest is *incomplete* (its save
never finished); one whose files differ from the manifest's sizes or sha256 is *corrupt*,
and the message names the file; one with a file that needs a pickled global outside the
allow-list of tensors and plain data (or a manifest name leaving the directory) is
*unsafe*, and the message names the file and the global. Nothing here unpickles a file
any other way (vlm.checkpoint.store.load)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


class _Checkpoint:
    """vlm.checkpoint.store, imported on first use: it imports torch (~2 s), which every other
    `vlm` command, --help included, should not wait for just because this module
    registers its parser."""

    def __getattr__(self, name: str):
        from vlm.checkpoint import store as module

        return getattr(module, name)


checkpoint = _Checkpoint()


def add_ckpt_commands(sub, config_args) -> None:
    """Registers `vlm ckpt ...` (config_args unused: everything comes from the checkpoint)."""
    ckpt = sub.add_parser("ckpt", help="list, inspect and export training checkpoints",
                          description="Checkpoints live in RUN_DIR/checkpoints/TAG/ (DeepSpeed's files, "
                          "trainer_state.pt and manifest.json, written last); RUN_DIR/checkpoints/latest "
                          "names the newest. See docs/checkpoints.md.")
    ck = ckpt.add_subparsers(dest="ckpt_command", required=True, metavar="COMMAND")

    p = ck.add_parser("list", help="every tag with its step, samples, world size, size and validity",
                      description="One line per checkpoint tag, complete or not: step, samples seen, world "
                      "size, bytes on disk and validity (ok = complete and every file matches its manifest; "
                      "incomplete = no manifest; corrupt = names the file that differs; unsafe = names the "
                      "file that holds a pickled global other than tensors and plain data, never loaded). "
                      "'*' marks the tag "
                      "that `latest` names. Exit status 1 when any tag is not ok.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its checkpoints/ directory)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--no-verify", action="store_true",
                   help="compare file sizes only, not checksums (fast on large checkpoints)")
    p.set_defaults(func=cmd_list)

    p = ck.add_parser("inspect", help="step, ZeRO stage, parameters, objectives, files and manifest check",
                      description="Describes one checkpoint: step, samples seen, world size, ZeRO stage, "
                      "precision, the model (parameter counts per component, read from DeepSpeed's "
                      "parameter shapes without loading the weights), the objectives, every file with its "
                      "size, and the result of checking the files against the manifest. Exit status 1 "
                      "when the checkpoint is incomplete or corrupt.")
    p.add_argument("path", metavar="CKPT_OR_RUN_DIR", help="a checkpoint directory, or a run directory")
    p.add_argument("--tag", default="latest", help="with a run directory: which tag (default: latest)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-verify", action="store_true", help="compare file sizes only, not checksums")
    p.set_defaults(func=cmd_inspect)

    p = ck.add_parser("export", help="consolidated fp32 safetensors file that `vlm eval` loads",
                      description="Verifies the checkpoint against its manifest, consolidates its weights "
                      "in fp32 (ZeRO 0-3, offline, with DeepSpeed's zero_to_fp32) and writes one "
                      "safetensors file atomically: the CLIP model's tensors under their own names, the "
                      "objectives' parameters under objectives.N., and the run config and tokenizer in "
                      "the file's metadata. `vlm eval --checkpoint FILE.safetensors` evaluates it.")
    p.add_argument("path", metavar="CKPT_OR_RUN_DIR", help="a checkpoint directory, or a run directory")
    p.add_argument("--output", required=True, metavar="FILE.safetensors", help="where to write the export")
    p.add_argument("--tag", default="latest",
                   help="with a run directory: which tag (default: latest; a corrupt latest falls back to "
                   "the newest whole one, with a warning)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=cmd_export)


# -- reading checkpoints without DeepSpeed -----------------------------------------------------


def _root(run_dir: str) -> Path:
    """RUN_DIR/checkpoints, or RUN_DIR itself when it is that directory."""
    p = Path(run_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if (p / "latest").is_file() or any((d / checkpoint.MANIFEST).is_file() for d in p.iterdir() if d.is_dir()):
        return p
    raise FileNotFoundError(f"{run_dir} has no checkpoints/ directory: is it a run directory?")


def _latest(root: Path) -> str | None:
    f = root / "latest"
    return f.read_text().strip() if f.is_file() else None


def check(ckpt: Path, *, checksums: bool = True) -> tuple[str, str | None]:
    """-> (status, problem): ("ok", None), ("incomplete", why), ("corrupt", which file) or
    ("unsafe", which file needs which global). Every .pt file is proved safe to load (without
    reading its tensors), whatever the manifest says: whoever wrote the file could rewrite it."""
    try:
        checkpoint.check_files(ckpt)
    except checkpoint.UnsafeCheckpointError as e:
        return "unsafe", f"{e.path.relative_to(ckpt)} needs {e.needs}, not tensors or plain data: never loaded"
    except ValueError:
        pass  # unreadable: the manifest check below names the file that differs
    if not (ckpt / checkpoint.MANIFEST).is_file():
        return "incomplete", f"no {checkpoint.MANIFEST}: the save did not finish"
    try:
        manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        return "corrupt", f"{checkpoint.MANIFEST} is unreadable ({e})"
    try:
        if checksums:
            checkpoint.verify(ckpt)
        else:
            for name, meta in files.items():
                p = checkpoint.inside(ckpt, name, where=ckpt / checkpoint.MANIFEST)
                if not p.is_file() or p.stat().st_size != meta["bytes"]:
                    raise ValueError(f"checkpoint {ckpt} is corrupt: {name} does not match its manifest")
    except checkpoint.UnsafeCheckpointError as e:
        return "unsafe", str(e)
    except ValueError as e:
        return "corrupt", str(e).split(": ", 1)[-1]
    return "ok", None


def _trainer_state(ckpt: Path) -> tuple[dict | None, str | None]:
    if not (ckpt / checkpoint.TRAINER_STATE).is_file():
        return None, f"no {checkpoint.TRAINER_STATE}"
    try:
        return checkpoint.load_trainer_state(ckpt), None
    except Exception as e:  # a torn or foreign file: report it, never crash a listing
        return None, f"{checkpoint.TRAINER_STATE} is unreadable ({type(e).__name__}: {e})"


def _step(ckpt: Path, state: dict | None) -> int | None:
    if state is not None:
        return state.get("step")
    try:
        return json.loads((ckpt / checkpoint.MANIFEST).read_text())["step"]
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
    root = _root(run_dir)
    tags = [d for d in root.iterdir() if d.is_dir()]
    if not tags:
        raise FileNotFoundError(f"no checkpoints under {root}")
    latest = _latest(root)
    rows = [describe_tag(d, latest=latest, checksums=checksums) for d in tags]
    rows.sort(key=lambda r: (r["step"] if r["step"] is not None else -1, r["tag"]), reverse=True)
    return rows, latest


def _param_shapes(ckpt: Path, stage: int) -> dict[str, tuple]:
    """Parameter name -> shape, from the model-states file's shape table (no weights loaded)."""
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    states = checkpoint.load(ckpt / name, mmap=True)
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


def _inspect_target(path: str, tag: str) -> Path:
    """A checkpoint dir as given, or RUN_DIR's tag (whole or not: inspect reports on it)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint or run directory not found: {path}")
    if any((p / name).is_file() for name in (checkpoint.MANIFEST, checkpoint.TRAINER_STATE)) \
            or any(p.glob("*model_states.pt")):
        return p
    root = _root(path)
    where = root
    if tag == "latest":
        tag, where = _latest(root), root / "latest"
        if tag is None:
            raise FileNotFoundError(f"{root} has no 'latest' file: pass --tag (vlm ckpt list {path} shows the tags)")
    ckpt = checkpoint.inside(root, tag, what="checkpoint tag", where=where, tag=True)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"no checkpoint {tag} under {root} (vlm ckpt list {path} shows the tags)")
    return ckpt


# -- output ---------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _blank(v) -> str:
    return "-" if v is None else str(v)


def cmd_list(args) -> int:
    rows, latest = list_tags(args.run_dir, checksums=not args.no_verify)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'TAG':<22} {'STEP':>8} {'SAMPLES':>10} {'WORLD':>5} {'SIZE':>10}  STATUS")
        for r in rows:
            status = r["status"] + (f": {r['problem']}" if r["problem"] else "")
            print(f"{r['tag'] + (' *' if r['latest'] else ''):<22} {_blank(r['step']):>8} "
                  f"{_blank(r['samples_seen']):>10} {_blank(r['world_size']):>5} {_size(r['bytes']):>10}  {status}")
        print("* = the tag 'latest' names" if latest else "no 'latest' file")
        if latest and latest not in {r["tag"] for r in rows}:
            print(f"warning: 'latest' names {latest}, which does not exist", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _print_inspection(info: dict) -> None:
    print(f"checkpoint  {info['path']}")
    check_line = info["status"] + (f": {info['problem']}" if info["problem"] else "")
    print(f"manifest    {check_line}{'' if info['checksums'] else ' (sizes only)'}")
    if "step" not in info:
        return
    print(f"step        {info['step']}  (samples seen {info['samples_seen']}, world size {info['world_size']}, "
          f"ZeRO-{info['zero_stage']}, precision {info['precision']})")
    m, mc = info["model"], info["model_config"]
    if "error" in m:
        print(f"model       cannot read the parameter shapes: {m['error']}")
    else:
        print(f"model       {m['model_parameters']:,} parameters ({mc['vision'].get('type', 'vit')} image tower "
              f"width {mc['vision'].get('width')} depth {mc['vision'].get('depth')} at "
              f"{mc['vision'].get('image_size')}px; text width {mc['text'].get('width')} depth "
              f"{mc['text'].get('depth')}; embedding {mc.get('embed_dim')})")
        for name, n in m["by_component"].items():
            print(f"  {name:<30} {n:>14,}")
    print("objectives  " + ", ".join(f"{o['name']} (weight {o['weight']})" for o in info["objectives"]))
    print("files")
    for name, n in info["files"].items():
        print(f"  {name:<46} {_size(n):>10}")


def cmd_inspect(args) -> int:
    info = inspect_checkpoint(_inspect_target(args.path, args.tag), checksums=not args.no_verify)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_inspection(info)
    return 0 if info["status"] == "ok" else 1


def cmd_export(args) -> int:
    from vlm.checkpoint.export import export_safetensors

    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise ValueError(f"--output must be a .safetensors file, not {args.output}")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    ckpt = checkpoint.resolve_verified(args.path, args.tag)
    summary = export_safetensors(ckpt, out)
    print(f"exported {ckpt} (step {summary['step']}, ZeRO-{summary['zero_stage']}) to {out}: "
          f"{summary['tensors']} tensors, {summary['parameters']:,} fp32 parameters "
          f"({summary['model_parameters']:,} in the model), {_size(summary['bytes'])}")
    return 0
