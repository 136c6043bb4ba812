"""`balora app`: the Gradio app over a folder of runs (Compare, Train, Curves).

It listens on 127.0.0.1 unless told otherwise: another address needs `--allow-remote true` and an
`--auth-file`, whose `user:password` lines become the page's login.
"""
from __future__ import annotations

import argparse
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from balora_diffusion.config import add_config_arguments, check_config, config_from_args, field
from balora_diffusion import threads
from balora_diffusion.errors import UserError

LOOPBACK_NAMES = {"localhost"}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in LOOPBACK_NAMES


@dataclass
class AppConfig:
    def __post_init__(self) -> None:
        check_config(self)

    runs: str = field("runs", "folder of run folders (`balora train` / `balora sweep` outputs); created if missing",
                      nonempty=True, path=True)
    host: str = field("127.0.0.1", "address to listen on; anything but a loopback address needs --allow-remote",
                      nonempty=True)
    port: int = field(7860, "port to listen on", ge=1, lt=65536)
    base_model: str = field("", "diffusers folder or single-file .safetensors the runs were trained on; "
                                "empty = the shipped tiny model", path=True)
    device: str = field("auto", "device of the base model: auto (CUDA if present), cpu, cuda, cuda:N", nonempty=True)
    cpu_threads: int = field(0, "the app's and the trainings it starts: " + threads.HELP, ge=0)
    allow_remote: bool = field(False, "listen on a non-loopback --host (then --auth-file is required)")
    auth_file: str = field("", "file of `user:password` lines: the logins the page asks for", path=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Also started as `python -m app` from a source checkout. Generations are cached under "
                     "RUNS/.app-cache, so a redraw is instant; delete that folder to free the space.")
    add_config_arguments(parser, AppConfig)


def read_auth(path: Path) -> list[tuple[str, str]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the auth file {path}: {exc}") from None
    logins = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            user, sep, password = line.strip().partition(":")
            if not (sep and user and password):
                raise UserError(f"{path} line {number}: expected user:password")
            logins.append((user, password))
    if not logins:
        raise UserError(f"{path} holds no user:password line")
    return logins


def check_access(cfg: AppConfig) -> list[tuple[str, str]] | None:
    """The logins the server asks for: none on a loopback address, required on any other."""
    if _is_loopback(cfg.host):
        return read_auth(Path(cfg.auth_file)) if cfg.auth_file else None
    if not cfg.allow_remote:
        raise UserError(f"--host {cfg.host} would open the app to the network: add --allow-remote true and an "
                        "--auth-file with user:password lines, or keep the default 127.0.0.1")
    if not cfg.auth_file:
        raise UserError(f"--host {cfg.host} needs an --auth-file with user:password lines: the page then asks "
                        "for a login")
    return read_auth(Path(cfg.auth_file))


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another server listens on now, before torch and Gradio load (the server would
    fail only after them, in a traceback). Address reuse as the server sets it, so that a port that
    only waits out a closed connection is not taken for busy."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise UserError(f"cannot listen on {host} port {port}: {exc.strerror} (another server uses it? "
                            "choose another --port)") from None


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(AppConfig, args)
    auth = check_access(cfg)
    check_port_free(cfg.host, cfg.port)
    from balora_diffusion.devices import pick_device  # imports torch

    pick_device(cfg.device)  # a device that is not here fails now, not at the first request
    if cfg.base_model and Path(cfg.base_model).is_dir():
        from balora_diffusion.models import check_model_dir

        check_model_dir(Path(cfg.base_model))
    elif cfg.base_model and not Path(cfg.base_model).is_file():
        raise UserError(f"base model not found: {cfg.base_model}")
    runs = Path(cfg.runs)
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot use {runs} as the runs folder: {exc.strerror}") from None
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the app needs Gradio: pip install 'balora-diffusion[app]'") from None
    from balora_diffusion.app.app import App, serve

    print(f"balora app: runs in {runs}, on http://{cfg.host}:{cfg.port} (Ctrl-C to stop)")
    serve(App(runs, cfg.base_model, cfg.device, cfg.cpu_threads), cfg.host, cfg.port, auth)
    return 0
