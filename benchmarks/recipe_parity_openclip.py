"""The OpenCLIP side of benchmarks/recipe_parity.py, run inside its side virtual environment.

OpenCLIP's package imports torchvision, which must not enter the project's environment, so
recipe_parity.py runs this file with the side environment's Python:

    python recipe_parity_openclip.py train --model-config M.json -- OPEN_CLIP_TRAIN_ARGS...
    python recipe_parity_openclip.py embed --model-config M.json --checkpoint C.pt \
        --heldout DIR --out DIR

`train` registers the model config (a JSON file whose stem is the model name) and hands the
rest of the command line to OpenCLIP's own trainer, `open_clip_train.main.main`. `embed`
loads the checkpoint that trainer wrote and writes the held-out set's image and caption
embeddings (L2-normalised, OpenCLIP's own preprocessing and tokenizer) as images.npy and
texts.npy, row i of both from held-out sample i, for the shared recall function."""
from __future__ import annotations

import argparse
import io
import sys
import tarfile
import types
from pathlib import Path

import numpy as np


def cpu_torchvision() -> None:
    """Lets torchvision import beside the CPU build of torch.

    PyPI's torchvision wheels link their C++ operators (nms, roi_align, ...) against the CUDA
    build of torch, so with torch+cpu that library does not load, and importing torchvision
    then fails where it registers meta kernels for those operators. OpenCLIP's CLIP training
    uses only torchvision's Python transforms, so the registration module is replaced by an
    empty one; calling one of the missing operators would still fail loudly."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def heldout_samples(root: Path) -> list[tuple[bytes, str]]:
    """(image bytes, caption) of every sample of the shards in ``root``, in shard order."""
    samples = []
    for shard in sorted(root.glob("*.tar")):
        parts: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
        samples += [(p["jpg"], p["txt"].decode()) for p in parts.values() if "jpg" in p and "txt" in p]
    return samples


def embed(args) -> None:
    """Embeds the held-out set with the trained OpenCLIP model."""
    cpu_torchvision()
    import open_clip
    import torch
    from PIL import Image

    open_clip.add_model_config(args.model_config)
    name = args.model_config.stem
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(args.checkpoint))
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    samples = heldout_samples(args.heldout)
    images, texts = [], []
    with torch.no_grad():
        for start in range(0, len(samples), 256):
            chunk = samples[start:start + 256]
            pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in chunk])
            images.append(model.encode_image(pixels, normalize=True))
            texts.append(model.encode_text(tokenizer([c for _, c in chunk]), normalize=True))
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "images.npy", torch.cat(images).numpy())
    np.save(args.out / "texts.npy", torch.cat(texts).numpy())
    print(f"embedded {len(samples)} held-out samples with {sum(p.numel() for p in model.parameters())} "
          f"parameters into {args.out}")


def train(args, rest: list[str]) -> int:
    """OpenCLIP's own trainer with the custom model config registered."""
    cpu_torchvision()
    import open_clip
    from open_clip_train.main import main

    open_clip.add_model_config(args.model_config)
    return main(rest) or 0


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits off everything after `--` (OpenCLIP's own arguments)."""
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("train", "embed"))
    ap.add_argument("--model-config", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--heldout", type=Path)
    ap.add_argument("--out", type=Path)
    return ap.parse_args(own), rest


if __name__ == "__main__":
    ns, extra = parse(sys.argv[1:])
    if ns.command == "train":
        sys.exit(train(ns, extra))
    embed(ns)
