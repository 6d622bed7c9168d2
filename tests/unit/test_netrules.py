"""netrules: what `agentkeys sidecar-init` asks of iptables, parsed and built without running it
(tests/test_netns.py runs it in a namespace)."""

import pytest

from agentkeys.cli import main
from agentkeys.netrules import FILTER_CHAIN, NAT_CHAIN, RedirectSpec, chains, parse_ports


def test_ports_are_parsed_once_and_bad_ones_refused():
    assert parse_ports("80, 443,8443") == (80, 443, 8443)
    with pytest.raises(ValueError, match="separated by commas"):
        parse_ports("80;443")
    with pytest.raises(ValueError, match="70000 is not a TCP port"):
        RedirectSpec(to_port=15001, ports=(443, 70000), proxy_uid=1337)
    with pytest.raises(ValueError, match="cannot itself be redirected"):
        RedirectSpec(to_port=443, ports=(80, 443), proxy_uid=1337)


def rules_of(spec: RedirectSpec, ipv6: bool = False) -> dict[tuple[str, str], list[str]]:
    return {(c.tool, c.table): [" ".join(rule) for rule in c.rules] for c in chains(spec, ipv6)}


def test_the_redirect_spares_the_proxys_own_connections():
    [redirect] = rules_of(RedirectSpec(15001, (80, 443), proxy_uid=1337))[("iptables", "nat")]
    assert redirect == ("-p tcp -m multiport --dports 80,443 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 15001")


def test_drop_others_refuses_all_but_the_proxy_loopback_dns_and_replies():
    egress = rules_of(RedirectSpec(15001, proxy_uid=1337, drop_others=True))[("iptables", "filter")]
    assert egress[0] == "-m owner --uid-owner 1337 -j RETURN"
    assert "-o lo -j RETURN" in egress and "-p udp --dport 53 -j RETURN" in egress
    assert egress[-1] == "-j REJECT"


def test_ipv6_is_refused_on_the_redirected_ports_since_the_listener_is_ipv4():
    rules = rules_of(RedirectSpec(15001, (443,), proxy_uid=1337), ipv6=True)
    assert rules[("ip6tables", "filter")] == ["-p tcp -m multiport --dports 443 -m owner ! --uid-owner 1337 -j REJECT"]
    assert ("iptables", "filter") not in rules  # no drop_others: other ports are left alone


def test_our_chains_have_names_of_their_own():
    names = {c.name for c in chains(RedirectSpec(15001, proxy_uid=1, drop_others=True), ipv6=True)}
    assert names == {NAT_CHAIN, FILTER_CHAIN}


def test_sidecar_init_needs_the_transparent_port_from_its_options_or_the_config(tmp_path, capsys):
    config = tmp_path / "agentkeys.yaml"
    config.write_text("proxy_port: 8080\n")
    assert main(["--config", str(config), "sidecar-init", "--proxy-uid", "1337"]) == 1
    assert "give --to-port, or set transparent_port in the config" in capsys.readouterr().err
    assert main(["sidecar-init", "--proxy-uid", "1337", "--to-port", "443", "--ports", "443"]) == 1
    assert "cannot itself be redirected" in capsys.readouterr().err
