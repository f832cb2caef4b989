"""Command line: ``agent-runtime serve|chat|train|eval|bench|tenants|audit|config`` (also
``python -m agent_runtime``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

from agent_runtime import __version__
from agent_runtime.config import RuntimeConfig, add_arguments, load_config, markdown_table
from agent_runtime.errors import AgentRuntimeError

log = logging.getLogger("agent_runtime")


def _check_port(host: str, port: int) -> None:
    """Fail at once, in one line, when the port cannot be listened on."""
    import socket

    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise AgentRuntimeError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                " (is another server running there? choose another --port)"
            ) from None


async def _serve(config: RuntimeConfig) -> None:
    from agent_runtime.models import load_model
    from server.app import Server

    _check_port(config.server.host, config.server.port)  # before seconds of model loading
    model = load_model(config.engine, Path(config.store.data_dir))
    started = time.perf_counter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    # A write past a file-size limit then fails with EFBIG (a StorageError) instead of killing us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    async with Server(config, model) as server:
        print(
            f"agent-runtime {__version__} ready in {time.perf_counter() - started:.1f}s: "
            f"ws://{config.server.host}:{server.port}/v1/realtime  (web page http://{config.server.host}:{server.port}/)",
            flush=True,
        )
        await stop.wait()
        log.info("shutting down")


# Sub-commands implemented in their own modules: "module:function" taking argv, returning an exit code.
BENCHES = {
    "memory": "agent_runtime.bench.memory:main",
    "serve": "agent_runtime.bench.serve:main",
    "privacy": "agent_runtime.bench.privacy:main",
    "faults": "agent_runtime.bench.faults:main",
    "model": "agent_runtime.bench.model:main",
    "mqtt": "agent_runtime.bench.mqtt:main",
    "cluster": "agent_runtime.bench.cluster_bench:main",
}
TOOLS = {
    "chat": ("agent_runtime.client.chat:main", "terminal chat client"),
    "train": ("agent_runtime.training.train:main", "train the chat model (resumable)"),
    "eval": ("agent_runtime.training.evaluate:main", "evaluate recall and perplexity"),
    "tenants": ("privacy.cli:tenants_main", "add, list or revoke tenant API keys"),
    "audit": ("privacy.cli:audit_main", "privacy ledger report and audit-log verification"),
    "models": ("agent_runtime.models.llama.registry:main", "list or fetch pretrained models"),
}


def _delegate(target: str, argv: list[str]) -> int:
    import importlib

    module, function = target.split(":")
    entry = getattr(importlib.import_module(module), function)
    return int(entry(argv))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agent-runtime", description="Memorizing Transformer chat runtime"
    )
    parser.add_argument("--version", action="version", version=f"agent-runtime {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the websocket chat server")
    add_arguments(serve)

    bench = sub.add_parser("bench", help="run a benchmark: " + " | ".join(BENCHES))
    bench.add_argument("suite", choices=list(BENCHES), help="which benchmark")
    bench.add_argument(
        "rest", nargs=argparse.REMAINDER, help="options of the benchmark (see its --help)"
    )
    for name, (_target, help_text) in TOOLS.items():
        tool = sub.add_parser(name, help=f"{help_text} (see {name} --help)", add_help=False)
        tool.add_argument("rest", nargs=argparse.REMAINDER)

    cfg = sub.add_parser(
        "config", help="print the effective configuration or the settings reference"
    )
    add_arguments(cfg)
    cfg.add_argument(
        "--markdown", action="store_true", help="print the settings reference as a Markdown table"
    )

    argv = sys.argv[1:] if argv is None else list(argv)
    # Delegated commands parse their own options (argparse's REMAINDER drops leading flags).
    target = None
    if argv and argv[0] in TOOLS:
        target, rest = TOOLS[argv[0]][0], argv[1:]
    elif len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        target, rest = BENCHES[argv[1]], argv[2:]
    if target is not None:
        logging.basicConfig(
            level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        try:
            return _delegate(target, rest)
        except AgentRuntimeError as exc:
            print(f"agent-runtime: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            asyncio.run(_serve(load_config(args)))
        elif args.command == "bench" or args.command in TOOLS:  # only reached for --help-like use
            parser.parse_args([args.command, "--help"])
        elif args.command == "config":
            if args.markdown:
                print(markdown_table())
            else:
                import json

                from agent_runtime.config import redacted

                print(json.dumps(redacted(load_config(args)), indent=2))
    except AgentRuntimeError as exc:
        print(f"agent-runtime: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
