"""llmhosts.py: the shipped catalogue of LLM API hosts, its globs, and the config's changes to it."""

import pytest

from agentkeys.llmhosts import Catalogue, catalogue, shipped
from agentkeys.yamlfile import ConfigError

# The issue's list, by a host of each: every one must be known to the shipped catalogue.
NAMED_IN_THE_ISSUE = {
    "api.openai.com": "openai", "api.anthropic.com": "anthropic", "generativelanguage.googleapis.com": "gemini",
    "us-central1-aiplatform.googleapis.com": "vertex-ai", "aiplatform.googleapis.com": "vertex-ai",
    "contoso.openai.azure.com": "azure-openai", "bedrock-runtime.eu-west-1.amazonaws.com": "bedrock",
    "api.groq.com": "groq", "api.mistral.ai": "mistral", "api.deepseek.com": "deepseek",
    "api.together.xyz": "together", "api.fireworks.ai": "fireworks", "openrouter.ai": "openrouter",
    "api.cohere.com": "cohere", "api.x.ai": "xai", "api.perplexity.ai": "perplexity",
}  # fmt: skip


@pytest.mark.parametrize(("host", "vendor"), NAMED_IN_THE_ISSUE.items())
def test_the_shipped_catalogue_knows_every_host_the_issue_names(host, vendor):
    assert catalogue(None, {}).vendor_of(host) == vendor


@pytest.mark.parametrize(
    "host", ["openai.azure.com.evil.example", "s3.eu-west-1.amazonaws.com", "example.com", "mistral.ai", ""]
)
def test_other_hosts_are_not_llm_hosts(host):
    assert catalogue(None, {}).vendor_of(host) is None


def test_a_host_is_matched_whatever_its_case_or_trailing_dot():
    assert catalogue(None, {}).vendor_of("API.Mistral.AI.") == "mistral"


def test_the_config_adds_a_vendor_replaces_one_and_removes_one():
    changed = catalogue(None, {"inhouse": ["llm.corp.example", "*.llm.corp.example"], "groq": [], "mistral": ["m.x"]})
    assert changed.vendor_of("eu.llm.corp.example") == "inhouse"
    assert changed.vendor_of("api.groq.com") is None
    assert (changed.vendor_of("m.x"), changed.vendor_of("api.mistral.ai")) == ("mistral", None)
    assert changed.vendor_of("api.openai.com") == "openai", "the rest of the catalogue stays"


def test_a_catalogue_file_replaces_the_shipped_one_and_a_bad_one_names_its_line(tmp_path):
    own = tmp_path / "hosts.yaml"
    own.write_text("hosts:\n  inhouse: [llm.corp.example]\n")
    replaced = catalogue(own, {})
    assert (replaced.vendor_of("llm.corp.example"), replaced.vendor_of("api.openai.com")) == ("inhouse", None)
    own.write_text("hosts:\n  inhouse:\n    - https://llm.corp.example/v1\n")
    with pytest.raises(ConfigError, match=r"hosts.yaml:3: hosts.inhouse.0: .*not a host name or glob"):
        catalogue(own, {})


def test_the_shipped_file_is_valid_and_every_entry_is_reachable():
    vendors = shipped()
    built = Catalogue.of(vendors)
    for vendor, globs in vendors.items():
        for glob in globs:
            assert built.vendor_of(glob.replace("*", "x")) == vendor, glob
