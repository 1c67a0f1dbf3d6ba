"""Reading a study config's YAML without losing a setting to a repeated key.

YAML loaders keep the last of two equal keys in a mapping, so `probe: {kind: ridge}` followed by
`probe: {sites: all}` silently becomes a logistic-free default probe section. The document is
therefore composed into nodes first and every mapping, at any depth, is checked for repeated
keys (reported with their key path and lines) before it is turned into Python values.
"""

from __future__ import annotations

from typing import Any

import yaml


def parse_config_yaml(text: str) -> tuple[Any, list[str]]:
    """(the parsed document, one problem per repeated key); `yaml.YAMLError` for text that is not YAML."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        problems = _repeated_keys(node, "", set()) if node is not None else []
        return (loader.construct_document(node) if node is not None else None), problems
    finally:
        loader.dispose()


def _repeated_keys(node: yaml.Node, path: str, seen: set[int]) -> list[str]:
    if id(node) in seen:  # an alias of a node already walked (anchors may even refer to themselves)
        return []
    seen.add(id(node))
    problems: list[str] = []
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _repeated_keys(item, f"{path}[{i}]", seen)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key == "<<":  # a YAML merge key: overriding merged keys is what it is for
                continue
            key_path = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in first_line:
                problems.append(f"{key_path}: given twice (lines {first_line[key]} and {line}); YAML would keep only "
                                f"the second, silently dropping the first. Merge them into one")
            else:
                first_line[key] = line
            problems += _repeated_keys(value_node, key_path, seen)
    return problems


__all__ = ["parse_config_yaml"]
