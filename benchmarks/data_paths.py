"""Where the benchmarks read the real data by default: ``$LIT_META_DATA`` when it is set, else ``data/`` in the
checkout (``python -m lit_meta download omniglot --root data/omniglot`` puts Omniglot there). Every script also
takes the folder as an argument."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LIT_META_DATA") or REPO / "data").expanduser()
OMNIGLOT = DATA / "omniglot"
