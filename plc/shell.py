"""`plc shell`: an interactive and scriptable PLCAPI client in the manner of plcsh.

Every API method the server lists (``system.listMethods``) becomes a plain function;
the auth struct is filled in unless the first argument already is one::

    plc shell --url http://127.0.0.1:8000/PLCAPI/ -u admin@example.org -p secret \\
        -c 'GetSlices({}, ["name"])'

As in plcsh, ``begin()`` starts batching: later calls return None and are queued, and
``commit()`` sends them in one ``system.multicall`` and returns the list of results,
raising the first fault it finds.

``--config plc.toml`` takes the endpoint from the server's ``[api]`` table and, unless
``-u``/``-s`` is given, the maintenance account's credentials (see ``load_config``).
"""

from __future__ import annotations

import argparse
import code
import getpass
import os
import pprint
import sys
import xmlrpc.client
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HISTORY_FILE = Path("~/.plcsh_history")
DEFAULT_URL = "http://127.0.0.1:8000/PLCAPI/"


class ShellError(Exception):
    """Bad options or configuration for the shell; the message names the bad thing."""


def make_auth(
    username: str | None = None,
    password: str | None = None,
    session: str | None = None,
    role: str | None = None,
) -> dict[str, Any]:
    """The auth struct plcsh would send. ``Role`` is an extra key legacy servers ignore."""
    auth: dict[str, Any]
    if session:
        auth = {"AuthMethod": "session", "session": session}
    elif username:
        if password is None:
            raise ShellError(f"no password given for user {username!r}")
        auth = {"AuthMethod": "password", "Username": username, "AuthString": password}
    else:
        auth = {"AuthMethod": "anonymous"}
    if role:
        auth["Role"] = role
    return auth


def _is_auth(value: Any) -> bool:
    return isinstance(value, dict) and "AuthMethod" in value


class Method:
    """One API method as a callable; ``repr``/``doc`` come from system.methodHelp."""

    def __init__(self, shell: Shell, name: str) -> None:
        self._shell = shell
        self.__name__ = name

    def __call__(self, *args: Any) -> Any:
        return self._shell.call(self.__name__, *args)

    def __repr__(self) -> str:
        return f"<PLCAPI method {self.__name__}>"

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        return self._shell.method_help(self.__name__)


class _System:
    """``system.listMethods()`` etc. as attributes, like a ServerProxy's ``system``."""

    def __init__(self, shell: Shell) -> None:
        self._shell = shell

    def __getattr__(self, name: str) -> Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return Method(self._shell, f"system.{name}")


class Shell:
    """A connection to one PLCAPI server with one identity."""

    def __init__(self, url: str, auth: dict[str, Any] | None = None, timeout: float = 60.0,
                 verbose: bool = False) -> None:
        self.url = url
        self.auth: dict[str, Any] = auth if auth is not None else make_auth()
        transport: xmlrpc.client.Transport
        if url.startswith("https:"):
            transport = xmlrpc.client.SafeTransport()
        elif url.startswith("http:"):
            transport = xmlrpc.client.Transport()
        else:
            raise ShellError(f"unsupported URL {url!r}: must start with http:// or https://")
        transport.timeout = timeout  # type: ignore[attr-defined]
        self._proxy = xmlrpc.client.ServerProxy(
            url, transport=transport, allow_none=True, verbose=verbose
        )
        self._queue: list[dict[str, Any]] | None = None
        self._methods: list[str] | None = None
        self.system = _System(self)

    # -- calls -----------------------------------------------------------------------
    def _params(self, name: str, args: tuple[Any, ...]) -> list[Any]:
        if name.startswith("system.") or (args and _is_auth(args[0])):
            return list(args)
        return [self.auth, *args]

    def call(self, name: str, *args: Any) -> Any:
        """Call ``name``; inside begin()/commit() queue it and return None."""
        params = self._params(name, args)
        if self._queue is not None and name != "system.multicall":
            self._queue.append({"methodName": name, "params": params})
            return None
        return getattr(self._proxy, name)(*params)

    def begin(self) -> None:
        """Start queueing calls for one system.multicall (plcsh's begin())."""
        if self._queue is not None:
            raise ShellError("a multicall is already in progress; commit() it first")
        self._queue = []

    def commit(self) -> list[Any] | None:
        """Send the queued calls; return their results in order, raise the first fault."""
        queue, self._queue = self._queue, None
        if queue is None:
            raise ShellError("commit() without begin()")
        if not queue:
            return None
        results: Any = self._proxy.system.multicall(queue)
        out: list[Any] = []
        for result in results:
            if isinstance(result, dict):
                raise xmlrpc.client.Fault(result.get("faultCode", 1),
                                          result.get("faultString", ""))
            if isinstance(result, list) and len(result) == 1:
                out.append(result[0])
            else:
                raise ShellError(f"unexpected entry in multicall result: {result!r}")
        return out

    # -- introspection ---------------------------------------------------------------
    def methods(self) -> list[str]:
        if self._methods is None:
            listed: Any = self._proxy.system.listMethods()
            self._methods = sorted(str(name) for name in listed)
        return self._methods

    def method_help(self, name: str) -> str:
        try:
            return str(self._proxy.system.methodHelp(name))
        except xmlrpc.client.Fault as fault:
            return f"{name}: {fault.faultString}"

    def namespace(self) -> dict[str, Any]:
        """Globals for commands and scripts: every method, plus the shell's helpers."""
        ns: dict[str, Any] = {
            name: Method(self, name) for name in self.methods() if "." not in name
        }
        ns.update(
            shell=self, plc=self, auth=self.auth, system=self.system,
            begin=self.begin, commit=self.commit, Fault=xmlrpc.client.Fault,
            methodhelp=lambda m: print(self.method_help(str(getattr(m, "__name__", m)))),
        )
        return ns

    def close(self) -> None:
        self._proxy("close")()


# -- configuration --------------------------------------------------------------------
def load_config(path: Path) -> dict[str, Any]:
    """Endpoint and credentials from plc.toml, as plcsh took them from the PLC config.

    The URL comes from ``[api] listen`` (HTTPS when ``[api] cert`` is set; a wildcard
    address means this host's loopback); the identity is the maintenance account
    (``[api] maintenance_user``/``maintenance_password``) when its password is set.
    """
    from plc import config as plc_config  # the server's schema; imported only when used

    try:
        cfg = plc_config.load(path)
    except plc_config.ConfigError as exc:
        raise ShellError(str(exc)) from None
    host, port = plc_config.parse_listen(cfg.get("api", "listen"), f"{path}: [api] listen")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if cfg.get("api", "cert") else "http"
    out: dict[str, Any] = {"url": f"{scheme}://{host}:{port}/PLCAPI/"}
    if cfg.get("api", "maintenance_password"):
        out["username"] = cfg.get("api", "maintenance_user")
        out["password"] = cfg.get("api", "maintenance_password")
    return out


# -- command line ---------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"PLCAPI endpoint (default {DEFAULT_URL})")
    parser.add_argument("--config", dest="shell_config", metavar="FILE",
                        help="plc.toml: endpoint and maintenance account from its [api] table")
    parser.add_argument("-u", "--user", help="e-mail address (password auth)")
    parser.add_argument("-p", "--password", help="password; asked for when -u is given alone")
    parser.add_argument("-s", "--session", help="session id (session auth)")
    parser.add_argument("-r", "--role", help="role sent as the legacy 'Role' auth key")
    parser.add_argument("-c", "--command", action="append", default=[],
                        help="run this Python statement or expression (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the XML-RPC traffic")
    parser.add_argument("script", nargs="?", help="Python script to run with the methods defined")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")


def register(subparsers: Any) -> None:
    """Add the ``shell`` subcommand to the ``plc`` command line."""
    parser = subparsers.add_parser(
        "shell", help="interactive and scriptable PLCAPI client (plcsh)",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    config_path = getattr(args, "shell_config", None) or getattr(args, "config", None)
    conf = load_config(Path(config_path)) if config_path else {}
    url = args.url or conf.get("url") or os.environ.get("PLC_API_URL") or DEFAULT_URL
    user = args.user or (None if args.session else conf.get("username"))
    password = args.password if args.password is not None else conf.get("password")
    session = args.session or (None if args.user else conf.get("session"))
    if user and password is None and not session:
        if not sys.stdin.isatty():
            raise ShellError(f"no password for {user}: give -p or shell.password in the config")
        password = getpass.getpass(f"Password for {user}: ")
    return url, make_auth(user, password, session, args.role)


def _run_source(source: str, ns: dict[str, Any], filename: str) -> None:
    """Evaluate an expression and print its value, or execute statements."""
    try:
        compiled = compile(source, filename, "eval")
    except SyntaxError:
        exec(compile(source, filename, "exec"), ns)
        return
    value = eval(compiled, ns)
    if value is not None:
        pprint.pprint(value, sort_dicts=True)


def _interact(shell: Shell, ns: dict[str, Any]) -> None:
    banner = (f"PlanetLab Central shell on {shell.url} as "
              f"{shell.auth.get('Username') or shell.auth['AuthMethod']}\n"
              "Every API method is a function; begin()/commit() batch calls; Ctrl-D quits.")
    try:
        import readline
        import rlcompleter

        readline.set_completer(rlcompleter.Completer(ns).complete)
        readline.parse_and_bind("tab: complete")
        history = HISTORY_FILE.expanduser()
        try:
            readline.read_history_file(history)
        except OSError:
            pass
    except ImportError:  # pragma: no cover - readline is in every Debian python
        readline = None  # type: ignore[assignment]
    try:
        code.interact(banner=banner, local=ns, exitmsg="")
    finally:
        if readline is not None:
            try:
                readline.write_history_file(history)
            except OSError:
                pass


def run(args: argparse.Namespace) -> int:
    try:
        url, auth = _settings(args)
        shell = Shell(url, auth, verbose=args.verbose)
        ns = shell.namespace()
    except ShellError as exc:
        print(f"plc shell: {exc}", file=sys.stderr)
        return 2
    except xmlrpc.client.Fault as fault:
        print(f"plc shell: {url}: fault {fault.faultCode}: {fault.faultString}", file=sys.stderr)
        return 1
    except (OSError, xmlrpc.client.ProtocolError) as exc:
        print(f"plc shell: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.command or args.script:
            for i, command in enumerate(args.command):
                _run_source(command, ns, f"<command {i + 1}>")
            if args.script:
                path = Path(args.script)
                ns["__name__"] = "__main__"
                saved_argv = sys.argv
                sys.argv = [str(path), *args.script_args]
                try:
                    exec(compile(path.read_text(), str(path), "exec"), ns)
                finally:
                    sys.argv = saved_argv
        else:
            _interact(shell, ns)
    except xmlrpc.client.Fault as fault:
        print(f"Fault {fault.faultCode}: {fault.faultString}", file=sys.stderr)
        return 1
    except (OSError, xmlrpc.client.ProtocolError) as exc:
        print(f"plc shell: {url}: {exc}", file=sys.stderr)
        return 1
    except ShellError as exc:
        print(f"plc shell: {exc}", file=sys.stderr)
        return 2
    finally:
        shell.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plc shell", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
