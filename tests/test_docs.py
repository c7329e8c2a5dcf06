"""The docs say what the code does: every metric, config key, command-line option and error
is documented, the README keeps its shape, and every relative link leads somewhere.

No sockets: the modules are imported and the files read.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
EXAMPLE_YAML = ROOT / "relay" / "examples" / "upstreams.yaml"

TWO_COMMANDS = ["pip install . && relay demo", "bash .ci/run"]
README_BYTES = (7 * 1024, 11 * 1024)

# [text](target): the target up to the first space or closing parenthesis.
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE = re.compile(r"`([^`\n]+)`")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _text(paths) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in paths)


def _code_spans(text: str) -> set[str]:
    """Every `code span` and every word-like piece of one (`health.eject_after` gives both
    the path and `eject_after`)."""
    spans = set()
    for span in _CODE.findall(_FENCE.sub("", text)):
        spans.add(span)
        spans.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span))
    return spans


# --- metrics ----------------------------------------------------------------------------

def _defined_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposition name -> (type, label names), for each metric object in the metrics module."""
    from prometheus_client import Counter, Gauge, Histogram

    import relay.observability.metrics as metrics

    found = {}
    for obj in vars(metrics).values():
        if isinstance(obj, (Counter, Gauge, Histogram)):
            name = obj._name + "_total" if isinstance(obj, Counter) else obj._name
            found[name] = (obj._type, tuple(obj._labelnames))
    assert len(found) >= 10, "the metrics module's objects were not found"
    return found


def _metric_rows(text: str) -> dict[str, str]:
    """Table rows of docs/metrics.md whose first cell names one metric: name -> row."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cells) >= 3:
            names = re.findall(r"`(relay_[a-z0-9_]+)`", cells[0])
            if len(names) == 1:
                rows[names[0]] = line
    return rows


def test_every_metric_is_documented_with_its_labels_and_every_documented_metric_exists():
    defined = _defined_metrics()
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    rows = _metric_rows(text)
    missing = sorted(set(defined) - set(rows))
    assert not missing, f"metrics without a row in docs/metrics.md: {missing}"
    for name, (kind, labels) in defined.items():
        cells = [c.strip() for c in rows[name].strip().strip("|").split("|")]
        assert cells[1] == kind, f"{name} is a {kind}, docs/metrics.md says {cells[1]!r}"
        documented = {label.strip() for label in cells[2].split(",") if label.strip()}
        assert documented == set(labels), f"{name} has labels {sorted(labels)}, docs say {sorted(documented)}"

    histograms = {n for n, (kind, _) in defined.items() if kind == "histogram"}
    allowed = set(defined) | {h + suffix for h in histograms for suffix in ("_bucket", "_sum", "_count")}
    unknown = sorted(set(re.findall(r"\brelay_[a-z0-9_]+", text)) - allowed)
    assert not unknown, f"docs/metrics.md names metrics that do not exist: {unknown}"


# --- configuration -----------------------------------------------------------------------

def _yaml_keys(node, parent: str = "") -> set[str]:
    """Config keys of the example: section names and the keys inside them, not model names or
    patterns (the keys of model_map, pricing, per_image, default_max_tokens, encodings)."""
    keys: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if parent not in ("model_map", "pricing", "per_image", "default_max_tokens", "encodings"):
                keys.add(str(key))
            keys |= _yaml_keys(value, "" if parent == "pricing" else str(key))
    elif isinstance(node, list):
        for item in node:
            keys |= _yaml_keys(item, parent)
    return keys


def _section_fields() -> set[str]:
    """Every key the config sections accept, from the typed config (commented-out ones too)."""
    from relay import config

    fields = set()
    for cls in (config.Timeouts, config.HealthPolicy, config.Retries, config.Limits, config.Quota, config.Site,
                config.Price):
        fields |= {f.name for f in dataclasses.fields(cls)}
    return fields - {"max_tokens_by_model"}  # built from default_max_tokens: not a key of the file


def _commented_out_keys(text: str) -> set[str]:
    """Keys of the example's commented-out settings (``# site:``, ``#   usage_host: ...``,
    ``# - {key: ..., disabled: true}``): documented there, but not in the parsed file."""
    keys: set[str] = set()
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            continue
        try:
            value = yaml.safe_load(line.lstrip()[1:])
        except yaml.YAMLError:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                keys.update(k for k in item if isinstance(k, str) and re.fullmatch(r"[a-z_][a-z0-9_]*", k))
    return keys


def _commented_in_yaml(text: str) -> set[str]:
    """Keys whose line in the example (active or commented out) carries a comment of its own,
    or that a comment line right above introduces."""
    keys, previous_comment = set(), False
    for line in text.splitlines():
        body = line.strip()
        m = re.match(r"#?\s*-?\s*\{?\s*([A-Za-z_][A-Za-z0-9_]*)\s*:", body)
        if m and (previous_comment or re.search(r"\s#\s*\S", body.lstrip("#"))):
            keys.add(m.group(1))
        previous_comment = body.startswith("#") and not m
    return keys


def test_every_upstreams_yaml_key_is_documented():
    text = EXAMPLE_YAML.read_text(encoding="utf-8")
    keys = _yaml_keys(yaml.safe_load(text)) | _commented_out_keys(text) | _section_fields()
    documented = _commented_in_yaml(text) | _code_spans(_text(_pages()))
    missing = sorted(keys - documented)
    assert not missing, f"config keys documented neither in the example's comments nor in the docs: {missing}"


def test_the_readme_links_to_the_documented_example_and_it_is_the_embedded_default():
    targets = {_resolve(README, t) for t in _LINK.findall(README.read_text(encoding="utf-8"))}
    assert EXAMPLE_YAML.resolve() in targets, "README.md must link to relay/examples/upstreams.yaml"
    assert (ROOT / "upstreams.yaml").read_text() == EXAMPLE_YAML.read_text(), \
        "README.md says upstreams.yaml is identical to the embedded example"


# --- command line and errors -------------------------------------------------------------

def _options(parser) -> set[str]:
    import argparse

    found = set()
    for action in parser._actions:
        found.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def test_every_command_and_option_is_documented():
    import argparse

    from relay.cli import build_parser

    parser = build_parser()
    readme = README.read_text(encoding="utf-8")
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert f"`relay {name}" in readme, f"`relay {name}` is not in the README's commands table"
        inner = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        for sub_name in inner[0].choices if inner else ():
            assert re.search(rf"`relay {name} (\S+ )*{sub_name}\b|/ `{sub_name}\b", readme), \
                f"`relay {name} {sub_name}` is not in the README's commands table"
    text = _text(_pages())
    missing = sorted(o for o in _options(parser) if not re.search(rf"`[^`]*{re.escape(o)}\b", text))
    assert not missing, f"command-line options not documented: {missing}"


def test_every_error_the_api_answers_is_in_the_error_table():
    import relay.app  # noqa: F401  (imports every handler, and with them their error classes)
    from relay.errors import RelayError

    rows = set()
    for line in (DOCS / "api.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].isdigit():
            rows.add((int(cells[0]), cells[1], None if cells[2] == "(null)" else cells[2]))
    classes, seen = [RelayError], []
    while classes:
        cls = classes.pop()
        seen.append(cls)
        classes.extend(cls.__subclasses__())
    missing = sorted({(c.status, c.type, c.code) for c in seen} - rows, key=str)
    assert not missing, f"(status, type, code) missing from the error table in docs/api.md: {missing}"


# --- the README's shape ------------------------------------------------------------------

def test_readme_is_short_and_starts_with_the_two_commands():
    data = README.read_bytes()
    low, high = README_BYTES
    assert low <= len(data) <= high, f"README.md is {len(data)} bytes; keep it between {low} and {high}"
    text = data.decode("utf-8")
    assert text.startswith("# "), "README.md starts with its title"
    fence = re.search(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    assert fence, "README.md has no code block"
    before = text[:fence.start()]
    assert "\n## " not in before and len(before) < 800, "only the title and a short intro come before the commands"
    commands = [line.strip() for line in fence.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert commands == TWO_COMMANDS, f"the first code block must be the two commands, got {commands}"


# --- links -------------------------------------------------------------------------------

def _resolve(page: Path, target: str) -> Path:
    return (page.parent / target.split("#", 1)[0]).resolve() if target.split("#", 1)[0] else page.resolve()


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_relative_link_points_to_an_existing_file_and_heading():
    broken = []
    for page in _pages():
        for target in _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path = _resolve(page, target)
            if not path.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif "#" in target and path.suffix == ".md" and target.split("#", 1)[1] not in _anchors(path):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links: " + "; ".join(broken)
    assert len(list(DOCS.glob("*.md"))) >= 6, "the docs pages are missing"
