"""What one CI stage did to the kernels' shared disk cache (``NUMBA_CACHE_DIR``).

    python .ci/cache_report.py mark FILE          # before a stage: remember the cache's files
    python .ci/cache_report.py report FILE NAME   # after it: one line, kernels compiled and kept
    python .ci/cache_report.py none FILE NAME     # after it: the same, and exit 1 if it compiled any

A kernel compiled and cached is a data file (``.nbc``) written in a ``fastrms-<hash>``
folder; a kernel loaded writes nothing. ``none`` names each file the stage wrote, and whether
the stage before had written it already (it recompiled what it should have loaded).
"""

import json
import os
import sys
from pathlib import Path


def _files():
    root = Path(os.environ["NUMBA_CACHE_DIR"])
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.glob("fastrms-*/*.nbc")}


def main(argv):
    verb, path = argv[0], Path(argv[1])
    if verb == "mark":
        path.write_text(json.dumps(_files()))
        return 0
    name = argv[2]
    before, after = json.loads(path.read_text()), _files()
    written = sorted(f for f, mtime in after.items() if before.get(f) != mtime)
    again = [f for f in written if f in before]
    folders = sorted({f.split("/")[0] for f in after})
    where = ", ".join(folders) or "no folder"
    print(f"ci: {name}: {len(written)} kernels compiled and cached, {len(after)} in {where}")
    if verb == "none" and written:
        print(
            f"ci: FAIL: {name} compiled {len(written)} kernels instead of loading them from NUMBA_CACHE_DIR "
            f"({len(again)} of them compiled by the stage before it: the cache folder no longer follows the "
            "content alone):",
            file=sys.stderr,
        )
        for f in written:
            print(f"ci:   {f}{'  (recompiled)' if f in again else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
