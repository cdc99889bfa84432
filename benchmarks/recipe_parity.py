"""Recipe parity with OpenCLIP: the same small ViT CLIP, data, budget and recipe, trained by
the project and by OpenCLIP's own trainer, then scored by one retrieval function.

Why: the architectures match tensor for tensor, so a retrieval gap at equal samples comes
from the recipe (weight decay groups, initialisation, temperature, data order, schedule),
and only a side-by-side run on real images and captions shows it.

1. Corpus (cached under --work): the clip art of Debian's ``openclipart-png`` package
   (``apt-get download``, no root), one caption per image from its file name and category
   folders (``head2.png`` in ``people/`` -> "head, people"), byte-identical files dropped,
   --heldout images held out (seed 0). Both splits are served on 127.0.0.1 and ingested
   with ``vlm data ingest`` into webdataset shards of 64-px JPEGs (white border to square).
2. Model: ViT 64 px, patch 8, width 128, depth 4, 4 heads; text context 77, CLIP's 49,408
   BPE (``tokenizer.kind: clip``), width 128, depth 4, 4 heads; MLP ratio 4; embedding 128.
   OpenCLIP gets the same as a model config JSON (same parameter count, plus logit_scale).
3. Recipe on both: batch 128, AdamW lr 5e-4, wd 0.1, betas (0.9, 0.98), eps 1e-6, linear
   warmup then cosine to 0, grad clip 1.0, fp32, one data worker, --samples samples
   (rounded to whole epochs of whole batches: OpenCLIP's webdataset loader counts epochs).
   OpenCLIP (open_clip_torch==3.3.0) runs in a side virtual environment created on first use
   (--openclip-venv; torch==2.13.0+cpu, never a CUDA build).
4. Each trained model embeds the held-out set with its own code (the project from its
   ``vlm ckpt export``, OpenCLIP from its checkpoint); one function scores both:
   image->text and text->image R@1 and R@5, means over the seeds.

    nice .venv/bin/python benchmarks/recipe_parity.py                  # 113,920 samples, seeds 0 1
    nice .venv/bin/python benchmarks/recipe_parity.py --jobs 2         # both seeds at once (2 cores)
    nice .venv/bin/python benchmarks/recipe_parity.py --samples 32256   # 6 epochs: ~8 + ~13 min a seed
    nice .venv/bin/python benchmarks/recipe_parity.py --only project --label=-x --set optim.warmup_steps=10

On the 2-core development machine one trainer thread each (--threads) runs about 75
(project) and 45-70 (OpenCLIP) samples/s, so the default budget takes about 25 and 35
minutes a run; --samples trades that for noise (a seed moves R@1 by about 0.01 at 6 epochs).
With --jobs 2 the two seeds share the cores (a project run beside an OpenCLIP run all the
time), so wall times grow and the CPU seconds are the speed figure to read.

Prints ``recipe parity: project R@1 P, OpenCLIP R@1 Q, ratio P/Q (DIRECTION)`` for both
directions, the same for R@5, each trainer's wall time (whole command, start-up included)
and CPU seconds (with its data worker), and the speed ratios OpenCLIP / project."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OPENCLIP_VERSION = "3.3.0"
SIDE_PINS = ["torch==2.13.0+cpu", "torchvision==0.28.0", f"open_clip_torch=={OPENCLIP_VERSION}",
             "webdataset<=0.2.86", "pandas", "fsspec"]
CLIPART = "pkg/usr/share/openclipart/png"
BATCH, WIDTH, DEPTH, HEADS, EMBED, IMAGE, PATCH = 128, 128, 4, 4, 128, 64, 8
OPENCLIP_MODEL = {"embed_dim": EMBED,
                  "vision_cfg": {"image_size": IMAGE, "patch_size": PATCH, "width": WIDTH, "layers": DEPTH,
                                 "head_width": WIDTH // HEADS, "mlp_ratio": 4.0},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": WIDTH, "heads": HEADS,
                               "layers": DEPTH, "mlp_ratio": 4.0}}


def run(cmd: list[str], log: Path | None = None, **kw) -> tuple[float, float]:
    """Runs cmd (output to ``log`` when given) -> (wall time, CPU seconds of it and the
    children it waited for, data workers included: the figure that other load on the
    machine disturbs least). The CPU time is this child's own (wait4), so runs side by side
    (--jobs) do not count each other's. Raises on failure."""
    start = time.monotonic()
    with open(log, "w") if log else open(os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed ({proc.returncode}):\n{tail}")
    return time.monotonic() - start, usage.ru_utime + usage.ru_stime


def ensure_openclip(venv: Path) -> Path:
    """The side environment's Python, with OpenCLIP's trainer and a CPU torch."""
    python = venv / "bin" / "python"
    if not (venv / "done").exists():
        print(f"creating {venv} with open_clip_torch=={OPENCLIP_VERSION} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run(pip + SIDE_PINS[:1], check=True)  # the CPU torch first: nothing may swap it
        subprocess.run(pip + SIDE_PINS, check=True)
        (venv / "done").write_text(" ".join(SIDE_PINS))
    return python


def caption(rel: Path) -> str:
    """A caption from a clip-art file's name and folders: 'moon dan gerhards, science astronomy'."""
    words = [w for w in re.split(r"[_\-\s.]+", rel.stem.lower()) if w and not w.isdigit()]
    folders = " ".join(p.replace("_", " ") for p in reversed(rel.parent.parts))
    return f"{' '.join(words) or 'clip art'}, {folders}"


def corpus_rows(work: Path, heldout: int) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(path, caption)], "heldout": [...]}: the package's unique images, split."""
    root = work / CLIPART
    if not root.is_dir():
        debs = list(work.glob("openclipart-png_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", "openclipart-png"], cwd=work, check=True)
            debs = list(work.glob("openclipart-png_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "pkg")], check=True)
    seen, rows = set(), []
    for path in sorted(root.rglob("*.png")):
        digest = hashlib.sha256(path.read_bytes()).digest()
        if digest not in seen:
            seen.add(digest)
            rel = path.relative_to(root)
            rows.append((str(rel), caption(rel)))
    random.Random(0).shuffle(rows)
    return {"heldout": rows[:heldout], "train": rows[heldout:]}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ingest(work: Path, heldout: int) -> dict[str, Path]:
    """Shards of both splits (made once): the clip art served on loopback, `vlm data ingest`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {split: work / f"shards-{split}" for split in ("train", "heldout")}
    if all((d / "done").exists() for d in out.values()):
        return out
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "demo.server", str(work / CLIPART), "--port", str(port)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/broken/missing.jpg", timeout=1)
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.1)
        for split, rows in corpus_rows(work, heldout).items():
            table = work / f"{split}.parquet"
            pq.write_table(pa.table({"url": [f"http://127.0.0.1:{port}/{p}" for p, _ in rows],
                                     "caption": [c for _, c in rows]}), table)
            shutil.rmtree(out[split], ignore_errors=True)
            spent = run([str(BIN / "vlm"), "data", "ingest", "--input", str(table), "--output", str(out[split]),
                         "--no-progress", "--metrics-port", "-1", "--backend", "local", "--processes", "2",
                         "--set", "data.ingest.shard_size=1000", "--set", f"data.ingest.image_size={IMAGE}",
                         "--set", "data.ingest.resize_mode=border", "--set", "data.ingest.fetch.retries=0",
                         "--set", "data.ingest.fetch.allow_private_hosts=[127.0.0.1]"],
                        work / f"ingest-{split}.log", cwd=REPO)
            print(f"ingested {split}: {len(rows)} rows, {count(out[split])} samples in {spent[0]:.0f} s", flush=True)
            (out[split] / "done").write_text("")
    finally:
        server.kill()
    return out


def count(shards: Path) -> int:
    """Samples in a shard folder (its ingest stats)."""
    return sum(json.loads(p.read_text()).get("successes", 0) for p in shards.glob("*_stats.json"))


def project_overrides(args, run_dir: Path, shards: Path, steps: int, seed: int) -> list[str]:
    """The project's run: the shared model and recipe as `key=value` config overrides."""
    tower = f"width: {WIDTH}, depth: {DEPTH}, heads: {HEADS}, mlp_ratio: 4.0"
    vision = f"{{image_size: {IMAGE}, patch_size: {PATCH}, {tower}}}"
    text = f"{{context_length: 77, {tower}}}"
    return [f"run_dir={run_dir}", f"data.train_shards={shards}", f"model.embed_dim={EMBED}",
            f"model.vision={vision}", f"model.text={text}", "tokenizer.kind=clip",
            "objectives=[{name: clip_infonce}]", f"optim.lr={args.lr}", "optim.weight_decay=0.1",
            "optim.betas=[0.9, 0.98]", "optim.eps=1e-6", f"optim.warmup_steps={args.warmup_steps}",
            "optim.min_lr_ratio=0.0", "optim.grad_clip=1.0", "train.num_workers=1",
            f"train.micro_batch_size={BATCH}", f"train.steps={steps}", f"train.seed={seed}",
            "train.precision=fp32", "train.log_every=50", "train.checkpoint_every=1000000",
            "train.keep_checkpoints=1", "metrics.enabled=false", "eval.every_steps=0",
            "data.loader_workers=1", f"train.threads_per_worker={args.threads}", *args.overrides]


def train_project(args, shards: dict[str, Path], steps: int, seed: int) -> tuple[float, Path]:
    """Trains, exports and embeds the project's model -> (training wall time, embeddings dir)."""
    from vlm.config import load_config
    from vlm.data.tokenizer import prepare_tokenizer

    run_dir = args.work / f"project{args.label}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    keys = project_overrides(args, run_dir, shards["train"], steps, seed)
    prepare_tokenizer(load_config(None, keys))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "vlm.train.trainer"] + [a for k in keys for a in ("--set", k)]
    spent = run(cmd, run_dir.with_suffix(".log"), cwd=REPO, env=env)
    export = run_dir / "export.safetensors"
    run([str(BIN / "vlm"), "ckpt", "export", str(run_dir), "--output", str(export), "--force"], cwd=REPO)
    out = run_dir / "embeddings"
    embed_project(export, shards["heldout"], out)
    return spent, out


def embed_project(export: Path, heldout: Path, out: Path) -> None:
    """The held-out set through the exported model's own encoders and eval preprocessing."""
    import torch

    from vlm.eval.features import embed_share
    from vlm.eval.load import load_eval_model

    model, text, cfg = load_eval_model(str(export))
    n = count(heldout)
    share = embed_share(model, text, str(heldout), list(range(n)), ev=cfg.eval,
                        image_size=cfg.model.vision.image_size)
    order = torch.argsort(share["text_item"])  # one caption per item: row i is item i's
    if not torch.equal(share["text_item"][order], share["index"]):
        raise RuntimeError("held-out items and captions do not pair one to one")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", share["image"].numpy())
    np.save(out / "texts.npy", share["text"][order].numpy())


def train_openclip(args, python: Path, shards: dict[str, Path], epochs: int, per_epoch: int,
                   seed: int) -> tuple[float, Path]:
    """Trains OpenCLIP's model with its own trainer and embeds the held-out set with it."""
    side = [str(python), str(REPO / "benchmarks" / "recipe_parity_openclip.py")]
    model_json = args.work / "ParityViT.json"
    model_json.write_text(json.dumps(OPENCLIP_MODEL))
    logs, name = args.work / "openclip-logs", f"openclip{args.label}-seed{seed}"
    shutil.rmtree(logs / name, ignore_errors=True)
    tars = sorted(shards["train"].glob("*.tar"))
    data = f"{shards['train']}/{{{tars[0].stem}..{tars[-1].stem}}}.tar"
    cmd = side + ["train", "--model-config", str(model_json), "--", "--model", "ParityViT",
                  "--train-data", data, "--dataset-type", "webdataset", "--train-num-samples", str(per_epoch),
                  "--batch-size", str(BATCH), "--epochs", str(epochs), "--lr", str(args.lr), "--wd", "0.1",
                  "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--warmup", str(args.warmup_steps),
                  "--lr-scheduler", "cosine", "--grad-clip-norm", "1.0", "--precision", "fp32",
                  "--device", "cpu", "--workers", "1", "--seed", str(seed), "--logs", str(logs),
                  "--name", name, "--save-frequency", str(epochs), "--log-every-n-steps", "50",
                  "--report-to", ""]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # the project's threads_per_worker
    spent = run(cmd, args.work / f"{name}.log", cwd=args.work, env=env)
    out = logs / name / "embeddings"
    run(side + ["embed", "--model-config", str(model_json), "--checkpoint",
                str(logs / name / "checkpoints" / f"epoch_{epochs}.pt"), "--heldout", str(shards["heldout"]),
                "--out", str(out)], args.work / f"{name}-embed.log", cwd=args.work)
    return spent, out


def recall(embeddings: Path, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Image->text and text->image R@k of paired rows (row i of images.npy with row i of texts.npy)."""
    images, texts = np.load(embeddings / "images.npy"), np.load(embeddings / "texts.npy")
    sim = images @ texts.T
    out = {}
    for direction, s in (("image->text", sim), ("text->image", sim.T)):
        rank = (s > s[np.arange(len(s)), np.arange(len(s))][:, None]).sum(axis=1)  # rows scored higher
        for k in ks:
            out[f"{direction} R@{k}"] = float((rank < k).mean())
    return out


def report(results: dict[str, list[dict]], times: dict[str, list[float]]) -> None:
    """The parity lines: means over the seeds of each metric, then the wall times."""
    mean = {side: {m: float(np.mean([r[m] for r in runs])) for m in runs[0]} for side, runs in results.items()}
    for side, runs in results.items():
        for i, r in enumerate(runs):
            print(f"{side} run {i + 1}: " + ", ".join(f"{m} {v:.3f}" for m, v in r.items())
                  + f"; trained in {times[side][i][0]:.0f} s ({times[side][i][1]:.0f} CPU-s)")
    if len(results) < 2:
        return
    for metric in mean["project"]:
        direction, k = metric.split(" ")
        p, q = mean["project"][metric], mean["OpenCLIP"][metric]
        print(f"recipe parity: project {k} {p:.3f}, OpenCLIP {k} {q:.3f}, "
              f"ratio {p / q if q else float('nan'):.2f} ({direction})")
    (tp, cp), (tq, cq) = (np.mean(times[side], axis=0) for side in ("project", "OpenCLIP"))
    print(f"recipe parity wall time: project {tp:.0f} s, OpenCLIP {tq:.0f} s, speed ratio {tq / tp:.2f}")
    print(f"recipe parity CPU time: project {cp:.0f} CPU-s, OpenCLIP {cq:.0f} CPU-s, speed ratio {cq / cp:.2f}")


def main(argv=None) -> int:
    """Corpus, then each seed's runs of both sides (order alternated), then the parity lines."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--work", type=Path, default=Path("/tmp/recipe_parity"),
                   help="corpus, shards, side environment and runs (cached; default /tmp/recipe_parity)")
    p.add_argument("--samples", type=int, default=113_920, help="training samples (rounded to whole epochs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--heldout", type=int, default=1505, help="images held out for retrieval")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, help="linear warmup of both (default: 5%% of the steps)")
    p.add_argument("--only", choices=("project", "OpenCLIP"), help="train one side only")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="another override of the project's config (repeatable), e.g. optim.warmup_steps=10")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each trainer (default 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds trained at once (2 halves the wall time on 2 cores; CPU-s stay comparable)")
    p.add_argument("--label", default="", help="appended to the run names (variants side by side)")
    p.add_argument("--openclip-venv", type=Path, help="side environment (default: WORK/openclip-venv)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    shards = ingest(args.work, args.heldout)
    per_epoch = count(shards["train"]) // BATCH * BATCH  # whole batches: what OpenCLIP's epoch holds
    epochs = max(1, round(args.samples / per_epoch))
    steps = epochs * per_epoch // BATCH
    args.warmup_steps = steps // 20 if args.warmup_steps is None else args.warmup_steps
    print(f"budget: {epochs} epochs of {per_epoch} samples = {steps} steps of {BATCH} = {steps * BATCH} samples "
          f"(asked {args.samples}); warmup {args.warmup_steps} steps; held out {count(shards['heldout'])}",
          flush=True)
    sides = [args.only] if args.only else ["project", "OpenCLIP"]
    python = ensure_openclip(args.openclip_venv or args.work / "openclip-venv") if "OpenCLIP" in sides else None
    results, times = {s: [] for s in sides}, {s: [] for s in sides}

    def one_seed(i: int, seed: int) -> list[tuple[str, dict, tuple[float, float]]]:
        done = []
        for side in (sides if i % 2 == 0 else sides[::-1]):  # alternate, so a busy spell hits both
            if side == "project":
                spent, emb = train_project(args, shards, steps, seed)
            else:
                spent, emb = train_openclip(args, python, shards, epochs, per_epoch, seed)
            done.append((side, recall(emb), spent))
            print(f"{side} seed {seed}: {done[-1][1]}, {spent[0]:.0f} s, {spent[1]:.0f} CPU-s", flush=True)
        return done

    # --jobs 2 runs seed 0 (project first) beside seed 1 (OpenCLIP first): one of each
    # trains at any time, so the load each side sees is alike
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for done in pool.map(one_seed, range(len(args.seeds)), args.seeds):
            for side, result, spent in done:
                results[side].append(result)
                times[side].append(spent)
    report(results, times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
