"""griffe extension for the API pages: funtrain's docstrings use reStructuredText roles
(the house style, readable in a terminal and in `help()`); turn them into the Markdown that
mkdocstrings renders: ``.. math::`` blocks and ``:math:`x``` into MathJax, and
``:func:`name``` style references into code."""

import re

import griffe

_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n"
                    r"(?P<body>(?:(?P=indent)[ \t]+.*\n|[ \t]*\n)+)", re.M)
_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc):`~?([^`]+)`")


def _block(match: re.Match[str]) -> str:
    indent = match["indent"]
    body = [line.strip() for line in match["body"].splitlines() if line.strip()]
    return f"{indent}$$\n" + "".join(f"{indent}{line}\n" for line in body) + f"{indent}$$\n\n"


def convert(text: str) -> str:
    text = _BLOCK.sub(_block, text if text.endswith("\n") else text + "\n")
    text = _INLINE_MATH.sub(lambda m: f"${m[1]}$", text)
    return _ROLE.sub(lambda m: f"`{m[1]}`", text).rstrip("\n")


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
