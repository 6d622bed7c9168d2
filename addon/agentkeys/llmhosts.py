"""The catalogue of LLM API hosts: which vendor a host belongs to (no mitmproxy here).

The proxy governs calls to the providers its config names. A call to another LLM API host is LLM
traffic that nobody configured: the proxy recognises it by this catalogue (shipped in
`data/llm_hosts.json`; extended or overridden by the config's `llm_hosts`, or replaced by
`llm_hosts_file`), audits it, and refuses or passes it per `unknown_llm_hosts`. A host that a
configured provider names is that provider's, never the catalogue's.
"""

import fnmatch
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from agentkeys.yamlfile import load_yaml_model

HOST_GLOB = re.compile(r"[a-z0-9*][a-z0-9.*-]*")


def host_glob(value: str) -> str:
    """A host name or glob, lower-case: `api.mistral.ai`, `*.openai.azure.com`; no scheme, port or path."""
    glob = value.strip().lower()
    if not HOST_GLOB.fullmatch(glob):
        raise ValueError(f"{value!r} is not a host name or glob (say api.mistral.ai or *.openai.azure.com)")
    return glob


HostGlob = Annotated[str, AfterValidator(host_glob)]
Vendors = dict[str, list[HostGlob]]  # vendor → host globs; an empty list takes the vendor out


class CatalogueFile(BaseModel):
    """`hosts: {vendor: [host globs]}` (`llm_hosts_file`, and the shipped catalogue)."""

    model_config = ConfigDict(extra="forbid")
    hosts: Vendors


@dataclass(frozen=True)
class Catalogue:
    """Host → vendor: exact names in a dict, globs tried in turn."""

    names: dict[str, str]
    globs: tuple[tuple[str, str], ...]  # (glob, vendor)

    @classmethod
    def of(cls, vendors: Vendors) -> "Catalogue":
        hosts = [(glob, vendor) for vendor, globs in vendors.items() for glob in globs]
        names = {glob: vendor for glob, vendor in hosts if "*" not in glob}
        return cls(names, tuple((glob, vendor) for glob, vendor in hosts if "*" in glob))

    def vendor_of(self, host: str) -> str | None:
        """The vendor whose LLM API `host` is, else None."""
        host = host.lower().rstrip(".")
        vendor = self.names.get(host)
        if vendor is not None:
            return vendor
        return next((vendor for glob, vendor in self.globs if fnmatch.fnmatchcase(host, glob)), None)


def shipped() -> Vendors:
    data = json.loads(resources.files("agentkeys").joinpath("data/llm_hosts.json").read_text())
    return CatalogueFile.model_validate({"hosts": data["hosts"]}).hosts


def catalogue(replacement: Path | None, changes: Vendors) -> Catalogue:
    """The shipped catalogue (or the `replacement` file's), with `changes` by vendor on top (ConfigError
    naming the file, line and field if the replacement is bad)."""
    vendors = load_yaml_model(replacement, CatalogueFile).hosts if replacement else shipped()
    merged = {**vendors, **changes}
    return Catalogue.of({vendor: globs for vendor, globs in merged.items() if globs})
