"""`vlm ckpt list|inspect|export`: parses the commands and prints what vlm.checkpoint reports.

What a run's checkpoints hold and whether they are whole (ok, incomplete, corrupt, unsafe)
is vlm/checkpoint/inspect.py's; the single-file fp32 export is vlm/checkpoint/export.py's.
Both are imported inside the commands: they import torch, which `vlm --help` should not
wait for."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_ckpt_commands(sub, config_args) -> None:
    """Registers `vlm ckpt ...` (config_args unused: everything comes from the checkpoint)."""
    ckpt = sub.add_parser("ckpt", help="list, inspect, export and convert checkpoints",
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
    _add_convert(ck)


def _add_convert(ck) -> None:
    """Registers `vlm ckpt convert`."""
    p = ck.add_parser("convert", help="CLIP weights between vlm, OpenCLIP and Hugging Face",
                      description="Reads CLIP weights (a vlm run, checkpoint or export; an OpenCLIP state dict "
                      "(.pt/.bin/.safetensors, with open_clip_config.json beside it when there is one) or "
                      "OpenCLIP model directory; a Hugging Face CLIPModel directory) and writes them as --to: "
                      "vlm = an export file (.safetensors) that `vlm eval` and model.init_from read; openclip "
                      "= a directory OpenCLIP loads with create_model('local-dir:DIR'); hf = a directory "
                      "CLIPModel.from_pretrained loads. ViT and modified-ResNet image towers (Hugging Face: "
                      "ViT only). The temperature (and SigLIP's bias) is carried. Nothing pickled is run. "
                      "See docs/interop.md.")
    p.add_argument("src", metavar="SRC", help="the weights to read (a file or a directory)")
    p.add_argument("--to", required=True, choices=("vlm", "openclip", "hf"), help="the format to write")
    p.add_argument("--output", required=True, metavar="DST",
                   help="a .safetensors file (--to vlm) or a directory (openclip, hf)")
    p.add_argument("--from", dest="source", choices=("vlm", "openclip", "hf"),
                   help="the format of SRC (default: detected from its files)")
    p.add_argument("--activation", choices=("gelu", "quick_gelu"),
                   help="the source's MLP activation, where its files cannot say (an OpenCLIP state dict "
                   "without its config; OpenAI's weights use quick_gelu)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_convert)


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
    from vlm.checkpoint.inspect import list_tags

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
    from vlm.checkpoint.inspect import inspect_checkpoint, inspect_target

    info = inspect_checkpoint(inspect_target(args.path, args.tag), checksums=not args.no_verify)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_inspection(info)
    return 0 if info["status"] == "ok" else 1


def cmd_export(args) -> int:
    from vlm.checkpoint.export import export_safetensors
    from vlm.checkpoint.resolve import resolve_verified

    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise ValueError(f"--output must be a .safetensors file, not {args.output}")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    ckpt = resolve_verified(args.path, args.tag)
    summary = export_safetensors(ckpt, out)
    print(f"exported {ckpt} (step {summary['step']}, ZeRO-{summary['zero_stage']}) to {out}: "
          f"{summary['tensors']} tensors, {summary['parameters']:,} fp32 parameters "
          f"({summary['model_parameters']:,} in the model), {_size(summary['bytes'])}")
    return 0


def cmd_convert(args) -> int:
    from vlm.checkpoint.convert import read
    from vlm.checkpoint.convert_write import write

    summary = write(read(args.src, args.source, activation=args.activation), args.to, args.output, force=args.force)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"converted {args.src} ({summary['from']}) to {summary['to']}: {summary['tensors']} tensors, "
          f"{summary['parameters']:,} parameters")
    print("carried: " + ", ".join(summary["carried"]))
    for note in summary["notes"]:
        print(f"note: {note}")
    for f in summary["files"]:
        print(f"wrote {f}")
    return 0
