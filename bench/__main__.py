"""``python -m bench``: the benchmark suite (:mod:`bench.run_all`; ``--help`` for options)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_all import main  # noqa: E402 - bench/ is a folder of scripts, not a package

raise SystemExit(main())
