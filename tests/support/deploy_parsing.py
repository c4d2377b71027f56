"""Readers for the deployment files, for tests/deploy/test_deploy.py.

Small on purpose: each reads just enough of its format (Dockerfile, .dockerignore, Java
properties, compose interpolation, nginx) for the checks, and raises on anything it cannot
read rather than guessing.
"""
from __future__ import annotations

import ast
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Instruction:
    stage: str
    keyword: str
    args: str


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    global_args: dict[str, str] = field(default_factory=dict)

    def of(self, keyword: str, stage: str | None = None) -> list[Instruction]:
        return [i for i in self.instructions
                if i.keyword == keyword and (stage is None or i.stage == stage)]

    @property
    def final_stage(self) -> str:
        return self.instructions[-1].stage

    def stage_args(self, stage: str) -> dict[str, str]:
        """ARG defaults visible in a stage (ARGs before the first FROM need re-declaring)."""
        out = {}
        for i in self.of("ARG", stage):
            name, _, default = i.args.partition("=")
            out[name.strip()] = default.strip() if default else self.global_args.get(name.strip(), "")
        return out

    def env(self, stage: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in self.of("ENV", stage):
            for token in shlex.split(i.args):
                key, sep, value = token.partition("=")
                if not sep:
                    raise ValueError(f"ENV without '=' is not supported here: {i.args!r}")
                out[key] = value
        return out


def parse_dockerfile(path: Path) -> Dockerfile:
    logical: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    if buf:
        raise ValueError(f"{path}: dangling line continuation")
    instructions, global_args, stage, count = [], {}, None, 0
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            stage = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else f"stage{count}"
            count += 1
        elif stage is None:
            if keyword != "ARG":
                raise ValueError(f"{path}: {keyword} before FROM")
            name, _, default = args.partition("=")
            global_args[name.strip()] = default.strip()
            continue
        instructions.append(Instruction(stage, keyword, args))
    return Dockerfile(instructions, global_args)


@dataclass
class Copy:
    stage: str
    sources: list[str]
    dest: str
    from_stage: str | None


def copy_of(df: Dockerfile, i: Instruction) -> Copy:
    """A COPY instruction, with ARG references in its sources resolved to their defaults."""
    if i.args.startswith("["):
        raise ValueError("COPY in JSON form is not supported here")
    words = i.args.split()
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
    args = df.stage_args(i.stage)
    resolved = [re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], p) for p in paths]
    return Copy(i.stage, resolved[:-1], resolved[-1], from_stage)


def copies(df: Dockerfile) -> list[Copy]:
    return [copy_of(df, i) for i in df.of("COPY")]


def copied_to(df: Dockerfile, source: str) -> str:
    """Where the final stage puts a file from the build context (relative destinations use WORKDIR)."""
    workdir, found = "/", None
    for i in df.instructions:
        if i.stage != df.final_stage:
            continue
        if i.keyword == "WORKDIR":
            workdir = i.args
        elif i.keyword == "COPY":
            cp = copy_of(df, i)
            if cp.from_stage or source not in cp.sources:
                continue
            dest = cp.dest if cp.dest.startswith("/") else workdir.rstrip("/") + "/" + cp.dest.removeprefix("./")
            found = dest + Path(source).name if dest.endswith("/") else dest
    if not found:
        raise LookupError(f"{source} is not copied into the final stage")
    return found


def image_user(df: Dockerfile) -> str:
    """uid:gid of the final stage's USER, read from its useradd/groupadd commands."""
    (user,) = [i.args for i in df.of("USER", df.final_stage)]
    runs = " && ".join(i.args for i in df.of("RUN", df.final_stage)).split("&&")
    (useradd,) = [shlex.split(c) for c in runs if c.strip().startswith("useradd")]
    if user not in (useradd[-1], _option(useradd, "--uid")):
        raise ValueError(f"USER {user} is not the user useradd creates")
    uid = _option(useradd, "--uid")
    groupadd = [shlex.split(c) for c in runs if c.strip().startswith("groupadd")]
    gid = _option(groupadd[0], "--gid") if groupadd else uid
    return f"{uid}:{gid}"


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def exposed_ports(df: Dockerfile) -> set[int]:
    return {int(p.split("/")[0]) for i in df.of("EXPOSE", df.final_stage) for p in i.args.split()}


def healthcheck_command(df: Dockerfile) -> list[str]:
    """The final stage's HEALTHCHECK command as argv (shell form becomes its words)."""
    (hc,) = df.of("HEALTHCHECK", df.final_stage)
    _, _, cmd = hc.args.partition("CMD ")
    cmd = cmd.strip()
    return json.loads(cmd) if cmd.startswith("[") else shlex.split(cmd)


# ---------------------------------------------------------------------------------------------
# .dockerignore (the rules Docker's builder uses: Go filepath.Match plus **, last match wins)


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "(?:/.*)?$")  # a matched directory excludes what it holds


def dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw[1:] if negate else raw
        pat = pat.strip().lstrip("/")
        if pat and _glob_regex(pat).match(path):
            ignored = not negate
    return ignored


def dockerignore_patterns(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


# ---------------------------------------------------------------------------------------------
# Java properties (TorchServe's config.properties): later keys win, `\\` is one backslash.


def parse_properties(text: str) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#!":
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            raise ValueError(f"line continuations are not supported here: {line!r}")
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not a key=value line: {line!r}")
        props[key.strip()] = re.sub(r"\\(.)", r"\1", value.strip())
    return props


def address_port(address: str) -> tuple[str, int]:
    m = re.fullmatch(r"https?://([^:/]+):(\d+)", address)
    if not m:
        raise ValueError(f"not a host:port address: {address!r}")
    return m.group(1), int(m.group(2))


# ---------------------------------------------------------------------------------------------
# docker compose variable interpolation, with an explicit environment (defaults only when empty)

_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(value, env: dict[str, str]):
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        op, word = m.group(2), m.group(3) or ""
        current = env.get(name)
        if op in (":-", "-"):
            return current if (current if op == ":-" else current is not None) else word
        if op in (":?", "?"):
            if not current:
                raise KeyError(f"${{{name}}} is required: {word}")
            return current
        return current or ""

    return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


# ---------------------------------------------------------------------------------------------
# nginx: tokens and a tree of directives, enough to find values and catch structural mistakes


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list["Directive"] | None = None

    def find(self, name: str) -> list["Directive"]:
        found = []
        for d in self.block or []:
            if d.name == name:
                found.append(d)
            found += d.find(name)
        return found


def _nginx_tokens(text: str):
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif c in "{};":
            yield c, False
            i += 1
        elif c in "'\"":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise ValueError("unterminated quoted string in nginx config")
            yield text[i + 1:j], True
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in "{};":
                j += 1
            yield text[i:j], False
            i = j


def parse_nginx(text: str) -> Directive:
    root = Directive("<root>", [], [])
    stack, words = [root], []
    for tok, quoted in _nginx_tokens(text):
        if not quoted and tok == ";":
            if not words:
                raise ValueError("empty nginx statement")
            stack[-1].block.append(Directive(words[0], words[1:]))
            words = []
        elif not quoted and tok == "{":
            if not words:
                raise ValueError("nginx block without a name")
            d = Directive(words[0], words[1:], [])
            stack[-1].block.append(d)
            stack.append(d)
            words = []
        elif not quoted and tok == "}":
            if words or len(stack) == 1:
                raise ValueError("unbalanced '}' or missing ';' in nginx config")
            stack.pop()
        else:
            words.append(tok)
    if words or len(stack) != 1:
        raise ValueError("nginx config ends inside a statement or block")
    return root


def nginx_size(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    if not m:
        raise ValueError(f"not an nginx size: {value!r}")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2).lower()]


def nginx_seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    if not m:
        raise ValueError(f"not an nginx time: {value!r}")
    return int(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


# ---------------------------------------------------------------------------------------------
# Python imports -> the distributions that provide them


def third_party_imports(paths: list[Path], local: set[str]) -> set[str]:
    """Top-level modules imported anywhere in these files (function bodies included)."""
    names: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in local and n != "__future__"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions_for(modules: set[str]) -> dict[str, set[str]]:
    """module -> canonical distribution names providing it (empty when not installed)."""
    index = metadata.packages_distributions()
    return {m: {canonical(d) for d in index.get(m, [])} for m in modules}


def installed_closure(names: list[str]) -> set[str]:
    """The distributions pip installs for these names: them and their dependencies, recursively
    (extras left out), as this environment's metadata declares them."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def requirement_names(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            if re.search(r"[<>=!~@;\[ ]", line):
                raise ValueError(f"{path}: {line!r}: list bare names; versions live in constraints.txt")
            out.append(canonical(line))
    return out


def pins(path: Path) -> dict[str, str]:
    return pins_from_lines(path.read_text())


def setup_cfg_requirements(path: Path) -> dict[str, str]:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(path)
    text = cfg["options"]["install_requires"] + "\n" + cfg["options.extras_require"].get("test", "")
    return pins_from_lines(text)


def pins_from_lines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonical(name)] = version.strip()
    return out


SERVE_SECTION = "# === TorchServe container"


def env_example_sections(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(API settings, TorchServe container settings) of .env.example, split at the serve header."""
    text = path.read_text()
    api, _, serve = text.partition(SERVE_SECTION)

    def names(part: str) -> dict[str, str]:
        pairs = re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", part, flags=re.M)
        assert len(pairs) == len({k for k, _ in pairs}), "a setting is listed twice"
        return dict(pairs)

    return names(api), names(serve)
