"""Malformed policies: each must fail with a PolicyError naming the file, the line, the key
path and the problem, quickly, and without running anything the file asks for."""

from __future__ import annotations

from pathlib import Path

import pytest

from gie_guard.errors import PolicyError, PolicyNotFoundError
from gie_guard.policy import MAX_POLICY_BYTES, Policy, check_policy, load_policy, read_policy

GOOD_CONCEPT = "  - {id: a, text: nude, scale: 3.0}\n"

BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]" for p, k in zip("abcdefgh", "bcdefghi")]
) + "\nname: x\n"

# (case id, file content, expected line, expected place, words the problem must contain)
CASES = [
    ("yaml-syntax", "name: x\nconcepts: [\n", 3, None, "invalid YAML"),
    ("tab-indent", "name: x\nconcepts:\n\t- id: a\n", 3, None, "tab"),
    ("top-level-list", "- name: x\n", 1, None, "top level must be a mapping"),
    ("top-level-scalar", "just words\n", 1, None, "top level must be a mapping"),
    ("empty-file", "", 1, None, "empty"),
    ("comments-only", "# nothing here\n", 1, None, "empty"),
    ("unknown-top-key", "name: x\nconcept: []\n", 2, "concept", "unknown key 'concept'; did you mean 'concepts'"),
    ("unknown-concept-key", "name: x\nconcepts:\n  - id: a\n    text: t\n    scael: 3\n", 5, "concepts[0].scael",
     "unknown key 'scael'"),
    ("missing-name", "concepts: []\n", 1, None, "required key 'name' is missing"),
    ("missing-text", "name: x\nconcepts:\n  - id: a\n    scale: 3\n", 3, "concepts[0]", "required key 'text'"),
    ("name-wrong-type", "name: [x]\n", 1, "name", "must be text"),
    ("text-is-boolean", "name: x\nconcepts:\n  - {id: a, text: yes}\n", 3, "concepts[0].text", "put it in quotes"),
    ("concepts-not-list", "name: x\nconcepts: {id: a}\n", 2, "concepts", "must be a list"),
    ("duplicate-ids", "name: x\nconcepts:\n" + GOOD_CONCEPT + "  - {id: a, text: naked}\n", 4, "concepts[1].id",
     "duplicate concept id (first used by concepts[0])"),
    ("bad-id", "name: x\nconcepts:\n  - {id: 'a b', text: t}\n", 3, "concepts[0].id", "letters, digits"),
    ("empty-text", "name: x\nconcepts:\n  - {id: a, text: '   '}\n", 3, "concepts[0].text", "must not be empty"),
    ("empty-alias", "name: x\nconcepts:\n  - {id: a, text: t, aliases: ['']}\n", 3, "concepts[0].aliases[0]",
     "must not be empty"),
    ("negative-scale", "name: x\nconcepts:\n  - {id: a, text: t, scale: -1}\n", 3, "concepts[0].scale", ">= 0"),
    ("infinite-scale", "name: x\nconcepts:\n  - {id: a, text: t, scale: .inf}\n", 3, "concepts[0].scale", "finite"),
    ("scale-as-text", "name: x\nconcepts:\n  - {id: a, text: t, scale: '3'}\n", 3, "concepts[0].scale", "'auto'"),
    ("scale-boolean", "name: x\nconcepts:\n  - {id: a, text: t, scale: true}\n", 3, "concepts[0].scale",
     "must be a number >= 0, `auto`, or a mapping"),
    ("auto-false", "name: x\nconcepts:\n  - id: a\n    text: t\n    scale: {auto: false}\n", 5,
     "concepts[0].scale.auto", "must be True"),
    ("auto-range", "name: x\nconcepts:\n  - id: a\n    text: t\n    scale: {auto: true, max: 3}\n", 5,
     "concepts[0].scale", "min <= fallback <= max"),
    ("auto-min-over-max", "name: x\nauto_scale: {min: 5, max: 1, fallback: 2}\n", 2, "auto_scale", "above max"),
    ("unknown-category", "name: x\nconcepts:\n  - {id: a, text: t, category: nsf}\n", 3, "concepts[0].category",
     "'nsfw', 'style', 'object' or 'custom'"),
    ("enabled-not-bool", "name: x\nconcepts:\n  - {id: a, text: t, enabled: 'no'}\n", 3, "concepts[0].enabled",
     "true or false"),
    ("steps-out-of-order", "name: x\ninhibit_steps: [0.9, 0.2]\n", 2, "inhibit_steps", "must be below end"),
    ("steps-out-of-range", "name: x\ninhibit_steps: [0.1, 1.5]\n", 2, "inhibit_steps[1]", "<= 1"),
    ("steps-three-values", "name: x\ninhibit_steps: [0.1, 0.5, 0.9]\n", 2, "inhibit_steps", "two fractions"),
    ("threshold-negative", "name: x\ndedup_threshold: -0.1\n", 2, "dedup_threshold", ">= 0"),
    ("on-missing-adapter", "name: x\non_missing_adapter: ignore\n", 2, "on_missing_adapter", "'fallback' or 'error'"),
    ("version-not-text", "version: [2]\nname: x\n", 1, "version", "must be text (got a list)"),
    ("duplicate-key", "name: x\nname: y\n", 2, "name", "duplicate key 'name' (first written on line 1)"),
    ("python-object-tag", "name: x\nconcepts: !!python/object/apply:os.system ['touch pwned']\n", 2, "concepts",
     "!!python/... is not allowed"),
    ("python-name-tag", "name: !!python/name:os.system x\n", 1, "name", "not allowed"),
    ("custom-tag", "name: x\nconcepts:\n  - !concept {id: a, text: t}\n", 3, "concepts[0]", "custom YAML tags (!...) are not allowed"),
    ("merge-key", "name: x\nbase: &b {scale: 3}\nconcepts:\n  - {<<: *b, id: a, text: t}\n", 4, "concepts[0]",
     "merge keys"),
    ("date-value", "name: x\ndescription: 2024-01-01\n", 2, "description", "dates are not policy values"),
    ("non-string-key", "name: x\n3: y\n", 2, None, "keys must be text"),
    ("multiple-documents", "name: x\n---\nname: y\n", 2, None, "invalid YAML"),
    ("alias-bomb", BILLION_LAUGHS, 6, "f", "alias bomb"),
]


def _write(tmp_path: Path, content: str | bytes, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.mark.parametrize(("content", "line", "place", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_policy_names_file_line_place_and_problem(tmp_path, content, line, place, words):
    path = _write(tmp_path, content)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    error = caught.value
    assert error.file == str(path)
    assert error.line == line
    assert error.place == place
    assert words in error.problem
    assert str(path) in str(error) and words in str(error)


def test_every_problem_of_a_file_is_reported(tmp_path):
    path = _write(tmp_path, "name: x\nfoo: 1\nconcepts:\n  - {id: a, text: '', scale: -2}\n")
    problems = check_policy(path)
    assert [(p.line, p.place) for p in problems] == [(2, "foo"), (4, "concepts[0].text"), (4, "concepts[0].scale")]
    with pytest.raises(PolicyError, match="unknown key 'foo'"):  # loading raises the first one
        read_policy(path)


def test_oversized_file_is_refused_before_parsing(tmp_path):
    # 10 MB of otherwise valid YAML: refused by size, without reading it all.
    big = "name: x\ndescription: '" + "a" * (10 * 1024 * 1024) + "'\n"
    path = _write(tmp_path, big)
    with pytest.raises(PolicyError, match="larger than the 1,048,576-byte limit") as caught:
        load_policy(path)
    assert caught.value.file == str(path)


def test_size_limit_is_the_documented_one():
    assert MAX_POLICY_BYTES == 1024 * 1024


def test_non_utf8_bytes(tmp_path):
    path = _write(tmp_path, b"name: x\nconcepts:\n  - {id: a, text: caf\xe9}\n")
    with pytest.raises(PolicyError, match="not UTF-8") as caught:
        load_policy(path)
    assert caught.value.line == 3


def test_python_tags_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = _write(tmp_path, f"name: x\ndescription: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(PolicyError):
        load_policy(path)
    assert not marker.exists()


def test_include_cycle_names_the_chain(tmp_path):
    _write(tmp_path, "name: a\ninclude: [b.yaml]\nconcepts: []\n", "a.yaml")
    _write(tmp_path, "name: b\ninclude: [sub/c.yaml]\nconcepts: []\n", "b.yaml")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub", "name: c\ninclude: [../a.yaml]\nconcepts: []\n", "c.yaml")
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "a.yaml")
    error = caught.value
    assert error.file == str(tmp_path / "sub" / "c.yaml") and error.line == 2 and error.place == "include[0]"
    assert "include cycle: " in error.problem
    assert error.problem.count(" -> ") == 3 and "b.yaml" in error.problem


@pytest.mark.parametrize(
    "include, error, match",
    [
        ("[policy.yaml]", PolicyError, "include cycle"),  # the file itself
        ("[no-such-policy]", PolicyNotFoundError, "no shipped policy named 'no-such-policy'.*nsfw"),
        ("['{tmp_path}/b.yaml']", PolicyError, "absolute path"),
    ],
    ids=["self-include-is-a-cycle", "unknown-shipped-include", "absolute-include"],
)
def test_include_is_refused(tmp_path, include, error, match):
    path = _write(tmp_path, "name: a\nconcepts: []\ninclude: " + include.format(tmp_path=tmp_path) + "\n")
    with pytest.raises(error, match=match):
        load_policy(path)


def _error_through_include(tmp_path, included: str, error: type[PolicyError] = PolicyError) -> PolicyError:
    """The error of loading a.yaml, which includes b.yaml (``included``)."""
    _write(tmp_path, "name: a\ninclude: [b.yaml]\nconcepts: []\n", "a.yaml")
    _write(tmp_path, included, "b.yaml")
    with pytest.raises(error) as caught:
        load_policy(tmp_path / "a.yaml")
    return caught.value


def test_missing_include_names_the_chain(tmp_path):
    error = _error_through_include(tmp_path, "name: b\nconcepts: []\ninclude:\n  - nowhere.yaml\n", PolicyNotFoundError)
    assert error.file == str(tmp_path / "b.yaml") and error.line == 4 and error.place == "include[0]"
    assert "'nowhere.yaml' not found" in error.problem and "a.yaml -> " in error.problem


def test_include_errors_point_into_the_included_file(tmp_path):
    error = _error_through_include(tmp_path, "name: b\nconcepts:\n  - {id: x, text: t, scale: -3}\n")
    assert (error.file, error.line, error.place) == (str(tmp_path / "b.yaml"), 3, "concepts[0].scale")


def test_sibling_includes_defining_the_same_id_conflict(tmp_path):
    _write(tmp_path, "name: b\nconcepts: [{id: x, text: one}]\n", "b.yaml")
    _write(tmp_path, "name: c\nconcepts: [{id: x, text: two}]\n", "c.yaml")
    path = _write(tmp_path, "name: a\ninclude: [b.yaml, c.yaml]\nconcepts: []\n")
    with pytest.raises(PolicyError, match="comes from both 'b.yaml' and 'c.yaml'") as caught:
        load_policy(path)
    assert caught.value.place == "include[1]"


def test_missing_file_and_unknown_name():
    with pytest.raises(PolicyNotFoundError, match="no such policy file"):
        load_policy("does/not/exist.yaml")
    with pytest.raises(PolicyNotFoundError, match="no shipped policy named 'nsfw2'"):
        load_policy("nsfw2")


def test_dict_and_object_sources_report_places():
    with pytest.raises(PolicyError) as caught:
        load_policy({"name": "x", "concepts": [{"id": "a", "text": "t", "scale": -1}]})
    assert caught.value.file is None and caught.value.place == "concepts[0].scale"
    with pytest.raises(PolicyError, match="cannot load a policy from a int"):
        load_policy(3)  # type: ignore[arg-type]


def test_models_are_frozen_and_keyword_only():
    policy = Policy(name="x")
    with pytest.raises(Exception):
        policy.name = "y"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Policy("x")  # type: ignore[misc]


def test_an_unknown_key_holding_a_colon_is_reported_not_crashed(tmp_path):
    """Found by the fuzz test: keys with ':' were taken for the scale union's tags and dropped."""
    path = _write(tmp_path, "v!!python/name:os.system ersion: '1'\nname: x\nconcepts: []\n")
    with pytest.raises(PolicyError, match="unknown key") as caught:
        load_policy(path)
    assert caught.value.line == 1 and caught.value.file == str(path)
