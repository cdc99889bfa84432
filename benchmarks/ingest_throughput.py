"""Throughput of `vlm data ingest` against img2dataset, and the ingest driver's memory.

1. Generates (once, cached in --cache-dir) N JPEG and PNG images of random sizes between
   256 and 1024 px a side, serves them from a separate process on 127.0.0.1 and writes
   a parquet URL table.
2. Runs `vlm data ingest` and img2dataset (the PyPI package, in its own virtual
   environment, --i2d-venv, created on first use) on that table with the same number of
   processes (one per core: vlm's local Ray runs one shard task per core), resizing to 224 (center crop) into webdataset shards of JPEG quality 95;
   prints samples/s of each (whole command wall time, start-up included) and the ratio.
   With --baseline TREE (a checkout of another commit) that tree's `vlm data ingest` runs
   too, alternated with this one's, and the ratio of their medians is printed.
3. Runs `vlm data ingest` over a 1,000,000-row and a 10,000-row table whose URLs point at
   a closed loopback port (every row fails fast with connection_error) and prints the
   driver's peak RSS for each and their ratio.

Nothing leaves 127.0.0.1. Run with `nice`: it keeps every core busy for minutes.

    nice python benchmarks/ingest_throughput.py                 # the full sizes
    nice python benchmarks/ingest_throughput.py --images 2000 --big-rows 100000 --small-rows 10000
    git worktree add /tmp/vlm-base COMMIT && nice python benchmarks/ingest_throughput.py \
        --images 2000 --repeat 5 --skip-i2d --skip-memory --baseline /tmp/vlm-base   # before/after
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
VLM = str(Path(sys.executable).parent / "vlm")
_LABELS = {"vlm": "vlm ingest", "base": "baseline", "i2d": "img2dataset"}
I2D_VERSION = "1.47.0"


def _make_image(args: tuple[int, str]) -> None:
    """One image: a colour gradient with a few shapes, so it compresses like a photo-ish
    picture rather than noise (PNGs stay around 0.2-1 MB)."""
    index, path = args
    rng = np.random.default_rng(index)
    w, h = (int(v) for v in rng.integers(256, 1025, size=2))
    y, x = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    t = ((x / w + y / h) / 2)[..., None]
    pixels = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    if path.endswith(".png"):
        img.save(path, format="PNG", compress_level=6)
    else:
        img.save(path, format="JPEG", quality=90)


def generate_corpus(root: Path, n: int, processes: int) -> list[str]:
    """Relative paths of n images (half JPEG, half PNG), generated unless already cached."""
    names = [f"img/{i // 1000:03d}/{i:06d}.{'png' if i % 2 else 'jpg'}" for i in range(n)]
    marker = root / f"done-{n}.json"
    if marker.exists():
        return names
    for d in {str(Path(p).parent) for p in names}:
        (root / d).mkdir(parents=True, exist_ok=True)
    todo = [(i, str(root / p)) for i, p in enumerate(names) if not (root / p).exists()]
    print(f"generating {len(todo)} images in {root} ...", flush=True)
    start = time.monotonic()
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_make_image, todo, chunksize=64))
    size = sum((root / p).stat().st_size for p in names)
    print(f"  {time.monotonic() - start:.0f} s, {size / 2**20:.0f} MiB", flush=True)
    marker.write_text(json.dumps({"images": n, "bytes": size}))
    return names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """The image server in its own process, so it does not share a GIL with a client."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "demo.server", str(root), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/broken/missing.jpg", timeout=1)
        except urllib.error.HTTPError:
            return proc, url  # a 404: it is up
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the image server did not start")


def write_table(path: Path, urls: list[str]) -> None:
    captions = [f"a synthetic picture number {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path, row_group_size=100_000)


def _timed(cmd: list[str], env=None, cwd: Path = REPO) -> tuple[float, str]:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout + proc.stderr


def run_vlm(table: Path, out: Path, shard_size: int, extra: list[str] = (),
            tree: Path | None = None) -> tuple[float, str]:
    """`vlm data ingest` on a private local Ray with one CPU (one shard task) per core; of
    the source tree ``tree`` (a checkout of another commit, first on the driver's and Ray
    workers' PYTHONPATH) instead of this one when given."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [VLM, "data", "ingest", "--input", str(table), "--output", str(out), "--no-progress",
           "--metrics-port", "-1",
           "--set", f"data.ingest.shard_size={shard_size}", "--set", "data.ingest.image_size=224",
           "--set", "model.vision.image_size=224",
           "--set", "data.ingest.resize_mode=center_crop", "--set", "data.ingest.encode_quality=95",
           "--set", "data.ingest.threads=16", "--set", "data.ingest.fetch.retries=0",
           "--set", "data.ingest.fetch.allow_private_hosts=[127.0.0.1]", *extra]
    if tree is None:
        return _timed(cmd)
    # the other tree's own entry point (cluster/cli.py before the layout change, cluster/cli/main.py after)
    module = "cluster.cli.main" if (tree / "cluster" / "cli" / "main.py").is_file() else "cluster.cli"
    cmd = [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())", *cmd[1:]]
    return _timed(cmd, {**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)


def ensure_i2d(venv: Path) -> Path:
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        print(f"creating {venv} with img2dataset=={I2D_VERSION} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"img2dataset=={I2D_VERSION}"], check=True)
    return exe


def run_i2d(exe: Path, table: Path, out: Path, processes: int, shard_size: int) -> tuple[float, str]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(exe), "--url_list", str(table), "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
           "--processes_count", str(processes), "--thread_count", "16", "--image_size", "224",
           "--resize_mode", "center_crop", "--encode_format", "jpg", "--encode_quality", "95",
           "--number_sample_per_shard", str(shard_size), "--distributor", "multiprocessing",
           "--retries", "0", "--timeout", "20", "--enable_wandb", "False"]
    # albumentations (an img2dataset dependency) asks PyPI for updates at import unless told not to
    return _timed(cmd, {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})


def count_tar_images(out: Path) -> int:
    import tarfile

    n = 0
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            n += sum(1 for m in t if m.name.endswith(".jpg"))
    return n


def peak_rss_mib(output: str) -> float:
    match = re.search(r"driver\s+peak RSS (\d+) MiB", output)
    if not match:
        raise RuntimeError(f"no peak RSS line in:\n{output[-2000:]}")
    return float(match.group(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--images", type=int, default=20_000, help="corpus size (default 20000)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/vlm-ingest-bench"),
                   help="where the corpus is generated and cached, and outputs go")
    p.add_argument("--shard-size", type=int, default=2500, help="samples per shard for both tools")
    p.add_argument("--i2d-venv", type=Path, default=Path("/tmp/i2d-venv"),
                   help=f"virtual environment holding img2dataset=={I2D_VERSION} (created if missing)")
    p.add_argument("--big-rows", type=int, default=1_000_000, help="rows of the large memory run")
    p.add_argument("--small-rows", type=int, default=10_000, help="rows of the small memory run")
    p.add_argument("--repeat", type=int, default=1, help="throughput runs of each tool, alternated; best counts")
    p.add_argument("--baseline", type=Path, metavar="TREE",
                   help="a checkout of the commit to compare with (git worktree add /tmp/vlm-base COMMIT): "
                   "its `vlm data ingest` runs alternately with this tree's on the same table, and the "
                   "ratio of their medians is printed")
    p.add_argument("--skip-i2d", action="store_true", help="do not run img2dataset")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    args.processes = os.cpu_count()  # vlm's local Ray runs one shard task per core
    root = args.cache_dir
    root.mkdir(parents=True, exist_ok=True)

    if not args.skip_throughput:
        names = generate_corpus(root / "corpus", args.images, args.processes)
        exe = None if args.skip_i2d else ensure_i2d(args.i2d_venv)
        if args.baseline is not None and not any((args.baseline / "cluster" / f).is_file()
                                                 for f in ("cli.py", "cli/main.py")):  # before and after the layout change
            p.error(f"--baseline {args.baseline}: not a checkout of this project (no cluster/cli.py or cluster/cli/main.py)")
        server, url = start_server(root / "corpus")
        try:
            table = root / f"urls-{args.images}.parquet"
            write_table(table, [f"{url}/{n}" for n in names])
            print(f"corpus        {args.images} images (JPEG+PNG, 256-1024 px), {args.processes} processes, "
                  f"resize 224 center_crop, webdataset jpg q95", flush=True)
            rates: dict[str, list[float]] = {"vlm": [], "base": [], "i2d": []}
            for rep in range(args.repeat):  # alternated (and the order swapped), so a busy spell hits all alike
                runs = [("vlm", None)] + ([("base", args.baseline)] if args.baseline else [])
                runs += [] if exe is None else [("i2d", None)]
                for tool, tree in (runs if rep % 2 == 0 else runs[::-1]):
                    out = root / f"out-{tool}"
                    if tool == "i2d":
                        t, log = run_i2d(exe, table, out, args.processes, args.shard_size)
                    else:
                        t, log = run_vlm(table, out, args.shard_size, tree=tree)
                    n = count_tar_images(out)
                    rates[tool].append(n / t)
                    own = re.search(r"elapsed\s+([\d.]+) s \(([\d.]+) samples/s\)", log)
                    extra = f"; its own summary {own.group(2)}/s" if tool != "i2d" and own else ""
                    print(f"run {rep + 1}: {_LABELS[tool]:<13} {n} samples in {t:.1f} s ({n / t:.0f}/s{extra})",
                          flush=True)
        finally:
            server.kill()
        for tool in ("vlm", "base", "i2d"):
            if rates[tool]:
                print(f"{_LABELS[tool]:<13} {max(rates[tool]):.0f} samples/s best, {statistics.median(rates[tool]):.0f} "
                      f"median of {len(rates[tool])} (wall time of the command)")
        for other, what in (("i2d", "vlm / img2dataset"), ("base", f"this tree / {args.baseline}")):
            if rates[other]:
                print(f"ratio         {max(rates['vlm']) / max(rates[other]):.2f}x best, "
                      f"{statistics.median(rates['vlm']) / statistics.median(rates[other]):.3f}x medians ({what})")
                if args.repeat >= 2:  # best against best hides the spread; say it
                    runs = ", ".join(f"{v / o:.2f}x" for v, o in zip(rates["vlm"], rates[other]))
                    print(f"run by run    {runs}")

    if not args.skip_memory:
        port = _free_port()  # closed: every row fails at connect
        peaks = {}
        for rows in (args.small_rows, args.big_rows):
            table = root / f"closed-{rows}.parquet"
            if not table.exists():
                write_table(table, [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(rows)])
            t, out = run_vlm(table, root / f"out-mem-{rows}", 10_000,
                             ["--set", "data.ingest.fetch.connect_timeout_s=1"])
            peaks[rows] = peak_rss_mib(out)
            print(f"memory        {rows:>9} rows: driver peak RSS {peaks[rows]:.0f} MiB ({t:.0f} s)", flush=True)
        ratio = peaks[args.big_rows] / peaks[args.small_rows]
        print(f"memory ratio  {ratio:.2f}x ({args.big_rows} rows / {args.small_rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
