"""Zoo names, versions and references: the grammar doubles as the path-traversal defence."""

from __future__ import annotations

import pytest

import zoo
from zoo.refs import Ref, Version, parse_ref, parse_version, validate_name


@pytest.mark.parametrize(
    "name",
    ["small_fc_lopt/mlp_mnist", "a/b", "fam-1/name.v2", "x9/y_z-1.0", "0/0"],
)
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name,message",
    [
        ("", "zoo name is empty"),
        ("/etc/passwd", "must not be an absolute path"),
        ("/abs", "must not be an absolute path"),
        ("C:/zoo/x", "must not be an absolute path"),
        ("a\\b", "must not contain '\\\\'"),
        ("../x", "must not contain '..'"),
        ("a/..", "must not contain '..'"),
        ("a/b..c", "must not contain '..'"),
        ("name", r"must be exactly 'family/name' \(one '/'\), got 1 part"),
        ("a/b/c", r"must be exactly 'family/name' \(one '/'\), got 3 part"),
        ("a/", "has an empty part"),
        ("/", "must not be an absolute path"),
        ("a//b", "got 3 part"),
        ("Small/x", "zoo name part 'Small' in 'Small/x' is invalid: use lowercase letters"),
        ("a/.hidden", "zoo name part '.hidden' .* is invalid"),
        ("a/-dash", "zoo name part '-dash' .* is invalid"),
        ("a/sp ace", "zoo name part 'sp ace' .* is invalid"),
        ("a/" + "x" * 101, "is longer than 100"),
    ],
)
def test_invalid_names(name, message):
    with pytest.raises(zoo.InvalidRefError, match=message):
        validate_name(name)


@pytest.mark.parametrize(
    "text,expected",
    [("0.0.0", Version(0, 0, 0)), ("1.2.3", Version(1, 2, 3)), ("10.0.11", Version(10, 0, 11))],
)
def test_versions(text, expected):
    assert parse_version(text) == expected
    assert str(parse_version(text)) == text


@pytest.mark.parametrize("text", ["1.0", "v1.0.0", "1.0.0-rc1", "01.0.0", "1.0.0.0", "", "a.b.c"])
def test_invalid_versions(text):
    with pytest.raises(zoo.InvalidRefError, match="is not a strict semantic version MAJOR.MINOR"):
        parse_version(text)


def test_versions_order_numerically():
    assert parse_version("1.10.0") > parse_version("1.9.9") > parse_version("1.9.0")
    assert Version(1, 2, 3).bump_minor() == Version(1, 3, 0)
    assert Version(1, 2, 3).bump_patch() == Version(1, 2, 4)


@pytest.mark.parametrize(
    "ref,expected",
    [
        ("a/b", Ref("a/b")),
        ("a/b:latest", Ref("a/b")),
        ("a/b:2.0.1", Ref("a/b", Version(2, 0, 1))),
    ],
)
def test_parse_ref(ref, expected):
    assert parse_ref(ref) == expected


@pytest.mark.parametrize(
    "ref,message",
    [
        ("a/b:", "has an empty version after ':'"),
        ("a/b:1.0", "is not a strict semantic version"),
        ("a/b:newest", "is not a strict semantic version"),
        ("../b:1.0.0", "must not contain '..'"),
        ("C:\\zoo", "must not be an absolute path"),
        (3, "zoo reference must be a string"),
    ],
)
def test_invalid_refs(ref, message):
    with pytest.raises(zoo.InvalidRefError, match=message):
        parse_ref(ref)
