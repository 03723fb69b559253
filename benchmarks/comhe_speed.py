"""CoMHE cost (issue 5's performance check), measured side by side in one run.

Prints the penalty forward+backward time of random-projection CoMHE (spec defaults: 5 projections
to 30 dimensions, half-space) divided by full MHE on the same layer for (512, 4608) and (4096, 512),
then the ResNet-18 / 32x32 / batch 64 training-step time with CoMHE on every layer divided by the
step without a regularizer (target <= 1.10). The measurements live in ``comhe_claims.py``
(``--speed`` / ``--overhead``); this entry point runs both.

    python benchmarks/comhe_speed.py [--reps 5] [--threads 2]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comhe_claims


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    comhe_claims.main(["--speed", *argv])
    comhe_claims.main(["--overhead", *argv])


if __name__ == "__main__":
    main()
