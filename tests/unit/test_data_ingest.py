"""Ingestion against a real loopback image server: fetch safety, shard files, Ray driver."""

import hashlib
import io
import json
import tarfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.config import FetchConfig, IngestConfig
from demo.config import CorpusConfig
from data_pipeline.ingest.codec import decode_image, resize_image
from data_pipeline.ingest.driver import ingest
from data_pipeline.ingest.fetch import DomainRateLimiter, fetch
from data_pipeline.ingest.shard import ingest_shard
from data_pipeline.ingest.transport import robots_optout
from demo.server import ImageServer
from demo.corpus import generate_corpus
from demo.tables import write_url_table
from data_pipeline.ingest.table import read_table

LOOPBACK = ["127.0.0.1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cfg = CorpusConfig(num_train=40, num_heldout=0, image_size=48)
    return generate_corpus(cfg, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def server(corpus):
    with ImageServer(corpus.root) as srv:
        yield srv


@pytest.fixture(scope="module")
def url_table(corpus, server, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("table") / "urls.parquet")
    write_url_table(corpus, server.url, path, split="train", include_broken=True)
    return path  # 40 good rows then the 4 broken ones: shards of 16 → 16, 16, 12


def _cfg(**fetch) -> IngestConfig:
    defaults = {"deadline_s": 1.5, "retries": 0, "backoff_s": 0.05, "allow_private_hosts": LOOPBACK}
    fetch_cfg = FetchConfig(**{**defaults, **fetch})
    return IngestConfig(shard_size=16, threads=8, image_size=32, fetch=fetch_cfg)


# ---------------------------------------------------------------- fetch


def test_private_address_refused_without_connecting(server):
    before = server.request_count
    result = fetch(server.url + "/images/train/000000.png", FetchConfig(retries=2))
    assert (result.ok, result.reason) == (False, "private_address")
    assert server.request_count == before
    assert fetch("http://[::1]:9/x.png", FetchConfig()).reason == "private_address"
    assert fetch("http://10.1.2.3/x.png", FetchConfig()).reason == "private_address"
    assert fetch("http://169.254.169.254/latest", FetchConfig()).reason == "private_address"


def test_robots_optout_header_honoured(server):
    url = server.url + "/optout/images/train/000000.png"
    before = server.request_count
    assert fetch(url, _cfg().fetch).reason == "robots_optout"
    assert server.request_count == before + 1  # not retried
    assert fetch(url, _cfg(respect_robots_header=False).fetch).ok


@pytest.mark.parametrize(
    "values, expected",
    [
        (["noai"], True),
        (["NoImageAI"], True),
        (["all", "noindex, nofollow"], True),
        (["nofollow"], False),
        (["otherbot: noai"], False),
        (["vlm-ingest: noimageai"], True),
        (["*: noai"], True),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], False),
        ([], False),
    ],
)
def test_robots_optout_parsing(values, expected):
    assert robots_optout(values, "vlm-ingest/0.1") is expected


def test_redirects_are_followed_and_bounded(server):
    ok = fetch(server.url + "/redirect/2/images/train/000001.png", _cfg().fetch)
    assert ok.ok and ok.final_url.endswith("/images/train/000001.png")
    too_many = fetch(server.url + "/redirect/5/images/train/000001.png", _cfg().fetch)
    assert too_many.reason == "too_many_redirects"


def test_trickling_body_ends_at_deadline(server):
    result = fetch(server.url + "/trickle/images/train/000002.png", _cfg(deadline_s=0.8).fetch)
    assert result.reason == "deadline"
    assert result.elapsed_s < 1.5


def test_byte_cap(server):
    result = fetch(server.url + "/images/train/000003.png", _cfg(max_bytes=100).fetch)
    assert result.reason == "too_large"


def test_only_transient_errors_are_retried(server):
    before = server.request_count
    missing = fetch(server.url + "/broken/missing.jpg", _cfg(retries=2).fetch)
    assert (missing.reason, missing.http_status) == ("http_404", 404)
    assert server.request_count == before + 1
    refused = fetch("http://127.0.0.1:1/x.png", _cfg(retries=2, backoff_s=0.1).fetch)
    assert refused.reason == "connection_error"
    assert refused.elapsed_s >= 0.1 + 0.2  # two backoffs happened


def test_domain_rate_limiter_spaces_requests():
    limiter = DomainRateLimiter(20.0)  # 50 ms apart per host
    start = time.monotonic()
    threads = [threading.Thread(target=limiter.wait, args=("a",)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start >= 0.19
    t0 = time.monotonic()
    limiter.wait("b")  # another host is not delayed
    assert time.monotonic() - t0 < 0.05


# ---------------------------------------------------------------- server


def test_server_binds_loopback_only(tmp_path):
    for host in ("0.0.0.0", "8.8.8.8", "example.com"):
        with pytest.raises(ValueError):
            ImageServer(tmp_path, host=host)


def test_server_shutdown_is_prompt_with_a_pending_request(tmp_path):
    srv = ImageServer(tmp_path).start()
    url = srv.broken_urls()["never_answers"]
    worker = threading.Thread(target=fetch, args=(url, FetchConfig(deadline_s=30, retries=0,
                                                                     allow_private_hosts=LOOPBACK)))
    worker.start()
    time.sleep(0.3)
    start = time.monotonic()
    srv.stop()
    assert time.monotonic() - start < 2
    worker.join(timeout=5)
    assert not worker.is_alive()


# ---------------------------------------------------------------- images and tables


def test_decode_composites_alpha_on_white_and_guards_pixels():
    buf = io.BytesIO()
    Image.new("RGBA", (40, 20), (255, 0, 0, 0)).save(buf, format="PNG")
    img, w, h = decode_image(buf.getvalue(), IngestConfig())
    assert (img.mode, (w, h), img.getpixel((5, 5))) == ("RGB", (40, 20), (255, 255, 255))
    with pytest.raises(Exception, match="too_many_pixels|pixels"):
        decode_image(buf.getvalue(), IngestConfig(max_pixels=100))
    with pytest.raises(Exception) as info:
        decode_image(buf.getvalue(), IngestConfig(max_aspect_ratio=1.5))
    assert info.value.reason == "bad_aspect_ratio"
    with pytest.raises(Exception) as info:
        decode_image(buf.getvalue(), IngestConfig(min_image_size=30))
    assert info.value.reason == "too_small"


def _png_variants() -> dict[str, bytes]:
    """PNGs of every colour type, bit depth and transparency kind, plus an eXIf rotation."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, size=(24, 36, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, size=(24, 36, 4), dtype=np.uint8))
    images = {
        "rgb": (rgb, {}), "rgba": (rgba, {}), "l": (rgb.convert("L"), {}), "la": (rgba.convert("LA"), {}),
        "p": (rgb.convert("P"), {}), "p_trns": (rgb.convert("P"), {"transparency": 3}),
        "l16": (Image.fromarray((rng.integers(0, 65536, size=(24, 36))).astype(np.uint16)), {}),
        "1bit": (rgb.convert("1"), {}),
    }
    out = {}
    for name, (img, kw) in images.items():
        buf = io.BytesIO()
        img.save(buf, format="PNG", **kw)
        out[name] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", exif=exif.tobytes())
    out["rgb_exif_rot"] = buf.getvalue()
    return out


@pytest.mark.parametrize("name", list(_png_variants()))
def test_png_decode_matches_pillow(name):
    """The libspng path gives Pillow's pixels for every PNG kind (16-bit grey within 1 level:
    the two round 16 -> 8 bits differently), with eXIf orientation and transparency kept."""
    from PIL import ImageOps

    from data_pipeline.ingest.codec import _to_rgb

    data = _png_variants()[name]
    img, w, h = decode_image(data, IngestConfig())
    ref = Image.open(io.BytesIO(data))
    ref.load()
    ref = _to_rgb(ImageOps.exif_transpose(ref) if name == "rgb_exif_rot" else ref)
    if name == "l16":  # Pillow opens 16-bit grey as mode I;16 and clips it to 255 on convert
        ref = Image.fromarray((np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64) / 257).round()
                              .astype(np.uint8)).convert("RGB")
    assert img.mode == "RGB" and (w, h) == (36, 24)
    assert img.size == ((24, 36) if name == "rgb_exif_rot" else (36, 24))
    diff = np.abs(np.asarray(img, dtype=int) - np.asarray(ref, dtype=int)).max()
    assert diff <= (1 if name == "l16" else 0), diff


def test_truncated_png_is_a_decode_error():
    data = _png_variants()["rgb"]
    with pytest.raises(Exception) as info:
        decode_image(data[: len(data) // 2], IngestConfig())
    assert info.value.reason == "decode_error"


@pytest.mark.parametrize(
    "mode, expected",
    [("center_crop", (32, 32)), ("border", (32, 32)), ("keep_ratio", (64, 32)), ("no", (80, 40))],
)
def test_resize_modes(mode, expected):
    assert resize_image(Image.new("RGB", (80, 40)), 32, mode).size == expected


def test_read_table_formats_and_errors(tmp_path):
    table = pa.table({"url": ["http://a/1.jpg"], "caption": ["a cat"], "n": [1]})
    pq.write_table(table, tmp_path / "t.parquet")
    pacsv.write_csv(table, tmp_path / "t.csv")
    (tmp_path / "t.jsonl").write_text(json.dumps(table.to_pylist()[0]) + "\n")
    for name in ("t.parquet", "t.csv", "t.jsonl"):
        assert read_table(str(tmp_path / name)).to_pylist() == table.to_pylist()
    with pytest.raises(ValueError, match=r"TEXT.*columns present.*'url'"):
        read_table(str(tmp_path / "t.csv"), caption_col="TEXT")
    with pytest.raises(ValueError, match="nope.parquet"):
        read_table(str(tmp_path / "nope.parquet"))


# ---------------------------------------------------------------- shards


def test_ingest_shard_writes_tar_parquet_stats(corpus, url_table, tmp_path):
    rows = read_table(url_table).slice(32).to_pylist()  # 8 good + 4 broken
    out = tmp_path / "shards"
    stats = ingest_shard(rows, 2, str(out), _cfg())
    names = sorted(p.name for p in out.iterdir())  # no temporary files left behind
    assert names == ["00002.parquet", "00002.tar", "00002_stats.json"]
    assert stats["total"] == 12 and stats["success"] == 8 and stats["failed"] == 4
    on_disk = json.loads((out / "00002_stats.json").read_text())
    assert on_disk["failures_by_reason"] == stats["failures_by_reason"]

    rows_out = pq.read_table(out / "00002.parquet").to_pylist()
    status = {r["url"].rsplit("/", 1)[1]: r for r in rows_out}
    assert status["missing.jpg"]["reason"] == "http_404"
    assert status["truncated.jpg"]["reason"] == "decode_error"
    assert status["not-an-image.jpg"]["reason"] == "decode_error"
    assert status["never-answers.jpg"]["reason"] in ("timeout", "deadline")
    good = [r for r in status.values() if r["status"] == "success"]
    assert len(good) == 8 and all(r["reason"] is None and r["colour"] for r in good)

    with tarfile.open(out / "00002.tar") as tar:
        names = tar.getnames()
        assert len(names) == 24 and all(n.count(".") == 1 for n in names)
        for name in (n for n in names if n.endswith(".jpg")):
            key = name[:-4]
            img = Image.open(io.BytesIO(tar.extractfile(name).read()))
            img.load()
            assert (img.size, img.mode) == ((32, 32), "RGB")
            meta = json.loads(tar.extractfile(key + ".json").read())
            caption = tar.extractfile(key + ".txt").read().decode()
            original = (corpus.root / meta["url"].split("/", 3)[3]).read_bytes()
            assert meta["sha256"] == hashlib.sha256(original).hexdigest()
            assert (meta["width"], meta["height"], meta["caption"]) == (32, 32, caption)  # as stored
            assert (meta["original_width"], meta["original_height"]) == (48, 48)
            assert {"colour", "shape", "split", "bbox"} <= meta.keys()


def test_committed_shard_is_skipped(url_table, server, tmp_path):
    rows = read_table(url_table).slice(0, 16).to_pylist()
    first = ingest_shard(rows, 0, str(tmp_path), _cfg())
    mtime = (tmp_path / "00000.tar").stat().st_mtime_ns
    before = server.request_count
    again = ingest_shard(rows, 0, str(tmp_path), _cfg())
    assert again["skipped"] and again["success"] == first["success"] == 16
    assert server.request_count == before
    assert (tmp_path / "00000.tar").stat().st_mtime_ns == mtime


def test_caption_filters_skip_the_download(server, tmp_path):
    rows = [
        {"url": server.url + "/images/train/000004.png", "caption": "  "},
        {"url": server.url + "/images/train/000005.png", "caption": "red"},
    ]
    cfg = _cfg().model_copy(update={"min_caption_words": 2})
    before = server.request_count
    ingest_shard(rows, 0, str(tmp_path), cfg)
    reasons = [r["reason"] for r in pq.read_table(tmp_path / "00000.parquet").to_pylist()]
    assert reasons == ["no_caption", "caption_too_short"]
    assert server.request_count == before


# ---------------------------------------------------------------- Ray driver


@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray")
    from cluster.ray.session import ray_session

    with ray_session(num_cpus=2, lean=True) as ray:
        yield ray


def test_ingest_through_ray_then_rerun_skips(ray_local, url_table, tmp_path):
    summary = ingest(url_table, str(tmp_path), _cfg(), progress=False)
    assert (summary.shards_total, summary.shards_written, summary.shards_skipped) == (3, 3, 0)
    assert (summary.samples_success, summary.samples_failed) == (40, 4)
    assert summary.failures_by_reason["http_404"] == 1
    assert summary.failures_by_reason["decode_error"] == 2
    assert "40 ok" in summary.format()
    for sid in range(3):
        assert (tmp_path / f"{sid:05d}_stats.json").exists()

    rerun = ingest(url_table, str(tmp_path), _cfg(), progress=False)
    assert (rerun.shards_skipped, rerun.shards_written) == (3, 0)


def test_ingest_fails_loudly_naming_the_shard(ray_local, url_table, tmp_path):
    (tmp_path / "00001.tar").mkdir()  # the atomic rename of shard 1's tar cannot succeed
    cfg = _cfg().model_copy(update={"task_retries": 1})
    with pytest.raises(RuntimeError, match="shard 00001"):
        ingest(url_table, str(tmp_path), cfg, progress=False)
    assert not (tmp_path / "00001_stats.json").exists()


# ---------------------------------------------------------------- resolution, hostile bodies, rules


@pytest.fixture
def connect_log(monkeypatch):
    """Every socket connect this process attempts (on top of conftest's loopback guard)."""
    import socket

    attempts = []
    real = socket.socket.connect

    def recording(self, address):
        attempts.append(address)
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", recording)
    return attempts


def test_private_resolution_refused_before_any_connect(server, connect_log, monkeypatch):
    import data_pipeline.ingest.guard as guard_mod

    guard_mod.dns_cache.clear()
    monkeypatch.setattr(guard_mod, "resolve_host", lambda host, port: {"intranet.test": ["192.168.0.7"],
                                                                       "mixed.test": ["8.8.8.8", "10.0.0.9"]}[host])
    port = server.url.rsplit(":", 1)[1]
    cfg = FetchConfig(retries=2, resolve={"override.test": ["10.1.2.3"]}, allow_private_hosts=LOOPBACK)
    before = server.request_count
    for host in ("intranet.test", "mixed.test", "override.test"):
        result = fetch(f"http://{host}:{port}/images/train/000000.png", cfg)
        assert (result.reason, result.http_status) == ("private_address", None), host
    assert connect_log == [] and server.request_count == before
    # an allow-listed name is fetched, and from the address that was checked
    ok = fetch(f"http://override.test:{port}/images/train/000000.png",
               FetchConfig(resolve={"override.test": ["127.0.0.1"]}, allow_private_hosts=["override.test"]))
    assert ok.ok and connect_log == [("127.0.0.1", int(port))]


def test_a_host_is_resolved_once_per_cache_period(server, monkeypatch):
    import data_pipeline.ingest.guard as guard_mod

    guard_mod.dns_cache.clear()
    calls = []
    monkeypatch.setattr(guard_mod, "resolve_host", lambda host, port: calls.append(host) or ["127.0.0.1"])
    port = server.url.rsplit(":", 1)[1]
    cfg = FetchConfig(retries=0, allow_private_hosts=LOOPBACK)
    for i in range(5):
        assert fetch(f"http://images.test:{port}/images/train/{i:06d}.png", cfg).ok
    assert calls == ["images.test"]
    guard_mod.dns_cache.clear()
    assert fetch(f"http://images.test:{port}/images/train/000000.png", cfg.model_copy(update={"dns_cache_s": 0})).ok
    assert fetch(f"http://images.test:{port}/images/train/000000.png", cfg.model_copy(update={"dns_cache_s": 0})).ok
    assert calls == ["images.test"] * 3


def test_hostile_endpoints(server, tmp_path):
    h = server.hostile_urls()
    before = server.requests_for("/broken/server-error.jpg")
    failed = fetch(h["server_error"], _cfg(retries=2).fetch)
    assert (failed.reason, server.requests_for("/broken/server-error.jpg") - before) == ("http_500", 3)
    assert fetch(h["empty"], _cfg().fetch).reason == "empty_body"
    assert fetch(h["redirect_loop"], _cfg().fetch).reason == "too_many_redirects"
    drip = fetch(h["slow_drip"], _cfg(deadline_s=0.6).fetch)
    assert drip.reason == "deadline" and drip.elapsed_s < 1.2
    bomb = fetch(h["bomb"], _cfg().fetch)
    assert bomb.ok and len(bomb.data) < 200_000
    with pytest.raises(Exception) as info:
        decode_image(bomb.data, IngestConfig())
    assert info.value.reason == "too_many_pixels"


@pytest.mark.parametrize("caption, update, reason", [
    ("a red square", {}, None),
    ("", {}, "no_caption"),
    ("one two three", {"max_caption_words": 2}, "caption_too_long"),
    ("abc", {"min_caption_length": 5}, "caption_too_short"),
    ("a fairly long caption", {"max_caption_length": 10}, "caption_too_long"),
    ("a photo of a red car parked in the street", {"languages": ["en"]}, None),
    ("une voiture rouge garée dans la rue", {"languages": ["en"]}, "wrong_language"),
    ("une voiture rouge garée dans la rue", {"languages": ["en", "fr"]}, None),
])
def test_caption_rules(caption, update, reason):
    from data_pipeline.ingest.captions import caption_reason

    assert caption_reason(caption, IngestConfig(**update))[0] == reason


def test_config_rejects_bad_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="resolve.a.test"):
        FetchConfig(resolve={"a.test": ["not-an-ip"]})
    with pytest.raises(ValidationError, match="ISO 639"):
        IngestConfig(languages=["English"])
    with pytest.raises(ValidationError, match="max_image_size"):
        IngestConfig(min_image_size=100, max_image_size=50)


def test_dedup_registry_first_shard_wins_and_retries_take_their_own_back():
    from data_pipeline.ingest.dedup import DedupRegistry

    reg = DedupRegistry()
    a, b = b"a" * 32, b"b" * 32
    assert reg.claim(1, [(a, "000010000"), (b, "000010001")]) == ["000010000", "000010001"]
    assert reg.claim(2, [(a, "000020003")]) == ["000010000"]
    # shard 1 again (a retried task) where row 2 now holds image a: it takes it over
    assert reg.claim(1, [(a, "000010002")]) == ["000010002"]
    reg.preload([(b"c" * 32, "000030000")])
    assert reg.claim(4, [(b"c" * 32, "000040000")]) == ["000030000"]


def test_iter_shards_streams_every_format(tmp_path):
    from data_pipeline.ingest.table import count_rows, iter_shards

    table = pa.table({"url": [f"http://h/{i}.jpg" for i in range(25)], "caption": ["c"] * 25,
                      "n": list(range(25))})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)
    pacsv.write_csv(table, tmp_path / "t.csv")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    for name in ("t.parquet", "t.csv", "t.jsonl"):
        shards = list(iter_shards(str(tmp_path / name), 10))
        assert [s.num_rows for s in shards] == [10, 10, 5]
        assert sum((s.column("n").to_pylist() for s in shards), []) == list(range(25))
    assert count_rows(str(tmp_path / "t.parquet")) == 25
    with pytest.raises(ValueError, match="no column 'text'"):
        next(iter_shards(str(tmp_path / "t.csv"), 10, caption_col="text"))


def test_dedup_inside_one_shard(server, tmp_path):
    url = server.url + "/images/train/000006.png"
    rows = [{"url": url, "caption": "first"}, {"url": server.url + "/copy/x/images/train/000006.png",
                                                "caption": "second"}]
    stats = ingest_shard(rows, 0, str(tmp_path), _cfg())
    assert (stats["success"], stats["failures_by_reason"]) == (1, {"duplicate": 1})
    second = pq.read_table(tmp_path / "00000.parquet").to_pylist()[1]
    assert second["error_message"] == "same image as 00000" + "0000"


def test_waiting_for_the_rate_limit_does_not_eat_the_deadline(server):
    limiter = DomainRateLimiter(4.0)  # 0.25 s apart: the fourth request waits 0.75 s for its turn
    cfg = _cfg(deadline_s=0.5).fetch
    results = [None] * 4

    def one(i):
        results[i] = fetch(server.url + f"/images/train/{i:06d}.png", cfg, rate_limiter=limiter)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.reason for r in results] == [None] * 4
