"""The Python API that ``winclip_cli/__init__.py`` promises, and that importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import winclip_cli


def test_every_public_name_resolves_to_its_module_object() -> None:
    import importlib

    for name, module in winclip_cli._PUBLIC.items():
        assert getattr(winclip_cli, name) is getattr(importlib.import_module(module), name)
    assert set(winclip_cli.__all__) == {"__version__", *winclip_cli._PUBLIC}


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        winclip_cli.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_the_package_and_the_cli_does_not_import_torch() -> None:
    code = "import sys, winclip_cli, winclip_cli.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
