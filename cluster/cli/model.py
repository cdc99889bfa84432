"""`vlm model list|info`: the registered model presets, their sizes and forward FLOPs."""
from __future__ import annotations

import json


def add_model_commands(sub, config_args) -> None:
    model = sub.add_parser("model", help="the registered model presets",
                           description="Model presets are YAML files of model config fields in "
                           "vlm/models/configs/; a run config can copy one into its model section.")
    model = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    p = model.add_parser("list", help="list the registered presets",
                         description="One preset per line: name, image tower, image size, text "
                         "context and parameter count (with a 49408-token vocabulary where the "
                         "preset leaves the vocabulary to the run's tokenizer, marked *).")
    p.set_defaults(func=cmd_model_list)
    p = model.add_parser("info", help="parameter counts and forward FLOPs of one preset",
                         description="Builds the preset on the meta device (no memory, no weights) "
                         "and prints its parameter counts and forward FLOPs per sample (batch 1, full "
                         "image size and text context; a multiply-add counts as 2 FLOPs).")
    p.add_argument("name", metavar="NAME", help="a preset name, as `vlm model list` prints it")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help="text vocabulary size (default: the preset's, else 49408, CLIP's)")
    p.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    p.set_defaults(func=cmd_model_info)


def cmd_model_list(args) -> int:
    from vlm.models.presets import get_config, list_presets
    from vlm.models.registry import describe

    for name in list_presets():
        d = describe(name)
        mark = "" if get_config(name).text.vocab_size else "*"
        print(f"{name:<14} {d['vision_type']:<7} {d['image_size']:>4}px  text {d['context_length']:>3} tokens  "
              f"{d['params_total'] / 1e6:8.2f}M params{mark}")
    print("* vocabulary taken from the run's tokenizer; counted here with 49408 tokens")
    return 0


def cmd_model_info(args) -> int:
    from vlm.models.presets import get_config, list_presets
    from vlm.models.registry import describe

    if args.name not in list_presets():
        raise ValueError(f"unknown model preset {args.name!r}; known presets: {', '.join(list_presets())}")
    cfg = get_config(args.name)
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ValueError(f"--vocab-size must be positive, not {args.vocab_size}")
    if args.vocab_size is not None:
        cfg = cfg.model_copy(update={"text": cfg.text.model_copy(update={"vocab_size": args.vocab_size})})
    d = describe(cfg)
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"{args.name}: {d['vision_type']} image tower at {d['image_size']}px, text context {d['context_length']}, "
          f"vocabulary {d['vocab_size']}, embedding {d['embed_dim']}")
    print(f"parameters: {d['params_total'] / 1e6:.2f}M total = {d['params_vision'] / 1e6:.2f}M image "
          f"+ {d['params_text'] / 1e6:.2f}M text")
    print(f"forward GFLOPs per sample: {d['flops_total'] / 1e9:.2f} total = {d['flops_vision'] / 1e9:.2f} image "
          f"+ {d['flops_text'] / 1e9:.2f} text (a multiply-add counts as 2 FLOPs; norms and activations not counted)")
    return 0
