"""`agentkeys accounts …`: the admin API's verbs on the command line, over the config's store.

agentkeys accounts create alice --plan pro        an account on a plan
agentkeys accounts mint alice --ttl 30m           a key for it (printed once)
agentkeys accounts usage alice                    its spend per period
"""

import sys
import time

from agentkeys import accounts
from agentkeys.keys import describe, iso
from agentkeys.money import Usd, dumps, format_usd, usd_to_micros
from agentkeys.plans import current_plans
from agentkeys.policy import parse_budget, parse_duration
from agentkeys.seal import store_seal


def add_account_commands(commands, config_option) -> None:
    verbs = commands.add_parser(
        "accounts", parents=[config_option], help="accounts on plans: create, suspend, mint keys, top up, usage"
    ).add_subparsers(required=True, metavar="ACTION")
    create = verbs.add_parser("create", help="an account on a plan (from the config's plans)")
    create.add_argument("account_id", help="your user's or tenant's id")
    create.add_argument("--plan", required=True)
    create.add_argument("--name", default="", help="a name to show (default: the id)")
    update = verbs.add_parser("update", help="move an account to another plan, or rename it")
    update.add_argument("account_id")
    update.add_argument("--plan")
    update.add_argument("--name")
    mint = verbs.add_parser("mint", help="a key for an account, bound by its plan; prints it once")
    mint.add_argument("account_id")
    mint.add_argument("--policy", help="one of its plan's policies, by name (default: the plan's first)")
    mint.add_argument("--ttl", help="lifetime, e.g. 30m (default: the policy's ttl)")
    mint.add_argument("--budget", help="the key's own USD cap (default: the policy's budget_usd)")
    mint.add_argument("--name", default="", help="a name for the key (default: the policy's name)")
    usage = verbs.add_parser("usage", help="an account's spend per period, newest first")
    usage.add_argument("account_id")
    usage.add_argument("--period", help="only this period (2026-12, 2026-W49, 2026-12-01)")
    top_up = verbs.add_parser("top-up", help="add USD to an account's budget for its current period only")
    top_up.add_argument("account_id")
    top_up.add_argument("amount_usd")
    for name, help_text, run in (
        ("list", "every account, with its current period", cmd_list),
        ("show", "one account and its current period", cmd_show),
        ("suspend", "refuse every key of an account at once", cmd_suspend),
        ("resume", "serve a suspended account's keys again", cmd_resume),
        ("delete", "revoke an account's keys and forget it and its books", cmd_delete),
        ("keys", "the keys minted for an account", cmd_keys),
    ):
        verb = verbs.add_parser(name, help=help_text)
        if name != "list":
            verb.add_argument("account_id")
        verb.set_defaults(run=run)
    for verb, run in ((create, cmd_create), (update, cmd_update), (mint, cmd_mint), (top_up, cmd_top_up),
                      (usage, cmd_usage)):  # fmt: skip
        verb.set_defaults(run=run)
    for verb in verbs.choices.values():
        verb.add_argument("--json", action="store_true")


def answered(command):
    """Run an account command; an AccountRefused is one line on stderr and exit status 1."""

    def run(args) -> int:
        try:
            return command(args) or 0
        except accounts.AccountRefused as e:
            print(f"error: {e.message}", file=sys.stderr)
            return 1

    return run


def store_and_config(args):
    from agentkeys.cli import open_store, read_config  # the CLI's own config and store rules

    config = read_config(args)
    return open_store(args, config), config


def show(args, value: dict | list) -> None:
    if args.json:
        print(dumps(value, indent=2))
    elif isinstance(value, dict):
        for name, field in value.items():
            print(f"{name:>15}  {dumps(field) if isinstance(field, (dict, list)) else field}")
    else:
        for item in value:
            print(dumps(item))


@answered
def cmd_create(args) -> int:
    ledger, config = store_and_config(args)
    plan = accounts.plan_named(current_plans(config), args.plan)
    record = accounts.new_account(args.account_id, args.name, plan, time.time())
    try:
        ledger.create_account(record)
    except ValueError as e:
        raise accounts.AccountRefused(str(e)) from None
    show(args, accounts.show_account(ledger, record, config.calendar, time.time()))


@answered
def cmd_update(args) -> int:
    ledger, config = store_and_config(args)
    plan = accounts.plan_named(current_plans(config), args.plan) if args.plan else None
    record = accounts.changed_account(accounts.existing_account(ledger, args.account_id), plan, args.name)
    ledger.update_account(record)
    show(args, accounts.show_account(ledger, record, config.calendar, time.time()))


def set_status(args, status: str) -> int:
    ledger, config = store_and_config(args)
    record = accounts.changed_account(accounts.existing_account(ledger, args.account_id), status=status)
    ledger.update_account(record)
    show(args, accounts.show_account(ledger, record, config.calendar, time.time()))


cmd_suspend = answered(lambda args: set_status(args, "suspended"))
cmd_resume = answered(lambda args: set_status(args, "active"))


@answered
def cmd_list(args) -> int:
    ledger, config = store_and_config(args)
    now = time.time()
    shown = [accounts.show_account(ledger, record, config.calendar, now) for record in ledger.list_accounts()]
    if args.json:
        print(dumps(shown, indent=2))
        return
    from agentkeys.cli import print_table

    columns = ["id", "plan", "status", "period", "spent_usd", "remaining_usd"]
    rows = [
        [a["id"], a["plan"], a["status"], a["current_period"]["id"], str(a["current_period"]["spent_usd"]),
         str(a["current_period"]["remaining_usd"])]
        for a in shown
    ]  # fmt: skip
    print_table(columns, rows)


@answered
def cmd_show(args) -> int:
    ledger, config = store_and_config(args)
    show(args, accounts.show_account(ledger, accounts.existing_account(ledger, args.account_id), config.calendar,
                                     time.time()))  # fmt: skip


@answered
def cmd_delete(args) -> int:
    ledger, _ = store_and_config(args)
    if not ledger.delete_account(args.account_id, time.time()):
        raise accounts.UnknownAccount(args.account_id)
    print(f"deleted account {args.account_id}; its keys are revoked")


@answered
def cmd_keys(args) -> int:
    ledger, _ = store_and_config(args)
    accounts.existing_account(ledger, args.account_id)
    show(args, accounts.describe_keys(ledger, args.account_id, time.time()))


@answered
def cmd_usage(args) -> int:
    ledger, config = store_and_config(args)
    account = accounts.existing_account(ledger, args.account_id)
    report = accounts.account_usage(ledger, account, config.calendar, time.time())
    show(args, {**report, "periods": [p for p in report["periods"] if args.period in (None, p["id"])]})


@answered
def cmd_mint(args) -> int:
    from agentkeys.cli import option_value

    ttl, budget = option_value(parse_duration, "--ttl", args.ttl), option_value(parse_budget, "--budget", args.budget)
    ledger, config = store_and_config(args)
    account = accounts.existing_account(ledger, args.account_id)
    seal = store_seal(config.path(config.certs_dir))
    issued = accounts.mint_account_key(
        ledger, account, current_plans(config), args.policy, ttl, budget, args.name, seal=seal
    )
    record = issued.record
    if args.json:
        print(dumps({**describe(record, time.time()), "key": issued.key}))
        return
    print(issued.key)
    print(
        f"# id {record.key_id}, account {account.account_id}, policy {record.policy_name},"
        f" budget {format_usd(record.budget_micros)}, expires {iso(record.expires_at)}; the key is shown only once",
        file=sys.stderr,
    )


@answered
def cmd_top_up(args) -> int:
    from agentkeys.cli import option_value

    amount = option_value(parse_budget, "amount_usd", args.amount_usd)
    ledger, _ = store_and_config(args)
    books = ledger.top_up(args.account_id, usd_to_micros(amount), time.time())
    if books is None:
        raise accounts.UnknownAccount(args.account_id)
    show(args, {"account_id": args.account_id, "period": books.period_id, "top_up_usd": Usd(books.top_up_micros)})
