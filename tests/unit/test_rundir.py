"""vlm.rundir against a real S3 API (moto's server on 127.0.0.1) and a local directory:
whole-file reads and writes, the remote step log's upload points, the scratch directory,
and the run-directory readers and writers built on them (log truncation, metrics
endpoint, report, preflight, tokenizer)."""
from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from vlm import rundir
from support.s3 import moto_s3


@pytest.fixture(scope="module")
def s3_server():
    with moto_s3("rundir-unit") as (fs, env):
        yield fs


@pytest.fixture
def s3(s3_server):
    """(s3fs filesystem, a fresh run URL in the bucket)."""
    return s3_server, f"s3://rundir-unit/{uuid.uuid4().hex[:8]}"


def test_join_keeps_urls_urls_and_paths_paths(tmp_path):
    assert rundir.join("s3://b/run/", "metrics", "rank0.json") == "s3://b/run/metrics/rank0.json"
    assert rundir.join(tmp_path, "a", "b.json") == str(tmp_path / "a" / "b.json")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_whole_file_read_write_exists_remove(where, tmp_path, request):
    base = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3")[1]
    path = rundir.join(base, "sub", "config.yaml")
    assert not rundir.exists(path)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        rundir.read_text(path)
    rundir.write_text(path, "a: 1\n")
    rundir.write_text(path, "a: 2\n")
    assert rundir.exists(path) and rundir.read_text(path) == "a: 2\n"
    rundir.append_text(rundir.join(base, "log.jsonl"), "1\n")
    rundir.append_text(rundir.join(base, "log.jsonl"), "2\n")
    assert rundir.read_text(rundir.join(base, "log.jsonl")) == "1\n2\n"
    assert rundir.list_names(base) == ["log.jsonl"]  # files only, not the directory "sub"
    assert rundir.list_names(rundir.join(base, "sub")) == ["config.yaml"]
    assert rundir.list_names(rundir.join(base, "none")) == []
    rundir.remove(path)
    rundir.remove(path)  # nothing there: no error
    assert not rundir.exists(path)
    if where == "local":
        assert sorted(p.name for p in (tmp_path / "run" / "sub").iterdir()) == []  # no temporary file left


def test_scratch_dir_is_the_run_dir_locally_and_a_temp_dir_per_url(tmp_path):
    assert rundir.scratch_dir(tmp_path) == tmp_path
    a, b = rundir.scratch_dir("s3://b/run1"), rundir.scratch_dir("s3://b/run2")
    assert a != b and a == rundir.scratch_dir("s3://b/run1/")
    assert a.parent == Path(tempfile.gettempdir()) / rundir.SCRATCH_ROOT
    assert not a.is_relative_to(Path.cwd())


def test_remote_log_uploads_on_sync_and_close_and_continues_the_remote_file(s3, tmp_path):
    fs, url = s3
    log_url = rundir.join(url, "train_log.jsonl")
    rundir.write_text(log_url, '{"step": 1}\n')
    log = rundir.RunLog(log_url, scratch=tmp_path, upload_every_s=3600)
    log.write('{"step": 2}\n')
    log.flush()  # local only: the interval has not passed
    assert rundir.read_text(log_url) == '{"step": 1}\n'
    log.sync()
    assert rundir.read_text(log_url) == '{"step": 1}\n{"step": 2}\n'
    log.write('{"step": 3}\n')
    log.close()
    log.close()
    assert rundir.read_text(log_url).splitlines()[-1] == '{"step": 3}'
    eager = rundir.open_log(url, "eval_log.jsonl", upload_every_s=0)
    eager.write("x\n")
    eager.flush()
    assert rundir.read_text(rundir.join(url, "eval_log.jsonl")) == "x\n"
    eager.close()
    shutil.rmtree(rundir.scratch_dir(url))


def test_local_log_appends_in_place(tmp_path):
    (tmp_path / "train_log.jsonl").write_text("a\n")
    log = rundir.open_log(tmp_path, "train_log.jsonl")
    log.write("b\n")
    log.flush()
    assert (tmp_path / "train_log.jsonl").read_text() == "a\nb\n"
    log.close()


def test_truncate_log_on_s3_keeps_one_row_per_step(s3):
    from vlm.train.steplog import truncate_log

    _, url = s3
    path = rundir.join(url, "train_log.jsonl")
    rundir.write_text(path, "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    truncate_log(path, 2)
    assert [json.loads(x)["step"] for x in rundir.read_text(path).splitlines()] == [1, 2]
    truncate_log(rundir.join(url, "absent.jsonl"), 2)
    assert not rundir.exists(rundir.join(url, "absent.jsonl"))


def test_metrics_endpoint_of_a_remote_run_dir(s3):
    from vlm.observe.metrics import TrainMetrics

    _, url = s3
    m = TrainMetrics(run="r", rank=0, host="127.0.0.1", port=0, objectives=["clip_infonce"])
    target = rundir.scratch_dir(url) / "metrics" / "targets" / "rank0.json"
    try:
        assert m.write_endpoint(url, 0) == f"{url}/metrics/rank0.json"
        assert json.loads(rundir.read_text(f"{url}/metrics/rank0.json"))["url"] == m.url
        assert json.loads(target.read_text())[0]["labels"] == {"run": "r", "rank": "0"}
    finally:
        m.close()
    assert not target.exists()
    shutil.rmtree(rundir.scratch_dir(url))


def test_report_of_a_remote_run_dir_is_written_locally(s3, tmp_path):
    from vlm.observe.report import default_out_dir, write_report

    _, url = s3
    rows = [{"step": s, "loss/total": 1.0 / s, "samples_per_s": 10.0, "step_s": 1.0, "data_wait_s": 0.1}
            for s in (1, 2, 3)]
    rundir.write_text(f"{url}/train_log.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    rundir.write_text(f"{url}/eval_log.jsonl", json.dumps({"step": 3, "zeroshot": {"acc1": 0.5}}) + "\n")
    png, page = write_report(url, tmp_path / "out")
    assert png.stat().st_size > 0 and "zeroshot/acc1" in page.read_text()
    assert default_out_dir("s3://rundir-unit/abc/") == Path("abc-report")
    assert default_out_dir(tmp_path) == tmp_path


def test_preflight_probes_a_remote_run_dir(s3):
    from cluster.preflight import check_run_dir
    from vlm.config import ConfigError, load_config

    fs, url = s3
    check_run_dir(load_config(None, [f"run_dir={url}"]))
    assert not fs.exists(url[len("s3://"):]) or not fs.ls(url[len("s3://"):])  # the probe is gone
    missing = "s3://no-such-bucket-here/run"
    with pytest.raises(ConfigError, match="run_dir s3://no-such-bucket-here/run is not writable"):
        check_run_dir(load_config(None, [f"run_dir={missing}"]))


def test_preflight_refuses_a_fresh_run_over_remote_checkpoints(s3):
    from cluster.preflight import check_resume
    from vlm.config import ConfigError, load_config

    _, url = s3
    cfg = load_config(None, [f"run_dir={url}"])
    assert check_resume(cfg, None) is None
    rundir.write_text(f"{url}/checkpoints/latest", "step_00000004")
    with pytest.raises(ConfigError, match="already has checkpoints .*step_00000004"):
        check_resume(cfg, None)


def test_clip_tokenizer_prepared_in_and_loaded_from_a_remote_run_dir(s3):
    from vlm.config import load_config
    from vlm.data.tokenizer import CLIP_VOCAB_SIZE, load_run_tokenizer, prepare_tokenizer

    _, url = s3
    with pytest.raises(FileNotFoundError, match=f"{url}/tokenizer.json not found"):
        load_run_tokenizer(url, 77)
    prepare_tokenizer(load_config(None, [f"run_dir={url}", "tokenizer.kind=clip"]))
    text, encoder = load_run_tokenizer(url, 77)
    assert encoder.vocab_size == CLIP_VOCAB_SIZE and json.loads(text)


def test_cluster_jobs_read_a_run_on_s3(s3):
    """`vlm cluster submit --name` derives a sibling URL, a resubmission compares the run's
    config.yaml in the bucket, and `status` reads the newest checkpoint from it."""
    from types import SimpleNamespace

    import yaml

    from cluster.ray.jobs import _previous_config, name_run, newest_checkpoint
    from vlm.config import load_config

    _, url = s3
    cfg = load_config(None, [f"run_dir={url}/demo"])
    assert name_run(cfg, "other") == "other" and cfg.run_dir == f"{url}/other"
    assert _previous_config(cfg, []) == (None, "")
    rundir.write_text(rundir.join(cfg.run_dir, "config.yaml"), yaml.safe_dump({"name": "other"}))
    assert _previous_config(cfg, []) == ({"name": "other"}, f"{url}/other/config.yaml")
    job = SimpleNamespace(metadata={"run_dir": cfg.run_dir})
    assert newest_checkpoint(job) is None
    rundir.write_text(rundir.join(cfg.run_dir, "checkpoints", "latest"), "step_00000012\n")
    assert newest_checkpoint(job) == "step_00000012"
