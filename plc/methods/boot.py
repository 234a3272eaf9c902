"""Node boot and management methods (spec 6.3): BootGetNodeDetails, BootUpdateNode,
BootNotifyOwners, ReportRunlevel, GetNodeFlavour, GetSliceFamily, GetPlcRelease."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from plc.auth import Auth
from plc.faults import PLCAPIError, PLCInvalidArgument, PLCNotImplemented, PLCPermissionDenied
from plc.method import ALL_ROLES, api_method
from plc.methods._tags import get_tag, set_tag
from plc.methods._util import id_or_name
from plc.methods.interfaces import validate_interface
from plc.methods.nodes import check_lookup
from plc.methods.sessions import create_node_session
from plc.model import Interface, Node, Slice
from plc.params import Parameter

if TYPE_CHECKING:
    from plc.api import Call

PRIMARY_KEYS = ("method", "mac", "gateway", "network", "broadcast", "netmask", "dns1", "dns2")


@api_method(roles=["node"], accepts=[Auth(only=("hmac",), force_hmac=True)],
            returns=Parameter(dict, "hostname, boot_state, model, session, networks"))
def BootGetNodeDetails(call: Call, auth: dict) -> dict:
    """Returns a set of details about the calling node, including a new node session
    value (replacing the previous one)."""
    nid = call.caller_ident
    node = call.one(Node, nid, ["hostname", "boot_state", "model", "interface_ids"])
    details: dict[str, Any] = {"hostname": node["hostname"], "boot_state": node["boot_state"],
                               "model": node["model"] or "",
                               "session": create_node_session(call, nid)}
    if node["interface_ids"]:
        nets = call.get(Interface, node["interface_ids"])
        # BootManager cannot unmarshal nil: every nil becomes "" (spec 6.3)
        details["networks"] = [{k: ("" if v is None else v) for k, v in n.items()} for n in nets]
    call.log(f"Node {nid} requested its details", Node=nid)
    return details


@api_method(roles=["node"],
            accepts=[Auth(only=("hmac", "session")),
                     {"boot_state": Node.fields["boot_state"].param,
                      "ssh_rsa_key": Node.fields["ssh_rsa_key"].param,
                      "ssh_host_key": Node.fields["ssh_rsa_key"].param,
                      "primary_network": Parameter(dict, "primary interface fields")}],
            returns=Parameter(int, "1 if successful"))
def BootUpdateNode(call: Call, auth: dict, node_fields: dict) -> int:
    """Allows the calling node to update its own record: boot_state, ssh_rsa_key (alias
    ssh_host_key) and its primary interface (ip cannot change). Without boot_state and
    ssh_rsa_key it records a boot: last_contact, last_boot and time online/offline."""
    if call.caller_kind != "node":
        raise PLCPermissionDenied("Only nodes may call BootUpdateNode")
    nid = call.caller_ident
    changes: dict[str, Any] = {}
    if "boot_state" in node_fields:
        check_lookup(call, "boot_states", node_fields["boot_state"], "boot_state")
        changes["boot_state"] = node_fields["boot_state"]
    key = node_fields.get("ssh_rsa_key", node_fields.get("ssh_host_key"))
    if key is not None:
        changes["ssh_rsa_key"] = key
    if "primary_network" in node_fields:
        net = node_fields["primary_network"]
        if not isinstance(net.get("interface_id"), int):
            raise PLCInvalidArgument("Interface not specified", "primary_network")
        iface = call.get(Interface, [net["interface_id"]])
        if not iface or iface[0]["node_id"] != nid or not iface[0]["is_primary"]:
            raise PLCInvalidArgument("Interface is not the node's primary interface")
        if "ip" in net and net["ip"] != iface[0]["ip"]:
            raise PLCInvalidArgument("IP address cannot be changed", "ip")
        row = dict(iface[0])
        row.update({k: net[k] for k in PRIMARY_KEYS if k in net})
        validate_interface(call, row, net["interface_id"])
        call.update("interfaces", {"interface_id": net["interface_id"]},
                    {**{k: row[k] for k in PRIMARY_KEYS if k in net},
                     "last_updated": call.now})
        changes["primary_network"] = True
    if "boot_state" not in node_fields and key is None:
        times = call.conn.query("SELECT last_contact, last_boot, last_pcu_reboot FROM nodes "
                                "WHERE node_id = ?", [nid])[0]
        boot: dict[str, Any] = {"last_contact": call.now, "last_boot": call.now}
        if times["last_contact"] is not None and times["last_boot"] is not None:
            boot["last_time_spent_online"] = times["last_contact"] - times["last_boot"]
            boot["last_time_spent_offline"] = call.now - times["last_contact"]
        if times["last_pcu_reboot"] is not None and call.now - times["last_pcu_reboot"] < 1200:
            boot["last_pcu_confirmation"] = call.now
        call.update("nodes", {"node_id": nid}, boot)
    columns = {k: v for k, v in changes.items() if k != "primary_network"}
    if columns:
        call.update("nodes", {"node_id": nid}, {**columns, "last_updated": call.now})
    if changes:
        call.log(f"Node {nid} updated: {', '.join(sorted(changes))}", Node=nid)
    return 1


@api_method(roles=["node"],
            accepts=[Auth(), Parameter(str, "Message identifier"),
                     Parameter(int, "Notify PIs"), Parameter(int, "Notify technical contacts"),
                     Parameter(int, "Notify support")],
            returns=Parameter(int, "1 if successful"))
def BootNotifyOwners(call: Call, auth: dict, message_id: str, include_pis: int,
                     include_techs: int, include_support: int) -> int:
    """Notify the owners of the calling node that some event has occurred, by the
    message template message_id. A missing or disabled template is not an error."""
    rows = call.conn.query("SELECT subject, template FROM messages WHERE message_id = ? "
                           "AND enabled = 1", [message_id])
    if not rows:
        return 1
    nid = call.caller_ident
    node = call.conn.query("SELECT hostname, site_id FROM nodes WHERE node_id = ?", [nid])[0]
    to = [call.config.mail_boot_address]
    if include_support:
        to.append(call.config.mail_support_address)
    roles = [r for r, want in (("pi", include_pis), ("tech", include_techs)) if want]
    if roles:
        to += [r["email"] for r in call.conn.query(
            "SELECT DISTINCT p.email FROM persons p JOIN person_site ps ON "
            "ps.person_id = p.person_id JOIN person_role pr ON pr.person_id = p.person_id "
            "JOIN roles r ON r.role_id = pr.role_id WHERE ps.site_id = ? AND p.enabled = 1 "
            f"AND p.deleted = 0 AND r.name IN ({', '.join('?' * len(roles))})",
            [node["site_id"], *roles])]
    values = {"node_id": nid, "hostname": node["hostname"],
              "PLC_WWW_HOST": call.config.www_host, "PLC_WWW_SSL_PORT": call.config.www_ssl_port,
              "fault": ""}
    try:
        subject = (rows[0]["subject"] or "") % values
        body = (rows[0]["template"] or "") % values
    except (KeyError, ValueError, TypeError):
        subject, body = rows[0]["subject"] or message_id, rows[0]["template"] or ""
    try:
        from plc import mail
        mail.send(mail.MailConfig.from_plc_config(call.config), to, subject, body)
    except Exception as e:  # MailError, or a bad [mail] configuration
        raise PLCAPIError(f"could not send mail: {e}") from None
    call.log(f"Sent message {message_id} about node {nid}", Node=nid)
    return 1


@api_method(roles=["node", "admin"],
            accepts=[Auth(only=("hmac", "session", "password", "capability", "anonymous",
                                "hmac_dummybox", "gpg")),
                     {"run_level": Node.fields["run_level"].param},
                     Parameter(id_or_name(Node), "node id or hostname (admins)", nullok=True)],
            returns=Parameter(int, "1 if successful"))
def ReportRunlevel(call: Call, auth: dict, report_fields: dict,
                   node_id_or_hostname: int | str | None = None) -> int:
    """Report the run level of a node: nodes report their own, admins must name one."""
    if call.caller_kind == "node":
        nid = call.caller_ident
    else:
        if node_id_or_hostname is None:
            raise PLCInvalidArgument("Missing node id or hostname", "node_id_or_hostname")
        key = node_id_or_hostname.lower() if isinstance(node_id_or_hostname, str) else \
            node_id_or_hostname
        nid = call.one(Node, key, ["node_id"], what="node")["node_id"]
    if "run_level" not in report_fields:
        raise PLCInvalidArgument("run_level must be given", "report_fields")
    check_lookup(call, "run_levels", report_fields["run_level"], "run_level")
    call.update("nodes", {"node_id": nid}, {"run_level": report_fields["run_level"],
                                            "last_contact": call.now})
    return 1


def _virt(call: Call, fcdistro: str) -> str:
    default = "vs"
    for clause in call.config.flavour_virt_map.split(";"):
        names, _, virt = clause.partition(":")
        for name in (n.strip() for n in names.split(",")):
            if name == "default":
                default = virt.strip()
            elif name == fcdistro:
                return virt.strip()
    return default


@api_method(roles=["admin", "user", "node"], accepts=[Auth(), id_or_name(Node)],
            writes=True, returns=Parameter(dict, "arch, fcdistro, pldistro, virt, nodefamily, "
                                                 "extensions, plain"))
def GetNodeFlavour(call: Call, auth: dict, node_id_or_name: int | str) -> dict:
    """Returns detailed information on a given node's flavour: what the node runs, from
    its tags or the configured defaults (written back as tags)."""
    key = node_id_or_name.lower() if isinstance(node_id_or_name, str) else node_id_or_name
    nid = call.one(Node, key, ["node_id"], what="node")["node_id"]
    out: dict[str, Any] = {}
    for tag, default in (("arch", call.config.flavour_node_arch),
                         ("fcdistro", call.config.flavour_node_fcdistro),
                         ("pldistro", call.config.flavour_node_pldistro)):
        value = get_tag(call, "Node", nid, tag)
        if not value:
            value = default
            set_tag(call, "Node", nid, tag, value)
        out[tag] = value
    out["virt"] = get_tag(call, "Node", nid, "virt") or _virt(call, out["fcdistro"])
    out["nodefamily"] = get_tag(call, "Node", nid, "deployment") or \
        f"{out['pldistro']}-{out['fcdistro']}-{out['arch']}"
    ext = get_tag(call, "Node", nid, "extensions") or ""
    out["extensions"] = [f"{e}-{out['fcdistro']}-{out['arch']}" for e in ext.split()]
    out["plain"] = bool(get_tag(call, "Node", nid, "plain-bootstrapfs"))
    return out


def slice_family(call: Call, slice_id: int) -> str:
    def tag(name: str) -> str | None:
        return call.conn.scalar(
            "SELECT t.value FROM slice_tag t JOIN tag_types tt ON tt.tag_type_id = t.tag_type_id"
            " WHERE t.slice_id = ? AND tt.tagname = ? AND t.node_id IS NULL AND "
            "t.nodegroup_id IS NULL ORDER BY t.slice_tag_id LIMIT 1", [slice_id, name])

    pldistro = tag("vref") or tag("pldistro") or call.config.flavour_slice_pldistro
    fcdistro = tag("fcdistro") or call.config.flavour_slice_fcdistro
    arch = tag("arch") or call.config.flavour_slice_arch
    return f"{pldistro}-{fcdistro}-{arch}"


@api_method(roles=["admin", "user", "node"], accepts=[Auth(), id_or_name(Slice)],
            returns=Parameter(str, "the slice-family this slice should be based upon"))
def GetSliceFamily(call: Call, auth: dict, slice_id_or_name: int | str) -> str:
    """Returns the slice vserver reference image that a given slice should be based
    on: pldistro-fcdistro-arch from its slice-wide tags (vref wins) or the defaults."""
    return slice_family(call, call.one(Slice, slice_id_or_name, ["slice_id"],
                                       what="slice")["slice_id"])


_RELEASE_COMMENT = re.compile(r"\A\s*#.|\A\s*\Z|\Axxxxx")
_RELEASE_LINES = (
    ("build", re.compile(r"\A[bB]uild\s+(?P<key>[^:]+)\s*:\s*(?P<value>.*)\Z")),
    ("tags", re.compile(r"\A(?P<key>[^:]+)\s*:=\s*(?P<value>.*)\Z")),
    ("rpms", re.compile(r"\A(?P<key>[^:]+?)\s*::\s*(?P<value>.*)\Z")),
)


@api_method(roles=ALL_ROLES + ["anonymous"], accepts=[Auth()],
            returns=Parameter(dict, "build, tags, rpms"))
def GetPlcRelease(call: Call, auth: dict) -> dict:
    """Returns various information about the current myplc installation, parsed from
    the release file (fault 109 when there is none)."""
    try:
        with open(call.config.release_file, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        raise PLCNotImplemented("Cannot open the release file "
                                f"{call.config.release_file}") from None
    # the build system's format (build/Makefile myplc-release), parsed as legacy did:
    #   xxxxxxxx build info            <- separator, like comments and blank lines
    #   Build target-arch: x86_64      <- build
    #   PLCAPI-GITPATH := git://...    <- tags
    #   myplc :: version=5.3 release=1 <- rpms
    out: dict[str, Any] = {"build": {}, "tags": {}, "rpms": {}}
    for line in lines:
        line = line.strip()
        if _RELEASE_COMMENT.match(line):
            continue
        for section, regexp in _RELEASE_LINES:
            m = regexp.match(line)
            if m:
                out[section][m.group("key")] = m.group("value")
                break
        else:
            out["unexpected"] = out.get("unexpected", "") + line + "\n"
    return out
