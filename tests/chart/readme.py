"""The parameter tables of helm/fetchpool/README.md, generated from values.yaml's `## @param` lines
(bitnami's convention). `python tests/chart/readme.py` rewrites the part between the markers;
test_readme_parameters_up_to_date fails when it is stale."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "fetchpool"
BEGIN, END = "<!-- parameters:begin -->", "<!-- parameters:end -->"


def _default(values: dict[str, Any], path: str) -> str:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return json.dumps(node).replace("|", "\\|")


def tables() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    out: list[str] = []
    for line in text.splitlines():
        section = re.match(r"^## @section (.+)$", line)
        param = re.match(r"^\s*## @param (\S+) (.+)$", line)
        if section:
            out += ["", f"### {section.group(1)}", "", "| Name | Description | Default |", "|---|---|---|"]
        elif param:
            name, desc = param.groups()
            desc = desc.replace("|", "\\|")
            out.append(f"| `{name}` | {desc} | `{_default(values, name)}` |")
    return "\n".join(out).strip() + "\n"


def render_readme(current: str) -> str:
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{tables()}{END}{tail}"


if __name__ == "__main__":
    path = CHART / "README.md"
    path.write_text(render_readme(path.read_text()))
    print(f"wrote {path}", file=sys.stderr)
