"""Reading a YAML file that nobody vetted: bounded in size, depth and work, strict about encoding and keys.

A scenario file may be anything a user (or a fuzzer) hands ``python -m harness validate``: a binary file, a
file in another encoding, a YAML "billion laughs" of aliases, a document nested ten thousand levels deep, a key
written twice. :func:`read_text` and :func:`load` turn each of these into a :class:`YamlError` naming the line,
never into a traceback, a hang or gigabytes of memory:

- the file is read as bytes, at most :data:`MAX_BYTES`, and decoded as strict UTF-8;
- PyYAML's own composer builds the node tree (:class:`_BoundedLoader`, a ``SafeLoader`` subclass), refusing
  anchors and aliases and any nesting deeper than :data:`MAX_DEPTH` as it goes, so the work is linear in the
  file's size;
- a key written twice in one mapping is an error naming both lines (YAML loaders silently keep the last), and so
  is a merge key (``<<``), which adds keys the file does not show where they apply;
- a key must be text: ``yes:``, ``null:`` or ``1:`` would silently become a boolean, None or a number, which no
  setting is named (the error says to quote it);
- the line of every key is recorded by its path in the same single walk of the tree.

Example::

    data, lines = load(read_text(Path("scenarios/tiny_cpu.yaml")))
    lines[("train", "steps")]  # -> 31
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent

# The largest shipped scenario is ~4 KB. PyYAML's SafeLoader needs 11 s for its worst MiB (a flow list of 520,000
# one-digit numbers) on a CI core: 256 KiB, 60 times the largest scenario, keeps any file to ~3 s.
MAX_BYTES = 256 << 10
# A scenario nests 4 levels (frameworks[i].overrides.<tool>.<key>); a tool's own settings under overrides may
# add a few. The composer recurses once per level: 32 stays far below Python's recursion limit.
MAX_DEPTH = 32

Problem = tuple[int, tuple, str]  # (line, key path, reason); the path is ("<file>",) / ("<yaml>",) off a key


class YamlError(Exception):
    """A file that is not one readable YAML document; ``problems`` holds ``(line, key path, reason)`` tuples."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(f"line {line}: {reason}" for line, _, reason in problems))


def read_text(path: Path, max_bytes: int = MAX_BYTES) -> str:
    """A file's text, read as bytes (at most ``max_bytes``) and decoded as strict UTF-8 (a leading BOM is dropped).

    Raises:
        YamlError: not a regular file, unreadable, too large, or not UTF-8 (with the line of the first bad byte).
    """
    if path.is_dir():
        raise YamlError([(0, ("<file>",), "is a directory, not a YAML file")])
    if not path.is_file():  # a FIFO or a device would block or never end
        raise YamlError([(0, ("<file>",), "not a regular file")])
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise YamlError([(0, ("<file>",), f"cannot read: {e.strerror or e}")]) from None
    if len(raw) > max_bytes:
        raise YamlError([(0, ("<file>",), f"larger than {max_bytes // 1024} KiB: not a scenario")])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise YamlError([(line, ("<file>",), f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                                             "a scenario is a UTF-8 YAML file")]) from None


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# what a plain key that is not text reads as (resolved by SafeLoader's implicit resolvers)
_KEY_KINDS = {"tag:yaml.org,2002:bool": "a boolean", "tag:yaml.org,2002:null": "null (None)",
              "tag:yaml.org,2002:int": "an integer", "tag:yaml.org,2002:float": "a number"}
# SafeLoader's types beyond JSON's (a plain 2024-01-01 resolves to a timestamp)
_NOT_JSON = frozenset(f"tag:yaml.org,2002:{t}" for t in ("timestamp", "binary", "set", "omap", "pairs"))


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses anchors, aliases, nesting beyond :data:`MAX_DEPTH` and non-JSON values, and reads
    every number JSON and YAML 1.2 write as a number: YAML 1.1 reads ``1e-4`` and ``1.0e9`` (no '.' or no exponent
    sign) as text, which no setting takes (a quoted number stays text).

    Aliases are refused rather than counted: no shipped scenario uses them, and a handful of nested aliases
    already expands into millions of values for whatever walks the loaded data (validation, hashing).
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # PyYAML hook
        """Compose one node, refusing aliases/anchors and counting the depth."""
        event = self.peek_event()
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ComposerError(None, None, "anchors and aliases (&name, *name) are not supported in scenarios: "
                                            "write the value out where it applies", event.start_mark)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):  # PyYAML hook
        """Construct one value; a Python error from a scalar (e.g. an int of 5,000 digits) becomes a YAML error."""
        if node.tag in _NOT_JSON:
            # they do not survive the JSON a scenario is hashed and stored as
            raise ConstructorError(None, None, f"a YAML {node.tag.rsplit(':', 1)[-1]} is not supported: write text, "
                                               "a number, true/false, null, a list or a mapping", node.start_mark)
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, OverflowError, TypeError) as e:
            raise ConstructorError(None, None, f"cannot read this value: {e}", node.start_mark) from None


# YAML 1.2's (and JSON's) float, after SafeLoader's own resolvers: an integer or a YAML 1.1 float is matched first
_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"),
                                     list("-+0123456789."))


def load(text: str, max_bytes: int = MAX_BYTES) -> tuple[Any, dict[tuple, int]]:
    """Parse one YAML document safely.

    Args:
        text: the document.
        max_bytes: the size limit (in UTF-8 bytes) of the text.

    Returns:
        ``(data, lines)``: the plain Python value (dicts, lists, scalars) and the 1-based line of every node by its
        path (mapping keys and list indices, e.g. ``("frameworks", 0, "name")``); a key's path maps to the key's line.

    Raises:
        YamlError: too large, not YAML, several documents, anchors/aliases, too deep, or duplicate keys.
    """
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise YamlError([(0, ("<file>",), f"larger than {max_bytes // 1024} KiB: not a scenario")])
    loader = None
    try:
        loader = _BoundedLoader(text)
        node = loader.get_single_node()
        lines: dict[tuple, int] = {}
        problems: list[Problem] = []
        if node is not None:
            _walk(node, (), lines, problems)
        if problems:
            raise YamlError(problems)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise YamlError([_yaml_problem(e, text)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def load_path(path: Path, max_bytes: int = MAX_BYTES) -> Any:
    """The value of the YAML file at ``path``, read as :func:`read_text` and :func:`load` read a scenario: for a file
    the harness wrote itself and reads back (a sweep's resolved ``scenario.yaml``), which may have been damaged or
    replaced since, so that it costs no more to read than a scenario.

    Raises:
        YamlError: missing, not a regular file, too large, not UTF-8 or not one plain YAML document.
    """
    if not path.exists():
        raise YamlError([(0, ("<file>",), "no such file")])
    return load(read_text(path, max_bytes), max_bytes)[0]


def _walk(node: yaml.Node, path: tuple, lines: dict[tuple, int], problems: list[Problem]) -> None:
    """Record the line of every node by its path, every key written twice in one mapping, every merge key and every
    key that is not text (one pass, no alias can make it revisit a node: the composer refused them)."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for k, v in node.value:
            line = k.start_mark.line + 1
            if not isinstance(k, yaml.ScalarNode):  # a list or mapping as a key: nothing can be named by it
                problems.append((line, path + (f"<{k.id} key>",), f"a key must be text, not a YAML {k.id}"))
                continue
            key = k.value
            if k.tag == _MERGE_TAG:
                problems.append((line, path + (key,), "merge keys (<<) are not supported in scenarios: write the keys "
                                                      "out where they apply"))
                continue
            if k.tag != _STR_TAG:
                kind = _KEY_KINDS.get(k.tag, f"a YAML {k.tag.rsplit(':', 1)[-1]}")
                problems.append((line, path + (key,), f"key {short_repr(key)} reads as {kind}, not as text: quote it "
                                                      f"({short_repr(str(key))}) if it is meant as a name"))
                continue
            ident = (k.tag, k.value)
            if ident in seen:
                problems.append((line, path + (key,), f"duplicate key {short_repr(key)} (first at line "
                                                      f"{seen[ident]}): YAML would silently keep the last one"))
                continue
            seen[ident] = line
            lines[path + (key,)] = line
            _walk(v, path + (key,), lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _walk(v, path + (i,), lines, problems)


def _yaml_problem(e: yaml.YAMLError, text: str) -> Problem:
    """``(line, ("<yaml>",), reason)`` from any PyYAML error, with the best line it offers."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        line = mark.line + 1
    elif isinstance(getattr(e, "position", None), int):  # ReaderError: a character YAML does not allow
        line = text.count("\n", 0, e.position) + 1
    else:
        line = 1
    if isinstance(e, yaml.reader.ReaderError):
        reason = f"character U+{e.character:04X} is not allowed in YAML (control characters and NUL are not text)"
    else:
        problem, context = getattr(e, "problem", None), getattr(e, "context", None)
        reason = (f"{context}: {problem}" if context else problem) if problem else str(e)
    return line, ("<yaml>",), reason


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters, so a hostile value cannot flood an error message."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def line_of(lines: dict[tuple, int], loc: tuple) -> int:
    """The line of ``loc`` in a :func:`load` line map, else of its nearest enclosing key (1 for the top)."""
    loc = tuple(loc)
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 1)


def dotted(loc: tuple) -> str:
    """A key path as the user writes it: ``("frameworks", 0, "overrides", "x")`` -> ``frameworks[0].overrides.x``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top>"
