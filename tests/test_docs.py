"""README.md and docs/ against the code: links resolve, config keys exist, the configuration reference is complete.

- every relative link (``[text](path)``, ``[text](path#anchor)``, ``[text](#anchor)``) in README.md and
  docs/**/*.md names an existing file, and an anchor into a Markdown file names one of its headings
  (GitHub's slugs);
- every repository path shown in inline code (``pipeline/summarize/run.py``), every ``python -m``
  module and every ``make`` target exists;
- every config key the docs show (``section.key`` in inline code, or ``section.key=value`` in a code
  block or inline code) is a field of a config dataclass, where ``section`` is a section of one;
  ``section.*`` only checks the section;
- docs/configuration.md lists every key of every config dataclass with its default: under a marker
  ``<!-- config: ClassName -->``, tables of ``| `key` | `default` | meaning |`` rows, the default
  written as YAML (``null``, ``true``, ``[1, 8]``, ``auto``). A job's own tables may leave out the
  keys it shares with the generation job (``PipelineConfig``) when their default is the same.

The dataclasses are built from their source without importing their modules (no Ray, FastAPI or
torch), so this file runs in about a second."""

from __future__ import annotations

import __future__
import ast
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
REFERENCE = REPO / "docs" / "configuration.md"

# the marker name in docs/configuration.md -> where the config dataclass is defined
CONFIGS = {
    "PipelineConfig": "pipeline/config.py",
    "SummarizeConfig": "pipeline/summarize/run.py",
    "CostConfig": "pipeline/cost/run.py",
    "ServeConfig": "pipeline/serve/app.py",
    "BenchConfig": "jobs/benchmark.py",
}
SHARED = "PipelineConfig"  # the generation job: the sections the other jobs share with it

# keys the docs show on purpose as mistakes: (page, key)
DELIBERATE = {("docs/reliability.md", "input.pth")}  # the bad-input table's unknown key
FILE_SUFFIXES = {"json", "jsonl", "parquet", "csv", "yaml", "yml", "md", "py", "txt", "png", "gguf", "safetensors",
                 "bin", "pt", "zip", "log"}


# ---------------------------------------------------------------- the config dataclasses


def _dataclasses_in(path: Path) -> dict:
    """The module's top-level constants and dataclasses, executed on their own (the module's imports are
    not run); pipeline.config's names (stdlib only) are in scope for base classes and defaults."""
    import pipeline.config

    ns = dict(vars(pipeline.config))
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        is_dataclass = isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "dataclass")
            or (isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == "dataclass")
            for d in node.decorator_list)
        if not (is_dataclass or isinstance(node, ast.Assign)):
            continue
        code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec",
                       flags=__future__.annotations.compiler_flag, dont_inherit=True)
        try:
            exec(code, ns)
        except Exception:
            if is_dataclass:
                raise
    return ns


def config_classes() -> dict[str, type]:
    classes = {}
    for name, path in CONFIGS.items():
        ns = _dataclasses_in(REPO / path)
        assert name in ns and dataclasses.is_dataclass(ns[name]), f"{path} defines no dataclass {name}"
        classes[name] = ns[name]
    return classes


def flatten(obj, prefix: str = "") -> dict[str, tuple]:
    """``dotted key -> (default, field)`` for every leaf field, nested dataclasses walked."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (value, f)
    return out


@pytest.fixture(scope="module")
def configs() -> dict[str, dict[str, tuple]]:
    return {name: flatten(cls()) for name, cls in config_classes().items()}


def sections_and_keys(configs) -> tuple[set, set, set]:
    """(sections, every dotted key, keys that are free-form mappings and take sub-keys)."""
    keys = {k for flat in configs.values() for k in flat}
    sections = {k.split(".")[0] for k in keys if "." in k}
    mappings = {k for flat in configs.values() for k, (v, f) in flat.items()
                if isinstance(v, dict) or "dict" in str(f.type)}
    return sections, keys, mappings


# ---------------------------------------------------------------- reading Markdown


def _lines(text: str):
    """``(line number, line, in a fenced code block)`` for every line outside HTML comments and fences."""
    fence = None
    in_comment = False
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        m = re.match(r"(```+|~~~+)", stripped)
        if fence:
            if m and stripped.startswith(fence):
                fence = None
            else:
                yield no, line, True
            continue
        if m:
            fence = m.group(1)
            continue
        if in_comment:
            in_comment = "-->" not in line
            continue
        if "<!--" in line and "-->" not in line.split("<!--", 1)[1]:
            in_comment = True
            line = line.split("<!--", 1)[0]
        yield no, re.sub(r"<!--.*?-->", "", line), False


def prose_lines(text: str):
    """``(line number, line)`` outside fenced code blocks and HTML comments."""
    return ((no, line) for no, line, code in _lines(text) if not code)


def code_lines(text: str):
    """``(line number, line)`` inside fenced code blocks."""
    return ((no, line) for no, line, code in _lines(text) if code)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text()):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str):
    """``(line number, target)`` of Markdown links and images outside code."""
    for no, line in prose_lines(text):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line):
            yield no, m.group(1)
        m = re.match(r"\s*\[[^\]]+\]:\s*(\S+)", line)  # reference definitions
        if m:
            yield no, m.group(1)


def rel(path: Path) -> str:
    return os.path.relpath(path, REPO)


# ---------------------------------------------------------------- (a) links


def link_problems(doc: Path) -> list[str]:
    problems = []
    for no, target in links(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = doc if not path else (doc.parent / path).resolve()
        where = f"{rel(doc)}:{no}: link {target!r}"
        if not dest.exists():
            problems.append(f"{where}: no such file {path!r}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: {rel(dest)} has no heading with anchor #{anchor}")
    return problems


def test_every_relative_link_resolves():
    problems = [p for doc in DOCS for p in link_problems(doc)]
    assert not problems, "broken links in the docs:\n" + "\n".join(problems)


TOP_DIRS = "pipeline|conflayers|jobs|tests|configs|benchmarks|deploy|docs"
PATH_IN_CODE = re.compile(rf"(?<![\w./-])((?:{TOP_DIRS})/[\w./*<>-]*\w)")


def path_problems(doc: Path) -> list[str]:
    """Repository paths shown in inline code (``pipeline/summarize/run.py``, ``tests/test_search_*.py``),
    ``make`` targets in code and ``python -m module`` commands must name what exists."""
    problems = []
    text = doc.read_text()
    for no, line in prose_lines(text):
        for span in re.findall(r"`([^`\n]+)`", line):
            for path in PATH_IN_CODE.findall(span):
                if "<" not in path and not list(REPO.glob(path)):
                    problems.append(f"{rel(doc)}:{no}: no such path `{path}`")
    makefile = REPO / "Makefile"
    targets = set(re.findall(r"^([\w-]+):", makefile.read_text(), re.M)) if makefile.exists() else set()
    shown = [(no, m) for no, line in prose_lines(text) for span in re.findall(r"`([^`\n]+)`", line)
             for m in re.findall(r"^make ([a-z][\w-]*)", span.strip())]
    shown += [(no, m) for no, line in code_lines(text) for m in re.findall(r"^\s*make ([a-z][\w-]*)", line)]
    for no, target in shown:
        if target not in targets:
            problems.append(f"{rel(doc)}:{no}: `make {target}`: no such target in the Makefile")
    for no, line in enumerate(text.splitlines(), 1):
        for module in re.findall(r"python -m ([\w.]+)", line):
            base = REPO.joinpath(*module.split("."))
            if module.split(".")[0] in {"pytest", "venv", "pip"}:
                continue
            if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
                problems.append(f"{rel(doc)}:{no}: `python -m {module}`: no such module in the repository")
    return problems


def test_every_path_and_module_shown_exists():
    problems = [p for doc in DOCS for p in path_problems(doc)]
    assert not problems, "stale paths in the docs:\n" + "\n".join(problems)


# ---------------------------------------------------------------- (b) config keys shown in the docs


KEY = r"[a-z_][a-z0-9_]*(?:\.(?:[a-z0-9_]+|\*))+"


def shown_keys(text: str, sections: set):
    """``(line number, key)`` of config keys shown: inline code that is a key (optionally followed by
    ``=``, ``:`` or ``/`` and more), and ``key=`` anywhere in code blocks and inline code."""
    def keep(key):
        parts = key.split(".")
        return parts[0] in sections and parts[-1] not in FILE_SUFFIXES

    for no, line in prose_lines(text):
        for span in re.findall(r"`([^`\n]+)`", line):
            m = re.fullmatch(rf"\s*({KEY})(?:\s*[=:/].*)?\s*", span)
            found = {m.group(1)} if m else set()
            found |= set(re.findall(rf"(?:^|[\s'\"])({KEY})=", span))
            yield from ((no, k) for k in sorted(found) if keep(k))
    for no, line in code_lines(text):
        for key in re.findall(rf"(?:^|[\s'\"=])({KEY})=", line):
            if keep(key):
                yield no, key


def key_problems(doc: Path, sections: set, keys: set, mappings: set) -> list[str]:
    problems = []
    for no, key in shown_keys(doc.read_text(), sections):
        parts = key.split(".")
        if parts[-1] == "*":
            ok = parts[0] in sections and len(parts) == 2
        else:
            ok = key in keys or any(key.startswith(m + ".") for m in mappings)
        if not ok and (rel(doc), key) not in DELIBERATE:
            problems.append(f"{rel(doc)}:{no}: config key `{key}` is not a field of any config dataclass")
    return problems


def test_every_config_key_shown_exists(configs):
    sections, keys, mappings = sections_and_keys(configs)
    problems = [p for doc in DOCS for p in key_problems(doc, sections, keys, mappings)]
    assert not problems, "unknown config keys in the docs:\n" + "\n".join(problems)


# ---------------------------------------------------------------- (c) the configuration reference


ROW = re.compile(r"\|\s*`([^`]+)`\s*\|\s*`([^`]*)`\s*\|(.*)\|\s*$")


def reference_tables(text: str) -> tuple[dict[str, dict[str, tuple]], list[str]]:
    """``{marker: {key: (default as written, line number)}}`` and the problems found reading them."""
    tables: dict[str, dict[str, tuple]] = {}
    problems = []
    current = None
    for no, line in enumerate(text.splitlines(), 1):
        m = re.search(r"<!--\s*config:\s*(\w+)\s*-->", line)
        if m:
            current = m.group(1)
            if current not in CONFIGS:
                problems.append(f"docs/configuration.md:{no}: unknown config class {current!r} "
                                f"(known: {', '.join(CONFIGS)})")
            tables.setdefault(current, {})
            continue
        if not line.lstrip().startswith("|") or re.match(r"\s*\|\s*(key|-+)\s*\|", line):
            continue
        row = ROW.match(line.strip())
        if not row:
            problems.append(f"docs/configuration.md:{no}: not a `key` | `default` | meaning row: {line.strip()}")
            continue
        if current is None:
            problems.append(f"docs/configuration.md:{no}: a table row before any <!-- config: Class --> marker")
            continue
        key, default, meaning = row.group(1), row.group(2), row.group(3).strip()
        if key in tables[current]:
            problems.append(f"docs/configuration.md:{no}: {current} `{key}` listed twice")
        if not meaning:
            problems.append(f"docs/configuration.md:{no}: {current} `{key}` has no meaning")
        tables[current][key] = (default, no)
    return tables, problems


def same_default(written: str, actual) -> bool:
    try:
        value = yaml.safe_load(written)
    except yaml.YAMLError:
        return False
    if isinstance(actual, bool) or isinstance(value, bool):
        return type(actual) is type(value) and actual == value
    return value == actual


def reference_problems(text: str, configs) -> list[str]:
    tables, problems = reference_tables(text)
    for name, flat in configs.items():
        table = tables.get(name, {})
        for key, (written, no) in table.items():
            if key not in flat:
                problems.append(f"docs/configuration.md:{no}: {name} has no key `{key}`")
            elif not same_default(written, flat[key][0]):
                problems.append(f"docs/configuration.md:{no}: {name} `{key}` default is "
                                f"`{yaml_default(flat[key][0])}`, the reference says `{written}`")
        for key, (default, _) in flat.items():
            if key in table:
                continue
            shared = configs[SHARED].get(key) if name != SHARED else None
            if shared is None:
                problems.append(f"docs/configuration.md: {name} `{key}` (default `{yaml_default(default)}`) "
                                "is not listed")
            elif not same_default(yaml_default(shared[0]), default):  # the generation job's row is checked above
                problems.append(f"docs/configuration.md: {name} `{key}` defaults to `{yaml_default(default)}`, "
                                f"not the generation job's `{yaml_default(shared[0])}`: list it in {name}'s tables")
    return problems


def yaml_default(value) -> str:
    """A default as the reference writes it: YAML in flow style on one line."""
    if isinstance(value, str) and (value == "" or "\n" in value):
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def test_configuration_reference_lists_every_key_with_its_default(configs):
    problems = reference_problems(REFERENCE.read_text(), configs)
    assert not problems, "docs/configuration.md and the config dataclasses disagree:\n" + "\n".join(problems)


# ---------------------------------------------------------------- the checks catch what they should


def test_the_checks_name_what_is_wrong(configs, tmp_path, monkeypatch):
    """A planted bad link, path, module, make target, key, stale default and missing key are each reported
    by name."""
    sections, keys, mappings = sections_and_keys(configs)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# Here it is\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "generate.py").write_text("")
    (tmp_path / "Makefile").write_text("run: setup\n\tpython -m jobs.generate\n")
    doc = tmp_path / "docs" / "page.md"
    doc.write_text("# Page\n\n[ok](there.md#here-it-is) [gone](missing.md) [bad anchor](there.md#nowhere)\n"
                   "[self](#page) [web](https://example.com/x.md)\n\n"
                   "`search.drafter` `search.*` `search.knobs.objective` `input.jsonl` `serve.shutdown()`\n"
                   "`ray.concurrenci` and `nosuch.*`, `pipeline/summarize.py`\n\n"
                   "```bash\npython -m jobs.generate 'storage.sekret=x' ray.concurrency=2\n"
                   "python -m jobs.nothing\nmake runn\n```\n")
    with monkeypatch.context() as m:
        m.setattr(sys.modules[__name__], "REPO", tmp_path)
        link = link_problems(doc)
        key = key_problems(doc, sections, keys, mappings)
        paths = path_problems(doc)
    assert [p.split(": ", 1)[1] for p in link] == [
        "link 'missing.md': no such file 'missing.md'",
        "link 'there.md#nowhere': docs/there.md has no heading with anchor #nowhere"]
    assert [p.split("`")[1] for p in key] == ["ray.concurrenci", "storage.sekret"]
    assert [p.split("`")[1] for p in paths] == ["pipeline/summarize.py", "make runn", "python -m jobs.nothing"]

    text = REFERENCE.read_text()
    some_key, (default, _) = next(iter(configs[SHARED].items()))
    stale = re.sub(rf"(\|\s*`{re.escape(some_key)}`\s*\|\s*)`[^`]*`", r"\1`stale-default`", text, count=1)
    assert stale != text
    assert any(f"`{some_key}` default is" in p for p in reference_problems(stale, configs))
    dropped = re.sub(rf"^\|\s*`{re.escape(some_key)}`.*\n", "", text, count=1, flags=re.M)
    assert any(f"`{some_key}`" in p and "is not listed" in p for p in reference_problems(dropped, configs))


# ---------------------------------------------------------------- the job's output columns


def _schema_names(path: Path, name: str) -> list[str]:
    """The column names of a ``pa.schema([("col", type), ...])`` constant, read from the source."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return [el.elts[0].value for el in ast.walk(node.value)
                    if isinstance(el, ast.Tuple) and el.elts and isinstance(el.elts[0], ast.Constant)
                    and isinstance(el.elts[0].value, str)]
    raise AssertionError(f"{name} not found in {path}")


def test_every_output_column_is_defined_in_the_docs():
    """Every column of metrics.parquet and of the generations files, and every header of the printed
    summary table, is named in docs/generate.md's "Output columns" section."""
    from pipeline.metrics import METRIC_FIELDS, SUMMARY_COLUMNS

    page = (REPO / "docs" / "generate.md").read_text()
    section = page[page.index("## Output columns"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    generations = _schema_names(REPO / "pipeline" / "actor.py", "OUTPUT_SCHEMA")
    assert len(generations) > 30
    missing = [c for c in (*METRIC_FIELDS, *generations) if not re.search(rf"\b{re.escape(c)}\b", section)]
    assert not missing, f"docs/generate.md#output-columns does not define: {missing}"
    headers = [h for h, _ in SUMMARY_COLUMNS]
    missing = [h for h in headers if f"`{h}`" not in section]
    assert not missing, f"docs/generate.md#output-columns does not define the table's columns: {missing}"
