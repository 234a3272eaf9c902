"""Standard tag types: the accessors of spec 9.2 and the slice/interface tags of 9.4.

``ACCESSORS`` drives both the generated Get/Set methods (plc/methods/accessors.py) and
the tag types ``plc init`` creates; ``STANDARD_TAGS`` are the remaining seeded types.
"""

from __future__ import annotations

from dataclasses import dataclass

ADMIN = ("admin",)
ALL = ("admin", "pi", "tech", "user", "node")
TECH = ("admin", "pi", "tech")


@dataclass(frozen=True)
class Accessor:
    classes: tuple[str, ...]
    suffix: str
    tagname: str
    category: str
    set_roles: tuple[str, ...]
    get_roles: tuple[str, ...] = ALL
    description: str = ""
    exposed: bool = False


def _a(classes: str, suffix: str, tagname: str, category: str, set_roles: tuple[str, ...],
       exposed: bool = False, description: str = "") -> Accessor:
    return Accessor(tuple(classes.split()), suffix, tagname, category, set_roles,
                    description=description or f"{tagname} tag", exposed=exposed)


ACCESSORS: tuple[Accessor, ...] = (
    # Accessors_standard
    _a("Slice", "Vref", "vref", "slice/config", ("admin", "pi", "user", "node"), True,
       "vserver reference image type"),
    _a("Slice", "InitscriptCode", "initscript_code", "slice/usertools", ("admin", "pi", "user"),
       True, "initscript code"),
    _a("Slice", "Initscript", "initscript", "slice/usertools", ("admin", "pi", "user"), True,
       "initscript name"),
    _a("Slice Node", "Arch", "arch", "node/slice/config", ALL, True, "architecture"),
    _a("Slice Node", "Pldistro", "pldistro", "node/slice/config/sfa", ALL, True, "PlanetLab distribution"),
    _a("Slice Node", "Fcdistro", "fcdistro", "node/slice/config", ALL, True, "Linux distribution"),
    _a("Node", "Virt", "virt", "node/operation", ALL, True, "virtualization technology"),
    _a("Node", "Deployment", "deployment", "node/operation", ADMIN, True, "deployment"),
    _a("Node", "Extensions", "extensions", "node/config", ADMIN, True, "extensions"),
    _a("Node Person Slice Site", "Hrn", "hrn", "node/person/slice/site/sfa", ALL, True,
       "SFA human readable name"),
    _a("Node", "PlainBootstrapfs", "plain-bootstrapfs", "node/config", TECH),
    _a("Node", "Serial", "serial", "node/bootcd", TECH),
    _a("Node", "Cramfs", "cramfs", "node/bootcd", TECH),
    _a("Node", "Kvariant", "kvariant", "node/bootcd", TECH),
    _a("Node", "Kargs", "kargs", "node/bootcd", TECH),
    _a("Node", "NoHangcheck", "no-hangcheck", "node/bootcd", TECH),
    _a("Interface", "Ifname", "ifname", "interface/config", TECH, True, "device name"),
    _a("Interface", "Driver", "driver", "interface/config", TECH),
    _a("Interface", "Alias", "alias", "interface/config", TECH),
    _a("Interface", "Backdoor", "backdoor", "interface/hidden", ADMIN),
    _a("Person Slice Site", "SfaCreated", "sfa_created", "person/slice/site/sfa", ALL, True),
    _a("Site", "DisabledRegistration", "disabled_registration", "site", ADMIN, True),
    # Accessors_sliverauth
    _a("Slice", "OmfControl", "omf_control", "slice/usertools", ALL, True),
    _a("Slice", "SliverHMAC", "enable_hmac", "slice/usertools", ALL, True),
    _a("Slice", "Hmac", "hmac", "slice/auth", ("admin", "node")),
    _a("Slice", "SshKey", "ssh_key", "slice/auth", ("admin", "node")),
    # Accessors_ipv6
    _a("Interface", "SliversIPv6Prefix", "sliversipv6prefix", "interface/ipv6", TECH),
    _a("Slice", "IPv6Address", "ipv6_address", "slice/usertools", ALL, True),
    # Accessors_myslice / vicci
    _a("Person", "Columnconf", "columnconf", "person/myslice", ALL, True),
    _a("Person", "Showconf", "showconf", "person/myslice", ALL, True),
    _a("Person", "Advanced", "advanced", "person/myslice", ALL, True),
) + tuple(
    _a("Interface", suffix, tag, "interface/wifi", TECH)
    for suffix, tag in (("Mode", "mode"), ("Essid", "essid"), ("Nw", "nw"), ("Freq", "freq"),
                        ("Channel", "channel"), ("Sens", "sens"), ("Rate", "rate"),
                        ("Key", "key"), ("Key1", "key1"), ("Key2", "key2"), ("Key3", "key3"),
                        ("Key4", "key4"), ("SecurityMode", "securitymode"),
                        ("Iwconfig", "iwconfig"), ("Iwpriv", "iwpriv"))
)

_RLIMITS = ("as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
            "nofile", "nproc", "rss", "rtprio", "sigpending", "stack", "openfd")

#: (tagname, category, description, roles)
STANDARD_TAGS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("system", "slice/general", "Is a default system slice (1) or not (0 or unset)", ADMIN),
    ("enabled", "slice/general", "Slice enabled (1 or unset) or suspended (0)", ADMIN),
    ("drl", "slice/general", "Is a DRL slice", ADMIN),
) + tuple(
    (name, "slice/rspec", desc, ADMIN) for name, desc in (
        ("ip_addresses", "Comma separated IP addresses the slice may bind"),
        ("isolate_loopback", "Create an isolated loopback interface"),
        ("cpu_pct", "Reserved CPU percent"),
        ("cpu_share", "Number of CPU shares"),
        ("cpu_cores", "Number of CPU cores reserved"),
        ("cpu_freezable", "Slice processes are frozen when idle"),
        ("net_min_rate", "Minimum bandwidth (kbps)"),
        ("net_max_rate", "Maximum bandwidth (kbps)"),
        ("net_i2_min_rate", "Minimum bandwidth over I2 routes (kbps)"),
        ("net_i2_max_rate", "Maximum bandwidth over I2 routes (kbps)"),
        ("net_max_kbyte", "Maximum daily network Tx KByte limit"),
        ("net_thresh_kbyte", "KByte limit before warning and throttling"),
        ("net_i2_max_kbyte", "Maximum daily network Tx KByte limit to I2 hosts"),
        ("net_i2_thresh_kbyte", "KByte limit to I2 hosts before warning and throttling"),
        ("net_share", "Number of bandwidth shares"),
        ("net_i2_share", "Number of bandwidth shares over I2 routes"),
        ("disk_max", "Disk quota (1k disk blocks)"),
        ("capabilities", "Comma separated list of capabilities"),
        ("vsys_vnet", "Subnet for vsys vnet"),
        ("codemux", "Demux HTTP between slices"),
        # Read by this project's node agent (agent/rspec.py, docs/guard.md):
        ("ports", "Ports the slice owns on its nodes: PROTO:PORT[-PORT][@ADDRESS],..."),
        ("mem_max", "Memory limit in KiB (0: none)"),
        ("pids_max", "Limit of processes and threads"),
        ("sockets_max", "INET sockets one sliver may hold open at once (0: no cap)"),
        ("cpu_cap", "CPU cap in percent of one CPU (0: none)"),
    )
) + (
    ("vsys", "slice/rspec", "Per-slice vsys script", ("pi", "user", "tech")),
    ("delegations", "slice/rspec", "Coma seperated list of slices to give delegation "
     "authority to.", ("admin", "pi", "user")),
    ("rawdisk", "slice/access", "Allow slice access to raw disk", ("admin", "pi")),
    ("exempt_slice_until", "slice/myops", "Exempt slice from MyOps until this date", ADMIN),
    ("interface", "slice/network", "The interface tag holds network configuration", ADMIN),
) + tuple(
    (f"{r}_{kind}", "slice/limit", f"Per-slice {r} rlimit {kind}", ADMIN)
    for r in _RLIMITS for kind in ("min", "soft", "hard")
) + (
    ("ovs_bridge", "interface/ovs", "Name of Open vSwitch bridge", ("admin", "tech")),
    ("ipv6_defaultgw", "interface/config", "IPv6 default gateway", ("admin", "tech")),
    ("ipv6addr", "interface/config", "IPv6 address for the interface", ("admin", "tech")),
    ("ipv6addr_secondaries", "interface/config", "IPv6 secondary addresses",
     ("admin", "tech")),
)
