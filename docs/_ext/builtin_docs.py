"""A griffe extension for the API pages: drop the docstring an attribute inherits from its value's type.

The pages are built by inspection (several docstrings are formatted at import time), and inspection
gives a class attribute such as ``Reverse.differentiates_state = True`` the docstring of ``bool``
("bool(x) -> bool ..."). Such an attribute has no documentation of its own, so it is left without a
docstring, and mkdocstrings leaves it out of the page (``show_if_no_docstring`` is off). Attributes
with their own documentation are described in their class's docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import griffe


class DropBuiltinDocstrings(griffe.Extension):
    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, **kwargs: Any) -> None:
        obj = getattr(node, "obj", None)
        if attr.docstring is None or obj is None:
            return
        inherited = inspect.getdoc(type(obj))
        text = attr.docstring.value.strip()
        # A NamedTuple field's generated docstring says only where the field sits in the tuple.
        if (inherited is not None and text == inherited.strip()) or re.fullmatch(r"Alias for field number \d+", text):
            attr.docstring = None


class DataclassFactoryDefaults(griffe.Extension):
    """Show a dataclass field's ``default_factory`` as the call it makes (``solver: LinearSolver = CG()``).

    Inspection reports such defaults as ``<factory>``, which is not Python: the signature formatter
    then leaves the whole signature on one line.
    """

    def on_class_members(self, *, node: Any, cls: griffe.Class, **kwargs: Any) -> None:
        obj = getattr(node, "obj", None)
        if obj is None or not dataclasses.is_dataclass(obj) or "__init__" not in cls.members:
            return
        init = cls.members["__init__"]
        for f in dataclasses.fields(obj):
            factory = f.default_factory
            if factory is dataclasses.MISSING or f.name not in init.parameters:
                continue
            name = getattr(factory, "__name__", "")
            init.parameters[f.name].default = f"{name}()" if name.isidentifier() else "..."
