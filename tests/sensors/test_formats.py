"""Answer formats: key: value, slicestat lines, Prometheus text (pure)."""

from __future__ import annotations

import json

from sensors import formats

SLIVER = {"name": "pl_a", "slice_id": 42, "state": "running", "cpu_seconds_total": 1.5,
          "cpu_percent": 12.345, "memory_bytes": 2048 * 1024, "processes": 3,
          "ports": ["tcp/80@0.0.0.0", "udp/53@10.0.0.1"], "sent_bytes": 10}


def test_key_values_one_line_per_key_and_hostile_values_stay_on_their_line() -> None:
    text = formats.key_values({"a": 1, "b": 0.5, "c": ["x", "y"], "d": "evil\nkey: 1",
                               "skip": None, "e": True})
    assert text == "a: 1\nb: 0.5\nc: x y\nd: evil key: 1\ne: 1\n"
    assert formats.text_value(2.0) == "2.0" and formats.text_value(1 / 3) == "0.333333"


def test_stanzas_are_blank_line_separated() -> None:
    assert formats.stanzas([{"name": "a"}, {"name": "b"}]) == "name: a\n\nname: b\n"


def test_slicestat_line_has_the_15_historic_fields() -> None:
    line = formats.slicestat_line(SLIVER, 100 * 1024 * 1024, (8.0, 4.0, 2.0), "10.0.0.1")
    fields = line.split(",")
    assert len(fields) == 15
    assert fields[:7] == ["pl_a", "42", "12.3", "2.0", "2048", "0", "3"]
    assert fields[7:10] == ["8.000000", "4.000000", "2.000000"]
    assert fields[13] == "10.0.0.1"
    hostile = formats.slicestat_line({"name": "a,b\nc"}, 0, (0.0, 0.0, 0.0), "")
    assert len(hostile.split(",")) == 15 and "\n" not in hostile


def test_prometheus_help_type_and_label_escaping() -> None:
    text = formats.prometheus({"load": {"load1": 0.5}, "kernel": {"release": 'a"b\\c\nd'}},
                              {'pl_"x\\\n': SLIVER}, 0.001)
    lines = text.splitlines()
    assert "# TYPE planetlab_node_load_load1 gauge" in lines
    assert "planetlab_node_load_load1 0.5" in lines
    assert 'planetlab_node_kernel_info{release="a\\"b\\\\c\\nd"} 1' in lines
    assert "# TYPE planetlab_sliver_cpu_seconds_total counter" in lines
    assert 'planetlab_sliver_cpu_seconds_total{slice="pl_\\"x\\\\\\n"} 1.5' in lines
    assert 'planetlab_sliver_ports{slice="pl_\\"x\\\\\\n"} 2' in lines
    assert 'planetlab_sliver_info{slice="pl_\\"x\\\\\\n",state="running"} 1' in lines
    # every sample belongs to a family announced by HELP and TYPE before it
    announced: set[str] = set()
    for line in lines:
        if line.startswith("# TYPE "):
            announced.add(line.split()[2])
        elif not line.startswith("#"):
            assert line.split("{")[0].split(" ")[0] in announced, line


def test_json_body_is_json() -> None:
    assert json.loads(formats.json_body({"a": [1, 2]})) == {"a": [1, 2]}
