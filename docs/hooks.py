"""mkdocs hook: fill generated sections so the docs cannot drift from the code.

``<!-- semask:model_zoo -->`` is replaced by the table built from the registry
(``semask.models.zoo.model_zoo_markdown``: params and GFLOPs counted on the meta device).
"""
from __future__ import annotations

import re

_MARKER = re.compile(r"<!--\s*semask:model_zoo(?:\s+pattern=(\S+))?\s*-->")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "semask:model_zoo" not in markdown:
        return markdown
    import semask  # noqa: F401  (registers every model family)
    from semask.models.zoo import model_zoo_markdown

    return _MARKER.sub(lambda m: model_zoo_markdown(m.group(1) or ""), markdown)
