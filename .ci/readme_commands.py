"""Print the README's two set-up commands (main job, then tests), one per line.

``.ci/run`` runs exactly what this prints, so CI and the README cannot drift apart: the
commands are the non-comment lines of the first ```bash block under "## Set-up". Exits
non-zero, with one line on stderr, when that block does not hold exactly two commands, the
first running the demo and the second pytest.
"""

import re
import sys
from pathlib import Path


def commands(readme):
    text = Path(readme).read_text(encoding="utf-8")
    section = text.split("## Set-up", 1)
    if len(section) != 2:
        raise ValueError(f"{readme}: no '## Set-up' section")
    block = re.search(r"```bash\n(.*?)```", section[1], re.S)
    if block is None:
        raise ValueError(f"{readme}: no ```bash block under '## Set-up'")
    lines = [ln.strip() for ln in block.group(1).splitlines()]
    cmds = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(cmds) != 2 or "fastrms demo" not in cmds[0] or "pytest" not in cmds[1]:
        raise ValueError(f"{readme}: the set-up block must hold two commands (the demo, then pytest), got {cmds}")
    return cmds


if __name__ == "__main__":
    try:
        print("\n".join(commands(sys.argv[1] if len(sys.argv) > 1 else "README.md")))
    except (OSError, ValueError) as exc:
        print(f"readme_commands: {exc}", file=sys.stderr)
        sys.exit(1)
