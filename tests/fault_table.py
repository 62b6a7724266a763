"""Write docs/reliability.md: run tests/test_faults.py with the report switched on.

python tests/fault_table.py [--out docs/reliability.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    env = {**os.environ, "ONSFT_RELIABILITY_DOC": str(out)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_faults.py")], env=env, cwd=ROOT
    )
    print(f"wrote {out}" if out.is_file() else "no report written", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
