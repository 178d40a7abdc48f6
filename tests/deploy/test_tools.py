"""The tool gate of these checks: a missing tool skips a check on a developer machine but fails it in CI."""

from __future__ import annotations

import pytest
from deploy_files import require


def test_missing_tool_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pip install nothing"):
        require("a tool", None, "pip install nothing")


def test_missing_tool_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required under CI"):
        require("a tool", None, "pip install nothing")


def test_present_tool_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require("a tool", "/usr/bin/tool", "pip install nothing") == "/usr/bin/tool"
