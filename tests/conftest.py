"""Session-wide fixtures: models in forms the project did not write (see tests/foreign_models.py)."""
from __future__ import annotations

import pytest

from exporters.foreign import export_forms
from tests.foreign_models import llama, tokenizer


@pytest.fixture(scope="session")
def foreign(tmp_path_factory):
    """(transformers model, {form: path}) for a random 6-layer Llama exported every way in foreign_models.FORMS."""
    model = llama()
    return model, export_forms(model, tokenizer(), tmp_path_factory.mktemp("foreign"))
