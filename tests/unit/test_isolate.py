"""isolate: the pieces of `agentkeys run --isolate` that need no namespace (tests/test_netns.py runs it)."""

from agentkeys.isolate import command_in, provider_addresses


def test_each_provider_host_gets_a_loopback_address_of_its_own():
    addresses = provider_addresses(["api.openai.com", "api.anthropic.com", "api.openai.com", "agentkeys.local"])
    assert addresses == {
        "127.0.1.1": "api.openai.com",
        "127.0.1.2": "api.anthropic.com",
        "127.0.1.3": "agentkeys.local",
    }


def test_the_command_runs_without_capabilities_and_as_the_sudo_user(monkeypatch):
    monkeypatch.delenv("SUDO_UID", raising=False)
    as_root = command_in("ns", ["agent", "--flag"])
    assert as_root[:4] == ["ip", "netns", "exec", "ns"] and as_root[-3:] == ["--", "agent", "--flag"]
    assert "--bounding-set=-all" in as_root and "--no-new-privs" in as_root and "--reuid" not in as_root
    monkeypatch.setenv("SUDO_UID", "1000")
    monkeypatch.setenv("SUDO_GID", "1000")
    as_user = command_in("ns", ["agent"])
    assert as_user[as_user.index("--reuid") + 1] == "1000" and as_user[as_user.index("--regid") + 1] == "1000"
