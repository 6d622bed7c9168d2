"""What every Python framework script shares: run one path, print one JSON line saying how it went."""

import json
import traceback

from pydantic import BaseModel


class City(BaseModel):
    """The structured output every script asks for."""

    name: str
    population: int


def weather(city: str) -> str:
    """The tool every script offers: the weather in a city."""
    return f"sunny in {city}"


def path(name: str, run) -> None:
    """Run one path; `run` returns nothing or raises. Prints {"path", "ok", "why"} on one line."""
    try:
        run()
        print(json.dumps({"path": name, "ok": True}), flush=True)
    except Exception as e:  # any failure of the framework is this path's result
        why = f"{type(e).__name__}: {e}".replace("\n", " ")[:240]
        print(json.dumps({"path": name, "ok": False, "why": why}), flush=True)
        traceback.print_exc()


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)
