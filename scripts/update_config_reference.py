#!/usr/bin/env python
"""Regenerate the key tables of docs/config_reference.md from the config schema."""
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mindspore_moe_ep.config.schema import reference_markdown  # noqa: E402

doc_path = REPO / "docs" / "config_reference.md"
doc = doc_path.read_text()
pattern = re.compile(r"(<!-- BEGIN GENERATED[^\n]*-->\n).*?(\n<!-- END GENERATED[^\n]*-->)", re.S)
if not pattern.search(doc):
    sys.exit(f"{doc_path}: GENERATED markers not found")
doc_path.write_text(pattern.sub(lambda m: m.group(1) + reference_markdown() + m.group(2), doc))
print(f"updated {doc_path}")
