"""The sample-id log (data.log_sample_ids): which samples each rank trained on at each step.

Every rank writes {run_dir}/sample_ids/rank{R:03d}.jsonl (a vlm.rundir.RunLog, so a run_dir
on S3 works: uploaded at every checkpoint and on close), one row per optimizer step:
{"step", "rank", "world_size", "samples": ["EPOCH SHARD/KEY", ...]} (vlm.data.batches.sample_id),
the samples of all the step's micro-batches in the order taken.

It is the audit of the reader's promise that each sample of an epoch is trained on
exactly once, also across restarts and elastic resizes: like the step log, a resumed run
first cuts every rank's file back to the checkpoint's step (the steps after it are trained
again, on the same samples or, at another world size, on the re-split rest of the epoch),
and rank 0 also cuts the files of ranks the run no longer has. What the files then hold is
exactly what the model has learned from. `vlm report` does not read them; a test or a user
does, e.g. counting each "EPOCH SHARD/KEY" over every file."""
from __future__ import annotations

import json
import re

from vlm import rundir
from vlm.train.steplog import truncate_log

SAMPLE_IDS_DIR = "sample_ids"
_RANK_FILE = re.compile(r"^rank(\d+)\.jsonl$")


def rank_file(rank: int) -> str:
    return f"rank{rank:03d}.jsonl"


class SampleIdLog:
    """This rank's sample-id log from `step` on; write() takes the loader's ids of each step."""

    def __init__(self, run_dir: str, loader, *, rank: int, world_size: int, step: int):
        directory = rundir.join(run_dir, SAMPLE_IDS_DIR)
        mine = rundir.join(directory, rank_file(rank))
        truncate_log(mine, step)
        if rank == 0:  # the files of ranks a shrunk run no longer has
            for name in rundir.list_names(directory):
                match = _RANK_FILE.match(name)
                if match and int(match.group(1)) >= world_size:
                    truncate_log(rundir.join(directory, name), step)
        self.loader, self.rank, self.world_size = loader, rank, world_size
        self.log = rundir.RunLog(mine, scratch=rundir.scratch_dir(run_dir) / SAMPLE_IDS_DIR)

    def write(self, step: int) -> None:
        """The row of `step`: the ids the loader handed out since the last row (then cleared)."""
        row = {"step": step, "rank": self.rank, "world_size": self.world_size, "samples": self.loader.taken_ids}
        self.loader.taken_ids = []
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()

    def sync(self) -> None:
        self.log.sync()

    def close(self) -> None:
        self.log.close()
