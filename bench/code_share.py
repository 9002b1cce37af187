"""How much of the optimizer code is validation, and how long the core rules are, beside optax.

Counts source lines with ``ast``, docstrings, comments and blank lines left out:

- *validation*: ``raise`` statements, ``if`` blocks whose body only raises (their test
  included), ``assert``s, statement calls to a ``check_*``/``_check_*`` function, and the
  ``@checked`` (domains declared in a signature) and ``@names_errors`` decorators;
- *code*: every other line of a statement, decorators included.

It prints the validation share of each module of ``funtrain/optim`` and in all (with how
many of those lines are the ``@checked``/``@names_errors`` decorators); the same
share counting the shared check helpers (``_checks.py``) as validation line by line, since
every line of them serves validation; and the code lines of ``scale_by_adam`` and
``adamw`` next to optax's (when optax is installed).

    python bench/code_share.py
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

OPTIM = Path(__file__).resolve().parent.parent / "funtrain" / "optim"


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _is_validation(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Raise, ast.Assert)):
        return True
    if isinstance(node, ast.If):
        return all(isinstance(s, ast.Raise) for s in node.body) and not node.orelse
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        fn = node.value.func
        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
        return name.startswith(("check", "_check"))
    return False


def _decorator_name(node: ast.expr) -> str:
    fn = node.func if isinstance(node, ast.Call) else node
    return fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")


def count(source: str) -> tuple[int, int, int]:
    """(code lines, validation lines, of which ``@checked``/``@names_errors`` decorator
    lines) of ``source``."""
    tree = ast.parse(source)
    skip = _docstring_lines(tree)
    code: set[int] = set()
    validation: set[int] = set()
    declared: set[int] = set()
    for node in ast.walk(tree):
        for dec in getattr(node, "decorator_list", []):  # @checked, @names_errors: validation
            lines = set(range(dec.lineno, dec.end_lineno + 1))
            is_check = _decorator_name(dec) in ("checked", "names_errors")
            (validation if is_check else code).update(lines)
            if is_check:
                declared |= lines
        if not isinstance(node, ast.stmt):
            continue
        span = set(range(node.lineno, node.end_lineno + 1)) - skip
        if _is_validation(node):
            validation |= span
        elif not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.If, ast.For, ast.While,
                                   ast.With, ast.Try)):
            code |= span
        else:  # a compound statement counts its header line only (its body counts itself)
            code.add(node.lineno)
    lines = source.splitlines()
    blank = {i + 1 for i, line in enumerate(lines) if not line.strip()
             or line.strip().startswith("#")}
    code, validation = code - blank, validation - blank
    return len(code | validation), len(validation), len(declared - blank)


def function_lines(fn: object) -> int:
    """Code lines of a function (docstring, comments and blank lines left out)."""
    return count(textwrap.dedent(inspect.getsource(fn)))[0]


def main() -> None:
    total_code = total_val = total_dec = 0
    print(f"{'module':24} {'code lines':>10} {'validation':>10} {'share':>6} "
          f"{'decorators':>10}")
    for path in sorted(OPTIM.glob("*.py")):
        code, val, dec = count(path.read_text())
        total_code, total_val, total_dec = total_code + code, total_val + val, total_dec + dec
        print(f"{path.name:24} {code:10d} {val:10d} {val / max(code, 1):6.1%} {dec:10d}")
    print(f"{'funtrain/optim':24} {total_code:10d} {total_val:10d} "
          f"{total_val / total_code:6.1%} {total_dec:10d}")
    helpers, helpers_val, _ = count((OPTIM / "_checks.py").read_text())
    whole = total_val + helpers - helpers_val
    print(f"{'  with _checks.py whole':24} {total_code:10d} {whole:10d} "
          f"{whole / total_code:6.1%}")

    from funtrain.optim import optimizers, transforms
    rows = [("scale_by_adam", transforms.scale_by_adam), ("adamw", optimizers.adamw)]
    try:
        import optax
        peers = {"scale_by_adam": optax.scale_by_adam, "adamw": optax.adamw}
    except ImportError:
        peers = {}
    print(f"\n{'function':16} {'funtrain':>9} {'optax':>6}   (code lines, docstrings aside)")
    for name, fn in rows:
        peer = function_lines(peers[name]) if name in peers else "-"
        print(f"{name:16} {function_lines(fn):9d} {peer:>6}")


if __name__ == "__main__":
    main()
