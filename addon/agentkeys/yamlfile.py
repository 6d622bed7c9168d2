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
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 1
        raise ConfigError([f"{path}:{line}: invalid YAML: {e.problem}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: expected a mapping of fields, got {type(data).__name__}"])
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError([_describe(path, root, error) for error in e.errors()]) from None


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
