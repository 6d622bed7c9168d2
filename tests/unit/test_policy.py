"""Policies and the proxy config: durations, endpoint rules, model globs, and errors that point at the line."""

import hashlib
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from agentkeys.policy import (
    ClaimMatch,
    EndpointRule,
    Policy,
    ProxyConfig,
    Scope,
    current_policies,
    key_showing,
    load_config,
    load_policy,
    parse_byte_size,
    parse_duration,
    scope_of,
)
from agentkeys.yamlfile import ConfigError

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def policy(**fields) -> Policy:
    base = {
        "name": "t",
        "budget_usd": 1,
        "providers": ["openai"],
        "endpoints": ["POST /v1/chat/completions"],
        "models": ["gpt-4o-mini*"],
    }
    return Policy.model_validate({**base, **fields})


# ----- durations -----


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("2d", 172800), (" 1H ", 3600)],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5x", "", "-1", 0, -5, "1h 30m", "m", "h1", True])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_duration_accepts_a_bare_number_given_as_text():
    assert parse_duration("90") == 90


# ----- endpoint rules -----


@pytest.mark.parametrize(
    "raw",
    ["POST /v1/chat/completions", "post   /v1/chat/completions ", {"method": "post", "path": "/v1/chat/completions"}],
)
def test_endpoint_rule_from_string_or_mapping(raw):
    rule = EndpointRule.model_validate(raw)
    assert (rule.method, rule.path) == ("POST", "/v1/chat/completions")
    assert str(rule) == "POST /v1/chat/completions"


@pytest.mark.parametrize("raw", ["/v1/chat/completions", "POST", "POST v1/chat", {"method": "GET"}])
def test_endpoint_rule_rejects(raw):
    with pytest.raises(ValidationError):
        EndpointRule.model_validate(raw)


@pytest.mark.parametrize(
    ("rule", "method", "path", "allowed"),
    [
        ("POST /v1/chat/completions", "POST", "/v1/chat/completions", True),
        ("POST /v1/chat/completions", "post", "/v1/chat/completions", True),
        ("POST /v1/chat/completions", "GET", "/v1/chat/completions", False),
        ("POST /v1/chat/completions", "POST", "/v1/chat/completions/x", False),
        ("GET /v1/models/*", "GET", "/v1/models/gpt-4o", True),
        ("GET /v1/models/*", "GET", "/v1/models", False),
        ("* /v1/*", "DELETE", "/v1/files", True),
        ("* /v1/*", "DELETE", "/v1/files/abc", False),  # `*` stays within one segment
        ("* /v1/**", "DELETE", "/v1/files/abc", True),  # `**` crosses them
        ("* /v1/*", "GET", "/v2/files", False),
        ("POST /v1/files*", "POST", "/v1/files/x/../../chat/completions", False),
        ("GET /v1/models/?", "GET", "/v1/models/a", True),
        ("GET /v1/models/?", "GET", "/v1/models//", False),
        ("GET /V1/models", "GET", "/v1/models", False),  # paths are case-sensitive
    ],
)
def test_endpoint_rule_matching(rule, method, path, allowed):
    assert EndpointRule.model_validate(rule).matches(method, path) is allowed
    assert policy(endpoints=[rule]).allows_endpoint(method, path) is allowed


@pytest.mark.parametrize(
    ("model", "allowed"),
    [
        ("gpt-4o-mini", True),
        ("gpt-4o-mini-2024-07-18", True),
        ("gpt-4o", False),
        ("GPT-4O-MINI", False),
        ("claude-haiku-4-5", True),
        ("claude-sonnet-4-5", False),
    ],
)
def test_policy_allows_models_by_glob(model, allowed):
    assert policy(models=["gpt-4o-mini*", "claude-haiku-?-5"]).allows_model(model) is allowed


def test_policy_defaults_and_duration_ttl():
    p = policy(ttl="30m")
    assert (p.ttl, p.default_max_output_tokens, p.description) == (1800, None, "")


@pytest.mark.parametrize("field", ["budget_usd", "providers", "endpoints", "models"])
def test_policy_requires_a_useful_value(field):
    bad = {"budget_usd": 0, "providers": [], "endpoints": [], "models": []}[field]
    with pytest.raises(ValidationError, match=field):
        policy(**{field: bad})


# ----- loading policy files: errors name file, line and field -----

GOOD_LINES = [
    "name: t",
    "providers: [openai]",
    "models: [gpt-4o-mini]",
    "budget_usd: 1",
    "endpoints:",
    "  - POST /v1/chat/completions",
]


def lines_with(replace: dict[int, str] | None = None, append: tuple[str, ...] = (), drop: int | None = None) -> str:
    """GOOD_LINES with some (1-based) lines replaced, dropped or added at the end."""
    lines = [(replace or {}).get(n, line) for n, line in enumerate(GOOD_LINES, start=1) if n != drop]
    return "\n".join([*lines, *append]) + "\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (lines_with({4: "budget_usd: -3"}), [":4: budget_usd:", "greater than 0"]),
        (lines_with(append=("  - chat please",)), [":7: endpoints.1:", "METHOD /path"]),
        (lines_with({6: "  - {method: POST}"}), [":6: endpoints.0.path:", "required"]),
        (lines_with(drop=3), [":1: models:", "Field required"]),
        (lines_with(append=("budget: 5",)), [":7: budget:", "Extra inputs"]),
        (lines_with({2: "ttl: soon"}), [":2: ttl:", "not a duration"]),
        (lines_with({3: "models: gpt: 4"}), [":3: invalid YAML"]),
        ("- a list\n", [":1: expected a mapping"]),
    ],
    ids=[
        "negative-budget",
        "bad-endpoint-item",
        "endpoint-missing-path",
        "missing-field",
        "unknown-field",
        "bad-duration",
        "yaml-syntax",
        "not-a-mapping",
    ],
)
def test_load_policy_errors_name_file_line_and_field(tmp_path, text, expected):
    path = tmp_path / "bad.policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    for fragment in expected:
        assert fragment in message, message


def test_load_policy_reports_every_problem(tmp_path):
    path = tmp_path / "bad.policy.yaml"
    path.write_text(lines_with({4: "budget_usd: -3"}, append=("color: blue",)))
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert len(caught.value.problems) == 2
    assert any(":4: budget_usd:" in p for p in caught.value.problems)
    assert any(":7: color:" in p for p in caught.value.problems)


def test_load_policy_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path / "nope.policy.yaml")


def test_a_good_policy_file_loads(tmp_path):
    path = tmp_path / "good.policy.yaml"
    path.write_text(lines_with())
    assert load_policy(path).endpoints == [EndpointRule(method="POST", path="/v1/chat/completions")]


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.policy.yaml")), ids=lambda p: p.name)
def test_example_policies_load(path):
    loaded = load_policy(path)
    assert loaded.name and loaded.budget_usd > 0
    assert loaded.allows_endpoint("POST", "/v1/chat/completions")


def test_there_are_example_policies():
    assert len(list(POLICIES.glob("*.policy.yaml"))) >= 3


# ----- proxy config -----


def test_proxy_config_keeps_default_providers_when_one_field_is_overridden():
    config = ProxyConfig.model_validate({"providers": {"openai": {"upstream": "http://127.0.0.1:9999/"}}})
    openai = config.providers["openai"]
    assert openai.upstream == "http://127.0.0.1:9999"
    assert (openai.format, openai.hosts, openai.key_env) == ("openai", ["api.openai.com"], "OPENAI_API_KEY")
    assert config.providers["anthropic"].upstream == "https://api.anthropic.com"


def test_proxy_config_adds_an_openai_compatible_provider():
    extra = {"format": "openai", "upstream": "https://api.groq.com/openai", "key_env": "GROQ_API_KEY"}
    config = ProxyConfig.model_validate({"providers": {"groq": extra}})
    assert set(config.providers) == {"openai", "anthropic", "gemini", "groq"}
    assert config.providers["groq"].hosts == []


def test_load_config_merges_defaults_and_resolves_paths(tmp_path):
    path = tmp_path / "agentkeys.yaml"
    path.write_text(
        textwrap.dedent("""\
        store: sqlite:///data/keys.db
        providers:
          anthropic:
            upstream: http://localhost:1234
    """)
    )
    config = load_config(path)
    assert config.providers["anthropic"].key_env == "ANTHROPIC_API_KEY"
    assert config.providers["openai"].upstream == "https://api.openai.com"
    assert config.store_url == f"sqlite:///{(tmp_path / 'data' / 'keys.db').resolve()}"


def test_proxy_config_accepts_a_redis_store(tmp_path):
    path = tmp_path / "agentkeys.yaml"
    path.write_text("store: redis://localhost:6379/2\n")
    config = load_config(path)
    assert config.store_url == "redis://localhost:6379/2"


@pytest.mark.parametrize("store", ["postgres://x", "agentkeys.db"])
def test_proxy_config_rejects_unknown_store(tmp_path, store):
    path = tmp_path / "agentkeys.yaml"
    path.write_text(f"proxy_port: 8080\nstore: {store}\n")
    with pytest.raises(ConfigError, match=":2: store:"):
        load_config(path)


@pytest.mark.parametrize("option", ["mode", "confdir", "connection_strategy", "agentkeys_store"])
def test_proxy_config_keeps_the_mitmproxy_options_serve_sets_itself(tmp_path, option):
    path = tmp_path / "agentkeys.yaml"
    path.write_text(f"proxy_port: 8080\nmitmproxy:\n  ssl_insecure: true\n  {option}: x\n")
    with pytest.raises(ConfigError, match=f":2: mitmproxy: {option}: set by agentkeys serve"):
        load_config(path)


@pytest.mark.parametrize(
    "fields",
    [
        {"providers": {"openai": {"upstream": "ftp://x"}}},
        {"providers": {"openai": {"format": "cohere"}}},
        {"proxy_port": 70000},
        {"egress": "sometimes"},
    ],
)
def test_proxy_config_rejects_bad_values(fields):
    with pytest.raises(ValidationError):
        ProxyConfig.model_validate(fields)


def scope_policy(**fields) -> Policy:
    endpoints = ["POST /v1/chat/completions", "POST /v1/messages"]
    base = {"name": "team", "budget_usd": 1, "providers": ["openai", "anthropic"], "endpoints": endpoints,
            "models": ["gpt-4o*", "claude-*"]}  # fmt: skip
    return Policy.model_validate({**base, **fields})


def test_a_scope_allows_only_what_every_policy_in_it_allows():
    issued = scope_policy(default_max_output_tokens=500, clamp_max_tokens=True)
    current = scope_policy(providers=["openai"], models=["gpt-4o-mini*"], endpoints=["POST /v1/chat/completions"],
                           default_max_output_tokens=100)  # fmt: skip
    scope = Scope((issued, current), "abc")
    assert scope.providers == ["openai"]
    assert scope.allows_model("gpt-4o-mini") and not scope.allows_model("gpt-4o") and not scope.allows_model("claude-x")
    assert scope.allows_endpoint("POST", "/v1/chat/completions") and not scope.allows_endpoint("POST", "/v1/messages")
    assert (scope.default_max_output_tokens, scope.clamp_max_tokens) == (100, False)


def test_a_key_is_scoped_by_its_issued_copy_and_the_current_file_of_that_name(tmp_path):
    issued = scope_policy()
    path = tmp_path / "team.policy.yaml"
    path.write_text(yaml.safe_dump(scope_policy(models=["gpt-4o-mini*"]).model_dump(mode="json")))
    config = ProxyConfig.model_validate({"policies": ["*.policy.yaml"], "base_dir": tmp_path})
    current = current_policies(config)
    scope = scope_of(issued.model_dump_json(), current)
    assert scope.revision == current["team"].revision and len(scope.revision) == 12
    assert not scope.allows_model("gpt-4o") and scope.allows_model("gpt-4o-mini")
    assert scope_of(scope_policy(name="other").model_dump_json(), current).revision is None


def test_proxy_config_reads_the_audit_settings_once_into_types(tmp_path):
    path = tmp_path / "agentkeys.yaml"
    path.write_text(
        "audit_sinks: [file, stdout]\naudit_rotate_bytes: 100MB\naudit_rotate_interval: 1d\n"
        "audit_checkpoint_interval: 30s\n"
    )
    config = load_config(path)
    assert config.audit_sinks_used == ["file", "stdout"]
    assert (config.audit_rotate_bytes, config.audit_rotate_interval) == (100_000_000, 86400)
    assert config.audit_checkpoint_interval == 30


@pytest.mark.parametrize(
    "audit_log, sinks, expected",
    [("audit.jsonl", None, ["file"]), (None, None, []), (None, ["stdout"], ["stdout"])],
)
def test_proxy_config_audit_sinks_default_to_the_file_when_there_is_one(audit_log, sinks, expected):
    assert ProxyConfig(audit_log=audit_log, audit_sinks=sinks).audit_sinks_used == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("audit_sinks: [file, syslog]\n", ":2: audit_sinks.1: Input should be 'file' or 'stdout'"),
        ("audit_log: null\naudit_sinks: [file]\n", ":3: audit_sinks: the file sink needs audit_log"),
        ("audit_sinks: []\n", ":2: audit_sinks: List should have at least 1 item"),
        ("audit_rotate_bytes: lots\n", ":2: audit_rotate_bytes: "),
        ("audit_rotate_bytes: 0\n", ":2: audit_rotate_bytes: a size must be positive"),
        ("audit_rotate_interval: soon\n", ":2: audit_rotate_interval: 'soon' is not a duration"),
        ("audit_checkpoint_interval: 0s\n", ":2: audit_checkpoint_interval: a duration must be positive"),
    ],
)
def test_proxy_config_refuses_bad_audit_settings_with_file_and_line(tmp_path, text, expected):
    path = tmp_path / "agentkeys.yaml"
    path.write_text("proxy_port: 8080\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert expected in str(caught.value)


# ----- sizes (max_request_bytes decides which bodies are refused unread) -----


@pytest.mark.parametrize(
    ("value", "size"),
    [(1, 1), (65536, 65536), ("1", 1), ("512k", 512 * 1024), ("64MiB", 64 * 1024**2), ("1g", 1024**3),
     ("100MB", 100 * 1000**2), (" 2 kb ", 2000)],
)  # fmt: skip
def test_a_size_is_read_in_bytes(value, size):
    assert parse_byte_size(value) == size
    assert ProxyConfig.model_validate({"max_request_bytes": value}).max_request_bytes == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "True is not a size (use e.g. 65536, 512k, 64MiB, 1g)"),
        ("12 parsecs", "'12 parsecs' is not a size (use e.g. 65536, 512k, 64MiB, 1g)"),
        (-5, "a size must be positive"),
        (0, "a size must be positive"),
        ("0k", "a size must be positive"),
    ],
)
def test_anything_else_is_not_a_size(value, message):
    with pytest.raises(ValueError) as refused:
        parse_byte_size(value)
    assert str(refused.value) == message


def test_without_a_price_file_the_table_is_the_bundle_and_the_configs_prices():
    prices = {"openai": {"my-model": {"input_per_mtok": 1, "output_per_mtok": 2}}}
    config = ProxyConfig.model_validate({"prices": prices})
    table = config.price_table()
    assert table.lookup("openai", "my-model").output == 2e-6
    assert table.lookup("openai", "gpt-4o-mini").source.startswith("bundled")
@pytest.mark.parametrize(
    "text, expected",
    [
        ("enforcement: sometimes\n", ":2: enforcement: Input should be 'enforce' or 'shadow'"),
        ("real_keys: allow\n", ":2: real_keys: Input should be 'refuse' or 'audit'"),
        ("unknown_llm_hosts: warn\n", ":2: unknown_llm_hosts: Input should be 'refuse', 'audit' or 'pass'"),
        ("llm_hosts:\n  inhouse: [https://llm.corp/v1]\n", ":3: llm_hosts.inhouse.0: 'https://llm.corp/v1' is not a"),
        ("llm_hosts_file: missing.yaml\n", "missing.yaml: cannot read"),
    ],
)
def test_proxy_config_refuses_bad_security_team_settings_with_file_and_line(tmp_path, text, expected):
    path = tmp_path / "agentkeys.yaml"
    path.write_text("proxy_port: 8080\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path).llm_catalogue()
    assert expected in str(caught.value)


def test_a_policy_may_say_shadow_or_enforce_or_leave_it_to_the_config(tmp_path):
    assert scope_policy().enforcement is None
    assert scope_policy(enforcement="shadow").enforcement == "shadow"
    with pytest.raises(ValidationError, match="enforcement"):
        scope_policy(enforcement="off")
# ----- rate limits and the loop breaker -----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (lines_with(append=("rate_limits:", "  requests_per_minute: 0")), [":8: rate_limits.requests_per_minute:",
                                                                          "greater than 0"]),
        (lines_with(append=("rate_limits:", "  calls_per_minute: 5")), [":8: rate_limits.calls_per_minute:", "Extra"]),
        (lines_with(append=("rate_limits: {tokens_per_minute: lots}",)), [":7: rate_limits.tokens_per_minute:"]),
        (lines_with(append=("max_identical_calls: 5 a minute",)), [":7: max_identical_calls:", "'N per WINDOW'"]),
        (lines_with(append=("max_identical_calls: 5 per fortnight",)), [":7: max_identical_calls.window:", "duration"]),
        (lines_with(append=("max_identical_calls: 0 per 1m",)), [":7: max_identical_calls.calls:", "greater than 0"]),
        (lines_with(append=("max_calls: -1",)), [":7: max_calls:", "greater than 0"]),
    ],
    ids=["zero-rpm", "unknown-limit", "not-a-number", "no-per", "bad-window", "zero-calls", "negative-max-calls"],
)
def test_bad_limits_name_file_line_and_field(tmp_path, text, expected):
    path = tmp_path / "bad.policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    for fragment in expected:
        assert fragment in str(caught.value), str(caught.value)


def test_limits_are_read_in_either_form(tmp_path):
    path = tmp_path / "good.policy.yaml"
    path.write_text(lines_with(append=(
        "rate_limits: {requests_per_minute: 60, tokens_per_minute: 100000, concurrent_calls: 4}",
        "max_identical_calls: {calls: 3, window: 1h}",
        "max_calls: 500",
    )))  # fmt: skip
    policy = load_policy(path)
    assert (policy.rate_limits.requests_per_minute, policy.rate_limits.concurrent_calls) == (60, 4)
    assert (policy.max_identical_calls.calls, policy.max_identical_calls.window, policy.max_calls) == (3, 3600, 500)
    assert str(policy.max_identical_calls) == "3 per 1h"


def test_a_scope_holds_the_tightest_of_the_issued_copy_and_the_file():
    issued = policy(rate_limits={"requests_per_minute": 10}, max_calls=50)
    now = policy(
        rate_limits={"requests_per_minute": 20, "concurrent_calls": 2}, max_calls=40, max_identical_calls="3 per 1m"
    )
    scope = Scope((issued, now))
    limits = scope.rate_limits
    assert (limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_calls) == (10, None, 2)
    assert scope.max_calls == 40 and [str(limit) for limit in scope.max_identical_calls] == ["3 per 1m"]


def write_policy(path: Path, name: str, models: list[str]) -> Path:
    path.write_text(yaml.safe_dump(scope_policy(name=name, models=models).model_dump(mode="json")))
    return path


def test_the_current_policies_are_the_files_named_globbed_and_issued_from(tmp_path):
    write_policy(tmp_path / "a.policy.yaml", "a", ["gpt-4o*"])
    write_policy(tmp_path / "b.policy.yaml", "b", ["gpt-4o*"])
    write_policy(tmp_path / "plain.yaml", "plain", ["gpt-4o*"])
    write_policy(tmp_path / "ci.yaml", "ci", ["gpt-4o*"])
    config = ProxyConfig.model_validate({
        "policies": ["*.policy.yaml", "plain.yaml", "a.policy.yaml"],  # a file named twice is one file
        "issuers": {"ci": {"token_env": "CI_TOKEN", "policies": ["ci.yaml"]}},
        "base_dir": tmp_path,
    })  # fmt: skip
    current = current_policies(config)
    assert sorted(current) == ["a", "b", "ci", "plain"]
    assert current["plain"].revision == hashlib.sha256((tmp_path / "plain.yaml").read_bytes()).hexdigest()[:12]


def test_two_files_defining_one_policy_name_are_refused(tmp_path):
    write_policy(tmp_path / "one.yaml", "team", ["gpt-4o*"])
    write_policy(tmp_path / "two.yaml", "team", ["gpt-4o-mini*"])
    config = ProxyConfig.model_validate({"policies": ["one.yaml", "two.yaml"], "base_dir": tmp_path})
    with pytest.raises(ConfigError) as refused:
        current_policies(config)
    assert str(refused.value) == f"{tmp_path / 'two.yaml'}: name: policy team is also defined by another file"


def test_a_policy_file_named_literally_must_exist_where_a_glob_may_match_none(tmp_path):
    assert current_policies(ProxyConfig.model_validate({"policies": ["*.policy.yaml"], "base_dir": tmp_path})) == {}
    with pytest.raises(ConfigError, match="Missing-X.yaml"):
        current_policies(ProxyConfig.model_validate({"policies": ["Missing-X.yaml"], "base_dir": tmp_path}))


def test_without_a_config_file_the_defaults_are_relative_to_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None).base_dir == tmp_path  # where a later chdir cannot move it


@pytest.mark.parametrize(
    ("value", "seconds"), [(1, 1), ("1s", 1), (3650 * 86400, 3650 * 86400), ("3650d", 3650 * 86400), (2.9, 2)]
)
def test_a_duration_from_one_second_to_ten_years_is_read(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("inf"), "inf is not a duration (use e.g. 90s, 5m, 1h, 1h30m, 2d)"),
        (float("nan"), "nan is not a duration (use e.g. 90s, 5m, 1h, 1h30m, 2d)"),
        ("soon", "'soon' is not a duration (use e.g. 90s, 5m, 1h, 1h30m, 2d)"),
        (0, "a duration must be positive"),
        (0.5, "a duration must be positive"),
        (3650 * 86400 + 1, "315360001 is longer than the longest duration allowed, 3650d"),
        ("3651d", "'3651d' is longer than the longest duration allowed, 3650d"),
    ],
)
def test_anything_else_is_not_a_duration_and_says_why(value, message):
    with pytest.raises(ValueError) as refused:
        parse_duration(value)
    assert str(refused.value) == message


def test_a_claim_match_names_its_conditions_as_lists_of_globs():
    match = ClaimMatch.model_validate({"repository": "acme/*", "ref": ["refs/heads/main", "refs/tags/*"]})
    assert match.conditions() == {"repository": ["acme/*"], "ref": ["refs/heads/main", "refs/tags/*"]}
    with pytest.raises(ValidationError, match="name at least one claim to match"):
        ClaimMatch.model_validate({})


@pytest.mark.parametrize(
    ("options", "showing"),
    [({"flow_detail": 2, "proxy_debug": True}, {"flow_detail": 1, "proxy_debug": False}),
     ({"flow_detail": 1, "proxy_debug": False}, {}), ({"flow_detail": 3}, {"flow_detail": 1}), ({}, {})],
)  # fmt: skip
def test_the_mitmproxy_options_that_would_print_a_real_key_are_named_with_their_safe_value(options, showing):
    assert key_showing(options) == showing
