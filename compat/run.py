"""`make compat`: the agent frameworks people use, unchanged, through the proxy in both modes.

Starts the mock provider and a real proxy (`agentkeys serve`), mints one key per framework and mode,
runs each framework's script (`compat/frameworks/`) with that key configured the way a user would —
proxy mode: HTTPS_PROXY and the proxy's CA; gateway mode: the SDKs' base-URL variables — and prints a
table framework × mode: ok (with what was metered) or failed (which path, and why). A cell is ok when
every path the script ran succeeded, every call it made was metered from the provider's usage (or is
free), and the key's spend in the store equals the sum of its audit records.

Run by `make compat`, which installs the pinned frameworks first (each of compat/requirements/*.txt in
its own venv under var/compat, compat/package.json in a temporary folder); not part of `make test`.
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from agentkeys.money import format_usd  # noqa: E402
from conftest import (  # noqa: E402 (the test helpers: the mock's keys, a real proxy, the books check)
    ANTHROPIC_REAL_KEY,
    OPENAI_REAL_KEY,
    assert_ledger_matches_audit,
    start_proxy,
    stop_proxy,
    write_policy,
)
from mock_provider import MockProvider  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent / "frameworks"
SCRIPT_SECONDS = 240
LOGS = REPO / "var" / "compat" / "logs"
# name, runtime, script
FRAMEWORKS = [
    ("openai-agents", "python", "openai_agents.py"),
    ("langchain-openai", "python", "langchain_openai_paths.py"),
    ("langchain-anthropic", "python", "langchain_anthropic_paths.py"),
    ("litellm", "python", "litellm_paths.py"),
    ("google-genai", "python", "google_genai_paths.py"),
    ("pydantic-ai", "python", "pydantic_ai_paths.py"),
    ("instructor", "python", "instructor_paths.py"),
    ("ai-sdk + @ai-sdk/openai", "node", "ai_sdk_openai.mjs"),
    ("ai-sdk + @ai-sdk/anthropic", "node", "ai_sdk_anthropic.mjs"),
    ("@anthropic-ai/sdk (Node)", "node", "anthropic_node.mjs"),
]
MODES = ("proxy", "gateway")
POLICY = {  # an ordinary key: $0.50, the frameworks' own output defaults lowered to a ceiling
    "budget_usd": 0.5,
    "providers": ["openai", "anthropic", "gemini"],
    "endpoints": [
        "POST /v1/chat/completions", "POST /v1/responses", "POST /v1/embeddings", "POST /v1/messages",
        "POST /v1/messages/count_tokens", "GET /v1/models", "POST /v1/traces/ingest",
        "POST /v1*/models/*:generateContent", "POST /v1*/models/*:streamGenerateContent",
    ],
    "models": ["gpt-4o-mini*", "text-embedding-3-small", "claude-haiku-4-5*", "gemini-2.5-flash*"],
    "default_max_output_tokens": 1024,
    "max_output_tokens": 4096,
}  # fmt: skip
TIKTOKEN_BLOBS = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
# Node's fetch ignores HTTPS_PROXY (Node 20); this preload is how a Node program is put behind a proxy.
NODE_PROXY_PRELOAD = """import { EnvHttpProxyAgent, setGlobalDispatcher } from "undici";
setGlobalDispatcher(new EnvHttpProxyAgent());
"""


@dataclass
class Cell:
    paths: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    calls: int = 0
    metered: int = 0
    free: int = 0
    cost_micros: int = 0
    stderr: str = ""  # what the script wrote there: kept in var/compat/logs for a failed cell's details

    def text(self) -> str:
        failed = [f"{p['path']}: {p.get('why', '?')}" for p in self.paths if not p.get("ok")]
        if failed or self.problems or not self.paths:
            return "failed (" + "; ".join(failed + self.problems or ["no path ran"]) + ")"
        ran = ", ".join(p["path"] for p in self.paths)
        spent = format_usd(self.cost_micros)
        return f"ok: {ran}; {self.calls} calls, {self.metered} metered from usage, {self.free} free, {spent}"

    @property
    def ok(self) -> bool:
        return bool(self.paths) and not self.problems and all(p.get("ok") for p in self.paths)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--venvs", required=True, help="the folder with one venv per Python framework (its requirements name)"
    )
    parser.add_argument("--node-modules", help="the folder with the Node frameworks' node_modules (none: skipped)")
    parser.add_argument("--only", help="run only the frameworks whose name contains this")
    parser.add_argument("--table", default=str(REPO / "var" / "compat" / "last-table.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agentkeys-compat-"))
    mock = MockProvider(openai_key=OPENAI_REAL_KEY, anthropic_key=ANTHROPIC_REAL_KEY).start()
    providers = {name: {"upstream": mock.url} for name in ("openai", "anthropic", "gemini")}
    proxy = start_proxy(work / "proxy", mock, providers=providers)
    try:
        policy = write_policy(work, "compat", **POLICY)
        tiktoken_cache = tiktoken_cache_dir(work / "tiktoken")
        LOGS.mkdir(parents=True, exist_ok=True)
        rows = []
        for name, runtime, script in FRAMEWORKS:
            if args.only and args.only not in name:
                continue
            if runtime == "node" and not args.node_modules:
                rows.append((name, {mode: "skipped (no npm)" for mode in MODES}, True))
                continue
            if runtime == "node":  # an ES module finds its packages beside it, never through NODE_PATH
                for helper in SCRIPTS.glob("*.mjs"):
                    shutil.copy(helper, Path(args.node_modules) / helper.name)
            cells = {}
            for mode in MODES:
                with contextlib.redirect_stderr(io.StringIO()):  # the CLI's "using config …" line
                    key = proxy.issue(policy)
                env = environment(mode, proxy, key["key"], tiktoken_cache, runtime, args.node_modules)
                python = Path(args.venvs) / venv_of(name) / "bin" / "python"
                command = [str(python), str(SCRIPTS / script)] if runtime == "python" else ["node", script]
                cells[mode] = run_one(command, env, proxy, key, args.node_modules if runtime == "node" else None)
                log = LOGS / f"{venv_of(name).strip('@').replace('/', '-')}-{mode}.log"
                log.write_text(cells[mode].stderr)
                print(f"{name} / {mode}: {cells[mode].text()}", flush=True)
            rows.append((name, {mode: cell.text() for mode, cell in cells.items()}, all(c.ok for c in cells.values())))
        table = render(rows)
        print("\n" + table)
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table)
        return 0 if all(ok for _, _, ok in rows) else 1
    finally:
        stop_proxy(proxy)
        mock.stop()
        shutil.rmtree(work, ignore_errors=True)


def environment(mode: str, proxy, key: str, tiktoken_cache: Path, runtime: str, node_modules: str | None) -> dict:
    """The variables a user sets: the scoped key as each SDK's key, and either the proxy or the base URLs."""
    env = {
        name: value for name, value in os.environ.items()
        if not name.endswith(("_BASE_URL", "_API_BASE", "_PROXY", "_proxy")) and not name.endswith("_API_KEY")
    }  # fmt: skip
    env.update(
        OPENAI_API_KEY=key, ANTHROPIC_API_KEY=key, GEMINI_API_KEY=key, GOOGLE_API_KEY=key,
        TIKTOKEN_CACHE_DIR=str(tiktoken_cache),  # tiktoken would download its encodings: the package ships them
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # LiteLLM would download its price map at import
        NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    if mode == "proxy":
        bundle = str(proxy.ca_bundle)
        env.update(HTTPS_PROXY=proxy.proxy_url, https_proxy=proxy.proxy_url, SSL_CERT_FILE=bundle,
                   REQUESTS_CA_BUNDLE=bundle, NODE_EXTRA_CA_CERTS=bundle)  # fmt: skip
        if runtime == "node":
            preload = Path(node_modules) / "proxy-preload.mjs"
            preload.write_text(NODE_PROXY_PRELOAD)
            env["NODE_OPTIONS"] = f"--import={preload.as_uri()}"
        return env
    gateway = proxy.gateway_url
    env.update(
        OPENAI_BASE_URL=f"{gateway}/openai/v1", ANTHROPIC_BASE_URL=f"{gateway}/anthropic",
        GOOGLE_GEMINI_BASE_URL=f"{gateway}/gemini",
        # The Agents SDK posts traces to api.openai.com whatever the base URL: off in gateway mode (docs/frameworks.md).
        OPENAI_AGENTS_DISABLE_TRACING="1",
    )  # fmt: skip
    return env


def run_one(command: list[str], env: dict, proxy, key: dict, node_modules: str | None) -> Cell:
    cell = Cell()
    started = time.monotonic()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=SCRIPT_SECONDS,
                              cwd=node_modules or None)  # fmt: skip
    except subprocess.TimeoutExpired:
        cell.problems.append(f"timed out after {SCRIPT_SECONDS}s")
        return cell
    cell.stderr = done.stderr
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            cell.paths.append(json.loads(line))
    if done.returncode != 0 and not cell.paths:
        cell.problems.append(f"exit {done.returncode}: {last_line(done.stderr)}")
    time.sleep(min(1.0, time.monotonic() - started))  # the last settlements' records
    records = [r for r in proxy.audit() if r.get("key_id") == key["id"]]
    cell.calls = len(records)
    cell.metered = sum(r.get("metering") == "usage" for r in records)
    cell.free = sum(r.get("metering") == "free" for r in records)
    cell.cost_micros = sum(r.get("cost_micros") or 0 for r in records)
    unmetered = [f"{r['method']} {r['path']}: {r.get('metering') or r.get('decision')} ({r.get('reason') or ''})"
                 for r in records if r.get("metering") not in ("usage", "free")]  # fmt: skip
    cell.problems += [f"not metered from usage: {u}" for u in unmetered[:3]]
    try:
        assert_ledger_matches_audit(proxy, key["id"])
    except AssertionError as e:
        cell.problems.append(f"books: {e}")
    return cell


def venv_of(name: str) -> str:
    """A Python framework's venv: named as its compat/requirements file."""
    return name.split(" ")[0]


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def tiktoken_cache_dir(folder: Path) -> Path:
    """tiktoken's cache, filled from the encodings the package ships: tiktoken names each file by its URL's sha1."""
    folder.mkdir(parents=True, exist_ok=True)
    for encoding in ("o200k_base", "cl100k_base"):
        source = REPO / "addon" / "agentkeys" / "data" / "tiktoken" / f"{encoding}.tiktoken"
        name = hashlib.sha1(TIKTOKEN_BLOBS.format(encoding).encode()).hexdigest()
        shutil.copy(source, folder / name)
    return folder


def render(rows: list[tuple[str, dict, bool]]) -> str:
    lines = ["| framework | proxy mode | gateway mode |", "| --- | --- | --- |"]
    lines += [f"| {name} | {cells['proxy']} | {cells['gateway']} |" for name, cells, _ in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
