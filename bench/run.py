"""Runs every benchmark in bench/ (each a script printing its figures against a peer).

    bench/run.py [--quick] [NAME ...]

`--quick` is passed on to each script; the whole quick suite must finish in under 3 minutes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CI)")
    parser.add_argument("names", nargs="*", help="benches to run (default: all)")
    args = parser.parse_args()
    scripts = sorted(
        p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run.py"
    )
    if args.names:
        unknown = set(args.names) - {p.stem for p in scripts}
        if unknown:
            parser.error(
                f"unknown bench {', '.join(sorted(unknown))} (have: {', '.join(p.stem for p in scripts)})"
            )
        scripts = [p for p in scripts if p.stem in args.names]
    failed = []
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, str(script), *(["--quick"] if args.quick else [])], check=False
        )
        print(
            f"== {script.stem}: {time.monotonic() - t0:.1f} s{'' if r.returncode == 0 else ' FAILED'}",
            flush=True,
        )
        if r.returncode != 0:
            failed.append(script.stem)
    if failed:
        print(f"benches failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
