#!/usr/bin/env python3
"""Reads a run's TensorBoard event files with TensorBoard's own EventAccumulator
(orphaned-data purging on, as TensorBoard shows them) and writes every scalar:

    tensorboard_reference.py RUN_DIR OUT.json   -> {"tag": [[step, value], ...], ...}
"""

from __future__ import annotations

import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run_dir: str, out: str) -> None:
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
    }
    with open(out, "w") as f:
        json.dump(scalars, f)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
