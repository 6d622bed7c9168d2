"""Load a YAML file into a pydantic model, with errors that name the file, line and field.

pydantic reports *which* field is wrong; YAML's node tree knows *where* it is. We compose the
document once, validate its data, and map each error's location back to its node's line.
"""

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(Exception):
    """A file that cannot be used, with one `file:line: field: reason` per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def load_yaml_model(path: Path, model: type[Model], **context) -> Model:
    text = read_text(Path(path))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}:{yaml_error_line(e, text)}: invalid YAML: {yaml_error_problem(e)}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}:1: invalid YAML: nested too deeply"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: expected a mapping of fields, got {type(data).__name__}"])
    duplicates = [f"{path}:{line}: {field}: {problem}" for line, field, problem in duplicate_keys(root)]
    if duplicates:
        raise ConfigError(duplicates)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError([_describe(path, root, error) for error in e.errors()]) from None


def read_text(path: Path) -> str:
    """The file as UTF-8 text; a byte that is not UTF-8 is refused with its line and the field it is in."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        field = field_at_line(raw.decode(errors="replace"), line)
        where = f" {field}:" if field else ""
        raise ConfigError([f"{path}:{line}:{where} not UTF-8 text (byte 0x{raw[e.start]:02x})"]) from None


def yaml_error_line(error: yaml.YAMLError, text: str) -> int:
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return mark.line + 1
    position = getattr(error, "position", None)  # a character YAML does not allow (yaml.reader.ReaderError)
    return text[:position].count("\n") + 1 if position is not None else 1


def yaml_error_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.reader.ReaderError):
        character = error.character if isinstance(error.character, int) else ord(error.character)
        return f"character U+{character:04X} is not allowed"
    return getattr(error, "problem", None) or str(error)


def duplicate_keys(root: yaml.Node) -> list[tuple[int, str, str]]:
    """(line, field, problem) for each key given twice in one mapping: YAML keeps the last silently."""
    found, pending = [], [(root, "")]
    while pending:
        node, prefix = pending.pop()
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key, value in node.value:
                name, line = str(key.value), key.start_mark.line + 1
                if name in first_line:
                    found.append((line, prefix + name, f"duplicate key (first given on line {first_line[name]})"))
                first_line.setdefault(name, line)
                pending.append((value, f"{prefix}{name}."))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((item, f"{prefix}{i}.") for i, item in enumerate(node.value))
    return sorted(found)


def field_at_line(text: str, line: int) -> str:
    """The dotted name of the deepest field whose value spans `line`, or "" (best effort, for messages)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return ""
    names: list[str] = []
    while isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        children = node.value if isinstance(node, yaml.MappingNode) else list(enumerate(node.value))
        inside = [(str(name.value if isinstance(name, yaml.Node) else name), child) for name, child in children
                  if (name.start_mark.line if isinstance(name, yaml.Node) else child.start_mark.line) + 1 <= line
                  <= child.end_mark.line + 1]  # fmt: skip
        if not inside:
            break
        name, node = inside[-1]
        names.append(name)
    return ".".join(names)


def _describe(path: Path, root: yaml.Node, error: dict) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "(document)"
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}:{_line_of(root, error['loc'])}: {field}: {message}"


def _line_of(node: yaml.Node, loc: tuple) -> int:
    """The line of the deepest node along `loc` (the parent's line when the field is missing)."""
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
