"""Time the post-model half of the pipeline at competition scale: store candidates, vote, write the submission.

Synthetic but realistically shaped: 400 tasks, 1 or 2 test inputs each, 1000 augmentation variants per test input,
grids up to 30x30, about 20 distinct candidate grids per test input with a skewed (Zipf-like) popularity and ~2%
malformed decodes. Run: `python benchmarks/bench_vote.py [--tasks 400 --variants 1000]`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.data.tasks import Task
from pipeline.inference.predictions import Predictions, PredictionsWriter
from pipeline.inference.vote import SELECTORS, group_candidates
from submissions.score import score_submission
from submissions.validate import validate_submission_file
from submissions.write import build_submission, write_submission


def synthetic_tasks(num_tasks: int, rng: np.random.Generator) -> list[Task]:
    tasks = []
    for t in range(num_tasks):
        num_tests = 2 if rng.random() < 0.3 else 1
        inputs = [rng.integers(0, 10, rng.integers(1, 31, 2), dtype=np.uint8) for _ in range(num_tests)]
        tasks.append(Task(id=f"{t:08x}", train=[], test_inputs=inputs, test_outputs=None, source="synthetic"))
    return tasks


def synthetic_batches(tasks: list[Task], variants: int, distinct: int, batch: int, rng: np.random.Generator):
    """Yield (task ids, test index, variant, q, grids) batches like the prediction loop would produce."""
    rows = [(t.id, i) for t in tasks for i in range(len(t.test_inputs))]
    pools = {}
    for key in rows:
        h, w = rng.integers(1, 31, 2)
        # Mostly one shape, a few candidates of another shape.
        pools[key] = [
            rng.integers(0, 10, (h, w) if k % 5 else rng.integers(1, 31, 2), dtype=np.uint8) for k in range(distinct)
        ]
    popularity = 1.0 / np.arange(1, distinct + 1)
    popularity /= popularity.sum()
    all_keys = [(key, v) for key in rows for v in range(variants)]
    for start in range(0, len(all_keys), batch):
        chunk = all_keys[start : start + batch]
        picks = rng.choice(distinct, size=len(chunk), p=popularity)
        malformed = rng.random(len(chunk)) < 0.02
        grids = [None if bad else pools[key][k] for (key, _), k, bad in zip(chunk, picks, malformed)]
        yield (
            [key[0] for key, _ in chunk],
            np.array([key[1] for key, _ in chunk]),
            np.array([v for _, v in chunk]),
            rng.random(len(chunk)).astype(np.float32),
            grids,
        )


def group_by_vectorised_hash(predictions: Predictions) -> int:
    """The alternative to group_candidates' dict on bytes: a random linear hash per row + np.unique.

    Kept here only to compare speed (not exact: collisions are improbable, not impossible)."""
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 2**63, 900, dtype=np.uint64) | np.uint64(1)
    rows = np.flatnonzero(predictions.valid)
    hashes = np.empty(len(rows), np.uint64)
    for s in range(0, len(rows), 20000):
        r = rows[s : s + 20000]
        size = predictions.height[r].astype(np.int64) * predictions.width[r]
        starts = np.cumsum(size) - size
        position = np.arange(size.sum()) - np.repeat(starts, size)
        cells = predictions.cells[np.repeat(predictions.offset[r], size) + position].astype(np.uint64)
        with np.errstate(over="ignore"):
            products = cells * weights[position] + np.repeat(predictions.height[r].astype(np.uint64) << np.uint64(8) | predictions.width[r], size)
            hashes[s : s + 20000] = np.add.reduceat(products, starts) if len(starts) else 0
    keys = np.rec.fromarrays([predictions.task[rows], predictions.test_index[rows], hashes])
    return len(np.unique(keys))


class Timings(list):
    """(step, seconds, note) rows, in the order the steps ran."""

    def timed(self, name: str, fn: Callable[[], Any], note: Callable[[Any], str] = lambda result: "") -> Any:
        t0 = time.perf_counter()
        result = fn()
        self.append((name, time.perf_counter() - t0, note(result)))
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--variants", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=20)
    parser.add_argument("--batch", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng([args.seed, 1])
    tasks = synthetic_tasks(args.tasks, rng)
    batches = list(synthetic_batches(tasks, args.variants, args.distinct, args.batch, rng))
    timings = Timings()
    predictions = time_building(tasks, batches, timings)
    time_voting(tasks, predictions, timings)
    print(f"{args.tasks} tasks x {args.variants} variants, ~{args.distinct} distinct grids per test input")
    print(f"{'step':42}{'seconds':>9}  note")
    for name, seconds, note in timings:
        print(f"{name:42}{seconds:>9.2f}  {note}")
    critical = [s for n, s, _ in timings if n in ("select vote (top 2)", "build_submission", "write_submission")]
    print(f"{'vote (top 2) + build + write submission':42}{sum(critical):>9.2f}  target < 30 s")


def time_building(tasks: list, batches: list, timings: Timings) -> Predictions:
    """Predictions built from the batches both ways: from a list of grids, and from padded canvases (add_padded
    timed alone, without drawing the canvases)."""
    def build():
        writer = PredictionsWriter([t.id for t in tasks])
        for batch in batches:
            writer.add(*batch)
        return writer.finish()

    predictions = timings.timed("build Predictions (add, list of grids)", build,
                                lambda p: f"{len(p)} rows, {len(p.cells) / 1e6:.0f} MB cells")
    padded, seconds = build_padded(tasks, batches)
    timings.append(("build Predictions (add_padded only)", seconds,
                    "same rows" if np.array_equal(padded.cells, predictions.cells) else "MISMATCH"))
    return predictions


def build_padded(tasks: list, batches: list) -> tuple[Predictions, float]:
    """The predictions through add_padded, and the seconds add_padded took."""
    writer = PredictionsWriter([t.id for t in tasks])
    seconds = 0.0
    for ids, test, variant, q, grids in batches:
        canvas = np.zeros((len(grids), 30, 30), np.uint8)
        height = np.zeros(len(grids), np.int64)
        width = np.zeros(len(grids), np.int64)
        for k, g in enumerate(grids):
            if g is not None:
                canvas[k, : g.shape[0], : g.shape[1]] = g
                height[k], width[k] = g.shape
        t0 = time.perf_counter()
        writer.add_padded(ids, test, variant, q, canvas, height, width)
        seconds += time.perf_counter() - t0
    return writer.finish(), seconds


def time_voting(tasks: list, predictions: Predictions, timings: Timings) -> None:
    """The file round trip, grouping both ways, every selector, then the submission: built, written, validated,
    scored."""
    timed = timings.timed
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.npz"
        timed("save .npz", lambda: predictions.save(path), lambda _: f"{path.stat().st_size / 1e6:.0f} MB")
        loaded = timed("load .npz (+ checks)", lambda: Predictions.load(path))
        assert np.array_equal(loaded.cells, predictions.cells)

        timed("group: dict on bytes (used)", lambda: group_candidates(loaded), lambda g: f"{len(g.votes)} groups")
        timed("group: vectorised hash (comparison)", lambda: group_by_vectorised_hash(loaded), lambda n: f"{n} groups")
        for name, selector in SELECTORS.items():
            timed(f"select {name} (all ranks)", lambda: selector(loaded))
        ranked = timed("select vote (top 2)", lambda: SELECTORS["vote"](loaded, top_k=2))
        submission, report = timed("build_submission", lambda: build_submission(tasks, ranked),
                                   lambda r: f"{len(r[1].fallbacks)} fallbacks")
        out = Path(tmp) / "submission.json"
        timed("write_submission", lambda: write_submission(out, submission), lambda _: f"{out.stat().st_size / 1e6:.1f} MB")
        timed("validate_submission_file", lambda: validate_submission_file(out, tasks), lambda p: f"{len(p)} problems")
        solutions = {t.id: [np.asarray(a["attempt_2"], np.uint8) for a in submission[t.id]] for t in tasks}
        timed("score_submission (+ oracle)", lambda: score_submission(submission, solutions, loaded))


if __name__ == "__main__":
    main()
