"""YAML files into pydantic models (yamlfile.py): a bad file is refused with its file, line and field."""

import textwrap

import pytest
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from agentkeys.yamlfile import ConfigError, load_yaml_model


class Limit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    tokens: int


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str
    limits: list[Limit] = []
    retries: int = 0

    @field_validator("title")
    @classmethod
    def not_reserved(cls, title: str, info: ValidationInfo) -> str:
        if title in (info.context or {}).get("reserved", ()):
            raise ValueError(f"{title!r} is reserved")
        return title


def write(tmp_path, text: str):
    path = tmp_path / "settings.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def problems(path, **context) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        load_yaml_model(path, Settings, **context)
    assert str(refused.value) == "\n".join(refused.value.problems)
    return refused.value.problems


def test_a_good_file_loads(tmp_path):
    path = write(tmp_path, """
        title: demo
        limits:
          - {name: a, tokens: 5}
    """)  # fmt: skip
    assert load_yaml_model(path, Settings) == Settings(title="demo", limits=[Limit(name="a", tokens=5)])


def test_a_wrong_field_is_named_with_its_line(tmp_path):
    path = write(tmp_path, """
        title: demo
        retries: often
    """)  # fmt: skip
    [problem] = problems(path)
    assert problem.startswith(f"{path}:2: retries: ") and "integer" in problem


def test_a_field_inside_a_list_is_found_on_its_own_line(tmp_path):
    path = write(tmp_path, """
        title: demo
        limits:
          - name: a
            tokens: 5
          - name: b
            tokens: lots
    """)  # fmt: skip
    [problem] = problems(path)
    assert problem.startswith(f"{path}:6: limits.1.tokens: ")


def test_a_missing_field_is_placed_on_its_parents_line(tmp_path):
    path = write(tmp_path, """
        title: demo
        limits:
          - name: a
    """)  # fmt: skip
    [problem] = problems(path)
    assert problem == f"{path}:3: limits.0.tokens: Field required"


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, """
        retries: often
        colour: blue
    """)  # fmt: skip
    found = problems(path)
    assert len(found) == 3
    assert any(p.startswith(f"{path}:1: retries: ") for p in found)
    assert any(p.startswith(f"{path}:2: colour: ") for p in found)
    assert any(p.startswith(f"{path}:1: title: Field required") for p in found)


def test_validators_see_the_context_and_their_message_is_kept_plain(tmp_path):
    path = write(tmp_path, "title: admin\n")
    assert problems(path, reserved={"admin"}) == [f"{path}:1: title: 'admin' is reserved"]
    assert load_yaml_model(path, Settings).title == "admin"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("title: [unclosed\n", ":2: invalid YAML: "),
        ("- just\n- a list\n", ":1: expected a mapping of fields, got list"),
        ("", ":1: expected a mapping of fields, got NoneType"),
    ],
    ids=["bad-yaml", "not-a-mapping", "empty"],
)
def test_a_file_that_is_not_a_mapping_of_fields_is_refused(tmp_path, text, expected):
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    [problem] = problems(path)
    assert problem.startswith(f"{path}{expected}")


def test_a_missing_file_says_it_cannot_be_read(tmp_path):
    [problem] = problems(tmp_path / "absent.yaml")
    assert problem == f"{tmp_path / 'absent.yaml'}: cannot read: No such file or directory"
