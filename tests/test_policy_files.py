"""Reading policy files safely: never block on a FIFO, never read outside the allowed
folders, never quote a refused file's content in an error, a log line or the CLI."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from gie_guard.errors import PolicyError
from gie_guard.policy import PolicyStore, check_policy, load_policy, read_policy


def finishes(fn, timeout: float = 60.0):
    """Run ``fn`` in a daemon thread; (finished in time, its result or exception)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), box.get("error", box.get("value"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


GOOD = "name: top\ndedup_threshold: 0\nconcepts: [{id: car, text: car, scale: 2}]\n"

# -- FIFOs -------------------------------------------------------------------------------


def test_fifo_as_the_policy_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    done, result = finishes(lambda: load_policy(fifo))
    assert done, "load_policy blocked on a FIFO"
    assert isinstance(result, PolicyError) and "FIFO" in result.problem and result.file == str(fifo)


def test_fifo_as_an_included_file_never_hangs_a_reload(tmp_path):
    top = write(tmp_path / "top.yaml", "name: top\ndedup_threshold: 0\ninclude: [base.yaml]\nconcepts: []\n")
    base = write(tmp_path / "base.yaml", "name: base\nconcepts: [{id: car, text: car, scale: 1}]\n")
    store = PolicyStore(top)
    first = store.current
    base.unlink()
    os.mkfifo(base)
    done, result = finishes(store.reload)
    assert done, "reload() blocked on a FIFO include (holding the store lock)"
    assert result is False and store.current is first
    assert "FIFO" in store.state.last_error and "include[0]" in store.state.last_error
    done, _ = finishes(store.reload)  # the lock was released
    assert done
    store.close()


def test_fifo_include_under_the_watcher_and_close(tmp_path):
    top = write(tmp_path / "top.yaml", "name: top\ndedup_threshold: 0\ninclude: [base.yaml]\nconcepts: []\n")
    base = write(tmp_path / "base.yaml", "name: base\nconcepts: [{id: car, text: car, scale: 1}]\n")
    store = PolicyStore(top, watch=True, poll_interval=0.1)
    base.unlink()
    os.mkfifo(base)
    deadline = time.monotonic() + 60
    while store.state.failed_count == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.state.failed_count == 1 and store.watching
    done, _ = finishes(store.close)
    assert done and not store.watching


def test_cli_check_of_a_fifo_does_not_hang(tmp_path, capsys):
    from gie_guard.cli import main

    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)
    done, code = finishes(lambda: main(["policy", "check", str(fifo)]))
    assert done and code == 1
    assert "FIFO" in capsys.readouterr().err


# -- confinement ------------------------------------------------------------------------

SECRET = "s3cr3t-Value-0xC0FFEE"


@pytest.fixture
def layout(tmp_path):
    """tmp/policies/ (the operator's folder) and tmp/secret/ (outside it)."""
    secret = write(tmp_path / "secret" / "creds.yaml",
                   f"aws_access_key_id: AKIA{SECRET}\naws_secret_access_key: {SECRET}\nport: 5432\n")
    folder = tmp_path / "policies"
    folder.mkdir()
    return folder, secret


def _no_leak(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and "aws_secret_access_key" not in text and "AKIA" not in text, text


def test_include_outside_the_policy_folder_is_refused(layout):
    folder, secret = layout
    top = write(folder / "top.yaml", "name: top\ninclude:\n  - ../secret/creds.yaml\nconcepts: []\n")
    with pytest.raises(PolicyError) as caught:
        read_policy(top)
    error = caught.value
    assert (error.file, error.line, error.place) == (str(top), 3, "include[0]")
    assert "outside the folders policies may include from" in error.problem and str(secret) in error.problem
    _no_leak(str(error))


def test_symlink_include_pointing_outside_is_refused(layout):
    folder, secret = layout
    (folder / "creds.yaml").symlink_to(secret)
    top = write(folder / "top.yaml", "name: top\ninclude: [creds.yaml]\nconcepts: []\n")
    with pytest.raises(PolicyError, match="outside the folders") as caught:
        load_policy(top)
    _no_leak(str(caught.value))


def test_roots_allow_a_named_folder(layout, tmp_path):
    folder, _ = layout
    shared = write(tmp_path / "shared" / "common.yaml", "name: common\nconcepts: [{id: boat, text: boat, scale: 1}]\n")
    top = write(folder / "top.yaml", "name: top\ndedup_threshold: 0\ninclude: [../shared/common.yaml, shapes-demo]\nconcepts: []\n")
    with pytest.raises(PolicyError, match="outside"):
        read_policy(top)
    flat = read_policy(top, roots=[tmp_path / "shared"])
    assert [c.id for c in flat.policy.concepts] == ["boat", "circle"]  # shipped by name still works
    assert str(shared) in {os.path.normpath(f) for f in flat.files}
    with PolicyStore(top, roots=[str(tmp_path / "shared")]) as store:
        assert len(store.current.concepts) == 2
    assert check_policy(top, roots=[tmp_path / "shared"]) == []
    assert read_policy(top, roots=str(tmp_path / "shared")).policy.concepts  # one folder, as text


def test_symlinks_inside_the_folder_are_fine(tmp_path):
    write(tmp_path / "real" / "base.yaml", "name: base\nconcepts: [{id: car, text: car, scale: 1}]\n")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "real" / "base.yaml")
    top = write(tmp_path / "top.yaml", "name: top\ndedup_threshold: 0\ninclude: [link.yaml]\nconcepts: []\n")
    assert [c.id for c in read_policy(top).policy.concepts] == ["car"]


def test_dict_sources_are_confined_to_the_working_directory(tmp_path, monkeypatch, layout):
    folder, _ = layout
    monkeypatch.chdir(folder)
    with pytest.raises(PolicyError, match="outside"):
        read_policy({"name": "x", "include": ["../secret/creds.yaml"], "concepts": []})


# -- errors never quote a refused file ------------------------------------------------------

LEAKY = {
    "scalar": f"{SECRET}\n",
    "not-a-policy": f"aws_secret_access_key: {SECRET}\nuser: admin\n",
    "list": f"- {SECRET}\n- two\n",
    "wrong-types": f"name: [{SECRET}]\nconcepts: {SECRET}\nversion: {{x: {SECRET}}}\n",
    "number-for-text": "name: x\ndescription: 123456789012345\n",
    "scale-too-large": "name: x\nconcepts: [{id: a, text: t, scale: 987654321}]\n",
    "unknown-category": f"name: x\nconcepts: [{{id: a, text: t, category: {SECRET}}}]\n",
    "bad-id": f"name: x\nconcepts: [{{id: '{SECRET} x', text: t}}]\n",
    "steps": "name: x\ninhibit_steps: [0.987654, 0.123456]\n",
    "auto-range": "name: x\nauto_scale: {min: 87.654321, max: 12.345678, fallback: 50}\n",
    "yaml-unterminated": f"name: x\ndescription: '{SECRET}\n",
    "yaml-alias": f"name: *{SECRET}\n",
    "yaml-anchor-twice": f"a: &{SECRET} 1\nb: &{SECRET} 2\nname: x\n",
    "yaml-tag": f"name: !{SECRET} x\n",
    "yaml-bad-indent": f"name: x\n  {SECRET}: 1\n bad\n",
    "yaml-escape": f'name: "\\q{SECRET}"\n',
    "huge-int": "name: x\nconcepts: [{id: a, text: t, scale: " + "9" * 5000 + "}]\n",
    "control-char": f"name: x\ndescription: {SECRET}\x07\n",
}


@pytest.mark.parametrize("content", list(LEAKY.values()), ids=list(LEAKY))
def test_errors_never_quote_the_file(tmp_path, content):
    path = tmp_path / "p.yaml"
    path.write_bytes(content.encode("utf-8"))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    problems = check_policy(path)
    assert problems and all(p.file == str(path) for p in problems)
    texts = [str(caught.value), *map(str, problems)]
    for text in texts:
        assert SECRET not in text, text
        for digits in ("987654321", "123456789012345", "87.654321", "0.987654", "99999"):
            assert digits not in text, text
        assert "aws_secret_access_key" not in text and "admin" not in text


def test_not_a_policy_names_no_keys(tmp_path):
    path = write(tmp_path / "creds.yaml", "aws_secret_access_key: x\ndb_password: y\n")
    with pytest.raises(PolicyError, match="not a policy: none of its 2 top-level keys is a policy key"):
        read_policy(path)


def _passwd_fragments() -> list[str]:
    try:
        lines = Path("/etc/passwd").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [line[:16] for line in lines if len(line) >= 16]


@pytest.fixture
def passwd_link(tmp_path):
    if not _passwd_fragments():
        pytest.skip("no /etc/passwd to point at")
    link = tmp_path / "passwd.yaml"
    link.symlink_to("/etc/passwd")
    return link


def test_a_symlink_to_etc_passwd_leaks_nothing_through_the_cli(passwd_link, capsys):
    from gie_guard.cli import main

    assert main(["policy", "check", str(passwd_link)]) == 1
    assert main(["policy", "explain", str(passwd_link)]) == 1
    out, err = capsys.readouterr()
    assert err
    for fragment in _passwd_fragments():
        assert fragment not in out + err


def test_a_symlink_to_etc_passwd_leaks_nothing_through_the_guard(passwd_link):
    from gie_guard import Guard

    with pytest.raises(PolicyError) as caught:
        Guard(policy=str(passwd_link))
    for fragment in _passwd_fragments():
        assert fragment not in str(caught.value)


def test_a_symlink_swapped_to_etc_passwd_leaks_nothing_on_reload(tmp_path, caplog):
    if not _passwd_fragments():
        pytest.skip("no /etc/passwd to point at")
    real = write(tmp_path / "real.yaml", GOOD)
    link = tmp_path / "policy.yaml"
    link.symlink_to(real)
    with PolicyStore(link) as store:
        temp = tmp_path / "swap"
        temp.symlink_to("/etc/passwd")
        os.replace(temp, link)
        with caplog.at_level(logging.DEBUG, logger="gie_guard"):
            assert store.reload() is False
        assert "policy reload failed" in caplog.text
        for fragment in _passwd_fragments():
            assert fragment not in caplog.text and fragment not in store.state.last_error
