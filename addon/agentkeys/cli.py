"""The `agentkeys` command: run the proxy, issue and manage keys, check policies, show the CA."""

import argparse
import csv
import itertools
import json
import os
import platform
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import agentkeys
from agentkeys import auditreport, credentials, logs
from agentkeys.accountscli import add_account_commands
from agentkeys.audit import AuditSettings
from agentkeys.auditchain import fingerprint, load_public_key, public_key_pem, signing_key
from agentkeys.auditfiles import audit_files, call_records
from agentkeys.auditverify import verify
from agentkeys.certs import agent_environment, bundle_path, ca_cert_path, ensure_ca
from agentkeys.isolate import IsolationError, check_privileges
from agentkeys.keys import describe, iso, issue_key
from agentkeys.ledger import KeyRecord, Ledger, LedgerUnavailable, open_ledger
from agentkeys.money import dumps, format_usd
from agentkeys.netrules import RedirectSpec, Rules, RulesError, describe_rules, parse_ports
from agentkeys.policy import ProxyConfig, load_config, load_policy, parse_budget, parse_duration
from agentkeys.pricing import price_rows
from agentkeys.runner import run_with_key
from agentkeys.seal import store_seal
from agentkeys.yamlfile import ConfigError

DEFAULT_CONFIG = Path("agentkeys.yaml")
PROBE_TIMEOUT_SECONDS = 4
LIST_PAGE = 10_000  # keys read from the store at a time by a filtered `keys list`


class NoStore(Exception):
    """The config names a key store that does not exist; only `serve` (or `keys issue --create-store`) makes one."""


class BadOption(Exception):
    """An option's value is unusable (`--ttl 0s`, `--budget inf`): one line saying which and why."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(config_first(sys.argv[1:] if argv is None else argv))
    try:
        status = args.run(args) or 0
        sys.stdout.flush()  # here, so that a reader gone away is caught below, not at the interpreter's exit
        return status
    except (ConfigError, NoStore, BadOption) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LedgerUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except BrokenPipeError:
        # The reader went away (`keys list | head`): what it did not read is not wanted. Point stdout at
        # /dev/null so that the interpreter's last flush does not fail again on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def option_value(parse, option: str, text: str | None):
    """`text` parsed by `parse`, None if the option was not given; BadOption naming the option otherwise."""
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError as e:
        raise BadOption(f"{option}: {e}") from None


def config_first(argv: list[str]) -> list[str]:
    """Accept `--config FILE` after the command too (`agentkeys serve --config FILE`), never past `--`."""
    end = argv.index("--") if "--" in argv else len(argv)
    for i, arg in enumerate(argv[:end]):
        if arg == "--config" and i + 1 < end:
            return [arg, argv[i + 1], *argv[:i], *argv[i + 2 :]]
        if arg.startswith("--config="):
            return [arg, *argv[:i], *argv[i + 1 :]]
    return argv


CONFIG_HELP = "proxy config (default: $AGENTKEYS_CONFIG, else ./agentkeys.yaml if present)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentkeys", description=__doc__)
    parser.add_argument("--config", type=Path, help=CONFIG_HELP)
    parser.add_argument("--version", action="version", version=version_line())
    # `--config` after a command too, shown in its --help; SUPPRESS keeps the one given before the command.
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE", help=CONFIG_HELP)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        parents=[config_option],
        help="run the proxy (proxy mode and gateway mode listeners)",
        description="Run the proxy: proxy mode and gateway mode listeners, and the metrics port (/metrics,"
        " /healthz, /readyz). Listeners, store, audit log, metrics port, log format and mitmproxy options"
        " come from the config file. Stops on SIGINT or SIGTERM.",
    )
    serve.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="proxy processes sharing the listeners, the store and the metrics port (default: one per core)",
    )
    serve.set_defaults(run=cmd_serve)

    keys = commands.add_parser("keys", help="issue, list, show and revoke agent keys").add_subparsers(
        required=True, metavar="ACTION"
    )
    issue = keys.add_parser("issue", help="mint a key from a policy; prints it once")
    issue.add_argument("policy", type=Path, help="a *.policy.yaml file")
    issue.add_argument("--ttl", help="lifetime, e.g. 5m, 1h (default: the policy's ttl)")
    issue.add_argument("--budget", help="USD cap (default: the policy's budget_usd)")
    issue.add_argument(
        "--create-store", action="store_true", help="create the config's key store if it does not exist yet"
    )
    issue.add_argument("--name", help="a name for the key (default: the policy's name)")
    issue.add_argument("--json", action="store_true", help="print id, key, expiry and budget as JSON")
    issue.set_defaults(run=cmd_keys_issue)
    listing = keys.add_parser("list", help="all keys with their spend")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--status", choices=["active", "revoked", "expired"], help="only keys in this state")
    listing.add_argument("--policy", help="only keys issued from this policy (its name)")
    listing.add_argument("--parent", metavar="ID", help="only the child keys of this key")
    listing.add_argument("--limit", type=positive_int, metavar="N", help="at most N keys (a page); the rest: --offset")
    listing.add_argument(
        "--offset", type=non_negative_int, default=0, metavar="N", help="skip the first N keys listed (default 0)"
    )
    listing.set_defaults(run=cmd_keys_list)
    show = keys.add_parser("show", help="one key in detail")
    show.add_argument("key_id", metavar="ID_OR_KEY", help="the key's id, or the key itself (ak_…)")
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
    run.add_argument("--budget", help="USD cap (default: the policy's budget_usd)")
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

    ca = commands.add_parser(
        "ca",
        parents=[config_option],
        help="where the CA is, and the environment an agent needs",
        description="Create the proxy's CA if there is none (in the config's certs_dir), and print where it is"
        " and the environment lines an agent needs to use the proxy.",
    )
    ca.set_defaults(run=cmd_ca)

    probe = commands.add_parser(
        "probe",
        parents=[config_option],
        help="ask the running proxy whether it is ready (or alive); exit status 0 if it is",
        description="Ask the proxy of this config, on its metrics port, whether it is ready (/readyz: listeners"
        " up, CA loaded, store answering) or alive (/healthz); print its answer; exit status 0 if so, 1 if not."
        " For a container's HEALTHCHECK or an exec probe; an HTTP probe can ask the port itself.",
    )
    probe.add_argument("question", choices=["ready", "alive"], nargs="?", default="ready")
    probe.set_defaults(run=cmd_probe)

    prices = commands.add_parser("prices", help="model prices").add_subparsers(required=True, metavar="ACTION")
    price_show = prices.add_parser("show", help="what a model costs, and where that price comes from")
    price_show.add_argument("model")
    price_show.add_argument("--provider", help="as the proxy prices it for this provider (default: every table)")
    price_show.set_defaults(run=cmd_prices_show)
    add_audit_commands(commands)
    add_account_commands(commands, config_option)
    return parser


def version_line() -> str:
    from mitmproxy.version import VERSION

    return f"agentkeys {agentkeys.__version__} (mitmproxy {VERSION}, Python {platform.python_version()})"


def add_audit_commands(commands) -> None:
    audit = commands.add_parser("audit", help="verify, report on and follow the audit log").add_subparsers(
        required=True, metavar="ACTION"
    )
    files_help = "audit files (default: every file of the config's audit_log, each writer's and rotated ones)"
    check = audit.add_parser("verify", help="prove audit files untouched; else name the first bad record, exit 1")
    check.add_argument("files", nargs="*", type=Path, help=files_help)
    check.add_argument("--public-key", type=Path, help="the proxy's public key (`agentkeys audit public-key`)")
    check.add_argument("--live", action="store_true", help="the proxy is still writing: accept a tail not yet signed")
    check.set_defaults(run=cmd_audit_verify)
    summary = audit.add_parser("report", help="calls, tokens, cost and refusals, grouped")
    summary.add_argument("files", nargs="*", type=Path, help=files_help)
    summary.add_argument("--since", help="only records this recent, e.g. 24h, 7d (default: all)")
    summary.add_argument("--by", choices=list(auditreport.GROUPINGS), default="key")
    summary.add_argument(
        "--real-keys", action="store_true",
        help="the real provider keys still used (real_keys: audit), by fingerprint: from where, how often, what cost",
    )  # fmt: skip
    output = summary.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true")
    output.add_argument("--csv", action="store_true")
    summary.set_defaults(run=cmd_audit_report)
    tail = audit.add_parser("tail", help="the last calls, and with -f each new one as it is written")
    tail.add_argument("log", nargs="?", type=Path, help="the log's live file (default: the config's audit_log)")
    tail.add_argument("-f", "--follow", action="store_true")
    tail.add_argument("-n", "--lines", type=int, default=10, help="how many past records to show first")
    for name in ("key", "policy", "decision", "host"):
        tail.add_argument(f"--{name}", help=f"only calls with this {name}" + (" (id or name)" if name == "key" else ""))
    tail.add_argument("--json", action="store_true", help="the records as written, one JSON object a line")
    tail.set_defaults(run=cmd_audit_tail)
    public = audit.add_parser("public-key", help="print the key that checks the audit log's signatures (PEM)")
    public.set_defaults(run=cmd_audit_public_key)


def config_file(args) -> Path | None:
    """--config, else $AGENTKEYS_CONFIG, else ./agentkeys.yaml if there is one; None means the defaults."""
    path = args.config or (Path(os.environ["AGENTKEYS_CONFIG"]) if os.environ.get("AGENTKEYS_CONFIG") else None)
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    return path


def read_config(args) -> ProxyConfig:
    return load_config(config_file(args))


def open_store(args, config: ProxyConfig, create: bool = False):
    """The config's key store, after saying on stderr which config and store these are. A SQLite file that
    does not exist is refused unless `create`: a store made by mistake (run outside the config's folder)
    would hold keys the running proxy never sees."""
    announce(args, f"store {config.store_url}")
    path = sqlite_path(config.store_url)
    if path is not None and not path.exists() and not create:
        raise NoStore(
            f"no key store at {path} (the store of {describe_config(args)}); run this in the config's folder or"
            " give --config, or create the store: start the proxy (agentkeys serve) or keys issue --create-store"
        )
    return open_ledger(config.store_url, config.calendar)


def sqlite_path(store_url: str) -> Path | None:
    return Path(store_url.removeprefix("sqlite:///")) if store_url.startswith("sqlite:///") else None


def describe_config(args) -> str:
    path = config_file(args)
    return f"config {path.resolve()}" if path else f"the default config (no agentkeys.yaml in {Path.cwd()})"


def announce(args, using: str) -> None:
    """One stderr line: which config a command read, and which store (or folder) it uses."""
    print(f"agentkeys: using {describe_config(args)}, {using}", file=sys.stderr)


# ----- serve -----


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of at least 1: {text!r}")
    return int(text)


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number of at least 0: {text!r}")
    return int(text)


def cmd_serve(args) -> int:
    from agentkeys.workers import default_workers, supervise

    config = read_config(args)
    certs_dir = config.path(config.certs_dir)
    if config.log_format != "json":  # a JSON log names them in its first line, the banner
        announce(args, f"store {config.store_url}, CA in {certs_dir}")
    ensure_ca(certs_dir)
    host = config.listen_host
    modes = [
        f"regular@{host}:{config.proxy_port}",
        # The reverse target is never dialled: the addon routes every gateway call by its path prefix.
        f"reverse:http://127.0.0.1:9@{host}:{config.gateway_port}",
    ]
    if config.transparent_port:  # the original destination of each connection comes from its socket
        modes.append(f"transparent@{host}:{config.transparent_port}")
    settings = {**config.mitmproxy, **connection_limits(config)}
    settings.update(confdir=str(certs_dir), connection_strategy="lazy")
    if config_file(args):
        settings["agentkeys_config"] = str(config_file(args))
    if config.log_format == "json":
        fields = {**banner_fields(config), "config": describe_config(args), "store": config.store_url}
        print(logs.json_line(time.time(), "info", "agentkeys: starting", fields), flush=True)
    else:
        print_how_to_connect(config, certs_dir)
    workers = args.workers or default_workers()
    if workers == 1:
        from agentkeys.server import serve  # mitmproxy's proxy core: a supervisor needs none of it

        return serve(settings, modes, config.log_format)
    if AuditSettings.of(config).enabled:  # made once here, not raced for by the workers
        signing_key(certs_dir)
    if sqlite_path(config.store_url):  # made before the listeners open, as one proxy does (keys issue waits for it)
        open_ledger(config.store_url).close()
    return supervise(workers, settings, modes, config.log_format, config)


def banner_fields(config: ProxyConfig) -> dict:
    """Where the proxy listens and which command manages it: the first thing its log says."""
    host = config.listen_host
    return {
        "version": agentkeys.__version__,
        "proxy": f"{host}:{config.proxy_port}",
        "gateway": f"http://{host}:{config.gateway_port}",
        "metrics": f"http://{host}:{config.metrics_port}/metrics" if config.metrics_port else None,
        "command": agentkeys_command(),
    }


def agentkeys_command() -> str:
    """The full path of the `agentkeys` command that runs this code, for the lines the banner suggests."""
    beside_python = Path(sys.executable).with_name("agentkeys")
    found = beside_python if beside_python.exists() else shutil.which("agentkeys")
    return str(found) if found else f"{sys.executable} -m agentkeys.cli"


def connection_limits(config: ProxyConfig) -> dict:
    """The config's connection limits, as the options of the proxy's ConnectionGuard."""
    return {
        "agentkeys_max_connections": config.max_connections,
        "agentkeys_header_timeout": float(config.header_timeout),
        "agentkeys_idle_timeout": float(config.idle_timeout),
    }


def print_how_to_connect(config: ProxyConfig, certs_dir: Path) -> None:
    host, fields = config.listen_host, banner_fields(config)
    print(f"agentkeys {fields['version']}: proxy mode on {fields['proxy']}, gateway mode on {fields['gateway']}")
    if config.transparent_port:
        print(f"agentkeys: transparent mode on {host}:{config.transparent_port} (see agentkeys sidecar-init)")
    if fields["metrics"]:
        print(f"Metrics:       {fields['metrics']} (probes: /healthz, /readyz)")
    print(f"Issue a key:   {fields['command']} keys issue policies/example.policy.yaml --ttl 1h --budget 5")
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
    ttl, budget = option_value(parse_duration, "--ttl", args.ttl), option_value(parse_budget, "--budget", args.budget)
    policy = load_policy(args.policy)
    try:
        store, seal = open_store(args, config, args.create_store), store_seal(config.path(config.certs_dir))
        issued = issue_key(store, policy, ttl, budget, args.name or "", seal=seal)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = issued.record
    if args.json:
        print(dumps({**describe(record, time.time()), "key": issued.key}))
    else:
        print(issued.key)
        print(
            f"# id {record.key_id}, policy {policy.name}, budget {format_usd(record.budget_micros)},"
            f" expires {iso(record.expires_at)}; the key is shown only once",
            file=sys.stderr,
        )
    return 0


def cmd_keys_list(args) -> int:
    now, ledger = time.time(), open_store(args, read_config(args))
    wanted = {"status": args.status, "policy": args.policy, "parent_id": args.parent}
    wanted = {name: value for name, value in wanted.items() if value is not None}
    if wanted:  # filtered here, so read page by page, and no further than the page asked for
        summaries = (describe(record, now) for record in keys_in_pages(ledger))
        matching = (s for s in summaries if all(s[name] == value for name, value in wanted.items()))
        stop = None if args.limit is None else args.offset + args.limit
        summaries = list(itertools.islice(matching, args.offset, stop))
    else:
        summaries = [describe(record, now) for record in ledger.list_keys(args.offset, args.limit)]
    if args.limit is not None and len(summaries) == args.limit:
        next_page = args.offset + args.limit
        print(f"agentkeys: {args.limit} keys listed; the next ones: --offset {next_page}", file=sys.stderr)
    if args.json:
        print(dumps(summaries, indent=2))
        return 0
    columns = ["id", "name", "policy", "parent_id", "status", "expires_at"]
    columns += ["budget_usd", "spent_usd", "held_usd", "remaining_usd"]
    print_table(columns, [[str(s[c]) if s[c] is not None else "-" for c in columns] for s in summaries])
    return 0


def cmd_keys_show(args) -> int:
    record = find_key(open_store(args, read_config(args)), args.key_id)
    if record is None:
        given_key_id = credentials.key_id_of(args.key_id)  # a key given is named by its id, never echoed
        print(f"error: no key {given_key_id or args.key_id}", file=sys.stderr)
        return 1
    summary = {**describe(record, time.time()), "policy_rules": json.loads(record.policy_json)}
    if args.json:
        print(dumps(summary, indent=2))
    else:
        for name, value in summary.items():
            print(f"{name:>14}  {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def keys_in_pages(ledger: Ledger):
    """Every key, oldest first, read LIST_PAGE at a time (a listing, not a snapshot)."""
    for offset in itertools.count(0, LIST_PAGE):
        page = ledger.list_keys(offset, LIST_PAGE)
        yield from page
        if len(page) < LIST_PAGE:
            return


def find_key(ledger: Ledger, id_or_key: str) -> KeyRecord | None:
    """The key with this id, or this key itself (ak_…): then only if it is that key, not one sharing its id."""
    key_id = credentials.key_id_of(id_or_key)
    if key_id is None:
        return ledger.get_key(id_or_key)
    record = ledger.get_key(key_id)
    return record if record and credentials.matches(id_or_key, record.key_hash) else None


def cmd_keys_revoke(args) -> int:
    if not open_store(args, read_config(args)).revoke(args.key_id, time.time()):
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
    ttl, budget = option_value(parse_duration, "--ttl", args.ttl), option_value(parse_budget, "--budget", args.budget)
    policy = load_policy(args.policy)
    try:
        if args.isolate:
            check_privileges()  # before a key is minted: without them, nothing runs
        return run_with_key(
            config, config_file(args), open_store(args, config, create=True), policy, command, ttl, budget, args.proxy,
            args.isolate,
        )  # fmt: skip
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
    announce(args, f"CA in {certs_dir}")
    ensure_ca(certs_dir)
    print(f"# CA certificate: {ca_cert_path(certs_dir)}")
    print(f"# bundle (system roots + CA): {bundle_path(certs_dir)}")
    for name, value in agent_environment(certs_dir, f"http://{config.listen_host}:{config.proxy_port}").items():
        print(f"export {name}={value}")
    gateway = f"http://{config.listen_host}:{config.gateway_port}"
    print("# Node.js: fetch, and with it the openai and anthropic SDKs, ignores HTTPS_PROXY (Node 24+ honours it")
    print("# with NODE_USE_ENV_PROXY=1); otherwise give the SDK the gateway as its base URL, no CA needed:")
    print(f"#   export OPENAI_BASE_URL={gateway}/openai/v1")
    print(f"#   export ANTHROPIC_BASE_URL={gateway}/anthropic")
    return 0


def cmd_probe(args) -> int:
    config = read_config(args)
    if not config.metrics_port:
        print("error: the config turns the metrics port off (metrics_port): nothing to ask", file=sys.stderr)
        return 2
    url = f"http://{local_address(config.listen_host)}:{config.metrics_port}"
    url += "/readyz" if args.question == "ready" else "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_SECONDS) as answer:
            print(answer.read().decode().strip())
        return 0
    except urllib.error.HTTPError as e:
        print(e.read().decode().strip(), file=sys.stderr)
    except OSError as e:
        print(f"error: nothing answers at {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
    return 1


def local_address(listen_host: str) -> str:
    """Where this machine reaches a listener bound to `listen_host` (all addresses: the loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)
    return f"[{host}]" if ":" in host else host


def cmd_prices_show(args) -> int:
    """Each table pricing the model; with --provider, the one the proxy would use (its format's as a fallback)."""
    config = read_config(args)
    table = config.price_table()
    if args.provider:
        spec = config.providers.get(args.provider)
        matches = [table.find(args.model, args.provider, *([spec.format] if spec else []))]
    else:
        pricing = table.providers_pricing(args.model)  # the configured providers first, in the config's order
        ordered = [p for p in config.providers if p in pricing] + [p for p in pricing if p not in config.providers]
        matches = [table.find(args.model, provider) for provider in ordered]
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


# ----- audit -----


def audit_log_files(args) -> list[Path]:
    return args.files or [file.path for file in audit_files(audit_log_path(args))]


def audit_log_path(args) -> Path:
    """The live file of the config's audit log: every other file of the log is named after it."""
    config = read_config(args)
    if not config.audit_log:
        raise ConfigError(["the config has no audit_log: name the audit files"])
    return config.path(config.audit_log)


def cmd_audit_verify(args) -> int:
    trusted = load_public_key(args.public_key) if args.public_key else None
    files = audit_log_files(args)
    if not files:
        print(f"FAIL: no audit files at {audit_log_path(args)}")
        return 1
    verdict = verify(files, trusted, args.live)
    if verdict.problem:
        print(f"FAIL: {verdict.problem}")
        return 1
    span = f"{iso(verdict.first_ts)} to {iso(verdict.last_ts)}" if verdict.first_ts else "no calls"
    print(
        f"OK: {verdict.records} records ({verdict.calls} calls) by {verdict.writers} writer(s)"
        f" in {len(files)} file(s), {span}"
    )
    signers = ", ".join(sorted(verdict.signers)) or "none"
    if trusted:
        print(f"checkpoints signed by the given public key {fingerprint(trusted)}")
    else:
        print(f"checkpoints signed by the key(s) the log names: {signers}; pass --public-key to check they are yours")
    for note in verdict.notes:
        print(f"note: {note}")
    return 0


def cmd_audit_report(args) -> int:
    since = time.time() - parse_duration(args.since) if args.since else None
    records = call_records(audit_log_files(args), since)
    if args.real_keys:
        uses = auditreport.real_key_report(records)
        rows, columns = auditreport.real_key_rows(uses), ["real_key", *auditreport.REAL_KEY_COLUMNS]
    else:
        uses = auditreport.report(records, args.by)
        rows, columns = auditreport.report_rows(uses), [args.by, *auditreport.COLUMNS]
    if args.json:
        print(json.dumps({name: use.as_dict() for name, use in uses.items()}, indent=2))
    elif args.csv:
        csv.writer(sys.stdout).writerows([columns, *rows])
    else:
        print_table(columns, rows)
    return 0


def cmd_audit_tail(args) -> int:
    wanted = auditreport.RecordFilter(args.key, args.policy, args.decision, args.host)
    show = (lambda record: json.dumps(record)) if args.json else auditreport.describe
    base = args.log or audit_log_path(args)
    for record in auditreport.last_records(base, args.lines, wanted):
        print(show(record), flush=True)
    if not args.follow:
        return 0
    try:
        for record in auditreport.Follower(base, wanted).follow():
            print(show(record), flush=True)
    except KeyboardInterrupt:
        return 0


def cmd_audit_public_key(args) -> int:
    config = read_config(args)
    sys.stdout.write(public_key_pem(signing_key(config.path(config.certs_dir)).public_key).decode())
    return 0


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    for row in [columns, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
