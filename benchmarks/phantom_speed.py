"""Time the generation of one synthetic CT perfusion patient (16 slices x 40 frames, 256x256).

Each run is a fresh `strokegate phantom --kind ctp` process, so the time includes building the
head model from the MNI templates and writing all 640 DICOM files and the truth. Prints every
run and the median.

    .venv/bin/python benchmarks/phantom_speed.py [--runs 3] [--matrix 256]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--frames", type=int, default=40)
    args = parser.parse_args()
    cli = Path(sys.executable).parent / "strokegate"
    seconds = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as out:
            command = [str(cli), "phantom", "--kind", "ctp", "--out", out, "--seed", str(1000 + run),
                       "--ct-matrix", str(args.matrix), "--ct-slices", str(args.slices), "--ct-frames", str(args.frames)]
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - started)
            files = sum(1 for _ in Path(out).rglob("*.dcm"))
        print(f"run {run + 1}: {seconds[-1]:.2f} s, {files} DICOM files")
    print(f"CTP patient {args.slices} slices x {args.frames} frames, {args.matrix}x{args.matrix}: "
          f"median {statistics.median(seconds):.2f} s over {args.runs} runs (target <= 20 s)")


if __name__ == "__main__":
    main()
