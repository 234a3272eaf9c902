"""Rspec resolution: defaults < _default slice < sliver; units; kernel limits."""

from __future__ import annotations

from agent import rspec


def test_defaults_match_the_original() -> None:
    r = rspec.resolve({}).rspec
    assert r["cpu_share"] == 1 and r["cpu_pct"] == 0 and r["enabled"] == 1
    assert r["net_min_rate"] == 1 and r["net_max_rate"] == 1_000_000
    assert r["net_max_kbyte"] == 10_546_875 and r["net_thresh_kbyte"] == 9_492_187
    assert r["net_i2_max_kbyte"] == 31_640_625 and r["net_i2_thresh_kbyte"] == 28_476_562
    assert r["disk_max"] == 10_000_000 and r["cpu_cores"] == "0b"
    assert r["capabilities"] == "" and r["ip_addresses"] == "0.0.0.0"
    assert r["tags"] == {}


def test_layers_override_in_order() -> None:
    res = rspec.resolve({"cpu_share": "30", "vref": "img"},
                        {"cpu_share": "5", "disk_max": "2000", "net_max_rate": "-1"})
    assert res.rspec["cpu_share"] == 30
    assert res.rspec["disk_max"] == 2000
    assert res.rspec["net_max_rate"] == -1
    assert res.rspec["tags"] == {"cpu_share": "30", "vref": "img"}
    assert res.problems == []


def test_bad_values_fall_back_to_the_layer_below_and_are_reported() -> None:
    res = rspec.resolve({"cpu_share": "lots", "enabled": "7", "cpu_cores": "x"},
                        {"cpu_share": "5"})
    assert res.rspec["cpu_share"] == 5
    assert res.rspec["enabled"] == 1
    assert res.rspec["cpu_cores"] == "0b"
    joined = " ".join(res.problems)
    assert "cpu_share" in joined and "enabled" in joined and "cpu_cores" in joined


def test_sysctl_tags_copied_whole() -> None:
    # The original stripped with lstrip("sysctl."), mangling names; we keep them whole.
    r = rspec.resolve({"sysctl.legacy_va_layout": "1"}).rspec
    assert r["sysctl.legacy_va_layout"] == "1"


def test_rlimits() -> None:
    res = rspec.resolve({"nofile_soft": "1024", "nofile_hard": "4096", "openfd_hard": "4096",
                         "nproc_hard": "100", "core_soft": "KEEP", "stack_hard": "-1",
                         "as_soft": "9", "as_hard": "5", "cpu_hard": "abc"})
    rl = res.rspec["rlimits"]
    assert rl["nofile"] == [1024, 4096]
    assert rl["nproc"] == [100, 100]
    assert "core" not in rl and "stack" not in rl
    assert rl["as"] == [5, 5]
    assert any("cpu_hard" in p for p in res.problems)
    assert any("soft 9 above hard 5" in p for p in res.problems)


def test_memory_from_mem_max_or_memlock() -> None:
    assert rspec.resolve({"mem_max": "1024"}).rspec["mem_max"] == 1024
    assert rspec.resolve({"memlock_hard": "2048"}).rspec["mem_max"] == 2048
    kw = rspec.limits_kwargs(rspec.resolve({"memlock_hard": "2048"}).rspec)
    assert kw["mem_max"] == 2048 * 1024
    assert rspec.limits_kwargs(rspec.resolve({}).rspec)["mem_max"] is None


def test_limits_kwargs() -> None:
    r = rspec.resolve({"cpu_share": "10", "cpu_cap": "50", "pids_max": "77",
                       "nofile_hard": "512", "capabilities": "net_raw,CAP_NET_ADMIN,bogus"})
    kw = rspec.limits_kwargs(r.rspec)
    assert kw["cpu_share"] == 10 and kw["cpu_cap"] == 50 and kw["pids_max"] == 77
    assert kw["rlimits"] == {"nofile": (512, 512)}
    assert kw["extra_capabilities"] == ("CAP_NET_ADMIN", "CAP_NET_RAW")
    assert any("BOGUS" in p for p in r.problems)
    # cpu_pct is a reservation (agent/cpu.py makes its weight), not a weight or a cap.
    kw = rspec.limits_kwargs(rspec.resolve({"cpu_pct": "25", "cpu_cores": "1b",
                                            "cpu_freezable": "1"}).rspec)
    assert kw["cpu_share"] == 1 and kw["cpu_cap"] is None and kw["cpu_reserve_pct"] == 25
    assert kw["cpu_cores"] == "1b" and kw["cpu_freezable"] == 1
    assert rspec.limits_kwargs(rspec.resolve({"cpu_cap": "0"}).rspec)["cpu_cap"] is None


def test_image_and_initscript() -> None:
    assert rspec.image_of({"vref": "deb12"}, "default") == "deb12"
    assert rspec.image_of({"vref": " "}, "default") == "default"
    assert rspec.image_of({}, "base") == "base"
    scripts = {"hello": "#!/bin/sh\necho hi\n"}
    assert rspec.initscript_of({"initscript": "hello"}, scripts) == scripts["hello"]
    assert rspec.initscript_of({"initscript": "hello", "initscript_code": "X"}, scripts) == "X"
    assert rspec.initscript_of({"initscript": "missing"}, scripts) == ""
    assert rspec.initscript_of({}, scripts) == ""


def test_attributes_last_duplicate_wins() -> None:
    d = rspec.attributes_to_dict([{"tagname": "a", "value": "1"}, {"tagname": "a", "value": "2"}])
    assert d == {"a": "2"}


def test_sockets_max_layers_and_zero_means_no_cap() -> None:
    """Built-in 1024 < agent.toml < the _default slice < the sliver's own tag."""
    def cap(attrs: dict[str, str], over: dict[str, str] | None = None,
            node: dict[str, str] | None = None) -> object:
        return rspec.limits_kwargs(rspec.resolve(attrs, over, node).rspec)["inet_sockets_max"]

    assert cap({}) == 1024
    assert cap({}, None, {"sockets_max": "200"}) == 200
    assert cap({}, {"sockets_max": "300"}, {"sockets_max": "200"}) == 300
    assert cap({"sockets_max": "7"}, {"sockets_max": "300"}, {"sockets_max": "200"}) == 7
    assert cap({"sockets_max": "0"}) is None
    r = rspec.resolve({"sockets_max": "-3"}, None, {"sockets_max": "50"})
    assert r.rspec["sockets_max"] == 50 and "sockets_max" in r.problems[0]


def test_node_defaults_mem_max_and_nofile_under_every_tag() -> None:
    """agent.toml sliver_mem_max/sliver_nofile: every sliver is limited unless its tags
    (or the _default slice's) say otherwise (F34, issue 8 item 3)."""
    from agent import config
    from agent.rspec import limits_kwargs, resolve

    d = config.defaults().sliver_defaults
    assert d == {"mem_max": 1024 * 1024, "nofile": 4096, "sockets_max": 1024}
    lim = limits_kwargs(resolve({}, {}, d).rspec)
    assert lim["mem_max"] == 1 << 30 and lim["rlimits"]["nofile"] == (4096, 4096)
    tagged = limits_kwargs(resolve({"mem_max": "2048", "nofile_soft": "100",
                                    "nofile_hard": "200"}, {}, d).rspec)
    assert tagged["mem_max"] == 2048 * 1024 and tagged["rlimits"]["nofile"] == (100, 200)
    by_default_slice = limits_kwargs(resolve({}, {"openfd_hard": "50"}, d).rspec)
    assert by_default_slice["rlimits"]["nofile"] == (50, 50)
    # memlock_hard still stands for mem_max when no layer gives mem_max
    assert limits_kwargs(resolve({"memlock_hard": "4096"}, {}, d).rspec)["mem_max"] == 4 << 20
