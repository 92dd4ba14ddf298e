"""The spec's test vectors (spec/vectors/vectors.json) against the reference reader.

For every vector: ``detect``/``sniff`` classify it as the index says; ``restore`` produces
exactly the listed entries, or raises the listed error (class, rule, member) leaving the
target absent, no staging directory and nothing else written; ``validate`` agrees. Plus the
bookkeeping that keeps spec, code and vectors in step: the generator is deterministic, every
reader-observable rule has a vector, and every rule ID the code cites exists in the spec.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import checkpoint_format
import pytest
from checkpoint_format import (
    PREFIX_SIZE,
    CheckpointFormatError,
    Limits,
    detect,
    restore,
    sniff,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "spec" / "checkpoint-format.md"
VECTORS = REPO / "spec" / "vectors"
GENERATOR = VECTORS / "make_vectors.py"
PACKAGE_SRC = REPO / "packages" / "checkpoint-format" / "src" / "checkpoint_format"
INDEX: list[dict] = json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))
AREAS = ("detect", "valid", "extract", "limit", "integ", "mark", "raw", "asm")
RULE_DEFINITION = re.compile(r"\*\*(CF-[A-Z]+-\d{2})\.\*\*")
RULE_ID = re.compile(r"CF-[A-Z]+-\d{2}")

# Rules a reader cannot observe in an object, so no vector can exercise them. They are
# tested where they live: the writer's suite (CF-WRITE-*; CF-ASM-08, a segment checked
# against its scan, in packages/checkpoint-format/tests/test_assembled.py), the storage
# layer (CF-OBJ-01 atomic publication, CF-OBJ-02 absent object) and the validator/CLI suite
# (CF-VALID-01).
WRITER_OR_ELSEWHERE = {
    *(f"CF-WRITE-{n:02d}" for n in range(1, 11)),
    "CF-ASM-08",
    "CF-OBJ-01",
    "CF-OBJ-02",
    "CF-VALID-01",
}

# Vectors on which the reference reader disagrees with the spec: (tests, vectors, when,
# reason). The xfail is strict, so a fix flips it to a failure and forces the entry out.
_ALL = ("detect", "restore", "restore-existing", "validate")
KNOWN_BUGS: list[tuple[tuple[str, ...], tuple[str, ...], bool, str]] = []


def _known_bug(kind: str, file: str) -> tuple[bool, str] | None:
    for kinds, files, when, reason in KNOWN_BUGS:
        if kind in kinds and file in files:
            return when, reason
    return None


def _spec_rules() -> list[str]:
    return RULE_DEFINITION.findall(SPEC.read_text(encoding="utf-8"))


def _params(kind: str, vectors: list[dict]) -> list:
    params = []
    for vector in vectors:
        bug = _known_bug(kind, vector["file"])
        marks = [pytest.mark.xfail(bug[0], strict=True, reason=bug[1])] if bug else []
        params.append(pytest.param(vector, id=vector["file"], marks=marks))
    return params


def _data(vector: dict) -> bytes:
    return (VECTORS / vector["file"]).read_bytes()


def _limits(vector: dict) -> Limits:
    # Always explicit, so that CHECKPOINT_MAX_* in the environment cannot change a result.
    return Limits(**vector.get("limits", {}))


ERROR_VECTORS = [v for v in INDEX if "error" in v["expect"]]


# --------------------------------------------------------------------------- the index


def test_index_is_well_formed() -> None:
    assert INDEX, "vectors.json is empty"
    spec_rules = set(_spec_rules())
    files = [vector["file"] for vector in INDEX]
    assert len(files) == len(set(files)), "a file is listed twice"
    for vector in INDEX:
        where = vector["file"]
        assert vector["file"].split("/")[0] in AREAS, where
        assert (VECTORS / where).is_file(), f"{where} is listed but missing"
        assert (VECTORS / where).stat().st_size < 64 * 1024, f"{where} is not tiny"
        assert vector["rule"] in spec_rules, f"{where}: rule {vector['rule']} not in the spec"
        assert vector["description"], where
        expect = vector["expect"]
        assert expect["kind"] in ("tarball", "raw", "none"), where
        if "error" in expect:
            assert expect["rule"] in spec_rules, where
            assert hasattr(checkpoint_format, expect["error"]), where
            assert issubclass(getattr(checkpoint_format, expect["error"]), CheckpointFormatError)
        elif expect["kind"] != "none":
            for member in expect["members"]:
                assert member["type"] in ("file", "dir", "symlink", "hardlink"), where
        for field in vector.get("limits", {}):
            assert field in Limits.__dataclass_fields__, f"{where}: unknown limit {field}"


def test_every_vector_file_is_indexed() -> None:
    listed = {vector["file"] for vector in INDEX}
    on_disk = {
        path.relative_to(VECTORS).as_posix()
        for area in AREAS
        if (VECTORS / area).is_dir()
        for path in (VECTORS / area).rglob("*")
        if path.is_file()
    }
    assert on_disk - listed == set(), "vector files missing from vectors.json"


def test_every_reader_rule_has_a_vector() -> None:
    covered = {vector["rule"] for vector in INDEX}
    covered |= {vector["expect"]["rule"] for vector in ERROR_VECTORS}
    missing = [rule for rule in _spec_rules() if rule not in covered | WRITER_OR_ELSEWHERE]
    assert missing == [], f"spec rules without a test vector: {missing}"


def test_allow_list_names_only_spec_rules() -> None:
    assert set(_spec_rules()) >= WRITER_OR_ELSEWHERE


def test_rule_ids_in_package_source_exist_in_spec() -> None:
    spec_rules = set(_spec_rules())
    unknown = {}
    for path in sorted(PACKAGE_SRC.rglob("*.py")):
        for rule in RULE_ID.findall(path.read_text(encoding="utf-8")):
            if rule not in spec_rules:
                unknown.setdefault(rule, []).append(path.name)
    assert unknown == {}, f"rule IDs cited in the code but not defined in the spec: {unknown}"


def test_spec_rule_ids_are_unique() -> None:
    rules = _spec_rules()
    assert len(rules) == len(set(rules))
    assert len(rules) >= 40  # guards the regex against a format change of the spec


def test_generator_is_deterministic(tmp_path: Path) -> None:
    out = tmp_path / "regenerated"
    done = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    regenerated = {
        p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
    }
    committed = {
        p.relative_to(VECTORS).as_posix(): p.read_bytes()
        for p in [VECTORS / "vectors.json", *(q for a in AREAS for q in (VECTORS / a).rglob("*"))]
        if p.is_file()
    }
    assert sorted(regenerated) == sorted(committed)
    differ = [name for name in committed if committed[name] != regenerated[name]]
    assert differ == [], f"regenerate with `python {GENERATOR.relative_to(REPO)}`: {differ}"


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("vector", _params("detect", INDEX))
def test_detect(vector: dict) -> None:
    data = _data(vector)
    detection = detect(data[:PREFIX_SIZE], complete=len(data) <= PREFIX_SIZE)
    assert detection.kind == vector["expect"]["kind"], detection.reason
    sniffed, stream = sniff(io.BytesIO(data))
    assert sniffed.kind == vector["expect"]["kind"]
    assert stream.read() == data  # the sniffed stream replays the whole object


# --------------------------------------------------------------------------- restore


def _snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every entry under ``root`` except ``skip``'s subtree: type, mode, size, content hash."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path == skip or skip in path.parents:
                continue
            st = path.lstat()
            digest = None
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entries[path.relative_to(root).as_posix()] = (
                stat.S_IFMT(st.st_mode), st.st_size, digest
            )
    return entries


def _restored_entries(target: Path) -> dict[str, dict]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(target):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = path.relative_to(target).as_posix()
            if stat.S_ISDIR(st.st_mode):
                found[rel] = {"type": "dir", "size": 0}
            elif stat.S_ISLNK(st.st_mode):
                found[rel] = {"type": "symlink", "size": 0, "linkname": os.readlink(path)}
            elif stat.S_ISREG(st.st_mode):
                found[rel] = {
                    "type": "file",
                    "size": st.st_size,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                }
            else:
                found[rel] = {"type": f"unexpected mode {oct(st.st_mode)}"}
            found[rel]["stat"] = st
    return found


def _assert_tree(target: Path, expected: list[dict]) -> None:
    found = _restored_entries(target)
    assert sorted(found) == sorted(m["name"] for m in expected)
    for member in expected:
        entry = found[member["name"]]
        where = member["name"]
        if member["type"] == "hardlink":
            assert entry["type"] == "file", where
            assert os.path.samefile(target / where, target / member["linkname"]), where
        else:
            assert entry["type"] == member["type"], where
        if member["type"] == "symlink":
            assert entry["linkname"] == member["linkname"], where
        assert entry["size"] == member["size"], where
        if "sha256" in member:
            assert entry["sha256"] == member["sha256"], where
        st = entry["stat"]
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), where
        if "mode" in member:
            assert oct(stat.S_IMODE(st.st_mode)) == oct(member["mode"]), where
        if "mtime_ns" in member:
            assert st.st_mtime_ns == member["mtime_ns"], where


def _assert_error(error: CheckpointFormatError, expect: dict) -> None:
    assert type(error).__name__ == expect["error"], repr(error)
    assert error.rule == expect["rule"], str(error)
    assert error.member == expect["member"], str(error)
    message = str(error)
    assert f"({expect['rule']})" in message
    if expect["member"] is not None:
        assert repr(expect["member"]) in message
    if "limit" in expect:
        assert f"{expect['limit']}=" in message


def _assert_untouched(root: Path, parent: Path, target: Path, before: dict) -> None:
    assert _snapshot(root, target) == before, "restore wrote outside its target"
    leftovers = [p.name for p in parent.iterdir() if ".partial-" in p.name]
    assert leftovers == [], f"staging directories left behind: {leftovers}"


@pytest.mark.parametrize("vector", _params("restore", INDEX))
def test_restore(vector: dict, tmp_path: Path) -> None:
    parent = tmp_path / "outer" / "parent"
    parent.mkdir(parents=True)
    (tmp_path / "outer" / "sibling.txt").write_bytes(b"must survive\n")
    target = parent / "target"
    before = _snapshot(tmp_path, target)
    expect = vector["expect"]
    source = io.BytesIO(_data(vector))
    if "error" in expect:
        with pytest.raises(CheckpointFormatError) as caught:
            restore(source, target, limits=_limits(vector))
        _assert_error(caught.value, expect)
        assert not target.exists() and not target.is_symlink()
        _assert_untouched(tmp_path, parent, target, before)
        return
    result = restore(source, target, limits=_limits(vector))
    assert result.kind == expect["kind"]
    if expect["kind"] == "none":
        assert result.path is None
        assert not target.exists()
    else:
        assert result.path == (target if expect["kind"] == "tarball" else target / "payload")
        _assert_tree(target, expect["members"])
    assert _snapshot(tmp_path, target) == before


@pytest.mark.parametrize("vector", _params("restore-existing", ERROR_VECTORS))
def test_failed_restore_leaves_an_existing_empty_target_empty(vector: dict, tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    target = parent / "target"
    target.mkdir(parents=True)
    before = _snapshot(tmp_path, target)
    with pytest.raises(CheckpointFormatError):
        restore(io.BytesIO(_data(vector)), target, limits=_limits(vector))
    assert target.is_dir() and list(target.iterdir()) == []
    _assert_untouched(tmp_path, parent, target, before)


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize("vector", _params("validate", INDEX))
def test_validate(vector: dict) -> None:
    data = _data(vector)
    report = validate(io.BytesIO(data), limits=_limits(vector))
    expect = vector["expect"]
    assert report.detection.kind == expect["kind"]
    assert report.size == len(data)
    if "error" in expect:
        assert not report.valid
        found = [(v.rule, v.member) for v in report.violations]
        assert expect["rule"] in [rule for rule, _ in found], found
        for violation in report.violations:
            assert violation.rule in violation.message
    else:
        assert report.valid, report.violations
        if expect["kind"] == "tarball":
            listed = {m.name for m in report.members}
            assert listed <= {m["name"] for m in expect["members"]}
