"""Bad samples in untrusted shards and eval data: a decompression bomb (a 140 KB PNG of 144
megapixels), a truncated JPEG, a sample with no image, no caption, a caption that is not
UTF-8, metadata that does not parse. Training skips and counts them (step log, Prometheus)
and resumes exactly; mostly broken data ends the run naming the shards; `vlm eval` and
`vlm caption` fail with an error naming the item (as they do for any bad input); `vlm data
inspect` leaves them out of the contact sheet and says so."""
from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch

from support.badshards import add_to_shard, bad_samples, bomb_png, truncated_jpeg, write_bad_shard
from data_pipeline.shards.reader import ShardReader
from data_pipeline.shards.samples import list_shards
from support.shardgen import TINY_MODEL, write_shards
from vlm.data.batches import BadDataError, BatchLoader, check_sample
from vlm.data.tokenizer import TextEncoder, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
BAD = bad_samples()
REASON = {key: reason for key, (_, reason) in BAD.items()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """2 shards of 12 good samples; the first also holds one bad sample of every kind."""
    d = tmp_path_factory.mktemp("bad")
    tars = write_shards(d, n=24, per_shard=12)
    add_to_shard(tars[0], {key: parts for key, (parts, _) in BAD.items()}, every=2)
    return d


@pytest.fixture(scope="module")
def text():
    return TextEncoder(train_tokenizer(["a red square", "a blue circle", "a black square"] * 5, vocab_size=80), 16)


def loader(shards: Path, text, **kw) -> BatchLoader:
    reader = ShardReader(list_shards(str(shards)), seed=5, shuffle_block=8)
    return BatchLoader(reader, text, batch_size=4, image_size=32, label_field="label", **kw)


def test_loader_skips_and_counts_every_kind_of_bad_sample(shards, text, capsys):
    n_batches = 15  # 60 good samples: the 30-sample epoch twice and more
    ld = loader(shards, text)
    batches = [ld.next_batch() for _ in range(n_batches)]
    assert all(b["images"].shape == (4, 32, 32, 3) and b["images"].dtype == torch.uint8 for b in batches)
    # the same reader alone: which samples the loader must have consumed to find 60 good ones
    twin_reader = ShardReader(list_shards(str(shards)), seed=5, shuffle_block=8)
    twin, consumed, good = iter(twin_reader), [], 0
    while good < 4 * n_batches:
        consumed.append(next(twin)["__key__"])
        good += consumed[-1] not in BAD
    twin_state = twin_reader.state_dict()
    expected = Counter(REASON[k] for k in consumed if k in BAD)
    assert set(expected) == set(REASON.values()) and sum(expected.values()) >= len(BAD) * 2
    assert ld.bad_counts == expected
    # the reader's position counts the skipped samples: it is the twin's after the same reads
    assert {k: v for k, v in ld.state_dict().items() if not k.startswith(("bad_", "batches"))} == twin_state
    out = capsys.readouterr().out
    bomb_shard = list_shards(str(shards))[0]
    assert f"warning: rank 0: skipped too_many_pixels: sample badbomb in {bomb_shard}: 12000x12000 > " in out
    for key, reason in REASON.items():
        assert f"skipped {reason}: sample {key} in {bomb_shard}" in out


def test_loader_position_counts_skipped_samples_and_resumes_exactly(shards, text):
    whole = loader(shards, text)
    expected = [whole.next_batch() for _ in range(12)]
    first = loader(shards, text)
    for _ in range(5):
        first.next_batch()
    assert sum(first.bad_counts.values()) > 0, "no bad sample before the save: nothing tested"
    state = json.loads(json.dumps(first.state_dict()))  # states travel through checkpoints as plain data
    second = loader(shards, text)
    second.load_state_dict(state)
    for want in expected[5:]:
        got = second.next_batch()
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert second.bad_counts == whole.bad_counts
    assert second.state_dict() == whole.state_dict()


def test_mostly_broken_data_ends_with_an_error_naming_the_shards(tmp_path, text):
    tars = write_shards(tmp_path, n=8, per_shard=4)
    add_to_shard(tars[1], {f"bomb{i}": {"png": bomb_png(), "txt": b"x"} for i in range(12)}, every=1)
    ld = loader(tmp_path, text, max_bad_ratio=0.5, bad_window=10)
    with pytest.raises(BadDataError, match=r"rank 0: \d+ of the last 10 samples read were bad \(data."
                       r"max_bad_sample_ratio: 0.5; by reason so far: too_many_pixels \d+\); the data is "
                       rf"broken in {re.escape(str(tars[1]))} \(\d+ bad\)"):
        for _ in range(10):
            ld.next_batch()
    # a cap of 1.0 tolerates any share but a window of bad samples only, which can fill no batch
    ld = loader(tmp_path, text, max_bad_ratio=1.0, bad_window=20)  # a good shard between each 12 bombs
    for _ in range(10):
        ld.next_batch()
    assert ld.bad_counts["too_many_pixels"] > 20
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    write_bad_shard(only_bad / "00000.tar", {f"t{i}": BAD["badtrunc"][0] for i in range(3)})
    ld = loader(only_bad, text, max_bad_ratio=1.0, bad_window=10)
    with pytest.raises(BadDataError, match=r"10 of the last 10 samples read were bad .*: decode_error 10\)"):
        ld.next_batch()


def test_pixel_budget_is_configurable_and_read_from_the_header(shards, text):
    sample = {"__key__": "k", "__shard__": "s.tar", "txt": "a", "png": bomb_png()}
    code = ("import resource, sys; sys.path.insert(0, 'tests'); from support.badshards import bomb_png; "
            "from vlm.data.batches import check_sample, BadSample; data = bomb_png(); "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    check_sample({'__key__': 'k', 'txt': 'a', 'png': data})\n"
            "except BadSample as e:\n    print(e.reason)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    reason, grown_mb = proc.stdout.split()
    assert reason == "too_many_pixels" and int(grown_mb) < 50, proc.stdout + proc.stderr  # decoding it: ~600 MB
    with pytest.raises(ValueError, match="sample k in s.tar: 12000x12000 > 50000000 pixels"):
        check_sample(sample)
    small = next(s for s in ShardReader(list_shards(str(shards))) if "jpg" in s and "__bad__" not in s)
    assert check_sample(small).size == (32, 32)
    with pytest.raises(ValueError, match=r"32x32 > 1000 pixels"):
        check_sample(small, max_pixels=1000)
    ld = loader(shards, text, max_pixels=1000, bad_window=10_000)
    with pytest.raises(BadDataError, match="too_many_pixels"):
        ld.next_batch()


def test_metrics_count_bad_samples_by_reason():
    from vlm.observe.metrics import BAD_REASONS, TrainMetrics

    m = TrainMetrics(run="b", rank=0, host="127.0.0.1", port=0, objectives=["clip_infonce"])
    try:
        before = urllib.request.urlopen(m.url, timeout=5).read().decode()
        for reason in BAD_REASONS:  # every reason is a series from the first scrape
            assert f'vlm_train_bad_samples_total{{rank="0",reason="{reason}",run="b"}} 0.0' in before
        for bad in ({"too_many_pixels": 2, "no_image": 1}, {"too_many_pixels": 1}, {}):
            m.record_step(step=1, samples=8, step_s=0.1, wait_s=0.0, lr=1e-3, losses={"total": 1.0},
                          bad_samples=bad)
        after = urllib.request.urlopen(m.url, timeout=5).read().decode()
        assert 'vlm_train_bad_samples_total{rank="0",reason="too_many_pixels",run="b"} 3.0' in after
        assert 'vlm_train_bad_samples_total{rank="0",reason="no_image",run="b"} 1.0' in after
    finally:
        m.close()


# ---- eval, caption, inspect ----------------------------------------------------------------


def test_eval_folder_and_csv_with_a_bomb_fail_naming_the_image(tmp_path):
    """`vlm eval` fails on any bad input (a missing file, an undecodable image) with an error
    naming it; a bomb is one more such input, refused before its pixels are decoded."""
    from PIL import Image

    from support.evalsets import tiny_model, write_csv_set
    from vlm.eval.runner import evaluate_model

    model, text_enc, cfg = tiny_model()
    folder = tmp_path / "folder"
    for cls in ("red star", "blue cross"):
        (folder / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(folder / cls / f"{i}.jpg")
    (folder / "red star" / "bomb.png").write_bytes(bomb_png())
    with pytest.raises(ValueError, match=r"red star/bomb\.png: the image has too many pixels \(12000x12000 > "
                                         r"50000000 pixels; the budget is data.ingest.max_pixels\)"):
        evaluate_model(model, text_enc, cfg.eval, str(folder), image_size=16)
    table = write_csv_set(tmp_path / "csv", 4)
    image, mask = tmp_path / "csv" / "img" / "1.png", tmp_path / "csv" / "img" / "2.mask.png"
    good = image.read_bytes()
    image.write_bytes(bomb_png())
    with pytest.raises(ValueError, match=r"data\.csv line 3: the image has too many pixels"):
        evaluate_model(model, text_enc, cfg.eval, str(table), image_size=16)
    image.write_bytes(truncated_jpeg())
    with pytest.raises(ValueError, match=r"data\.csv line 3: cannot decode the image \(OSError"):
        evaluate_model(model, text_enc, cfg.eval, str(table), image_size=16)
    image.write_bytes(good)
    mask.write_bytes(bomb_png())
    with pytest.raises(ValueError, match=r"data\.csv line 4: the mask has too many pixels"):
        evaluate_model(model, text_enc, cfg.eval, str(table), image_size=16)


def test_eval_and_caption_shards_name_the_bad_sample(shards, tmp_path):
    from vlm.eval.datasets import iter_items, load_image
    from vlm.eval.generative import read_samples

    with pytest.raises(ValueError, match=r"sample badbomb in .*00000\.tar: 12000x12000 > 50000000 pixels"):
        read_samples(str(shards), image_size=32, label_template="{label}")  # what `vlm caption` reads
    tar, = write_shards(tmp_path, n=3, per_shard=3)
    add_to_shard(tar, {"badlatin1": BAD["badlatin1"][0]})
    with pytest.raises(ValueError, match=r"sample badlatin1 in .*00000\.tar: badlatin1\.txt is not UTF-8"):
        list(iter_items(str(tmp_path), label_template="{label}", payload=False))
    bomb = next(i for i in iter_items(str(shards), label_template="{label}") if i.key == "badbomb")
    with pytest.raises(ValueError, match=r"sample badbomb in .*: the image has too many pixels"):
        load_image(bomb, 32)


def test_inspect_reports_the_bomb_and_does_not_crash(shards, tmp_path, capsys):
    from cluster.cli.main import main

    sheet = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(shards), "--contact-sheet", str(sheet), "--images", "100"]) == 0
    out = capsys.readouterr().out
    assert f"contact sheet of 27 images: {sheet}" in out and sheet.is_file()
    assert "left out 2 image(s) that are over the pixel budget or do not decode:" in out
    assert re.search(r"badbomb in .*00000\.tar: too_many_pixels \(12000x12000 > 50000000 pixels\)", out)
    assert re.search(r"badtrunc in .*00000\.tar: decode_error", out)


# ---- the real engine (python -m vlm.train.trainer per rank, as in test_engine_resume) -------------


@pytest.fixture(scope="module")
def engine_data(shards, tmp_path_factory):
    from vlm.data.tokenizer import prepare_tokenizer
    from vlm.config import load_config

    root = tmp_path_factory.mktemp("bad_engine")
    cfg = load_config(None, [*TINY_MODEL, f"run_dir={root / 'tok'}", f"data.train_shards={shards}"])
    prepare_tokenizer(cfg)  # reads every caption, the non-UTF-8 one included
    return root, shards, root / "tok" / "tokenizer.json"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_training_skips_bad_samples_and_resumes_exactly(engine_data):
    from test_engine_resume import losses, new_run, run

    root, shards, tok = engine_data
    flat = "optim.min_lr_ratio=1"  # a constant rate after warmup: a 4-step run is the start of an 8-step one
    whole = new_run(root, "whole", tok)
    out = run(whole, shards, 1, "train.steps=8", "train.checkpoint_every=4", flat)
    rows = _rows(whole)
    assert [r["step"] for r in rows] == list(range(1, 9))
    last = rows[-1]
    for reason in set(REASON.values()):  # 256 good samples: the 30-sample epoch 8 times and more
        assert last[f"bad_samples/{reason}"] >= 8, last
    assert last["bad_samples"] == sum(last[f"bad_samples/{r}"] for r in set(REASON.values()))
    assert all(a["bad_samples"] <= b["bad_samples"] for a, b in itertools.pairwise(rows))
    assert re.search(r"warning: rank 0: skipped too_many_pixels: sample badbomb in \S+00000\.tar: 12000x12000", out)
    assert "further bad samples are counted, not named" not in out  # under 100 of them

    resumed = new_run(root, "resumed", tok)
    run(resumed, shards, 1, "train.steps=4", "train.checkpoint_every=4", flat)
    out = run(resumed, shards, 1, "train.steps=8", "train.checkpoint_every=4", flat, resume="latest")
    assert "at step 4" in out
    a, b = losses(whole), losses(resumed)
    for step in range(5, 9):  # the same samples after the resume, bad ones skipped alike: the same floats
        assert a[step] == b[step], f"step {step}: {a[step]!r} != {b[step]!r}"
    assert {k: v for k, v in _rows(resumed)[-1].items() if k.startswith("bad_samples")} == \
        {k: v for k, v in last.items() if k.startswith("bad_samples")}


@pytest.mark.e2e
def test_training_exports_bad_samples_and_keeps_running(engine_data):
    from test_engine_resume import launch, new_run

    root, shards, tok = engine_data
    d = new_run(root, "metrics", tok)
    proc, = launch(d, shards, 1, "train.steps=100000", "train.checkpoint_every=100000", "metrics.enabled=true",
                   "metrics.port=0", "train.log_every=1")
    try:
        log, deadline, row = d / "train_log.jsonl", time.monotonic() + 240, {}
        while time.monotonic() < deadline and proc.poll() is None and \
                not all(row.get(f"bad_samples/{r}") for r in REASON.values()):
            time.sleep(0.1)
            row = _rows(d)[-1] if log.is_file() and log.read_text().strip() else {}
        assert proc.poll() is None, "the run ended on bad samples"
        url = json.loads((d / "metrics" / "rank0.json").read_text())["url"]
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        for reason in set(REASON.values()):
            m = re.search(rf'vlm_train_bad_samples_total{{rank="0",reason="{reason}",run="[^"]+"}} (\S+)', body)
            assert m and float(m.group(1)) >= row[f"bad_samples/{reason}"] > 0, (reason, row)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    out = "\n".join(f.read_text() for f in d.glob("rank*.out"))
    assert proc.returncode == 128 + signal.SIGTERM and "stop requested (SIGTERM)" in out, out[-3000:]


@pytest.mark.e2e
def test_training_on_mostly_broken_shards_ends_with_a_clear_error(engine_data, tmp_path):
    from test_engine_resume import launch, new_run

    root, _, tok = engine_data
    data = tmp_path / "broken"
    tars = write_shards(data, n=16, per_shard=8)
    add_to_shard(tars[1], {f"trunc{i}": BAD["badtrunc"][0] for i in range(40)}, every=1)
    d = new_run(root, "broken", tok)
    proc, = launch(d, data, 1, "train.steps=50", "data.bad_sample_window=20", "data.max_bad_sample_ratio=0.6")
    assert proc.wait(timeout=300) == 1
    out = "\n".join(f.read_text() for f in d.glob("rank*.out"))
    assert re.search(r"python -m vlm\.train\.trainer: error: rank 0: \d+ of the last 20 samples read were bad "
                     r"\(data\.max_bad_sample_ratio: 0\.6; by reason so far: decode_error \d+\); the data is broken "
                     rf"in {re.escape(str(tars[1]))} \(\d+ bad\)", out), out[-3000:]
    assert "Traceback" not in out
