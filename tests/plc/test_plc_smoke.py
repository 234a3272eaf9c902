import xmlrpc.client

import pytest


def test_authcheck_and_sites(plc):
    api = plc.proxy()
    assert api.AuthCheck(plc.admin) == 1
    sites = api.GetSites(plc.admin)
    assert [s["login_base"] for s in sites] == ["pl"]
    sid = api.AddSite(plc.admin, {"name": "Test U", "abbreviated_name": "TU",
                                  "login_base": "tu", "max_slices": 3})
    got = api.GetSites(plc.admin, {"login_base": "tu"}, ["site_id", "name", "hrn"])
    assert got == [{"site_id": sid, "name": "Test U", "hrn": "plc.tu"}]
    with pytest.raises(xmlrpc.client.Fault) as e:
        api.AddSite(plc.admin, {"name": "X", "abbreviated_name": "X", "login_base": "tu"})
    assert e.value.faultCode == 102
    assert e.value.faultString.startswith("person_id 2: AddSite: Invalid login_base value")
