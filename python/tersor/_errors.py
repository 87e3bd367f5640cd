"""tersor's error contract across the libtorch stable ABI.

Through the stable ABI every C++ exception reaches Python as RuntimeError. tersor's C++ checks therefore
state the Python type they mean as the first word of the message (``"ValueError: aqlm_linear: ..."``,
``TypeError``, ``NotImplementedError``; see ``csrc/common/torch_glue.h``), and every tersor wrapper calls
its ops through :class:`CheckedOps`, which re-raises such an error as that type with the rest of the
message. Direct ``torch.ops.tersor.*`` calls keep the RuntimeError, whose message still says the kind.
"""

from __future__ import annotations

import torch

_KINDS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "NotImplementedError": NotImplementedError,
}


# What torch's dispatcher says when an argument does not match the op's schema (a list for a Tensor, a str
# for a float, ...): it raises RuntimeError before any tersor code runs, and it is a caller's type mistake.
_SCHEMA_TYPE_ERROR = "Expected a value of type"


def translate(err: RuntimeError) -> Exception | None:
    """The ValueError/TypeError/NotImplementedError a tersor C++ check meant (or TypeError for an argument the
    op's schema refuses), or None for other errors."""
    msg = str(err)
    kind, sep, rest = msg.partition(": ")
    cls = _KINDS.get(kind)
    if cls is not None and sep:
        return cls(rest)
    if msg.startswith("tersor") and _SCHEMA_TYPE_ERROR in msg.split("\n", 1)[0]:
        return TypeError(msg.split("\n", 1)[0])
    return None


def _checked(op):
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced: no try/except in the graph; the fakes raise the types
            return op(*args, **kwargs)
        try:
            return op(*args, **kwargs)
        except RuntimeError as err:
            typed = translate(err)
            if typed is None:
                raise
            raise typed from None

    call.__name__ = call.__qualname__ = getattr(op, "__name__", "op")
    call.__doc__ = getattr(op, "__doc__", None)
    return call


class CheckedOps:
    """An op namespace (``torch.ops.tersor``) whose calls raise the error types tersor's C++ checks name."""

    def __init__(self, namespace):
        self._namespace = namespace

    def __getattr__(self, name: str):
        wrapped = _checked(getattr(self._namespace, name))
        setattr(self, name, wrapped)  # looked up once per op
        return wrapped
