"""Runtime: worker pools (one compute thread a worker, all started up front, none outliving its parent),
process counts."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from wsss.run import THREAD_VARIABLES, process_pool
from wsss.workers import parallel_map


def _thread_settings(_):
    import numpy  # noqa: F401 - loaded as the worker's libraries are

    return {k: os.environ.get(k) for k in THREAD_VARIABLES}


def test_pool_workers_compute_with_one_thread_and_the_parent_keeps_its_settings():
    before = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    with process_pool(2) as pool:
        assert len(pool._processes) == 2  # all started before any task
        settings = [pool.submit(_thread_settings, i).result() for i in range(4)]
    assert all(s == dict.fromkeys(THREAD_VARIABLES, "1") for s in settings)
    assert {k: os.environ.get(k) for k in THREAD_VARIABLES} == before


def _square(x):
    return x * x


def test_parallel_map_draws_a_generator_as_the_pool_frees_up():
    drawn = []

    def items():
        for i in range(10):
            drawn.append(i)
            yield i

    results = {item: result for item, result, error in parallel_map(_square, items(), workers=2, total=10)}
    assert results == {i: i * i for i in range(10)} and drawn == list(range(10))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_workers_die_with_their_parent(tmp_path):
    """A `kill -9` of the stage process takes its pool's workers with it: none goes on writing."""
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from wsss.run import process_pool

        def work(_):
            time.sleep(60)

        if __name__ == "__main__":
            pool = process_pool(2)
            futures = [pool.submit(work, i) for i in range(2)]
            print(" ".join(str(p) for p in pool._processes), flush=True)
            time.sleep(60)
    """)
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.time() + 10
        alive = workers
        while alive and time.time() < deadline:
            alive = [p for p in workers if _alive(p)]
            time.sleep(0.1)
        assert not alive, f"workers {alive} outlived their parent"
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_batch_that_does_not_split_over_the_processes_stops_before_any_work(monkeypatch):
    from wsss.stage import StageError, check_processes

    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(StageError, match=r"--batch-size 10 does not split over 8 processes: run 1, 2, 5, 10 processes"):
        check_processes(10)
    check_processes(16)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_processes(10)


def test_without_fcntl_a_stage_stops_with_a_clear_error(tmp_path, monkeypatch):
    from wsss import stage

    monkeypatch.setattr(stage, "fcntl", None)
    with pytest.raises(stage.StageError, match="locked with fcntl.*Linux or macOS"):
        stage.lock(tmp_path, "stage 1", writes=False)


def test_scales_flags_take_both_spellings_and_record_one_value():
    from wsss import erasing, segment
    from wsss.run import common_parser

    stage1 = erasing.add_args(common_parser("test", "stage1"))
    assert stage1.parse_args(["--cam-scales", "0.5", "1"]).cam_scales == (0.5, 1.0)
    assert stage1.parse_args(["--cam-scales", "0.5,1"]).cam_scales == (0.5, 1.0)
    assert stage1.parse_args(["--preset", "voc-vgg16"]).cam_scales == (0.5, 1.0, 1.5, 2.0)
    stage3 = common_parser("test", "stage3")
    segment.add_args(stage3)
    assert stage3.parse_args(["--scales", "0.5,0.75", "1"]).scales == [0.5, 0.75, 1.0]
    assert stage3.parse_args(["--preset", "voc-r101"]).scales == [0.5, 0.75, 1.0]
    with pytest.raises(SystemExit):
        stage3.parse_args(["--scales", "0,1"])


def test_stage1_budget_has_a_floor_in_steps_that_the_dataset_size_does_not_shrink():
    from wsss import erasing
    from wsss.run import common_parser

    assert erasing.add_args(common_parser("test", "stage1")).parse_args([]).iterations == erasing.ITERATIONS
    # 600 images at batch 16 are 37 full batches an epoch: 9 epochs reach 300 steps; 400 images need 12
    assert erasing.step_epochs(3, 300, 600, 16) == 9
    assert erasing.step_epochs(3, 300, 400, 16) == 12
    assert erasing.step_epochs(3, 300, 10582, 16) == 3  # VOC's train_aug: the floor never binds
    assert erasing.step_epochs(3, 0, 600, 16) == 3  # --iterations 0: the epochs alone
    assert erasing.step_epochs(1, 300, 8, 16) == 300  # fewer images than a batch: one step an epoch


def test_every_flag_shows_its_default_in_help():
    from wsss import erasing
    from wsss.run import common_parser

    text = erasing.add_args(common_parser("test", "stage1")).format_help()
    assert "--seed SEED           default: 0" in text
