"""The package's face (`fastrms/__init__.py`): what `dir(fastrms)` shows and what it keeps
reachable."""

import importlib

import fastrms


def test_dir_shows_the_public_names_only_and_the_internal_modules_stay_importable():
    shown = dir(fastrms)
    assert shown == sorted(fastrms.__all__)
    assert not {"clock", "cpu", "memory", "spec", "seed", "options", "runtime"} & set(shown)
    assert all(hasattr(fastrms, name) for name in fastrms.__all__)
    cpu = importlib.import_module("fastrms.backend.cpu")  # internal, still importable by those who reach for it
    assert fastrms.backend.cpu is cpu


def test_the_core_modules_documented_under_their_first_paths_still_import_as_the_same_modules():
    import fastrms.checkpoint
    import fastrms.runtime
    import fastrms.spec
    from fastrms.checkpoint import loadable  # noqa: F401
    from fastrms.spec import Spec  # noqa: F401

    assert fastrms.spec is importlib.import_module("fastrms.core.spec")
    assert fastrms.checkpoint is importlib.import_module("fastrms.core.checkpoint")
    assert fastrms.runtime is importlib.import_module("fastrms.core.runtime")


def test_the_folders_show_the_rooms_kernels_import_nothing_above_and_core_nothing_of_the_backend():
    import ast
    import pathlib

    root = pathlib.Path(fastrms.__file__).parent

    def imported(folder):  # (file, the package-relative module each relative import names)
        for path in (root / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    for alias in node.names:  # `from .. import kernels` names the module in its names
                        yield path.name, node.level, node.module or alias.name

    assert all(level == 1 for _, level, _ in imported("kernels"))  # the kernels' own modules only
    above = {(name, module.split(".")[0]) for name, level, module in imported("core") if level == 2}
    assert {module for _, module in above} <= {"kernels", "_version"}, above
