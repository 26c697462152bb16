"""The backends' face (`fastrms/backend/__init__.py`): `info`, what `fastrms info` prints."""

import importlib.util

from fastrms import backend


def test_info_reports_the_cuda_target_or_why_there_is_none(monkeypatch):
    found = backend.info()
    assert {"threading_layer", "cache_folder", "cuda"} <= set(found)
    cuda = found["cuda"]
    assert set(cuda) == {"available", "device", "why"}
    assert cuda["available"] == (cuda["device"] is not None) == (cuda["why"] == "")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba_cuda" else real(name, *a))
    assert backend.cuda_target() == {
        "available": False,
        "device": None,
        "why": "numba-cuda is not installed (pip install 'fastrms[cuda]')",
    }
