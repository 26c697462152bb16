"""fastrms._typing: the options' static types, generated from the table, and what a user's
type checker makes of them."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest

import fastrms
from fastrms.core import options


def test_the_typed_options_file_is_the_tables_own():
    path = Path(fastrms.__file__).with_name("_typing.py")
    assert path.read_text(encoding="utf-8") == options.typing_source(), (
        "fastrms/_typing.py is out of date with fastrms.core.options.OPTIONS; regenerate it as "
        "fastrms.core.options.typing_source()'s docstring says"
    )


def test_the_typed_options_hold_every_keyword_only_option_with_its_kind():
    from fastrms._typing import Options

    hints = Options.__annotations__
    assert list(hints) == [n for n in options.NAMES if n not in options.POSITIONAL]
    for name, hint in hints.items():
        kind = options.BY_NAME[name].kind
        choice = Literal[options.BY_NAME[name].choices]  # type: ignore[valid-type]
        assert {"bool": bool, "float": float, "choice": choice}.get(kind, float | None) == hint, name
    assert Options.__total__ is False


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (the dev extra has it)")
def test_mypy_strict_catches_a_misspelt_option_in_a_users_code(tmp_path):
    snippet = tmp_path / "user.py"
    snippet.write_text(
        textwrap.dedent(
            """\
            import numpy as np

            import fastrms
            import fastrms.functional

            w = np.zeros(3, np.float32)
            fastrms.RMSprop(w, 1e-3, momentum=0.9, centered=True, clip_global_norm=None)
            fastrms.RMSprop(w, 1e-3, momentun=0.9)
            fastrms.RMSprop(w, 1e-3, centered=0.5j)
            opt = fastrms.RMSprop(w, fastrms.schedules.step_decay(1e-3, 0.95, 500))
            count: int = opt.step_count
            fastrms.functional.rmsprop_step(w, w, None, 1, 1e-3, nesterof=True)
            fastrms.RMSprop(w, 1e-3, state_storage="bfloat16")
            fastrms.RMSprop(w, 1e-3, state_storage="bf16")
            """
        )
    )
    # run from the snippet's folder: mypy must find fastrms where it is installed
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--show-error-codes", snippet.name],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["8", "9", "12", "14"], out.stdout + out.stderr
    assert '"momentun"' in errors[0] and '"centered"' in errors[1] and '"nesterof"' in errors[2]
    assert '"state_storage"' in errors[3]  # a Literal: only the storages there are
