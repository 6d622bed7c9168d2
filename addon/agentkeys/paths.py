"""Request paths: made canonical before anything matches them, and matched by globs that respect `/`.

A policy's `endpoints` and `unmetered_endpoints`, and every wire format's list of endpoints, are
matched against the path as the provider will read it. So a path is first normalised (percent-
escapes of ordinary characters decoded, `.` and `..` segments resolved, `//` collapsed, a trailing
`/` dropped) and that normal form is both what is matched and what is forwarded: the provider never
sees a path other than the one the policy allowed. A path that cannot be normalised safely (an
escaped `/`, `\\` or `%`, a control character, a `..` above the root) is refused.

In a path glob, `*` matches any run of characters within one segment (never a `/`), `**` any run
at all (`/` included), `?` one character other than `/`. Nothing else is special.
"""

import functools
import re
import string

# RFC 3986's `pchar` (unreserved, sub-delims, ':' and '@'), and the separator: all a normal path may hold.
PATH_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~" + "!$&'()*+,;=" + ":@" + "/")
PERCENT_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


class UnsafePath(ValueError):
    """A request path with no single meaning (an escaped separator, a climb above the root, …): refused
    with a 400, never matched and never forwarded."""


def normalise_path(path: str) -> str:
    """The one path a provider will read from `path` (which starts with `/`, no query); UnsafePath if none."""
    if not path.startswith("/"):
        raise UnsafePath(f"the path {path!r} does not start with '/'")
    decoded = PERCENT_ESCAPE.sub(decoded_escape, path)
    if "%" in decoded:
        raise UnsafePath("the path has a '%' that is not a valid percent-escape")
    strange = sorted(set(decoded) - PATH_CHARACTERS)
    if strange:
        raise UnsafePath(f"the path has characters a provider's path never holds: {''.join(strange)!r}")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise UnsafePath("the path climbs above the root with '..'")
            segments.pop()
        else:
            segments.append(segment)
    return "/" + "/".join(segments)


def decoded_escape(match: re.Match) -> str:
    """`%2e` -> `.`; an escaped `/`, `\\`, `%` or a character no path holds raises UnsafePath."""
    character = chr(int(match[1], 16))
    if character == "/" or character not in PATH_CHARACTERS:
        raise UnsafePath(f"the path has an escaped character ({match[0]}) that a provider could read as another path")
    return character


def path_matches(pattern: str, path: str) -> bool:
    """Whether `path` (normalised) matches the glob `pattern` (`*` within a segment, `**` across them)."""
    return glob_regex(pattern).fullmatch(path) is not None


@functools.lru_cache(maxsize=4096)
def glob_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wildcards = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part) or re.escape(part) for part in parts), re.DOTALL)


def path_glob_within(inner: str, outer: str) -> bool:
    """Whether every path `inner` matches, `outer` matches too (decided conservatively: False when unsure).

    Decided for the shapes policies use: a literal path; a pattern equal to the outer one; a
    pattern under an outer `PREFIX**`; `PREFIX*` under an outer `PREFIX*` whose prefix it extends
    within the same segment.
    """
    if inner == outer:
        return True
    if not has_wildcard(inner):
        return path_matches(outer, inner)
    if outer.endswith("**") and not has_wildcard(outer[:-2]):
        return inner.startswith(outer[:-2])
    outer_prefix, inner_prefix = outer[:-1], inner[:-1]
    return (
        inner.endswith("*") and not inner.endswith("**") and outer.endswith("*")
        and not has_wildcard(inner_prefix) and not has_wildcard(outer_prefix)
        and inner_prefix.startswith(outer_prefix) and "/" not in inner_prefix[len(outer_prefix):]
    )  # fmt: skip


def has_wildcard(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern
