"""The release-policy grammar: parsing, every operator, failure messages, and properties."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confinfer import policy
from confinfer.errors import ConfigError, PolicyError

pytestmark = pytest.mark.unit

MAA = "https://sharedeus.eus.attest.azure.net"

CVM_POLICY: dict[str, Any] = {
    "version": "1.0.0",
    "anyOf": [
        {
            "authority": MAA + "/",
            "allOf": [
                {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "sevsnpvm"},
                {
                    "claim": "x-ms-isolation-tee.x-ms-compliance-status",
                    "equals": "azure-compliant-cvm",
                },
            ],
        }
    ],
}


def tee(**over: Any) -> dict[str, Any]:
    inner = {
        "x-ms-attestation-type": "sevsnpvm",
        "x-ms-compliance-status": "azure-compliant-cvm",
        "x-ms-sevsnpvm-is-debuggable": False,
        "x-ms-sevsnpvm-guestsvn": 7,
    }
    inner.update(over)
    return {"iss": MAA, "x-ms-attestation-type": "azurevm", "x-ms-isolation-tee": inner}


def refused(doc: Any, claims: dict[str, Any], issuer: str = MAA) -> PolicyError:
    with pytest.raises(PolicyError) as err:
        policy.evaluate(doc, claims, issuer)
    return err.value


def invalid(doc: Any) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        policy.parse(doc)
    assert err.value.reason == "policy-invalid"
    assert "\n" not in err.value.message
    return err.value


def one(cond: dict[str, Any], authority: str = MAA) -> dict[str, Any]:
    return {"version": "1.0.0", "anyOf": [{"authority": authority, "allOf": [cond]}]}


# --- evaluation -----------------------------------------------------------------------------


def test_canonical_cvm_policy_passes() -> None:
    policy.evaluate(CVM_POLICY, tee(), MAA)
    policy.evaluate(json.dumps(CVM_POLICY), tee(), MAA + "/")
    policy.evaluate(
        json.dumps(CVM_POLICY).encode(), tee(), "HTTPS://SharedEUS.eus.attest.azure.net"
    )


def test_failure_names_the_claim_expected_and_actual() -> None:
    err = refused(CVM_POLICY, tee(**{"x-ms-compliance-status": "none"}))
    assert err.message == (
        'x-ms-isolation-tee.x-ms-compliance-status: expected "azure-compliant-cvm", got "none"'
    )
    assert err.reason == "policy-unsatisfied"
    assert err.details["claim"] == "x-ms-isolation-tee.x-ms-compliance-status"
    assert err.details["expected"] == "azure-compliant-cvm"
    assert err.details["actual"] == "none"


def test_missing_claim_fails() -> None:
    claims = tee()
    del claims["x-ms-isolation-tee"]["x-ms-attestation-type"]
    err = refused(CVM_POLICY, claims)
    assert err.message == (
        'x-ms-isolation-tee.x-ms-attestation-type: expected "sevsnpvm", got nothing (claim missing)'
    )
    assert err.details["present"] is False


def test_untrusted_issuer() -> None:
    err = refused(CVM_POLICY, tee(), "https://evil.example")
    assert err.reason == "policy-untrusted-issuer"
    assert err.details["claim"] == "iss"


def test_platform_token_policy_uses_top_level_claims() -> None:
    doc = one({"claim": "x-ms-attestation-type", "equals": "sevsnpvm"})
    policy.evaluate(doc, {"x-ms-attestation-type": "sevsnpvm"}, MAA)
    assert refused(doc, tee()).details["actual"] == "azurevm"


@pytest.mark.parametrize(
    ("cond", "ok"),
    [
        ({"equals": 7}, True),
        ({"equals": 7.0}, True),
        ({"equals": 8}, False),
        ({"equals": "7"}, False),
        ({"notEquals": 8}, True),
        ({"notEquals": 7}, False),
        ({"notEquals": "7"}, True),
        ({"less": 8}, True),
        ({"less": 7}, False),
        ({"lessOrEquals": 7}, True),
        ({"greater": 6}, True),
        ({"greater": 7}, False),
        ({"greaterOrEquals": 7}, True),
        ({"greaterOrEquals": 7.5}, False),
        ({"less": "8"}, False),
        ({"exists": True}, True),
        ({"exists": False}, False),
    ],
)
def test_operators_on_a_number(cond: dict[str, Any], ok: bool) -> None:
    doc = one({"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-guestsvn", **cond})
    if ok:
        policy.evaluate(doc, tee(), MAA)
    else:
        refused(doc, tee())


@pytest.mark.parametrize(
    ("cond", "ok"),
    [
        ({"equals": False}, True),
        ({"equals": 0}, False),
        ({"equals": "false"}, False),
        ({"notEquals": True}, True),
        ({"less": True}, False),
        ({"greaterOrEquals": False}, False),
    ],
)
def test_booleans_are_not_numbers(cond: dict[str, Any], ok: bool) -> None:
    doc = one({"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable", **cond})
    if ok:
        policy.evaluate(doc, tee(), MAA)
    else:
        refused(doc, tee())


def test_strings_order_and_compare_case_sensitively() -> None:
    claims = {"v": "b"}
    policy.evaluate(one({"claim": "v", "greater": "a"}), claims, MAA)
    refused(one({"claim": "v", "equals": "B"}), claims)


def test_objects_and_arrays_are_not_values() -> None:
    claims = {"obj": {"a": 1}, "arr": [1], "nul": None}
    for name in ("obj", "arr", "nul"):
        refused(one({"claim": name, "equals": 1}), claims)
        refused(one({"claim": name, "notEquals": 1}), claims)  # fail closed
        policy.evaluate(one({"claim": name, "exists": True}), claims, MAA)
    assert "got an object" in refused(one({"claim": "obj", "equals": 1}), claims).message
    refused(one({"claim": "arr.0", "equals": 1}), claims)  # no array indexing


def test_exists_false_asks_for_absence() -> None:
    policy.evaluate(one({"claim": "x-ms-isolation-tee.debug", "exists": False}), tee(), MAA)
    err = refused(one({"claim": "x-ms-attestation-type", "exists": False}), tee())
    assert err.message == 'x-ms-attestation-type: expected to be absent, got "azurevm"'


def test_condition_value_form() -> None:
    doc = one(
        {
            "claim": "x-ms-isolation-tee.x-ms-compliance-status",
            "condition": "equals",
            "value": "azure-compliant-cvm",
        }
    )
    policy.evaluate(doc, tee(), MAA)
    doc = one(
        {
            "claim": "x-ms-isolation-tee.x-ms-sevsnpvm-guestsvn",
            "condition": "greaterOrEquals",
            "value": 8,
        }
    )
    assert refused(doc, tee()).message == (
        "x-ms-isolation-tee.x-ms-sevsnpvm-guestsvn: expected >= 8, got 7"
    )


def test_nested_any_and_all() -> None:
    doc = {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": MAA,
                "allOf": [
                    {"anyOf": [{"claim": "a", "equals": 1}, {"claim": "b", "equals": 2}]},
                    {"allOf": [{"claim": "c", "exists": True}]},
                ],
            }
        ],
    }
    policy.evaluate(doc, {"b": 2, "c": 0}, MAA)
    policy.evaluate(doc, {"a": 1, "c": 0}, MAA)
    err = refused(doc, {"a": 0, "b": 0, "c": 0})
    assert err.message == "a: expected 1, got 0 (and 1 other alternative(s) failed)"
    assert err.details["failures"] == ["a: expected 1, got 0", "b: expected 2, got 0"]
    assert refused(doc, {"a": 1}).details["claim"] == "c"


def test_any_of_authorities_for_the_same_issuer() -> None:
    doc = {
        "version": "1.0.0",
        "anyOf": [
            {"authority": MAA, "allOf": [{"claim": "a", "equals": 1}]},
            {"authority": MAA + "/", "allOf": [{"claim": "a", "equals": 2}]},
            {"authority": "https://other.example", "allOf": [{"claim": "a", "equals": 3}]},
        ],
    }
    policy.evaluate(doc, {"a": 2}, MAA)
    refused(doc, {"a": 3})


def test_literal_dotted_claim_name_wins() -> None:
    policy.evaluate(one({"claim": "a.b", "equals": 1}), {"a.b": 1, "a": {"b": 2}}, MAA)


def test_keywords_are_case_blind() -> None:
    doc = {
        "Version": "1.0.0",
        "anyof": [
            {
                "Authority": MAA,
                "allof": [
                    {"Claim": "a", "EQUALS": 1},
                    {"claim": "b", "condition": "notequals", "value": 2},
                ],
            }
        ],
    }
    policy.evaluate(doc, {"a": 1, "b": 3}, MAA)


# --- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ("{", "not JSON"),
        ([], "expected a JSON object"),
        ({"anyOf": []}, "policy.version"),
        ({"version": "2.0", "anyOf": []}, "policy.version"),
        ({"version": "1.0.0"}, "exactly 'version' and 'anyOf'"),
        ({"version": "1.0.0", "anyOf": []}, "non-empty"),
        ({"version": "1.0.0", "anyOf": [{"allOf": []}]}, "missing 'authority'"),
        (
            {
                "version": "1.0.0",
                "anyOf": [{"authority": "http://x", "allOf": [{"claim": "a", "exists": True}]}],
            },
            "https://",
        ),
        (
            {
                "version": "1.0.0",
                "anyOf": [
                    {
                        "authority": MAA,
                        "allOf": [{"claim": "a", "exists": True}],
                        "anyOf": [{"claim": "a", "exists": True}],
                    }
                ],
            },
            "exactly one of anyOf or allOf",
        ),
        ({"version": "1.0.0", "anyOf": [{"authority": MAA}]}, "exactly one of anyOf or allOf"),
        ({"version": "1.0.0", "anyOf": [{"authority": MAA, "allOf": []}]}, "non-empty"),
        (one({"claim": "a", "matches": "x"}), "unknown key"),
        (one({"claim": "a", "equals": 1, "less": 2}), "exactly one operator"),
        (one({"claim": "a"}), "exactly one operator"),
        (one({"equals": 1}), "needs a 'claim'"),
        (one({"claim": "", "equals": 1}), "dotted claim name"),
        (one({"claim": "a..b", "equals": 1}), "dotted claim name"),
        (one({"claim": "a", "equals": None}), "not null"),
        (one({"claim": "a", "equals": {"x": 1}}), "not dict"),
        (one({"claim": "a", "exists": "yes"}), "true or false"),
        (one({"claim": "a", "condition": "like", "value": 1}), "unknown operator"),
        (one({"claim": "a", "condition": "equals"}), "condition/value form"),
        (one({"anyOf": [{"claim": "a", "equals": 1}], "claim": "b"}), "stand alone"),
        (one({"claim": "a", "equals": 1, "Equals": 2}), "given twice"),
    ],
)
def test_parse_errors_are_one_line(doc: Any, fragment: str) -> None:
    err = invalid(json.dumps(doc) if not isinstance(doc, str) else doc)
    assert fragment in err.message
    assert err.message.startswith("release policy: ")


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(CVM_POLICY), encoding="utf-8")
    assert policy.load(path).authorities[0].url == MAA + "/"
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        policy.load(path)
    assert str(path) in err.value.message
    with pytest.raises(ConfigError) as err:
        policy.load(tmp_path / "absent.json")
    assert "absent.json" in err.value.message


# --- properties -----------------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-1000, max_value=1000),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.text(max_size=6),
)
claim_trees = st.recursive(
    scalars,
    lambda children: st.dictionaries(names, children, min_size=1, max_size=4),
    max_leaves=12,
).filter(lambda v: isinstance(v, dict))


def kind(value: Any) -> str:
    """The JSON kind as the grammar compares them: 0 and 0.0 are one number, True is not 1."""
    if isinstance(value, bool):
        return "boolean"
    return "number" if isinstance(value, int | float) else "string"


def leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(leaves(v, path + "."))
        else:
            out.append((path, v))
    return out


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(claim_trees, st.data())
def test_policy_of_actual_values_passes_and_any_change_names_the_claim(
    claims: dict[str, Any], data: st.DataObject
) -> None:
    pairs = leaves(claims)
    doc = {
        "version": "1.0.0",
        "anyOf": [{"authority": MAA, "allOf": [{"claim": p, "equals": v} for p, v in pairs]}],
    }
    policy.evaluate(doc, claims, MAA)
    path, value = data.draw(st.sampled_from(pairs))
    other = data.draw(scalars.filter(lambda x: kind(x) != kind(value) or x != value))
    node = claims
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = other
    err = refused(doc, claims)
    assert err.details["claim"] == path
    assert err.message.startswith(f"{path}: expected ")


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "version",
                    "anyOf",
                    "allOf",
                    "authority",
                    "claim",
                    "equals",
                    "condition",
                    "value",
                    "exists",
                    "x",
                ]
            ),
            children,
            max_size=4,
        ),
    ),
    max_leaves=15,
)


@settings(max_examples=300)
@given(json_values)
def test_parse_only_ever_raises_config_error(doc: Any) -> None:
    try:
        policy.parse(json.dumps(doc))
    except ConfigError as exc:
        assert exc.reason == "policy-invalid"
        assert "\n" not in exc.message


conditions = st.builds(
    lambda claim, op, value: {"claim": claim, op: value},
    st.sampled_from(["a", "b", "c.d", "c.e", "missing"]),
    st.sampled_from(["equals", "notEquals", "less", "lessOrEquals", "greater", "greaterOrEquals"]),
    st.one_of(st.booleans(), st.integers(-3, 3), st.sampled_from(["x", "y"])),
) | st.builds(
    lambda claim, v: {"claim": claim, "exists": v},
    st.sampled_from(["a", "c.d", "missing"]),
    st.booleans(),
)
rules = st.recursive(
    conditions,
    lambda children: st.builds(
        lambda kind, items: {kind: items},
        st.sampled_from(["anyOf", "allOf"]),
        st.lists(children, min_size=1, max_size=3),
    ),
    max_leaves=8,
)
flat_claims = st.fixed_dictionaries(
    {
        "a": st.one_of(st.booleans(), st.integers(-3, 3), st.sampled_from(["x", "y"])),
        "b": st.one_of(st.integers(-3, 3), st.sampled_from(["x", "y"])),
        "c": st.fixed_dictionaries({"d": st.integers(-3, 3), "e": st.sampled_from(["x", "y"])}),
    }
)


@settings(max_examples=300)
@given(st.lists(rules, min_size=1, max_size=3), st.sampled_from(["anyOf", "allOf"]), flat_claims)
def test_agrees_with_the_testbeds_independent_evaluator(
    items: list[dict[str, Any]], kind: str, claims: dict[str, Any]
) -> None:
    """Key Vault's side in the testbed reads the grammar on its own; both must agree."""
    releasepolicy = pytest.importorskip("testbed.releasepolicy")
    doc = {"version": "1.0.0", "anyOf": [{"authority": MAA, kind: items}]}
    verdict = releasepolicy.evaluate(releasepolicy.parse(json.dumps(doc)), MAA, claims)
    try:
        policy.evaluate(doc, claims, MAA)
        ours = True
    except PolicyError:
        ours = False
    assert ours == verdict.allowed


def test_an_authority_without_a_scheme_means_https() -> None:
    """The tutorial's release-policy.json writes the bare host, which Key Vault accepts."""
    bare = {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": "sharedeus.eus.attest.azure.net",
                "allOf": CVM_POLICY["anyOf"][0]["allOf"],
            }
        ],
    }
    policy.evaluate(bare, tee(), MAA)
    assert refused(bare, tee(), "http://sharedeus.eus.attest.azure.net").details["claim"] == "iss"
    assert refused(bare, tee(), "https://other.attest.azure.net").details["claim"] == "iss"
    invalid(one({"claim": "a", "exists": True}, authority=""))
    invalid(one({"claim": "a", "exists": True}, authority="ftp://sharedeus.eus.attest.azure.net"))
