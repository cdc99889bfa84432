"""Throughput of `vlm data ingest` against img2dataset, and the ingest driver's memory.

A single corpus and a single server flatter one tool or the other: a highly compressible
corpus makes downloads and PNG decodes cheap, and a keep-alive server spares the client a
TCP handshake per image (img2dataset opens a connection per request either way). So:

1. Generates (once, cached in --cache-dir) two corpora of N images each, half JPEG
   (quality 90) and half PNG:
   - ``compressible``: colour gradients with a few flat shapes, 256-1024 px a side
     (about 51 MiB per 2,000 images);
   - ``photo``: photo-like content, a smooth colour field under multi-scale texture,
     200-1200 px a side, whose PNGs are as large as photographs' (about 880 MiB per
     2,000 images).
2. Serves each from its own process on 127.0.0.1 in two ways: ``keep-alive`` (the
   project's demo server, HTTP/1.1, connections reused) and ``close`` (the standard
   library's plain ThreadingHTTPServer, HTTP/1.0: one connection per request).
3. For each (corpus, server) runs `vlm data ingest` and img2dataset (the PyPI package, in
   its own virtual environment, --i2d-venv, created on first use) --repeat times,
   alternated (the order swapped every repeat, so a busy spell hits both alike), on the
   same table with the same settings: one process per core (`vlm data ingest --backend
   local --processes CORES`; img2dataset's multiprocessing distributor), 16 download
   threads each, shards of --shard-size rows (default
   N / cores, so every core has a shard), no retries, resize to 224 (center crop) into
   webdataset shards of JPEG quality 95. Each run's time is the command's wall time,
   start-up and shutdown included; its rate is the images in its tars over that time.
   Prints the medians and, per combination, the line
   ``ingest ratio of medians (CORPUS, SERVER): R`` (vlm's samples/s over img2dataset's).
   With --ray, `vlm data ingest --backend ray` (a private local Ray, one task per core)
   runs too, in the same rotation, and its ratio to img2dataset is printed as well.
   With --baseline TREE (a checkout of another commit) that tree's `vlm data ingest` runs
   too, in the same rotation, and the ratio of vlm's medians to its is printed.
4. Runs `vlm data ingest` over a 1,000,000-row and a 10,000-row table whose URLs point at
   a closed loopback port (every row fails fast with connection_error) and prints the
   driver's peak RSS for each and their ratio.

Nothing leaves 127.0.0.1. Run with `nice`: it keeps every core busy for minutes.

    nice python benchmarks/ingest_throughput.py --skip-memory                  # 2,000 images, 5 repeats
    nice python benchmarks/ingest_throughput.py --skip-memory --ray            # and vlm on a private Ray
    nice python benchmarks/ingest_throughput.py --images 400 --repeat 1 --corpora photo --skip-memory
    nice python benchmarks/ingest_throughput.py --skip-throughput             # the memory runs only
    git worktree add /tmp/vlm-base COMMIT && nice python benchmarks/ingest_throughput.py \
        --repeat 5 --skip-i2d --skip-memory --baseline /tmp/vlm-base           # before/after
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
_LABELS = {"vlm": "vlm ingest", "ray": "vlm on Ray", "base": "baseline", "i2d": "img2dataset"}
I2D_VERSION = "1.47.0"
CORPORA = ("compressible", "photo")
SERVERS = ("keep-alive", "close")


def _compressible_image(rng: np.random.Generator) -> Image.Image:
    """A colour gradient with a few flat shapes: PNGs of 0.02-0.1 MB."""
    w, h = (int(v) for v in rng.integers(256, 1025, size=2))
    y, x = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    t = ((x / w + y / h) / 2)[..., None]
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def _photo_image(rng: np.random.Generator) -> Image.Image:
    """A smooth colour field (a 4x4 grid of colours, upsampled) under texture at four
    scales, from blotches to grain, mostly luminance as in photographs: PNGs of about
    0.8 MB on average, JPEGs (quality 90) of about 0.1 MB, as photographs of these sizes."""
    w, h = (int(v) for v in rng.integers(200, 1201, size=2))
    field = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    for cell, amplitude in ((64, 24.0), (16, 16.0), (4, 6.0), (1, 3.0)):
        cw, ch = max(1, w // cell), max(1, h // cell)
        noise = rng.normal(0, amplitude, (ch, cw, 1)) + rng.normal(0, amplitude / 3, (ch, cw, 3))
        if cell > 1:  # smooth texture at this scale: upsample bilinearly
            tile = Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8))
            noise = np.asarray(tile.resize((w, h), Image.Resampling.BILINEAR), np.float32) - 128
        pixels += noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _make_image(args: tuple[str, int, str]) -> None:
    corpus, index, path = args
    rng = np.random.default_rng(index)
    img = (_photo_image if corpus == "photo" else _compressible_image)(rng)
    if path.endswith(".png"):
        img.save(path, format="PNG", compress_level=6)
    else:
        img.save(path, format="JPEG", quality=90)


def generate_corpus(root: Path, corpus: str, n: int, processes: int) -> tuple[list[str], int]:
    """(relative paths, total bytes) of n images of ``corpus`` (half JPEG, half PNG),
    generated unless already cached."""
    names = [f"img/{i // 1000:03d}/{i:06d}.{'png' if i % 2 else 'jpg'}" for i in range(n)]
    marker = root / f"done-{n}.json"
    if marker.exists():
        return names, json.loads(marker.read_text())["bytes"]
    for d in {str(Path(p).parent) for p in names}:
        (root / d).mkdir(parents=True, exist_ok=True)
    todo = [(corpus, i, str(root / p)) for i, p in enumerate(names) if not (root / p).exists()]
    print(f"generating {len(todo)} {corpus} images in {root} ...", flush=True)
    start = time.monotonic()
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_make_image, todo, chunksize=16))
    size = sum((root / p).stat().st_size for p in names)
    print(f"  {time.monotonic() - start:.0f} s, {size / 2**20:.0f} MiB", flush=True)
    marker.write_text(json.dumps({"images": n, "bytes": size}))
    return names, size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, kind: str) -> tuple[subprocess.Popen, str]:
    """An image server for ``root`` in its own process (so it shares no GIL with a client):
    ``keep-alive``: the project's demo server (HTTP/1.1, TCP_NODELAY); ``close``: the
    standard library's ThreadingHTTPServer with its default HTTP/1.0 handler, which closes
    the connection after every response."""
    port = _free_port()
    if kind == "keep-alive":
        cmd = [sys.executable, "-m", "demo.server", str(root), "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/broken/missing.jpg", timeout=1)
        except urllib.error.HTTPError:
            return proc, url  # a 404: it is up
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the {kind} image server did not start")


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
    """`vlm data ingest` with ``extra`` arguments (this tree's: its backend); of the source
    tree ``tree`` (a checkout of another commit, first on the driver's and its workers'
    PYTHONPATH, with its own default backend) instead of this one when given."""
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


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(a) / statistics.median(b)


def throughput(args, exe: Path | None) -> None:
    """The alternated runs of every (corpus, server) combination, then their medians."""
    root = args.cache_dir
    combos, servers, tables = [], [], {}
    try:
        for corpus in args.corpora:
            names, size = generate_corpus(root / f"corpus-{corpus}", corpus, args.images, args.processes)
            print(f"corpus {corpus}: {args.images} images (half JPEG, half PNG), {size / 2**20:.0f} MiB",
                  flush=True)
            for kind in args.servers:
                proc, url = start_server(root / f"corpus-{corpus}", kind)
                servers.append(proc)
                tables[corpus, kind] = root / f"urls-{corpus}-{kind}-{args.images}.parquet"
                write_table(tables[corpus, kind], [f"{url}/{n}" for n in names])
                combos.append((corpus, kind))
        print(f"{args.processes} processes x 16 threads, {args.shard_size} rows per shard, resize 224 "
              f"center_crop, webdataset jpg q95, no retries; rates: images in the tars / wall time "
              f"of the command", flush=True)
        rates = {(c, tool): [] for c in combos for tool in _LABELS}
        tools = (["vlm"] + (["ray"] if args.ray else []) + (["base"] if args.baseline else [])
                 + (["i2d"] if exe else []))
        for rep in range(args.repeat):
            for combo in combos:
                for tool in (tools if rep % 2 == 0 else tools[::-1]):
                    out = root / f"out-{tool}"
                    if tool == "i2d":
                        t, _ = run_i2d(exe, tables[combo], out, args.processes, args.shard_size)
                    else:
                        backend = {"vlm": ["--backend", "local", "--processes", str(args.processes)],
                                   "ray": ["--backend", "ray"], "base": []}[tool]
                        t, _ = run_vlm(tables[combo], out, args.shard_size, backend,
                                       tree=args.baseline if tool == "base" else None)
                    n = count_tar_images(out)
                    rates[combo, tool].append(n / t)
                    print(f"run {rep + 1} {combo[0]:<12} {combo[1]:<10} {_LABELS[tool]:<11} {n} samples "
                          f"in {t:5.1f} s ({n / t:4.0f}/s)", flush=True)
    finally:
        for proc in servers:
            proc.kill()
    for combo in combos:
        for tool in tools:
            r = rates[combo, tool]
            print(f"median {combo[0]:<12} {combo[1]:<10} {_LABELS[tool]:<11} {statistics.median(r):4.0f} "
                  f"samples/s (runs: {', '.join(f'{v:.0f}' for v in r)})")
    for combo in combos:
        if exe:
            runs = ", ".join(f"{v / o:.2f}" for v, o in zip(rates[combo, "vlm"], rates[combo, "i2d"]))
            print(f"ingest ratio of medians ({combo[0]}, {combo[1]}): "
                  f"{_median_ratio(rates[combo, 'vlm'], rates[combo, 'i2d']):.2f} (run by run {runs})")
        if exe and args.ray:
            print(f"ingest ratio of medians on Ray ({combo[0]}, {combo[1]}): "
                  f"{_median_ratio(rates[combo, 'ray'], rates[combo, 'i2d']):.2f}")
        if args.baseline:
            print(f"baseline ratio of medians ({combo[0]}, {combo[1]}): "
                  f"{_median_ratio(rates[combo, 'vlm'], rates[combo, 'base']):.2f} (this tree / {args.baseline})")


def memory(args) -> None:
    port = _free_port()  # closed: every row fails at connect
    peaks = {}
    for rows in (args.small_rows, args.big_rows):
        table = args.cache_dir / f"closed-{rows}.parquet"
        if not table.exists():
            write_table(table, [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(rows)])
        t, out = run_vlm(table, args.cache_dir / f"out-mem-{rows}", 10_000,
                         ["--set", "data.ingest.fetch.connect_timeout_s=1"])
        peaks[rows] = peak_rss_mib(out)
        print(f"memory        {rows:>9} rows: driver peak RSS {peaks[rows]:.0f} MiB ({t:.0f} s)", flush=True)
    ratio = peaks[args.big_rows] / peaks[args.small_rows]
    print(f"memory ratio  {ratio:.2f}x ({args.big_rows} rows / {args.small_rows} rows)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--images", type=int, default=2000, help="images per corpus (default 2000)")
    p.add_argument("--corpora", nargs="+", choices=CORPORA, default=list(CORPORA))
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/vlm-ingest-bench"),
                   help="where the corpora are generated and cached, and outputs go")
    p.add_argument("--shard-size", type=int,
                   help="rows per shard for both tools (default: images / cores, so every core has one)")
    p.add_argument("--i2d-venv", type=Path, default=Path("/tmp/i2d-venv"),
                   help=f"virtual environment holding img2dataset=={I2D_VERSION} (created if missing)")
    p.add_argument("--big-rows", type=int, default=1_000_000, help="rows of the large memory run")
    p.add_argument("--small-rows", type=int, default=10_000, help="rows of the small memory run")
    p.add_argument("--repeat", type=int, default=5, help="runs of each tool per combination, alternated")
    p.add_argument("--baseline", type=Path, metavar="TREE",
                   help="a checkout of the commit to compare with (git worktree add /tmp/vlm-base COMMIT): "
                   "its `vlm data ingest` runs in turn with this tree's on the same tables, and the "
                   "ratio of their medians is printed")
    p.add_argument("--ray", action="store_true",
                   help="also run `vlm data ingest --backend ray` (a private local Ray, one task per core) "
                   "in the rotation and print its ratio to img2dataset")
    p.add_argument("--skip-i2d", action="store_true", help="do not run img2dataset")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    args.processes = os.cpu_count()  # one shard process per core (Ray: one task per core)
    args.shard_size = args.shard_size or -(-args.images // args.processes)
    if args.baseline is not None and not any((args.baseline / "cluster" / f).is_file()
                                             for f in ("cli.py", "cli/main.py")):  # before and after the layout change
        p.error(f"--baseline {args.baseline}: not a checkout of this project "
                "(no cluster/cli.py or cluster/cli/main.py)")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    if not args.skip_throughput:
        throughput(args, None if args.skip_i2d else ensure_i2d(args.i2d_venv))
    if not args.skip_memory:
        memory(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
