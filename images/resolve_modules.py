#!/usr/bin/env python3
"""Print the .ko paths needed for the given modules, dependencies first (from modules.dep)."""
import sys
from pathlib import Path


def main() -> None:
    moddir = Path(sys.argv[1])
    wanted = sys.argv[2:]
    deps: dict[str, list[str]] = {}
    byname: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        byname[name] = path
        deps[path] = rest.split()
    builtin = {Path(l).name.split(".ko")[0].replace("-", "_")
               for l in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in order:
            return
        if path in stack:
            raise SystemExit(f"dependency cycle at {path}")
        for dep in deps[path]:
            visit(dep, stack + (path,))
        order.append(path)

    for mod in wanted:
        key = mod.replace("-", "_")
        if key in builtin:
            continue
        if key not in byname:
            raise SystemExit(f"module {mod} not found in {moddir}")
        visit(byname[key], ())
    print("\n".join(order))


if __name__ == "__main__":
    main()
