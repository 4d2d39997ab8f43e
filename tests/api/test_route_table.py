"""README's table of the SDK's routes is the SDK's own list, and the routes it marks served
are the app's: read from the SDK's source (tinker 0.38.0, its CLI included) and url_map."""

from __future__ import annotations

import re
from pathlib import Path

import tinker

ROOT = Path(__file__).resolve().parents[2]
CALL = re.compile(r'\.(?:_)?(get|post|put|delete|request)\(\s*(?:"(GET|POST|PUT|DELETE)",\s*)?'
                  r'f?"(/api/v1/[^"]+)"')
ROW = re.compile(r"^\| (GET|POST|PUT|DELETE) \| (/api/v1/\S+) \| (yes|no) \|", re.M)


def sdk_routes() -> set[tuple[str, str]]:
    routes = set()
    for file in Path(tinker.__file__).parent.rglob("*.py"):
        if file.name.endswith("_test.py"):
            continue
        for m in CALL.finditer(file.read_text()):
            routes.add(((m.group(2) or m.group(1)).upper(), re.sub(r"\{[^}]+\}", "{}",
                                                                    m.group(3))))
    return routes


def test_the_readme_lists_every_route_the_sdk_calls(app):
    table = {(method, path): served for method, path, served in
             ROW.findall((ROOT / "README.md").read_text())}
    assert set(table) == sdk_routes()
    urls = app.url_map.bind("localhost")
    for (method, path), served in table.items():
        checkpoint = "external_weights/x" if path.endswith("urls") else "weights/x"
        concrete = path.replace("{}", "x", 1).replace("{}", checkpoint)
        try:
            urls.match(concrete, method=method)
            found = True
        except Exception:  # NotFound, MethodNotAllowed
            found = False
        assert found == (served == "yes"), (method, path, served)
