"""Commands of the generative and alignment objectives: `vlm caption` (decode captions with
a checkpoint's caption decoder) and `vlm eval-generative` (captioning, ITM re-ranking and
zero-shot box classification figures)."""
from __future__ import annotations

import argparse
import json


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a run directory or a checkpoint directory")
    p.add_argument("--data", metavar="PATH",
                   help="shard directory (default: the run's data.eval_shards, on the demo the held-out "
                   "(colour, shape) combinations), or 'synthetic-seen': --limit (default 600) new images of "
                   "the run's synthetic corpus's training combinations (its settings as `vlm demo` saved "
                   "them in the run directory), never part of its training set")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N samples")
    p.add_argument("--output", metavar="JSON", help="also write the results here")


def add_generate_commands(sub, config_args) -> None:
    p = sub.add_parser("caption", help="caption images with a checkpoint's caption decoder (CoCa)",
                       description="Decodes a caption for every image of a shard directory (default: the "
                       "run's held-out shards) with the checkpoint's caption decoder, greedily or with beam "
                       "search, prints the first --show of them beside their reference captions, and, when "
                       "the samples' labels are '{colour} {shape}' (the demo corpus), the share of captions "
                       "naming the right colour and shape.")
    _common(p)
    p.add_argument("--beam", type=int, default=1, metavar="K", help="beam width (default 1: greedy)")
    p.add_argument("--show", type=int, default=10, metavar="N", help="captions to print (default 10)")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("eval-generative", help="captioning, ITM re-ranking and zero-shot box figures of a checkpoint",
                       description="Runs, on a shard directory (default: the run's held-out shards), every "
                       "task the checkpoint's objectives support, or those given with --task: 'caption' "
                       "(objective itg: greedy captions naming the right colour and shape), 'itm-rerank' "
                       "(objective itm: text->image recall@1 by contrastive similarity, then after the "
                       "ITM head re-ranks the contrastive top-k), 'box-zeroshot' (objective region_word: "
                       "each ground-truth box of the samples' 'regions' metadata classified among the "
                       "dataset's phrases, against chance).")
    _common(p)
    p.add_argument("--task", action="append", choices=["caption", "itm-rerank", "box-zeroshot"],
                   help="repeatable; default every task the checkpoint supports")
    p.add_argument("--beam", type=int, default=1, metavar="K", help="caption beam width (default 1: greedy)")
    p.add_argument("--top-k", type=int, default=16, metavar="K", help="images the ITM head re-ranks (default 16)")
    p.add_argument("--show", type=int, default=5, metavar="N", help="captions to print (default 5)")
    p.set_defaults(func=cmd_eval_generative)


def _check(args) -> None:
    if args.beam < 1:
        raise ValueError(f"--beam must be at least 1, not {args.beam}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be positive, not {args.limit}")
    if getattr(args, "top_k", 1) < 1:
        raise ValueError(f"--top-k must be positive, not {args.top_k}")


SEEN = "synthetic-seen"  # the --data value: new images of the demo corpus's training combinations


def _demo_inputs(args) -> dict:
    """What the evaluation takes from the demo: the synonyms of the corpus's colour and shape
    words and, for --data synthetic-seen, new images of the training (colour, shape) pairs of
    the run's corpus (its settings saved in the run directory by `vlm demo`)."""
    from demo.config import saved_demo_config
    from demo.corpus import unseen_samples, word_synonyms

    def seen(cfg, count: int):
        corpus = saved_demo_config(args.checkpoint, cfg.run_dir).corpus
        for data, r in unseen_samples(corpus, count, "train"):
            yield data, {"key": r["path"], "caption": r["caption"], "label": f"{r['colour']} {r['shape']}",
                         "regions": r["regions"]}

    return {"synonyms": word_synonyms(), "source": seen if args.data == SEEN else None}


def _finish(results: dict, args) -> int:
    from vlm.eval.generative import format_generative

    print(format_generative(results, show=args.show))
    if args.output:
        from pathlib import Path

        out = Path(args.output)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)
    return 0


def cmd_caption(args) -> int:
    from vlm.eval.generative import evaluate_generative

    _check(args)
    return _finish(evaluate_generative(args.checkpoint, data=args.data, tasks=["caption"], beam=args.beam,
                                       limit=args.limit, **_demo_inputs(args)), args)


def cmd_eval_generative(args) -> int:
    from vlm.eval.generative import evaluate_generative

    _check(args)
    return _finish(evaluate_generative(args.checkpoint, data=args.data, tasks=args.task, beam=args.beam,
                                       top_k=args.top_k, limit=args.limit, **_demo_inputs(args)), args)
