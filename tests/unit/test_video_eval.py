"""Action recognition on video (issue 25, item 1): clips really encoded and decoded with PyAV,
subsampled into frames, embedded by the image tower and pooled; the linear probe and the
zero-shot classifier on the clip embeddings; unreadable clips skipped and named.

The set (tests/support/videogen.py) is a shape moving left, right, up or down, growing or
shrinking, over a colour-ramp background: the class is the motion, so one frame cannot tell it. The model
is a randomly initialised tiny CLIP, frozen: its frame features say where the shape is
(through the background it hides), so a linear probe can read the motion from pooled
features that keep the order of frames, and not from a single frame."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.cli import eval as eval_cli
from cluster.cli.main import main
from support.videogen import MOTIONS, write_clip, write_motion_set
from vlm.config import EvalConfig, load_config
from vlm.data.tokenizer import TextEncoder, train_tokenizer
from vlm.eval.video import POOLINGS, VIDEO_TASKS, evaluate_video, format_video_results, pool_frames
from vlm.eval.video_data import Unreadable, VideoLimits, decode_clip, frame_indices, list_clips
from vlm.models.registry import build_model
from support.threads import one_thread  # noqa: F401  (autouse: one torch thread here)

TINY = ["model.embed_dim=64", "model.vision.width=64", "model.vision.depth=2", "model.vision.heads=2",
        "model.vision.image_size=16", "model.vision.patch_size=4", "data.ingest.image_size=16",
        "model.text.width=16", "model.text.depth=1", "model.text.heads=2", "model.text.context_length=16",
        "eval.batch_size=64"]
WORDS = "a video of a person clip moving left right up down growing shrinking"
PER_CLASS = 32  # 128 clips: 64 train the probe (16 of them validate its C), 64 test it


def tiny_model(seed: int = 0):
    cfg = load_config(None, TINY)
    tok = train_tokenizer([WORDS] * 5, vocab_size=80)
    torch.manual_seed(seed)
    return build_model(cfg.model, tok.get_vocab_size()).eval(), TextEncoder(tok, 16), cfg, tok


def add_bad_clips(root: Path) -> dict[str, str]:
    """A truncated mp4, an empty file and a valid .avi with no frame, each in a class
    folder -> {path: the reason's start}."""
    good = root / "moving_left" / "moving_left_1.mp4"
    (root / "moving_left" / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "moving_up" / "empty.mp4").write_bytes(b"")
    write_clip(root / "moving_right" / "no_frames.avi", [])
    return {str(root / "moving_left" / "truncated.mp4"): "does not decode",
            str(root / "moving_up" / "empty.mp4"): "does not decode",
            str(root / "moving_right" / "no_frames.avi"): "no frames"}


@pytest.fixture(scope="module")
def motion_set(tmp_path_factory):
    root = write_motion_set(tmp_path_factory.mktemp("motion"), PER_CLASS)
    return root, add_bad_clips(root)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The tiny model as a `vlm ckpt export` file (what `vlm eval` loads)."""
    from safetensors.torch import save_file

    from vlm.checkpoint.export import EXPORT_FORMAT

    model, _, cfg, tok = tiny_model()
    path = tmp_path_factory.mktemp("export") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt", "vlm_format": EXPORT_FORMAT, "vlm_tokenizer": tok.to_str(),
                        "vlm_config": json.dumps(cfg.model_dump(mode="json"))})
    return path


# ---- sampling, pooling, decoding ------------------------------------------------------------


def test_frame_indices_uniform_and_strided():
    assert frame_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]       # the middle of each eighth
    assert frame_indices(16, 1) == [8]
    assert frame_indices(3, 4) == [0, 1, 1, 2]                       # fewer frames than asked: repeats
    assert frame_indices(20, 4, stride=3) == [5, 8, 11, 14]          # a window of 10 centred in 20
    assert frame_indices(5, 4, stride=2) == [0, 2, 4, 4]             # longer than the clip: the last repeats


def test_pooling_keeps_the_order_of_frames():
    x = torch.arange(4.0)[None, :, None].expand(1, 4, 2)             # one clip, 4 frames: 0, 1, 2, 3
    backwards = x.flip(1)
    assert torch.equal(pool_frames(x, "mean"), pool_frames(backwards, "mean"))
    assert pool_frames(x, "diff").tolist() == [[1.5, 1.5, 1.0, 1.0]]  # mean, then the mean step
    assert pool_frames(backwards, "diff").tolist() == [[1.5, 1.5, -1.0, -1.0]]
    assert pool_frames(torch.arange(8.0)[None, :, None], "concat").tolist() == [[0.5, 2.5, 4.5, 6.5]]
    assert pool_frames(x[:, :1], "diff").tolist() == [[0.0, 0.0, 0.0, 0.0]]
    assert pool_frames(x[:, :2], "concat").shape == (1, 4)           # fewer frames than parts
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool_frames(x, "max")


def test_decoded_frames_are_in_order_and_through_the_eval_transform(tmp_path):
    """A clip of a shape moving right (40x32, the centre square kept): 8 frames at the model's
    size, the shape's column growing from frame to frame, in every container."""
    root = write_motion_set(tmp_path / "avi", 2, other_suffix=".avi")
    webm = write_motion_set(tmp_path / "webm", 1) / "moving_right" / "moving_right_0.webm"
    for clip in (root / "moving_right" / "moving_right_0.avi", root / "moving_right" / "moving_right_1.mp4", webm):
        frames = decode_clip(clip, frames=8, image_size=16)
        assert frames.shape == (8, 16, 16, 3) and frames.dtype == torch.uint8
        bright = frames.float().min(-1).values > 150                   # the shape: every channel high
        columns = [torch.nonzero(f)[:, 1].float().mean().item() for f in bright]
        assert all(b > a for a, b in zip(columns, columns[1:])), (clip, columns)


def test_each_decoding_bound_skips_a_clip_with_its_reason(tmp_path):
    clip = write_motion_set(tmp_path, 1, other_suffix=None) / "moving_up" / "moving_up_0.mp4"
    size = clip.stat().st_size
    cases = [(VideoLimits(max_bytes=size - 1), f"{size} bytes, over the bound of {size - 1}"),
             (VideoLimits(max_pixels=40 * 32 - 1), "40x32 frames, over the bound of 1279 pixels"),
             (VideoLimits(max_frames=15), "more than 15 frames"),
             (VideoLimits(max_seconds=0), "took longer than 0 s to decode")]
    for limits, reason in cases:
        with pytest.raises(Unreadable) as e:
            decode_clip(clip, frames=8, image_size=16, limits=limits)
        assert str(e.value) == reason
    assert decode_clip(clip, frames=8, image_size=16, limits=VideoLimits(max_bytes=size, max_pixels=40 * 32,
                                                                          max_frames=16)).shape[0] == 8


# ---- the two tasks --------------------------------------------------------------------------


def run(model, text, cfg, data, **kw) -> dict:
    # the probe's C is swept over the top of the default grid: normalised frame embeddings
    # differ little between frames, and the lower C values only cost time here
    ev = cfg.eval.model_copy(update={"probe_c_grid": [100.0, 1000.0, 10000.0]})
    return evaluate_video(model, text, ev, str(data), image_size=16, **kw)


def test_probe_beats_chance_and_temporal_pooling_beats_one_frame(motion_set):
    """Measured here (data seed 0, model seed 0): concat pooling of 8 frames 0.771 against
    chance 1/6, and 0.208 from one frame. Over data seeds 0-1 x model seeds 0-5: 0.77-0.92
    against 0.18-0.30 from one frame (diff pooling 0.59-0.84, mean pooling 0.21-0.38: the
    mean of the frames keeps the axis of a motion, not its direction). The bounds below
    hold for every one of those twelve with a margin of 0.26 or more, so neither a seed nor
    a few predictions flipped by another CPU's rounding decide them."""
    root, bad = motion_set
    model, text, cfg, _ = tiny_model()
    res = run(model, text, cfg, root, tasks=list(VIDEO_TASKS), frames=8, pooling="concat")
    one = run(model, text, cfg, root, tasks=["video-linear-probe"], frames=1, pooling="concat")
    temporal, single = res["video_linear_probe"], one["video_linear_probe"]
    print(f"\nconcat pooling, 8 frames: {temporal['linear_probe_acc1']:.4f}; one frame: "
          f"{single['linear_probe_acc1']:.4f}; chance {temporal['chance']:.4f}")
    assert temporal["chance"] == pytest.approx(1 / 6) and temporal["num_test"] == 2 * len(MOTIONS) * PER_CLASS // 4
    assert temporal["linear_probe_acc1"] >= 0.5
    assert temporal["linear_probe_acc1"] - single["linear_probe_acc1"] >= 0.25
    assert res["num_clips"] == len(MOTIONS) * PER_CLASS + 3 and res["num_read"] == len(MOTIONS) * PER_CLASS
    assert {s["path"]: s["reason"].split(" (")[0] for s in res["skipped"]} == bad
    zs = res["video_zeroshot"]
    assert zs["classnames"] == ["growing", "moving down", "moving left", "moving right", "moving up", "shrinking"]
    assert zs["templates_source"] == "built-in (actions)" and zs["templates"][0] == "a video of a person {c}."
    assert 0.0 <= zs["acc1"] <= 1.0 and zs["chance"] == pytest.approx(1 / 6)
    report = format_video_results(res)
    assert f"{len(MOTIONS) * PER_CLASS} of {len(MOTIONS) * PER_CLASS + 3} clips read" in report
    assert f"skipped {root / 'moving_right' / 'no_frames.avi'}: no frames" in report


def test_a_set_with_no_readable_clip_is_an_error(tmp_path):
    model, text, cfg, _ = tiny_model()
    root = tmp_path / "set"
    (root / "moving_up").mkdir(parents=True)
    (root / "moving_up" / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match=f"{root}: none of its 1 clips could be read .first: .*empty.mp4: "):
        run(model, text, cfg, root, tasks=["video-zeroshot"])
    (root / "moving_up" / "empty.mp4").unlink()
    with pytest.raises(ValueError, match=f"{root}: no video clips"):
        run(model, text, cfg, root, tasks=["video-zeroshot"])


def test_csv_layout_lists_clips_in_row_order(tmp_path):
    table = write_motion_set(tmp_path, 2, table=True, other_suffix=".avi")
    clips = list_clips(str(table))
    assert [c.path.name for c in clips[:7]] == ["moving_left_0.avi", "moving_right_0.avi", "moving_up_0.avi",
                                                "moving_down_0.avi", "growing_0.avi", "shrinking_0.avi",
                                                "moving_left_1.mp4"]
    assert clips[0].label == "moving_left" and clips[0].origin == f"{table} line 2"
    (tmp_path / "clips" / "extra.mp4").write_bytes((tmp_path / "clips" / "moving_up_1.mp4").read_bytes())
    with open(table, "a") as f:
        f.write("clips/extra.mp4,\n")
    with pytest.raises(ValueError, match="line 14: empty 'label'"):
        list_clips(str(table))


# ---- `vlm eval` -----------------------------------------------------------------------------


def test_vlm_eval_video_tasks_end_to_end(tmp_path, export, capsys):
    """A CSV of mp4 and avi clips, a separate folder training the probe, a stride, diff pooling."""
    table = write_motion_set(tmp_path / "csv", 4, table=True, other_suffix=".avi")
    probe_train = write_motion_set(tmp_path / "train", 4, seed=1)
    out = tmp_path / "results.json"
    rc = main(["eval", "--checkpoint", str(export), "--data", str(table), "--task", "video-zeroshot",
               "--task", "video-linear-probe", "--probe-train", str(probe_train), "--frames", "4",
               "--frame-stride", "3", "--pooling", "diff", "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "24 of 24 clips read, 4 frames each (every 3 frames)" in printed
    assert "video zero-shot top-1:" in printed and "4 templates from built-in (actions)" in printed
    assert "video linear-probe top-1:" in printed and "diff pooling of embed features" in printed
    res = json.loads(out.read_text())
    assert res["checkpoint"] == str(export) and res["probe_train"] == str(probe_train) and res["skipped"] == []
    lp = res["video_linear_probe"]
    assert lp["num_test"] == 24 and lp["num_train"] + lp["num_val"] == 24 and lp["pooling"] == "diff"
    assert res["video_zeroshot"]["class_labels"] == sorted(MOTIONS)


def test_vlm_eval_refuses_mixed_tasks_and_stray_video_flags(tmp_path, export, capsys):
    data = str(tmp_path)
    assert main(["eval", "--checkpoint", str(export), "--data", data, "--task", "zeroshot",
                 "--task", "video-zeroshot"]) == 2
    assert "image tasks (zeroshot) and video tasks (video-zeroshot) read different data" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(export), "--data", data, "--frames", "4"]) == 2
    assert "--frames only apply to --task video-zeroshot / video-linear-probe" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(export), "--task", "video-linear-probe"]) == 2
    assert "video tasks need --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(export), "--task", "video-zeroshot", "--frames", "0"])
    assert "--frames: invalid positive_int value: '0'" in capsys.readouterr().err


def test_the_cli_names_the_video_module_s_choices_and_bounds():
    """cluster/cli/eval.py spells the tasks, poolings and bounds without importing torch."""
    assert eval_cli.VIDEO_TASKS == VIDEO_TASKS and eval_cli.POOLINGS == POOLINGS
    limits = VideoLimits()
    side = int(limits.max_pixels ** 0.5)
    bounds = (f"({limits.max_bytes >> 20} MiB, {side}x{side} pixels a frame, {limits.max_frames} frames, "
              f"{limits.max_seconds:g} s by default")
    parser_help = " ".join(_eval_help().split())
    assert bounds in parser_help, bounds
    ev = EvalConfig()  # the config's defaults are the module's
    assert (ev.video_max_bytes, ev.video_max_pixels, ev.video_max_frames, ev.video_max_seconds) == (
        limits.max_bytes, limits.max_pixels, limits.max_frames, limits.max_seconds)


def test_the_bounds_come_from_the_eval_config(tmp_path, export, capsys):
    """--set eval.video_max_frames below the clips' 16 frames: every clip is skipped for it,
    and a set with no readable clip is an error naming the data."""
    table = write_motion_set(tmp_path / "csv", 1, table=True)
    assert main(["eval", "--checkpoint", str(export), "--data", str(table), "--task", "video-zeroshot",
                 "--set", "eval.video_max_frames=8"]) == 1
    err = capsys.readouterr().err
    assert str(table) in err and "frames" in err, err


def _eval_help() -> str:
    from cluster.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["eval"].format_help()
