"""One error tree: every deliberate raise in monquant derives from MonquantError."""

from __future__ import annotations

import ast
import builtins
import inspect
from pathlib import Path

import monquant
import monquant.errors as errors

SRC = Path(monquant.__file__).resolve().parent
BUILTIN_EXCEPTIONS = {
    name
    for name, obj in vars(builtins).items()
    if inspect.isclass(obj) and issubclass(obj, BaseException)
}
ALLOWED = {"NotImplementedError", "KeyboardInterrupt", "SystemExit"}


def _raises_outside_getattr(tree: ast.AST):
    """Every ``raise`` node, except inside a module ``__getattr__`` (PEP 562 requires it to raise
    ``AttributeError`` for an unknown name)."""
    skip = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f)}  # fmt: skip
    return [n for n in ast.walk(tree) if isinstance(n, ast.Raise) and id(n) not in skip]


def test_no_bare_builtin_raises_in_the_package():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in _raises_outside_getattr(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = func.id if isinstance(func, ast.Name) else None
                if name in BUILTIN_EXCEPTIONS and name not in ALLOWED:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} raise {name}")
    assert offenders == []


def test_error_classes_derive_from_monquant_error():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.MonquantError)
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.InputTypeError, TypeError)
