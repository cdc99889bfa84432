"""`vlm data ingest` checks what it can before Ray starts (columns, output, empty table), does
not retry a shard that would only fail again, and stores images whose size is independent of
the model: training and evaluation centre-crop and resize shards of any size."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.cli.main import main
from cluster.ray.session import ray_session
from data_pipeline.config import FetchConfig, IngestConfig, InputError
from demo.config import CorpusConfig
from data_pipeline.ingest.driver import ShardFailed, check_writable, ingest, preflight
from data_pipeline.shards.reader import ShardReader
from data_pipeline.shards.samples import list_shards
from demo.server import ImageServer
from demo.corpus import generate_corpus
from data_pipeline.shards.write import write_samples
from vlm.config import load_config
from vlm.data.batches import BatchLoader
from vlm.eval.datasets import EvalItem, load_image
from vlm.data.tokenizer import TextEncoder, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"url": "http://127.0.0.1:9/a.jpg", "caption": "a red circle"},
        {"url": "http://127.0.0.1:9/b.jpg", "caption": "a blue square"}]


def _ingest_cli(table: Path, out: Path, *extra: str) -> int:
    return main(["data", "ingest", "--input", str(table), "--output", str(out), "--no-progress",
                 "--metrics-port", "-1", *extra])


def _write(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix in (".csv", ".tsv"):
        pacsv.write_csv(table, path, pacsv.WriteOptions(delimiter="\t" if path.suffix == ".tsv" else ","))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    return path


# ---------------------------------------------------------------- before Ray


def test_missing_url_column_exits_2_in_seconds_without_ray(tmp_path):
    """In a fresh interpreter: the command fails naming the column, and Ray was never imported."""
    table = _write(pa.table({"link": ["http://x/1.jpg"], "caption": ["a cat"]}), tmp_path / "t.csv")
    code = ("import sys; from cluster.cli.main import main; "
            f"rc = main(['data', 'ingest', '--input', {str(table)!r}, '--output', {str(tmp_path / 'out')!r}, "
            "'--no-progress', '--metrics-port', '-1']); print('ray imported:', 'ray' in sys.modules); sys.exit(rc)")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no column 'url'" in proc.stderr and "data.ingest.url_col" in proc.stderr and str(table) in proc.stderr
    assert "ray imported: False" in proc.stdout
    assert elapsed < 15  # interpreter and imports; Ray's start alone took ~20 s for the user


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".jsonl"])
def test_missing_caption_column_is_found_in_every_format(tmp_path, suffix):
    table = _write(pa.table({"url": ["http://x/1.jpg"], "text": ["a cat"]}), tmp_path / f"t{suffix}")
    with pytest.raises(InputError, match=r"no column 'caption' \(data.ingest.caption_col\).*'text'"):
        preflight(str(table), str(tmp_path / "out"), IngestConfig())
    assert not (tmp_path / "out").exists()  # the output is not touched before the table passes
    cfg = IngestConfig(caption_col="text")
    assert preflight(str(table), str(tmp_path / "out"), cfg) is True
    assert list((tmp_path / "out").iterdir()) == []  # the probe file is gone


def test_configured_caption_column_missing_exits_2(tmp_path, capsys):
    table = _write(pa.Table.from_pylist(ROWS), tmp_path / "t.parquet")
    assert _ingest_cli(table, tmp_path / "out", "--set", "data.ingest.caption_col=alt_text") == 2
    err = capsys.readouterr().err
    assert "no column 'alt_text'" in err and "data.ingest.caption_col" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_output_directory_exits_2_naming_it(tmp_path, capsys):
    table = _write(pa.Table.from_pylist(ROWS), tmp_path / "t.parquet")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert _ingest_cli(table, out) == 2
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err
    assert str(out) in err and "cannot write" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_output_under_a_file_exits_2_naming_it(tmp_path, capsys):
    """An output that cannot be a directory (also as root, where chmod does not bind)."""
    table = _write(pa.Table.from_pylist(ROWS), tmp_path / "t.parquet")
    (tmp_path / "plain").write_text("not a directory")
    out = tmp_path / "plain" / "shards"
    assert _ingest_cli(table, out) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "cannot write" in err
    with pytest.raises(InputError, match="cannot write"):
        check_writable(str(tmp_path / "plain"))


@pytest.mark.parametrize("content", ["url,caption\n", ""])
def test_empty_table_warns_and_exits_cleanly(tmp_path, capsys, content):
    (tmp_path / "t.csv").write_text(content)
    assert _ingest_cli(tmp_path / "t.csv", tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "no rows" in captured.err and str(tmp_path / "t.csv") in captured.err
    assert not (tmp_path / "out").exists()


def test_ingest_config_needs_no_model():
    assert IngestConfig().image_size == 256
    cfg = load_config(None, ["data.ingest.image_size=224"])
    assert (cfg.data.ingest.image_size, cfg.model.vision.image_size) == (224, 32)


# ---------------------------------------------------------------- no retry of what would fail again


def test_a_deterministic_shard_failure_is_attempted_once(tmp_path):
    corpus = generate_corpus(CorpusConfig(num_train=6, num_heldout=0, image_size=32), tmp_path / "corpus")
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.tar").mkdir()  # the shard's tar can never be renamed into place
    with ImageServer(corpus.root) as server:
        rows = [{"url": f"{server.url}/{r['path']}", "caption": r["caption"]} for r in corpus.records]
        table = _write(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
        cfg = IngestConfig(shard_size=8, threads=4, image_size=32, task_retries=3,
                           fetch=FetchConfig(retries=0, allow_private_hosts=["127.0.0.1"]))
        with ray_session(lean=True), pytest.raises(ShardFailed) as failed:
            ingest(str(table), str(out), cfg, progress=False)
        assert server.request_count == len(rows)  # one attempt: every row fetched once, not 4 times
    message = str(failed.value)
    assert "shard 00000" in message and str(out / "00000.tar") in message
    assert "not retried" in message and "IsADirectoryError" in message


# ---------------------------------------------------------------- shards of any size, named bad samples


def _stripes(width: int, height: int) -> bytes:
    """Green in the centre square, red and blue in the side bands a squashing resize keeps."""
    img = Image.new("RGB", (width, height), (0, 255, 0))
    band = (width - height) // 2
    img.paste((255, 0, 0), (0, 0, band, height))
    img.paste((0, 0, 255), (width - band, 0, width, height))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _shard(directory: Path, samples: list[dict]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "00000.tar", "wb") as f:
        write_samples(f, samples)
    (directory / "00000_stats.json").write_text(json.dumps({"success": len(samples)}))
    return str(directory / "00000.tar")


def _text() -> TextEncoder:
    return TextEncoder(train_tokenizer(["a green square", "a red circle"] * 5, vocab_size=60), 8)


def test_64_px_shards_train_a_32_px_model_centre_cropped(tmp_path):
    samples = [{"__key__": f"k{i}", "png": _stripes(96, 64) if i % 2 else _stripes(64, 64),
                "txt": "a green square", "json": {"i": i}} for i in range(4)]
    _shard(tmp_path / "s", samples)
    reader = ShardReader(list_shards(str(tmp_path / "s")), shuffle_block=1)
    batch = BatchLoader(reader, _text(), batch_size=4, image_size=32).next_batch()
    rgb = batch["images"].permute(0, 3, 1, 2).float()  # the loader's uint8 [B, S, S, 3]
    assert rgb.shape == (4, 3, 32, 32)
    assert rgb[:, 1].min() > 200  # green everywhere: the centre square, not the side bands
    assert rgb[:, 0].mean() < 10 and rgb[:, 2].mean() < 10

    item = EvalItem(key="k1", captions=[], label=None, image=_stripes(96, 64))
    evaluated = load_image(item, 32).permute(2, 0, 1).float()
    assert evaluated.shape == (3, 32, 32) and evaluated[1].min() > 200 and evaluated[0].mean() < 10


def test_shards_at_the_model_size_are_used_as_they_are(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    _shard(tmp_path / "s", [{"__key__": "k0", "png": buf.getvalue(), "txt": "a red circle", "json": {}}])
    reader = ShardReader(list_shards(str(tmp_path / "s")), shuffle_block=1)
    images = BatchLoader(reader, _text(), batch_size=1, image_size=32).next_batch()["images"]
    assert np.array_equal(images[0].numpy(), pixels)


def test_a_caption_that_is_not_utf8_is_a_bad_sample_naming_shard_and_key(tmp_path, capsys):
    good = {"txt": "a green square", "json": {}, "png": _stripes(32, 32)}
    tar = _shard(tmp_path / "s", [{"__key__": "good0", **good}, {"__key__": "latin1", **good, "txt": b"caf\xe9"},
                                  {"__key__": "good1", **good}])
    reader = ShardReader(list_shards(str(tmp_path / "s")), shuffle_block=1)
    loader = BatchLoader(reader, _text(), batch_size=2, image_size=32)
    assert loader.next_batch()["images"].shape[0] == 2
    assert loader.bad_counts == {"bad_caption": 1}
    out = capsys.readouterr().out
    assert "sample latin1 in " + tar in out and "latin1.txt is not UTF-8" in out


def test_cli_names_the_path_of_an_os_error(tmp_path, capsys):
    """`vlm data inspect --json DIR`: the IsADirectoryError is reported (exit 1) with its path."""
    _shard(tmp_path / "s", [{"__key__": "k0", "txt": "a green square", "json": {}, "png": _stripes(32, 32)}])
    (tmp_path / "summary.json").mkdir()
    assert main(["data", "inspect", str(tmp_path / "s"), "--json", str(tmp_path / "summary.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vlm: error:") and str(tmp_path / "summary.json") in err
