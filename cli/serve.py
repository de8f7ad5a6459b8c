"""`ciar serve`: the cloud bridge, hosting the built-in cloud model (PyTorch) for many devices over websockets."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="bearer tokens, one per line (required unless bound to a loopback address)")
    p.add_argument("--max-sessions", type=int, default=64, help="concurrent sessions (KV-cache slots; default 64)")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds before an idle session is freed")
    p.add_argument("--max-frames-per-s", type=float, default=2000.0, help="per-connection frame rate limit")
    p.add_argument("--certfile", default=None, help="TLS certificate (PEM): serve wss://")
    p.add_argument("--keyfile", default=None, help="TLS private key (PEM), with --certfile")
    p.add_argument("--checkpoint", type=Path, default=None, help="built-in weights directory (default: shipped)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the cloud forward (default 1)")
    p.add_argument("--device", default="cpu", help="where the cloud model runs: cpu (default), cuda, cuda:N")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    import torch

    from ciar.cloud_bridge.cloud import CloudService
    from ciar.cloud_bridge.server import BridgeServer, ConfigError, JsonFormatter, ServerConfig, read_tokens
    from ciar.models.builtin import load_builtin

    if args.max_sessions < 1:
        raise ConfigError("--max-sessions must be at least 1")
    if bool(args.certfile) != bool(args.keyfile):
        raise ConfigError("--certfile and --keyfile go together")
    tokens = read_tokens(args.token_file) if args.token_file else None
    config = ServerConfig(args.host, args.port, tokens, args.max_sessions, args.idle_timeout, args.max_frames_per_s,
                          certfile=args.certfile, keyfile=args.keyfile, threads=args.threads)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    torch.set_num_threads(args.threads)
    models = load_builtin(args.checkpoint)
    try:
        models.cloud_to(args.device)
    except ValueError as e:
        raise ConfigError(f"--device {e}") from None
    service = CloudService(models, max_sessions=args.max_sessions)
    try:
        asyncio.run(BridgeServer(service, config).serve(announce=True))
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    return 0
