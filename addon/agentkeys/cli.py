"""The `agentkeys` command: run the proxy, issue and manage keys, check policies, show the CA."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from agentkeys.certs import agent_environment, bundle_path, ca_cert_path, ensure_ca
from agentkeys.isolate import IsolationError, check_privileges
from agentkeys.keys import describe, iso, issue_key
from agentkeys.ledger import LedgerUnavailable, open_ledger
from agentkeys.money import format_usd
from agentkeys.netrules import RedirectSpec, Rules, RulesError, describe_rules, parse_ports
from agentkeys.policy import ProxyConfig, load_config, load_policy, parse_duration
from agentkeys.pricing import price_rows
from agentkeys.runner import run_with_key
from agentkeys.yamlfile import ConfigError

DEFAULT_CONFIG = Path("agentkeys.yaml")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(config_first(sys.argv[1:] if argv is None else argv))
    try:
        return args.run(args) or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LedgerUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


def config_first(argv: list[str]) -> list[str]:
    """Accept `--config FILE` after the command too (`agentkeys serve --config FILE`), never past `--`."""
    end = argv.index("--") if "--" in argv else len(argv)
    for i, arg in enumerate(argv[:end]):
        if arg == "--config" and i + 1 < end:
            return [arg, argv[i + 1], *argv[:i], *argv[i + 2 :]]
        if arg.startswith("--config="):
            return [arg, *argv[:i], *argv[i + 1 :]]
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentkeys", description=__doc__)
    parser.add_argument(
        "--config", type=Path, help="proxy config (default: $AGENTKEYS_CONFIG, else ./agentkeys.yaml if present)"
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy (proxy mode and gateway mode listeners)")
    serve.set_defaults(run=cmd_serve)

    keys = commands.add_parser("keys", help="issue, list, show and revoke agent keys").add_subparsers(
        required=True, metavar="ACTION"
    )
    issue = keys.add_parser("issue", help="mint a key from a policy; prints it once")
    issue.add_argument("policy", type=Path, help="a *.policy.yaml file")
    issue.add_argument("--ttl", help="lifetime, e.g. 5m, 1h (default: the policy's ttl)")
    issue.add_argument("--budget", type=float, help="USD cap (default: the policy's budget_usd)")
    issue.add_argument("--name", help="a name for the key (default: the policy's name)")
    issue.add_argument("--json", action="store_true", help="print id, key, expiry and budget as JSON")
    issue.set_defaults(run=cmd_keys_issue)
    listing = keys.add_parser("list", help="all keys with their spend")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_keys_list)
    show = keys.add_parser("show", help="one key in detail")
    show.add_argument("key_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=cmd_keys_show)
    revoke = keys.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=cmd_keys_revoke)

    run = commands.add_parser(
        "run",
        help="run a command with a fresh key, revoked when it ends",
        usage="agentkeys run --policy FILE [--ttl 30m] [--budget 2] [--proxy URL] [--isolate] -- CMD ARGS...",
    )
    run.add_argument("--policy", type=Path, required=True, help="the key's policy")
    run.add_argument("--ttl", help="lifetime (default: the policy's ttl)")
    run.add_argument("--budget", type=float, help="USD cap (default: the policy's budget_usd)")
    run.add_argument("--proxy", help="a running proxy's URL (default: the config's, started if none is listening)")
    run.add_argument(
        "--isolate", action="store_true",
        help="run CMD in its own network namespace whose only way out is the proxy (root or CAP_NET_ADMIN)",
    )  # fmt: skip
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    run.set_defaults(run=cmd_run)

    sidecar = commands.add_parser(
        "sidecar-init",
        help="redirect this network namespace's outgoing HTTP(S) to the proxy's transparent listener (iptables)",
        description="Write (or with --remove, take away) the iptables rules that send this network namespace's"
        " outgoing TCP to the proxy's transparent_port, the proxy's own connections excepted. Idempotent."
        " Needs root or CAP_NET_ADMIN: what a Kubernetes init container runs.",
    )
    sidecar.add_argument("--proxy-uid", type=int, help="the user id the proxy runs as; its connections are left alone")
    sidecar.add_argument("--to-port", type=int, help="the proxy's transparent port (default: the config's)")
    sidecar.add_argument("--ports", default="80,443", help="TCP ports to redirect (default: 80,443)")
    sidecar.add_argument(
        "--drop-others", action="store_true", help="refuse all other outgoing traffic but the proxy's, loopback, DNS"
    )
    sidecar.add_argument("--remove", action="store_true", help="remove the rules this command wrote")
    sidecar.set_defaults(run=cmd_sidecar_init)

    policy = commands.add_parser("policy", help="policy files").add_subparsers(required=True, metavar="ACTION")
    check = policy.add_parser("check", help="validate policy files; exit status 1 if any is invalid")
    check.add_argument("files", nargs="+", type=Path)
    check.set_defaults(run=cmd_policy_check)

    swap = commands.add_parser(
        "exchange", help="trade a workload's OIDC token (a pod's service-account token) for a key, and renew it"
    )
    swap.add_argument(
        "--token-file",
        type=Path,
        default=Path("/var/run/secrets/agentkeys/token"),
        help="the OIDC token, re-read at each renewal (default: /var/run/secrets/agentkeys/token)",
    )
    swap.add_argument("--proxy", default=os.environ.get("AGENTKEYS_URL"), help="gateway URL (default $AGENTKEYS_URL)")
    swap.add_argument("--out", type=Path, help="write the key to this file, replaced on renewal (default: print it)")
    swap.add_argument("--renew-before", type=parse_duration, help="keep running; renew this long before expiry")
    swap.add_argument("--name", help="a name for the key (default: namespace/serviceaccount pod POD)")
    swap.add_argument("--ttl", help="ask for a shorter lifetime than the rule gives")
    swap.add_argument("--budget", type=float, help="ask for a smaller USD cap than the rule gives")
    swap.set_defaults(run=cmd_exchange)

    ca = commands.add_parser("ca", help="where the CA is, and the environment an agent needs")
    ca.set_defaults(run=cmd_ca)

    prices = commands.add_parser("prices", help="model prices").add_subparsers(required=True, metavar="ACTION")
    price_show = prices.add_parser("show", help="what a model costs, and where that price comes from")
    price_show.add_argument("model")
    price_show.add_argument("--provider", help="as the proxy prices it for this provider (default: every table)")
    price_show.set_defaults(run=cmd_prices_show)
    return parser


def config_file(args) -> Path | None:
    """--config, else $AGENTKEYS_CONFIG, else ./agentkeys.yaml if there is one; None means the defaults."""
    path = args.config or (Path(os.environ["AGENTKEYS_CONFIG"]) if os.environ.get("AGENTKEYS_CONFIG") else None)
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    return path


def read_config(args) -> ProxyConfig:
    return load_config(config_file(args))


def open_store(config: ProxyConfig):
    return open_ledger(config.store_url)


# ----- serve -----


def cmd_serve(args) -> int:
    from agentkeys.server import serve

    config = read_config(args)
    certs_dir = config.path(config.certs_dir)
    ensure_ca(certs_dir)
    host = config.listen_host
    modes = [
        f"regular@{host}:{config.proxy_port}",
        # The reverse target is never dialled: the addon routes every gateway call by its path prefix.
        f"reverse:http://127.0.0.1:9@{host}:{config.gateway_port}",
    ]
    if config.transparent_port:  # the original destination of each connection comes from its socket
        modes.append(f"transparent@{host}:{config.transparent_port}")
    settings = {**config.mitmproxy, "confdir": str(certs_dir), "connection_strategy": "lazy"}
    if config_file(args):
        settings["agentkeys_config"] = str(config_file(args))
    print_how_to_connect(config, certs_dir)
    return serve(settings, modes)


def print_how_to_connect(config: ProxyConfig, certs_dir: Path) -> None:
    host = config.listen_host
    print(f"agentkeys: proxy mode on {host}:{config.proxy_port}, gateway mode on {host}:{config.gateway_port}")
    if config.transparent_port:
        print(f"agentkeys: transparent mode on {host}:{config.transparent_port} (see agentkeys sidecar-init)")
    print("Issue a key:   agentkeys keys issue policies/example.policy.yaml --ttl 1h --budget 5")
    print("Proxy mode (no code change; the agent trusts our CA):")
    for name, value in agent_environment(certs_dir, f"http://{host}:{config.proxy_port}").items():
        print(f"  export {name}={value}")
    print("  export OPENAI_API_KEY=ak_…   # or ANTHROPIC_API_KEY=ak_…")
    print("  # Node's fetch ignores HTTPS_PROXY: give a Node agent the gateway's base URL (agentkeys run sets both)")
    print("Gateway mode (no CA; set the SDK's base URL):")
    for name in config.providers:
        print(f"  {name}: http://{host}:{config.gateway_port}/{name}" + ("/v1" if name == "openai" else ""))
    sys.stdout.flush()


# ----- keys -----


def cmd_keys_issue(args) -> int:
    config = read_config(args)
    policy = load_policy(args.policy)
    ttl = parse_duration(args.ttl) if args.ttl else None
    try:
        issued = issue_key(open_store(config), policy, ttl, args.budget, args.name or "")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = issued.record
    if args.json:
        print(json.dumps({**describe(record, time.time()), "key": issued.key}))
    else:
        print(issued.key)
        print(
            f"# id {record.key_id}, policy {policy.name}, budget {format_usd(record.budget_micros)},"
            f" expires {iso(record.expires_at)}; the key is shown only once",
            file=sys.stderr,
        )
    return 0


def cmd_keys_list(args) -> int:
    now = time.time()
    summaries = [describe(record, now) for record in open_store(read_config(args)).list_keys()]
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    columns = ["id", "name", "policy", "status", "expires_at", "budget_usd", "spent_usd", "held_usd", "remaining_usd"]
    # USD to the micro-dollar, the ledger's own unit: a few cheap calls still show.
    rows = [[str(s[c]) if not c.endswith("_usd") else f"{s[c]:.6f}" for c in columns] for s in summaries]
    print_table(columns, rows)
    return 0


def cmd_keys_show(args) -> int:
    record = open_store(read_config(args)).get_key(args.key_id)
    if record is None:
        print(f"error: no key {args.key_id}", file=sys.stderr)
        return 1
    summary = {**describe(record, time.time()), "policy_rules": json.loads(record.policy_json)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for name, value in summary.items():
            print(f"{name:>14}  {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def cmd_keys_revoke(args) -> int:
    if not open_store(read_config(args)).revoke(args.key_id, time.time()):
        print(f"error: no active key {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


def cmd_run(args) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("error: give the command after --, e.g. agentkeys run --policy ci.policy.yaml -- pytest", file=sys.stderr)
        return 2
    config = read_config(args)
    ttl = parse_duration(args.ttl) if args.ttl else None
    policy = load_policy(args.policy)
    try:
        if args.isolate:
            check_privileges()  # before a key is minted: without them, nothing runs
        return run_with_key(
            config, config_file(args), open_store(config), policy, command, ttl, args.budget, args.proxy, args.isolate
        )
    except (IsolationError, RulesError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


# ----- sidecar-init -----


def cmd_sidecar_init(args) -> int:
    rules = Rules()
    try:
        if args.remove:
            rules.remove()
            print("agentkeys: the redirect rules are removed")
            return 0
        spec = redirect_spec(args)
        rules.apply(spec)
    except (ValueError, RulesError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(describe_rules(spec))
    return 0


def redirect_spec(args) -> RedirectSpec:
    if args.proxy_uid is None:
        raise ValueError("give --proxy-uid, the user the proxy runs as, or its own connections would loop back to it")
    to_port = args.to_port or read_config(args).transparent_port
    if not to_port:
        raise ValueError("give --to-port, or set transparent_port in the config")
    return RedirectSpec(to_port, parse_ports(args.ports), args.proxy_uid, args.drop_others)


def cmd_exchange(args) -> int:
    from agentkeys.exchange import run_exchange

    if not args.proxy:
        print("error: give the proxy's gateway URL with --proxy or AGENTKEYS_URL", file=sys.stderr)
        return 2
    if args.renew_before and not args.out:
        print("error: --renew-before needs --out (the file the renewed key replaces)", file=sys.stderr)
        return 2
    return run_exchange(args)


# ----- policy, ca -----


def cmd_policy_check(args) -> int:
    known_providers = set(read_config(args).providers)
    invalid = 0
    for path in args.files:
        try:
            policy = load_policy(path)
        except ConfigError as e:
            invalid += 1
            print(e, file=sys.stderr)
            continue
        unknown = [p for p in policy.providers if p not in known_providers]
        if unknown:
            invalid += 1
            print(f"{path}: providers: unknown provider(s) {', '.join(unknown)}", file=sys.stderr)
            continue
        print(f"ok: {path} (policy {policy.name})")
    return 1 if invalid else 0


def cmd_ca(args) -> int:
    config = read_config(args)
    certs_dir = config.path(config.certs_dir)
    ensure_ca(certs_dir)
    print(f"# CA certificate: {ca_cert_path(certs_dir)}")
    print(f"# bundle (system roots + CA): {bundle_path(certs_dir)}")
    for name, value in agent_environment(certs_dir, f"http://{config.listen_host}:{config.proxy_port}").items():
        print(f"export {name}={value}")
    return 0


def cmd_prices_show(args) -> int:
    """Each table pricing the model; with --provider, the one the proxy would use (its format's as a fallback)."""
    config = read_config(args)
    table = config.price_table()
    if args.provider:
        spec = config.providers.get(args.provider)
        matches = [table.find(args.model, args.provider, *([spec.format] if spec else []))]
    else:
        matches = [table.find(args.model, provider) for provider in table.providers_pricing(args.model)]
    matches = [match for match in matches if match]
    if not matches:
        where = f" for {args.provider}" if args.provider else ""
        print(f"error: no price is known for {args.model}{where}; calls to it are refused", file=sys.stderr)
        return 1
    for match in matches:
        family = f" (as {match.model})" if match.model != args.model else ""
        print(f"{args.model}: {match.provider}'s price{family}, {match.price.source}")
        print_table(["", "USD/token", "USD/1M tokens"], price_rows(match.price))
        limits = {"max output tokens": match.price.max_output_tokens, "context window": match.price.max_input_tokens}
        for name, value in limits.items():
            print(f"{name}: {value:,}" if value else f"{name}: unknown")
        print()
    return 0


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    for row in [columns, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
