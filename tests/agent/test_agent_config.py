"""agent.toml: defaults, validation with clear messages, init-config output."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from agent import config


def test_defaults_are_valid() -> None:
    cfg = config.defaults()
    assert cfg.poll_interval == 600
    assert cfg.socket_path == "/run/planetlab/agent.sock"
    assert cfg.concurrency >= 1


def test_render_round_trips_and_is_commented(tmp_path: Path) -> None:
    path = config.write_default(tmp_path / "agent.toml", {
        "plc_url": "http://127.0.0.1:9/PLCAPI/", "hostname": "n1.example.org",
        "state_dir": str(tmp_path / "state")})
    text = path.read_text()
    assert text.count("\n# ") >= len(config.FIELDS)
    data = tomllib.loads(text)
    assert data["hostname"] == "n1.example.org"
    cfg = config.load(path)
    assert cfg.plc_url == "http://127.0.0.1:9/PLCAPI/"
    assert cfg.state_dir == str(tmp_path / "state")
    assert cfg.poll_interval == 600


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    path = config.write_default(tmp_path / "agent.toml")
    with pytest.raises(config.ConfigError, match="already exists"):
        config.write_default(path)


@pytest.mark.parametrize("text, words", [
    ("pol_interval = 5\n", ["pol_interval", "allowed keys", "poll_interval"]),
    ("poll_interval = 'ten'\n", ["poll_interval", "must be int", "str"]),
    ("poll_interval = 0\n", ["poll_interval", "minimum 1"]),
    ("poll_interval = true\n", ["poll_interval", "must be int"]),
    ("plc_url = 'ftp://x'\n", ["plc_url", "http://"]),
    ("state_dir = 'relative'\n", ["state_dir", "absolute"]),
    ("concurrency = [1]\n", ["concurrency", "must be int"]),
    ("this is not toml", ["not valid TOML"]),
    ("cgroup_parent = 'a/b'\n", ["cgroup_parent", "one cgroup name"]),
    ("cgroup_parent = '..'\n", ["cgroup_parent", "one cgroup name"]),
    ("cgroup_parent = ''\n", ["cgroup_parent", "one cgroup name"]),
    ("cgroup_parent = 'cpu.max'\n", ["cgroup_parent", "one cgroup name"]),
    ("cgroup_parent = 7\n", ["cgroup_parent", "must be str"]),
])
def test_bad_values_name_file_key_and_allowed(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_float_accepts_int(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("api_rate = 5\n")
    assert config.load(path).api_rate == 5.0


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")


def test_node_key_from_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "plnode.txt"
    key_file.write_text('# node\nNODE_ID="7"\nNODE_KEY="abc="\n')
    cfg = config.from_mapping({"key_file": str(key_file)}, "t.toml")
    assert config.read_node_key(cfg) == (7, "abc=")
    key_file.write_text("NODE_ID=x\n")
    with pytest.raises(config.ConfigError, match="NODE_ID"):
        config.read_node_key(cfg)
    key_file.write_text("bareKEY123\n")
    assert config.read_node_key(cfg) == (0, "bareKEY123")
    cfg2 = config.from_mapping({"node_id": 3, "node_key": "k"}, "t.toml")
    assert config.read_node_key(cfg2) == (3, "k")
    with pytest.raises(config.ConfigError, match="key_file"):
        config.read_node_key(config.defaults())


def test_cgroup_parent_default_and_override(tmp_path: Path) -> None:
    assert config.defaults().cgroup_parent == "planetlab"
    path = config.write_default(tmp_path / "agent.toml", {"cgroup_parent": "plnode-2"})
    text = path.read_text()
    assert "cgroup_parent = \"plnode-2\"" in text and "two agents on one kernel" in text
    assert config.load(path).cgroup_parent == "plnode-2"


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path: Path) -> None:
    """`planetlab-agent status | head`: the pipe closing under the CLI ends it quietly."""
    import subprocess
    import sys

    code = ("import sys\nfrom agent import cli, cli_agent\n"
            "def gone(args): raise BrokenPipeError(32, 'Broken pipe')\n"
            "cli_agent.cmd_status = gone\n"
            f"sys.exit(cli.main(['--state-dir', {str(tmp_path)!r}, 'status']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr


def test_plain_http_plc_only_to_loopback_or_when_insecure(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """F19/F30: http:// to a host that is not loopback is refused at load unless
    insecure_plc = 1, which the PLC client then warns about at every start."""
    path = tmp_path / "agent.toml"
    for url in ("http://plc.example.org/PLCAPI/", "http://10.0.0.1:8000/PLCAPI/"):
        path.write_text(f"plc_url = '{url}'\n")
        with pytest.raises(config.ConfigError, match="insecure_plc"):
            config.load(path)
    for url in ("http://127.0.0.1:8000/", "http://localhost/", "http://[::1]:80/",
                "https://plc.example.org/PLCAPI/"):
        path.write_text(f"plc_url = '{url}'\n")
        assert config.load(path).plc_url == url
    path.write_text("plc_url = 'http://plc.example.org/PLCAPI/'\ninsecure_plc = 1\n")
    cfg = config.load(path)
    from agent.plcclient import PLCClient
    with caplog.at_level("WARNING", logger="agent.plc"):
        PLCClient(cfg.plc_url, tmp_path, lambda: (1, "k"))
    assert "insecure_plc" in caplog.text and "clear" in caplog.text


def test_bandwidth_table_is_parsed_and_bad_keys_named() -> None:
    cfg = config.from_mapping({"bandwidth": {"interfaces": ["eth0"], "exempt": ["10.0.0.0/8"],
                                             "sample_s": 2}})
    assert cfg.bandwidth.interfaces == ("eth0",) and cfg.bandwidth.sample_s == 2.0
    assert config.from_mapping({}).bandwidth.interfaces == ()      # off by default
    for bad, word in (({"interfaces": "eth0"}, "interfaces"), ({"rate": 1}, "'rate'"),
                      ({"exempt": ["10.0.0.1/8"]}, "exempt")):
        with pytest.raises(config.ConfigError, match=word):
            config.from_mapping({"bandwidth": bad}, "t.toml")
    with pytest.raises(config.ConfigError, match="must be a table"):
        config.from_mapping({"bandwidth": 3}, "t.toml")
