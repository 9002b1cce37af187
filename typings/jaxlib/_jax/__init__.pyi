# jaxlib ships its C++ extension without type information, so mypy sees jax's PyTreeDef as
# an unknown type ("PyTreeDef?") and rejects every method call on a treedef. These stubs
# type the pytree part funtrain uses; everything else in the extension is Any.
from typing import Any

from . import pytree as pytree

def __getattr__(name: str) -> Any: ...
