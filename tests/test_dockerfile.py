"""Static checks of the Dockerfile and .dockerignore (Docker itself is not needed).

The Dockerfile is parsed the way Docker reads it (parser directives, comments, line
continuations), then checked: pinned official Ray base image for Python 3.11, the pinned
requirements installed, the FID Inception weights fetched at build time, the project
installed without touching the pinned dependencies, no test tools, and a non-root final user. Each check
is also run on a broken copy of the Dockerfile, to show that it can fail.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

RAY_VERSION = "2.60.0"
BASE_IMAGE_RE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<flavour>gpu|cu\d+)$")
FID_WEIGHTS = "pt_inception-2015-12-05"
TEST_TOOLS = ("pytest", "pytest-timeout", "hypothesis")  # pyproject.toml's `test` extra: never in the image


@dataclass(frozen=True)
class Instruction:
    lineno: int  # line where the instruction starts (1-based)
    cmd: str  # upper case: FROM, RUN, ...
    args: str  # everything after the keyword, continuation lines joined


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, as Docker's parser does.

    Handles parser directives (``# syntax=``, ``# escape=``) at the top, comment lines
    (also inside a continued instruction), blank lines, and line continuations with the
    escape character. Heredocs (``RUN <<EOF``) are refused rather than misread.
    """
    lines = text.splitlines()
    escape = "\\"
    # Parser directives: only at the very top, before any comment, blank line or instruction.
    i = 0
    while i < len(lines):
        m = re.match(r"^#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$", lines[i])
        if not m:
            break
        if m.group(1).lower() == "escape":
            escape = m.group(2)
            if escape not in ("\\", "`"):
                raise ValueError(f"line {i + 1}: invalid escape directive {escape!r}")
        i += 1

    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for n in range(i, len(lines)):
        raw = lines[n]
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and (not stripped or stripped.startswith("#")):
            continue  # comments and blank lines inside a continuation are dropped
        if not pending:
            start = n + 1
        body = raw.rstrip()
        if body.endswith(escape):
            pending.append(body[: -len(escape)])
            continue
        pending.append(body)
        joined = " ".join(part.strip() for part in pending).strip()
        pending = []
        keyword, _, args = joined.partition(" ")
        if "<<" in args and re.search(r"<<-?\s*['\"]?[A-Za-z_]+", args) and keyword.upper() in ("RUN", "COPY"):
            raise ValueError(f"line {start}: heredocs are not supported by this parser")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    if pending:
        raise ValueError("Dockerfile ends inside a line continuation")
    return out


def env_vars(instr: Instruction) -> dict[str, str]:
    """Variables set by one ENV instruction (``ENV a=1 b=2`` or legacy ``ENV a 1``)."""
    tokens = shlex.split(instr.args)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) for t in tokens)


def copy_sources(instr: Instruction) -> list[str]:
    tokens = [t for t in shlex.split(instr.args) if not t.startswith("--")]
    return tokens[:-1]


def _is_root(user: str) -> bool:
    name = user.split(":", 1)[0].strip()
    return name in ("root", "0")


def dockerfile_problems(instructions: list[Instruction]) -> list[str]:
    """Everything wrong with the Dockerfile, as readable messages (empty list = fine)."""
    problems: list[str] = []
    cmds = [ins.cmd for ins in instructions]

    # 1. Base image: one stage, the official Ray image, pinned version, Python 3.11.
    froms = [ins for ins in instructions if ins.cmd == "FROM"]
    if len(froms) != 1:
        problems.append(f"base: expected exactly one FROM, found {len(froms)}")
    if froms:
        image = [t for t in froms[-1].args.split() if not t.startswith("--")][0]
        m = BASE_IMAGE_RE.match(image)
        if "$" in image:
            problems.append(f"base: image {image!r} is not a literal (ARG substitution hides the pin)")
        elif "latest" in image or m is None:
            problems.append(f"base: image {image!r} is not rayproject/ray:<version>-py311-<gpu|cuXXX>")
        else:
            if m.group("version") != RAY_VERSION:
                problems.append(f"base: Ray {m.group('version')} in the image, expected {RAY_VERSION}")
            if m.group("py") != "311":
                problems.append(f"base: Python py{m.group('py')} in the image, expected py311")

    def first_index(pred) -> int | None:
        return next((k for k, ins in enumerate(instructions) if pred(ins)), None)

    # 2. Pinned requirements: copied, then installed with pip install -r.
    copy_req = first_index(lambda ins: ins.cmd == "COPY" and any(
        Path(s).name == "requirements.txt" for s in copy_sources(ins)))
    pip_req = first_index(lambda ins: ins.cmd == "RUN" and re.search(
        r"pip install\b[^&;|]*-r\s+(\./)?requirements\.txt", ins.args))
    if copy_req is None:
        problems.append("requirements: no COPY of requirements.txt")
    if pip_req is None:
        problems.append("requirements: no RUN pip install -r requirements.txt")
    if copy_req is not None and pip_req is not None and pip_req < copy_req:
        problems.append("requirements: installed before requirements.txt is copied")

    # 3. FID Inception weights fetched at build time, into a fixed TORCH_HOME.
    prefetch = first_index(lambda ins: ins.cmd == "RUN" and (
        "fid_inception_v3()" in ins.args or re.search(r"InceptionV3\(", ins.args)))
    if prefetch is None:
        problems.append("fid: no RUN that builds pytorch-fid's Inception (fid_inception_v3() / InceptionV3(...))")
    elif pip_req is not None and prefetch < pip_req:
        problems.append("fid: weights fetched before pytorch-fid is installed")
    torch_home = None
    for k, ins in enumerate(instructions):
        if ins.cmd == "ENV" and "TORCH_HOME" in env_vars(ins):
            if prefetch is not None and k > prefetch:
                problems.append("fid: TORCH_HOME changes after the weights were fetched")
            torch_home = env_vars(ins)["TORCH_HOME"]
    if torch_home is None:
        problems.append("fid: TORCH_HOME not set with ENV (weights would land in an unknown cache)")
    elif not torch_home.startswith("/home/ray/"):
        problems.append(f"fid: TORCH_HOME={torch_home} is not under /home/ray (user ray must own it)")

    # 4. The project: copied and installed without re-resolving the pinned dependencies.
    copy_proj = first_index(lambda ins: ins.cmd == "COPY" and "." in copy_sources(ins))
    pip_proj = first_index(lambda ins: ins.cmd == "RUN" and re.search(
        r"pip install\b[^&;|]*--no-deps\b[^&;|]*\s\.(\s|$)", ins.args + " "))
    if copy_proj is None:
        problems.append("project: no COPY . of the project")
    if pip_proj is None:
        problems.append("project: no RUN pip install --no-deps .")
    if copy_proj is not None and pip_proj is not None and pip_proj < copy_proj:
        problems.append("project: installed before it is copied")

    # 5. No test tools in the image: no pip install of the `test` extra or of a test tool by name.
    for ins in instructions:
        if ins.cmd == "RUN" and "pip install" in ins.args:
            if re.search(r"\[[^\]]*\btest\b[^\]]*\]", ins.args):
                problems.append(f"test tools: line {ins.lineno} installs the test extra")
            named = sorted(t for t in TEST_TOOLS if re.search(rf"(^|\s){re.escape(t)}(\s|[=<>~]|$)", ins.args))
            if named:
                problems.append(f"test tools: line {ins.lineno} installs {', '.join(named)}")

    # 6. Non-root final user, and nothing runs as root after the last USER.
    users = [ins for ins in instructions if ins.cmd == "USER"]
    if not users:
        problems.append("user: no USER instruction (the base image's user is not stated)")
    elif _is_root(users[-1].args):
        problems.append(f"user: final USER is {users[-1].args!r} (root)")
    elif users[-1].args.split(":")[0] not in ("ray", "1000"):
        problems.append(f"user: final USER is {users[-1].args!r}, expected the image's user ray")
    if cmds and cmds[-1] != "USER":
        problems.append(f"user: the Dockerfile should end with USER ray, ends with {cmds[-1]}")
    return problems


def ignore_problems(text: str) -> list[str]:
    patterns = {line.strip().rstrip("/") for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")}
    problems = []
    for needed in (".venv", ".git", "runs", "**/__pycache__"):
        if needed not in patterns and needed.lstrip("*/") not in patterns:
            problems.append(f".dockerignore: {needed} not excluded")
    if "**/auth_token" not in patterns:
        problems.append(".dockerignore: Ray auth tokens (**/auth_token) not excluded")
    return problems


# --------------------------------------------------------------------------- the parser


def test_parser_joins_continuations_and_drops_comments():
    text = (
        "# syntax=docker/dockerfile:1\n"
        "# a comment\n"
        "FROM rayproject/ray:2.60.0-py311-gpu\n"
        "\n"
        "RUN pip install -r requirements.txt \\\n"
        "    # a comment inside the continuation\n"
        "\n"
        " && echo done\n"
        "ENV A=1 \\\n"
        "    B=2\n"
        "USER ray\n"
    )
    ins = parse_dockerfile(text)
    assert [i.cmd for i in ins] == ["FROM", "RUN", "ENV", "USER"]
    assert ins[1].args == "pip install -r requirements.txt && echo done"
    assert ins[1].lineno == 5
    assert env_vars(ins[2]) == {"A": "1", "B": "2"}
    assert env_vars(Instruction(1, "ENV", "TORCH_HOME /x/y")) == {"TORCH_HOME": "/x/y"}


def test_parser_escape_directive_and_errors():
    ins = parse_dockerfile("# escape=`\nFROM x\nRUN a `\n  b\n")
    assert ins[1].args == "a b"
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM x\nRUN a \\\n")
    with pytest.raises(ValueError, match="heredoc"):
        parse_dockerfile("FROM x\nRUN <<EOF\necho hi\nEOF\n")


# --------------------------------------------------------------------------- the real files


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    assert DOCKERFILE.is_file(), "Dockerfile missing at the repository root"
    return DOCKERFILE.read_text()


def test_dockerfile_passes_all_checks(dockerfile_text):
    assert dockerfile_problems(parse_dockerfile(dockerfile_text)) == []


def test_base_image_is_pinned_ray_py311(dockerfile_text):
    (frm,) = [i for i in parse_dockerfile(dockerfile_text) if i.cmd == "FROM"]
    m = BASE_IMAGE_RE.match(frm.args)
    assert m is not None, frm.args
    assert (m.group("version"), m.group("py")) == (RAY_VERSION, "311")


def test_final_user_is_ray(dockerfile_text):
    ins = parse_dockerfile(dockerfile_text)
    assert ins[-1].cmd == "USER" and ins[-1].args == "ray"
    assert not any(i.cmd == "USER" and _is_root(i.args) for i in ins), "no USER root step is needed"


def test_dockerignore_excludes_local_state_and_secrets():
    assert DOCKERIGNORE.is_file(), ".dockerignore missing"
    assert ignore_problems(DOCKERIGNORE.read_text()) == []


def test_requirements_pin_matches_base_image():
    """The base image's Ray and requirements.txt's Ray must be the same version, or pip
    would replace the image's Ray (and its CUDA-matched build) with another one."""
    req = ROOT / "requirements.txt"
    if not req.is_file():
        pytest.skip("requirements.txt not written yet")
    text = req.read_text()
    pins = re.findall(r"^\s*ray(\[[^\]]*\])?\s*==\s*([\w.]+)", text, flags=re.M)
    assert pins, "requirements.txt does not pin ray"
    assert {p[1] for p in pins} == {RAY_VERSION}
    assert re.search(r"^\s*pytorch-fid\s*==", text, flags=re.M), "pytorch-fid must be pinned (Inception prefetch)"


def test_the_requirements_the_image_installs_hold_no_test_tools():
    names = {re.match(r"\s*([A-Za-z0-9_.-]+)", line).group(1).lower()
             for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")}
    assert not names & set(TEST_TOOLS), names & set(TEST_TOOLS)


# --------------------------------------------------------------------------- the checks can fail


def _swap(text: str, old: str, new: str) -> str:
    assert old in text, f"mutation target {old!r} not in the Dockerfile"
    return text.replace(old, new)


MUTATIONS = {
    "latest base": (lambda t: _swap(t, "FROM rayproject/ray:2.60.0-py311-gpu", "FROM rayproject/ray:latest-gpu"), "base:"),
    "other ray": (lambda t: _swap(t, "ray:2.60.0-py311", "ray:2.59.0-py311"), "base: Ray 2.59.0"),
    "python 3.10": (lambda t: _swap(t, "-py311-", "-py310-"), "base: Python py310"),
    "arg base": (lambda t: _swap(t, "FROM rayproject/ray:2.60.0-py311-gpu", "ARG BASE\nFROM $BASE"), "not a literal"),
    "no requirements": (lambda t: _swap(t, "pip install -r requirements.txt", "pip install torch"), "requirements: no RUN"),
    "no prefetch": (lambda t: _swap(t, "fid_inception_v3()", "print()"), "fid: no RUN"),
    "no torch home": (lambda t: re.sub(r"\s*\\\n\s*TORCH_HOME=\S+", "", t), "TORCH_HOME not set"),
    "no project install": (lambda t: _swap(t, "pip install --no-deps .", "true"), "project: no RUN"),
    "deps re-resolved": (lambda t: _swap(t, "pip install --no-deps .", "pip install ."), "project: no RUN"),
    "test extra": (lambda t: _swap(t, "pip install --no-deps .", "pip install --no-deps .[test]"), "installs the test extra"),
    "pytest": (lambda t: _swap(t, "pip install -r requirements.txt", "pip install -r requirements.txt pytest==9.2.0"),
               "installs pytest"),
    "ends as root": (lambda t: t + "USER root\n", "user: final USER is 'root'"),
    "ends with run": (lambda t: t + "RUN echo hi\n", "should end with USER"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_checks_catch_a_broken_dockerfile(dockerfile_text, name):
    mutate, expected = MUTATIONS[name]
    problems = dockerfile_problems(parse_dockerfile(mutate(dockerfile_text)))
    assert any(expected in p for p in problems), problems


def test_ignore_check_catches_missing_venv():
    text = DOCKERIGNORE.read_text()
    broken = "\n".join(line for line in text.splitlines() if line.strip() != ".venv")
    assert ".dockerignore: .venv not excluded" in ignore_problems(broken)
