"""`vlm eval`: its arguments and their checks, then vlm.eval.runner (images), vlm.eval.video (clips) or
vlm.eval.detection (COCO-format boxes)."""
from __future__ import annotations

import json
import os

from vlm.config import ConfigError

IMAGE_TASKS = ("zeroshot", "retrieval", "linear-probe", "dense")
VIDEO_TASKS = ("video-zeroshot", "video-linear-probe")  # vlm.eval.video.VIDEO_TASKS, named here without torch
POOLINGS = ("mean", "diff", "concat")                   # vlm.eval.video.POOLINGS
DETECTION_TASKS = ("detection",)
REGIONS = ("roi", "crop")                               # vlm.eval.detection.REGIONS
# each group reads its own kind of data, so one call runs tasks of one group; its own flags
GROUP_FLAGS = {"video": ("--frames", "--frame-stride", "--pooling"),
               "detection": ("--proposals", "--region", "--image-root")}


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def add_eval_commands(sub, config_args) -> None:
    p = sub.add_parser("eval", help="zero-shot, retrieval, linear-probe, dense, video and detection evaluation "
                       "of a checkpoint",
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
                       "else built-in ones. Video tasks (video-zeroshot, video-linear-probe; asked for by "
                       "--task, never by default, and not with image tasks in the same call) read a folder "
                       "of clips (one sub-folder per class; mp4, m4v, mov, mkv, webm, avi) or a CSV with "
                       "columns path and label: each clip is subsampled into --frames frames, each frame "
                       "embedded as an evaluation image, and the frame embeddings pooled into one clip "
                       "embedding; built-in templates are action prompts ('a video of a person {c}.'). A "
                       "clip that does not decode, holds no frame, or is over a decoding bound (512 MiB, "
                       "4096x4096 pixels a frame, 10000 frames, 60 s by default: --set eval.video_max_bytes, "
                       "video_max_pixels, video_max_frames, video_max_seconds) is skipped and listed. Detection (zero-shot, "
                       "asked for by --task detection, alone) reads COCO-format data: --data is instances.json "
                       "or its folder (images relative to it, or to --image-root); each proposal (--proposals, "
                       "else the ground-truth boxes) is classified by its region feature against the category "
                       "names' prompts: box accuracy, and AP at IoU 0.5 (pycocotools) with proposals.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a run directory, a checkpoint directory or an export from `vlm ckpt export` "
                   "or `vlm ckpt convert` (*.safetensors)")
    p.add_argument("--data", metavar="PATH",
                   help="shard directory, image folder or .csv (default: the run's data.eval_shards); for video "
                   "tasks a clip folder or .csv, always given")
    p.add_argument("--task", action="append", choices=IMAGE_TASKS + VIDEO_TASKS + DETECTION_TASKS,
                   help="repeatable; default every image task the data supports")
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
    _add_video_and_detection_args(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override an eval setting of the checkpoint's config (repeatable)")
    p.add_argument("--output", metavar="JSON", help="also write the results here")
    p.set_defaults(func=cmd_eval)


def _add_video_and_detection_args(p) -> None:
    """The flags of the video tasks and of detection (GROUP_FLAGS)."""
    p.add_argument("--frames", type=positive_int, metavar="N",
                   help="video tasks: frames taken from each clip (default 8)")
    p.add_argument("--frame-stride", type=positive_int, metavar="K",
                   help="video tasks: take every K-th frame of a window centred in the clip (default: the "
                   "frames spread uniformly over the whole clip)")
    p.add_argument("--pooling", choices=POOLINGS,
                   help="video linear probe: the clip feature from its frames' features: mean (default); "
                   "diff, the mean and the mean change between consecutive frames; concat, the means of "
                   "4 consecutive parts of the clip side by side (video zero-shot always takes the mean)")
    p.add_argument("--proposals", metavar="FILE",
                   help="detection: a JSON list of {image_id, bbox: [x, y, w, h] in pixels, score (optional)} "
                   "(COCO's results format without category_id); default: the ground-truth boxes")
    p.add_argument("--region", choices=REGIONS,
                   help="detection: roi (default), RoI-align on the image tower's MaskCLIP token map; crop, "
                   "each box cut out and encoded as an image (one forward pass per box)")
    p.add_argument("--image-root", metavar="DIR",
                   help="detection: where the images' file_name are relative to (default: instances.json's "
                   "folder, then its images/ sub-folder)")


def _task_group(args) -> str:
    """"image", "video" or "detection": the group of the requested tasks. Tasks of two groups,
    a group's flag without its task, or a video or detection task without --data is a
    ConfigError."""
    groups = {t: "video" if t in VIDEO_TASKS else "detection" if t in DETECTION_TASKS else "image"
              for t in args.task or ()}
    if len(set(groups.values())) > 1:
        listed = " and ".join(f"{g} tasks ({', '.join(t for t in groups if groups[t] == g)})"
                              for g in sorted(set(groups.values())))
        raise ConfigError(f"vlm eval: {listed} read different data; ask for them in separate calls")
    group = next(iter(groups.values()), "image")
    for other, flags in GROUP_FLAGS.items():
        given = [f for f in flags if getattr(args, f[2:].replace("-", "_")) is not None]
        if given and other != group:
            tasks = VIDEO_TASKS if other == "video" else DETECTION_TASKS
            raise ConfigError(f"vlm eval: {', '.join(given)} only apply to --task {' / '.join(tasks)}")
    if group == "video" and not args.data:
        raise ConfigError("vlm eval: video tasks need --data (a clip folder or a .csv of path and label)")
    if group == "detection" and not args.data:
        raise ConfigError("vlm eval: detection needs --data (COCO's instances.json, or the folder holding it)")
    return group


def _evaluate_detection(args, model, text, cfg) -> dict:
    from vlm.eval.detection import evaluate_detection

    return evaluate_detection(model, text, cfg.eval, args.data, image_size=cfg.model.vision.image_size,
                              proposals=args.proposals, classnames=args.classnames, templates=args.templates,
                              region=args.region or "roi", image_root=args.image_root)


def _evaluate_video(args, model, text, cfg) -> dict:
    from vlm.eval.video import evaluate_video
    from vlm.eval.video_data import VideoLimits

    ev = cfg.eval
    limits = VideoLimits(max_bytes=ev.video_max_bytes, max_pixels=ev.video_max_pixels,
                         max_frames=ev.video_max_frames, max_seconds=ev.video_max_seconds)
    return evaluate_video(model, text, ev, args.data, image_size=cfg.model.vision.image_size, tasks=args.task,
                          frames=args.frames or 8, stride=args.frame_stride, pooling=args.pooling or "mean",
                          classnames=args.classnames, templates=args.templates, probe_train=args.probe_train,
                          limits=limits)


def cmd_eval(args) -> int:
    from vlm.eval.load import load_for_eval
    from vlm.eval.runner import evaluate_model, format_results

    for flag, file in (("--classnames", args.classnames), ("--templates", args.templates),
                       ("--proposals", args.proposals)):
        if file is not None and not os.path.isfile(file):
            raise ConfigError(f"vlm eval {flag}: {file} is not a file")
    group = _task_group(args)
    used, model, text, cfg = load_for_eval(args.checkpoint, args.overrides)
    if group == "video":
        from vlm.eval.video import format_video_results

        results = _evaluate_video(args, model, text, cfg)
        report = format_video_results(results)
    elif group == "detection":
        from vlm.eval.detection import format_detection

        results = _evaluate_detection(args, model, text, cfg)
        report = format_detection(results)
    else:
        data = args.data or cfg.path(cfg.data.eval_shards)
        results = evaluate_model(model, text, cfg.eval, data, image_size=cfg.model.vision.image_size,
                                 tasks=args.task, probe_train=args.probe_train, classnames=args.classnames,
                                 templates=args.templates)
        report = format_results(results)
    results = {"checkpoint": used, **results}
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0
