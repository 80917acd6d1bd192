"""Imported at start-up by every Python process that has this folder on PYTHONPATH: the ranks a test
launches. With TITAN_TEST_PAUSE_SAVE=<step dir name>:<rank>, that rank stops inside DCP's file writer
while it writes that directory, after writing its pid to TITAN_TEST_PAUSE_MARKER, so the test can kill
it in the middle of the save."""

import os

if os.environ.get("TITAN_TEST_PAUSE_SAVE"):
    import time
    from pathlib import Path

    import torch.distributed as dist
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    _write_data = FileSystemWriter.write_data

    def _pausing_write_data(self, plan, planner):
        name, rank = os.environ["TITAN_TEST_PAUSE_SAVE"].split(":")
        if Path(self.path).name == name and dist.get_rank() == int(rank):
            marker = Path(os.environ["TITAN_TEST_PAUSE_MARKER"])
            marker.with_suffix(".tmp").write_text(str(os.getpid()))
            os.replace(marker.with_suffix(".tmp"), marker)
            time.sleep(600)
        return _write_data(self, plan, planner)

    FileSystemWriter.write_data = _pausing_write_data
