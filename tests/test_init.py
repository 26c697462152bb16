"""The package's face (`fastrms/__init__.py`): what `dir(fastrms)` shows and what it keeps
reachable."""

import importlib

import fastrms


def test_dir_shows_the_public_names_only_and_the_internal_modules_stay_importable():
    shown = dir(fastrms)
    assert shown == sorted(fastrms.__all__)
    assert not {"clock", "cpu", "memory", "spec", "seed", "options", "runtime"} & set(shown)
    assert all(hasattr(fastrms, name) for name in fastrms.__all__)
    cpu = importlib.import_module("fastrms.cpu")  # internal, still importable by those who reach for it
    assert fastrms.cpu is cpu
