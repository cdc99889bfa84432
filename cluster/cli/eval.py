"""`vlm eval`: its arguments and their checks, then vlm.eval.runner on a verified checkpoint."""
from __future__ import annotations

import json
import os

from vlm.config import ConfigError


def add_eval_commands(sub, config_args) -> None:
    p = sub.add_parser("eval", help="zero-shot, retrieval, linear-probe and dense evaluation of a checkpoint",
                       description="Evaluates a checkpoint's model on a webdataset shard directory (classes "
                       "from eval.label_template over each sample's metadata, masks from 'mask.png' "
                       "entries), an image folder (one sub-folder per class; NAME.mask.png beside an "
                       "image is its mask) or a CSV with columns path and caption and/or label, and "
                       "optionally mask (paths relative to the CSV; rows sharing a path are one image "
                       "with several captions). Settings come from the checkpoint's eval section, "
                       "overridable with --set eval.KEY=VALUE. Zero-shot class names, first of: "
                       "--classnames, eval.class_names (a {label: name} mapping), classnames.txt "
                       "beside the data (in the folder root or shard directory, or next to the CSV), "
                       "else the label with underscores as spaces. Templates, first of: --templates, "
                       "eval.prompt_templates, zeroshot_classification_templates.txt beside the data, "
                       "else built-in ones.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a run directory, a checkpoint directory or an export from `vlm ckpt export` (*.safetensors)")
    p.add_argument("--data", metavar="PATH",
                   help="shard directory, image folder or .csv (default: the run's data.eval_shards)")
    p.add_argument("--task", action="append", choices=["zeroshot", "retrieval", "linear-probe", "dense"],
                   help="repeatable; default every task the data supports")
    p.add_argument("--probe-train", metavar="PATH",
                   help="train the linear probe on this dataset (at most eval.probe_max_train items) and "
                   "test it on all of --data; default: alternate halves of each class of --data")
    p.add_argument("--classnames", metavar="FILE",
                   help="zero-shot class names, one a line (CLIP_benchmark's classnames.txt): line i "
                   "names the i-th label value in sorted order (the i-th sub-folder of an image "
                   "folder); when every label is an integer, line i+1 names label i")
    p.add_argument("--templates", metavar="FILE",
                   help="zero-shot prompt templates, one a line, {c} marking the class name "
                   "(CLIP_benchmark's zeroshot_classification_templates.txt)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override an eval setting of the checkpoint's config (repeatable)")
    p.add_argument("--output", metavar="JSON", help="also write the results here")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from vlm.eval.load import load_for_eval
    from vlm.eval.runner import evaluate_model, format_results

    for flag, file in (("--classnames", args.classnames), ("--templates", args.templates)):
        if file is not None and not os.path.isfile(file):
            raise ConfigError(f"vlm eval {flag}: {file} is not a file")
    used, model, text, cfg = load_for_eval(args.checkpoint, args.overrides)
    data = args.data or cfg.path(cfg.data.eval_shards)
    results = evaluate_model(model, text, cfg.eval, data, image_size=cfg.model.vision.image_size,
                             tasks=args.task, probe_train=args.probe_train, classnames=args.classnames,
                             templates=args.templates)
    results = {"checkpoint": used, **results}
    print(format_results(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0
