"""Per-image work over a process pool: results as they complete, one failing image never stopping
the others, and a worker that dies in native code (the CRF's) costing only its own image."""
from __future__ import annotations

import logging
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import numpy as np
from tqdm import tqdm

from wsss.crf import crf_labels
from wsss.run import process_pool

log = logging.getLogger("wsss")


def parallel_map(fn, items, workers: int = 1, desc: str = "images", total: int | None = None):
    """Yield (item, result, error) for every item, in completion order, with a tqdm bar.

    `items` may be a generator that computes them (a GPU loop): it is drawn only while fewer than
    2 x `workers` items are in the pool, so the loop and the workers overlap and memory stays
    bounded. An exception in one item is that item's `error`; the others go on. A worker that dies
    (a crash in native code) breaks the whole pool: the items it took down, and those still to
    come, are then run one at a time, each in a fresh single-worker pool, so only the culprit is
    lost. `workers` <= 1 runs in this process (no crash isolation). `fn` and the items must be
    picklable.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if total is not None:
        workers = min(workers, total)  # every worker starts up front: none for nothing to do
    bar = tqdm(total=total, desc=desc)
    try:
        if workers <= 1:
            for item in items:
                try:
                    result = fn(item)
                except Exception as e:  # noqa: BLE001 - one image's failure is reported, not raised
                    yield item, None, e
                else:
                    yield item, result, None
                bar.update()
            return
        lost = []
        with process_pool(workers) as pool:
            for item, outcome in _streamed(pool, fn, iter(items), 2 * workers):
                if isinstance(outcome, BrokenProcessPool):
                    lost.append(item)
                    continue
                yield (item, None, outcome) if isinstance(outcome, Exception) else (item, outcome[0], None)
                bar.update()
        if lost:
            log.warning("%s: a worker process died; running %d images one at a time", desc, len(lost))
        for item in lost:
            with process_pool(1) as pool:
                try:
                    result = pool.submit(fn, item).result()
                except Exception as e:  # noqa: BLE001
                    yield item, None, e
                else:
                    yield item, result, None
            bar.update()
    finally:
        bar.close()


def _streamed(pool, fn, items, in_flight: int):
    """(item, (result,) or the exception) of each item through `pool`, at most `in_flight` at once;
    after the pool breaks, the remaining items come back with the BrokenProcessPool unrun."""
    pending: dict = {}
    broken = None
    for item in items:
        if broken is None:
            try:
                pending[pool.submit(fn, item)] = item
            except BrokenProcessPool as e:
                broken = e
        if broken is not None:
            yield item, broken
            continue
        while len(pending) >= in_flight:
            yield from _drain(pending, FIRST_COMPLETED)
    yield from _drain(pending, ALL_COMPLETED)


def _drain(pending: dict, when):
    done, _ = wait(list(pending), return_when=when)
    for future in done:
        item = pending.pop(future)
        try:
            yield item, (future.result(),)
        except Exception as e:  # noqa: BLE001 - the caller decides (BrokenProcessPool: retry alone)
            yield item, e


def _crf_job(params: dict, indexed_job):
    index, job = indexed_job
    return index, crf_labels(job["image"], job["labels"], job["keys"], soft=job.get("soft"), **params)


def crf_many(jobs: list[dict], workers: int = 1, desc: str = "crf", **params) -> list[np.ndarray]:
    """`crf_labels` over many images in a process pool; returns the masks in job order.

    Each job is a dict with "image", "labels", "keys" and optionally "soft" (and "id", used in
    messages). An image whose CRF fails is logged and keeps its pre-CRF labels; the others' results
    are kept. `params` go to `crf_labels` (gt_prob, confidence, CRF parameters).
    """
    out: list[np.ndarray | None] = [None] * len(jobs)
    for (index, job), result, error in parallel_map(partial(_crf_job, params), list(enumerate(jobs)),
                                                    workers, desc):
        if error is not None:
            log.warning("CRF failed on %s (%s: %s); keeping its pre-CRF labels",
                        job.get("id", f"job {index}"), type(error).__name__, error)
            out[index] = np.asarray(job["labels"], dtype=np.uint8)
        else:
            out[result[0]] = result[1]
    return out
