#!/usr/bin/env python3
"""Checks a Grafana dashboard JSON file offline; scripts/check-monitoring.sh runs it.

Grafana itself is not packaged for Debian or PyPI, so Grafana's own import is
not what runs here. The nearest thing that is: the PyPI package
grafana-foundation-sdk, whose dashboard and panel model classes Grafana Labs
generates from Grafana's schemas (one release per Grafana version). With it:

  schema keys   the file is decoded into the SDK's Dashboard model and encoded
                back; a key the model drops is one Grafana's schema does not
                define (a misspelt or invented field), a value it changes is
                one it reads differently;
  schema types  every decoded value is checked against the type the model
                declares: strings, numbers, booleans, lists, and the closed
                sets of values (enums and literals: a panel's colorMode, a
                legend's placement, a line's drawStyle ...), down into each
                panel's options and custom field config, which the panel
                plugin's own model decodes;

and, without it, what the schema cannot say:

  structure     title, uid, schemaVersion, time, templating and panels are
                set; panel ids unique; gridPos inside the 24 columns and no
                two panels overlapping; every panel type one the SDK knows;
                every query panel uses the ${datasource} variable and each of
                its targets has a unique refId and an expr;
  variables     a Prometheus `datasource` variable, `job` and `instance`
                query variables, and no $name in a query that is not a
                variable of the dashboard or one of Grafana's built-ins;
  metric names  every registry_*, grpc_server_* and process_* name in the
                files given with --names-in is one the registry exports
                (a `pub const` in the METRICS_SOURCES files below).

With --rules-out FILE it writes every panel and variable query, with the
Grafana variables replaced by plain values, as Prometheus recording rules, so
that `promtool check rules FILE` parses each expression with Prometheus' own
parser (check-monitoring.sh does that).

One line per check, `ok` or `FAIL`; exit status 1 when any fails.
"""

import argparse
import enum
import json
import re
import sys
import types
import typing

# Where the registry's metric names are defined (`pub const NAME: &str`).
METRICS_SOURCES = [
    "registry-server/src/metrics.rs",
    "registry-server/src/grpc_metrics.rs",
    "registry-server/src/process.rs",
]
METRIC_NAME = re.compile(r"\b(?:registry|grpc_server|process)_[a-z0-9_]*[a-z0-9]\b")

# Grafana's built-in variables that may appear in a Prometheus query.
BUILTIN_VARIABLES = {
    "__interval", "__interval_ms", "__rate_interval", "__range", "__range_s",
    "__range_ms", "__from", "__to", "__dashboard", "__user", "__org",
}
# What each variable becomes for promtool: a syntactically valid stand-in of
# the same kind (a duration, a label value, a regex).
SUBSTITUTE = {
    "__rate_interval": "1m", "__interval": "1m", "__range": "1h",
    "__interval_ms": "60000", "__range_s": "3600", "__range_ms": "3600000",
    "job": "registry", "instance": ".+",
}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
GRID_COLUMNS = 24
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}

results = []


def ok(name):
    results.append(True)
    print(f"ok    {name}")


def fail(name, problems):
    results.append(False)
    print(f"FAIL  {name}")
    for p in problems[:40]:
        print(f"      {p}")
    if len(problems) > 40:
        print(f"      ... and {len(problems) - 40} more")


def report(name, problems):
    if problems:
        fail(name, problems)
    else:
        ok(name)


# ---- against the SDK's models --------------------------------------------

def diff_round_trip(before, after, path, problems):
    """Keys of `before` that `after` lacks or holds differently. Keys the
    encoder adds are defaults it spells out, not problems."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key, value in before.items():
            if key not in after:
                problems.append(f"{path}.{key}: not in the schema (dropped on decode)")
            else:
                diff_round_trip(value, after[key], f"{path}.{key}", problems)
    elif isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            problems.append(f"{path}: {len(before)} items became {len(after)}")
        for i, (b, a) in enumerate(zip(before, after)):
            diff_round_trip(b, a, f"{path}[{i}]", problems)
    elif before != after:
        problems.append(f"{path}: {before!r} read back as {after!r}")


def check_types(value, hint, path, problems, runtime):
    """Checks `value` against the type hint the generated model declares."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is typing.Any or hint is object:
        # Panel options and custom field config are `object` in the
        # dashboard model; the panel plugin's hook decoded them into its own
        # model class, so check them against that.
        if type(value).__module__.startswith("grafana_foundation_sdk.models."):
            check_types(value, type(value), path, problems, runtime)
        return
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        members = [a for a in args if a is not type(None)]
        # Descend into the one member that fits, so that a problem names the
        # deepest path rather than the whole union.
        fits = [a for a in members if isinstance(a, type) and a not in (str, int, float, bool)
                and not issubclass(a, enum.Enum) and isinstance(value, a)]
        if len(members) == 1 or len(fits) == 1:
            check_types(value, fits[0] if fits else members[0], path, problems, runtime)
            return
        for member in members:
            trial = []
            check_types(value, member, path, trial, runtime)
            if not trial:
                return
        problems.append(f"{path}: {value!r:.60} is none of {hint}")
        return
    if hint is type(None):
        if value is not None:
            problems.append(f"{path}: expected null, got {value!r:.60}")
        return
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{path}: {value!r} is not one of {list(args)}")
        return
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            check_types(item, args[0] if args else typing.Any, f"{path}[{i}]", problems, runtime)
        return
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {type(value).__name__}")
            return
        for key, item in value.items():
            check_types(item, args[1] if args else typing.Any, f"{path}.{key}", problems, runtime)
        return
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if not isinstance(value, hint) and value not in allowed:
            problems.append(f"{path}: {value!r} is not one of {allowed}")
        return
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected a boolean, got {value!r:.60}")
        return
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r:.60}")
        return
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r:.60}")
        return
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r:.60}")
        return
    if isinstance(hint, type):
        if not isinstance(value, hint):
            problems.append(f"{path}: expected {hint.__name__}, got {type(value).__name__}")
            return
        if isinstance(value, runtime.UnknownDataquery):
            problems.append(f"{path}: a query for a datasource type the SDK does not know")
            return
        for name, member_hint in typing.get_type_hints(type(value)).items():
            if hasattr(value, name):
                check_types(getattr(value, name), member_hint, f"{path}.{name}", problems, runtime)
        return
    problems.append(f"{path}: cannot check type {hint}")


def check_against_sdk(dashboard, sdk_version):
    from grafana_foundation_sdk.cog import plugins, runtime
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import dashboard as model

    plugins.register_default_plugins()
    label = f"grafana-foundation-sdk {sdk_version}"
    try:
        decoded = model.Dashboard.from_json(dashboard)
        encoded = json.loads(json.dumps(decoded, cls=JSONEncoder))
    except Exception as error:  # the decoder raises on a shape it cannot read
        fail(f"schema: decode with {label}", [f"{type(error).__name__}: {error}"])
        return set()
    problems = []
    diff_round_trip(dashboard, encoded, "$", problems)
    report(f"schema keys: every field survives a round trip through {label}'s Dashboard model", problems)
    problems = []
    check_types(decoded, model.Dashboard, "$", problems, runtime)
    report(f"schema types: every value has the type {label} declares (paths in the SDK's names)", problems)
    return set(runtime.Runtime().panelcfg_variants) | {"row"}


# ---- what the schema cannot say ------------------------------------------

def query_panels(dashboard):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", []) if panel.get("type") == "row" else ()


def check_structure(dashboard, panel_types):
    problems = []
    for key, kind in (("title", str), ("uid", str), ("schemaVersion", int), ("time", dict),
                      ("templating", dict), ("panels", list)):
        if not isinstance(dashboard.get(key), kind):
            problems.append(f"top level: {key} missing or not a {kind.__name__}")
    uid = dashboard.get("uid", "")
    if isinstance(uid, str) and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid):
        problems.append(f"uid {uid!r}: Grafana takes 1-40 characters of letters, digits, - and _")
    if isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] < 36:
        problems.append("schemaVersion below 36: Grafana would migrate the file on import")

    panels = list(query_panels(dashboard))
    seen_ids = {}
    boxes = []
    for index, panel in enumerate(panels):
        where = f"panel {panel.get('id')} {panel.get('title', '')!r}"
        pid = panel.get("id")
        if not isinstance(pid, int):
            problems.append(f"panels[{index}]: no integer id")
        elif pid in seen_ids:
            problems.append(f"{where}: id also used by {seen_ids[pid]!r}")
        else:
            seen_ids[pid] = panel.get("title", "")
        if panel_types and panel.get("type") not in panel_types:
            problems.append(f"{where}: panel type {panel.get('type')!r} is not one the SDK knows")
        if not panel.get("title"):
            problems.append(f"{where}: no title")
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")):
            problems.append(f"{where}: gridPos needs integer x, y, w, h")
        else:
            x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
            if x < 0 or y < 0 or w < 1 or h < 1 or x + w > GRID_COLUMNS:
                problems.append(f"{where}: gridPos {grid} outside the {GRID_COLUMNS} columns")
            for other, (ox, oy, ow, oh) in boxes:
                if x < ox + ow and ox < x + w and y < oy + oh and oy < y + h:
                    problems.append(f"{where}: gridPos overlaps panel {other}")
            boxes.append((pid, (x, y, w, h)))
        if panel.get("type") == "row":
            continue
        if panel.get("datasource") != DATASOURCE_REF:
            problems.append(f"{where}: datasource is {panel.get('datasource')!r}, not the ${{datasource}} variable")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets")
        ref_ids = set()
        for target in targets:
            ref = target.get("refId")
            if not ref or ref in ref_ids:
                problems.append(f"{where}: target refId {ref!r} missing or repeated")
            ref_ids.add(ref)
            if not str(target.get("expr", "")).strip():
                problems.append(f"{where}: target {ref!r} has no expr")
            if target.get("datasource", DATASOURCE_REF) != DATASOURCE_REF:
                problems.append(f"{where}: target {ref!r} datasource is not the ${{datasource}} variable")
    report(f"structure: top-level fields, {len(panels)} panels (unique ids, 24-column grid without "
           "overlaps, ${datasource} everywhere, targets with refId and expr)", problems)


def variable_query(variable):
    query = variable.get("query")
    return query.get("query", "") if isinstance(query, dict) else str(query or "")


def check_variables(dashboard):
    problems = []
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no `datasource` variable of type datasource for prometheus")
    for name in ("job", "instance"):
        v = variables.get(name)
        if not v or v.get("type") != "query":
            problems.append(f"no `{name}` query variable")
        elif v.get("datasource") != DATASOURCE_REF:
            problems.append(f"variable {name}: datasource is not the ${{datasource}} variable")
        elif not re.fullmatch(r"label_values\(.+,\s*\w+\)", variable_query(v)):
            problems.append(f"variable {name}: query {variable_query(v)!r} is not label_values(selector, label)")
    # (where, expr); `where` becomes the recording rule's name in
    # --rules-out, so that promtool's complaint names the panel.
    exprs = [(f"variable_{v.get('name')}", variable_query(v)) for v in variables.values() if v.get("type") == "query"]
    exprs += [(f"panel_{p.get('id')}_{t.get('refId')}", t.get("expr", ""))
              for p in query_panels(dashboard) for t in p.get("targets", [])]
    for where, expr in exprs:
        for m in VARIABLE.finditer(expr):
            name = m.group(1) or m.group(2)
            if name not in variables and name not in BUILTIN_VARIABLES:
                problems.append(f"{where}: ${name} is no variable of this dashboard")
    report(f"variables: {', '.join(variables)}; every $name in {len(exprs)} queries is defined", problems)
    return exprs


def known_metrics(sources):
    source = "\n".join(open(path, encoding="utf-8").read() for path in sources)
    consts = dict(re.findall(r'pub const (\w+): &str = "([a-z0-9_]+)";', source))
    names = set(consts.values())
    for const in re.findall(r"describe_histogram!\(\s*(?:[\w:]+::)?(\w+)", source):
        base = consts.get(const)
        if base:
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return names


def check_metric_names(paths, sources):
    known = known_metrics(sources)
    problems = []
    used = set()
    for path in paths:
        text = open(path, encoding="utf-8").read()
        for name in sorted(set(METRIC_NAME.findall(text))):
            used.add(name)
            if name not in known:
                problems.append(f"{path}: {name} is not exported by the registry")
    report(f"metric names: {len(used)} names used in {len(paths)} files, each defined in "
           f"{', '.join(sources)}", problems)


def write_rules(exprs, path):
    rules = []
    for where, expr in exprs:
        if expr.startswith("label_values("):
            # label_values(selector, label) is Grafana's, not PromQL: check
            # the selector inside it.
            expr = expr[len("label_values("):expr.rindex(",")]
        expr = VARIABLE.sub(lambda m: SUBSTITUTE.get(m.group(1) or m.group(2), "x"), expr)
        rules.append({"record": f"dashboard:{re.sub(r'[^A-Za-z0-9_]', '_', where)}", "expr": expr})
    with open(path, "w", encoding="utf-8") as out:
        # JSON is YAML, and promtool reads it as such.
        json.dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, out, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dashboard")
    parser.add_argument("--sdk-version", help="grafana-foundation-sdk version that is importable; "
                        "without it the schema checks are skipped and reported as such")
    parser.add_argument("--metrics-rs", nargs="+", default=METRICS_SOURCES,
                        help="the Rust files defining the registry's metric names")
    parser.add_argument("--names-in", nargs="*", default=[], help="more files whose metric names to check")
    parser.add_argument("--rules-out", help="write the queries here as recording rules for promtool")
    args = parser.parse_args()

    try:
        with open(args.dashboard, encoding="utf-8") as f:
            dashboard = json.load(f)
    except (OSError, ValueError) as error:
        fail(f"{args.dashboard}: JSON", [str(error)])
        return 1
    ok(f"{args.dashboard}: JSON parses")

    panel_types = set()
    if args.sdk_version:
        panel_types = check_against_sdk(dashboard, args.sdk_version)
    else:
        fail("schema: grafana-foundation-sdk not available", ["only the structural checks below ran"])
    check_structure(dashboard, panel_types)
    exprs = check_variables(dashboard)
    check_metric_names([args.dashboard, *args.names_in], args.metrics_rs)
    if args.rules_out:
        write_rules(exprs, args.rules_out)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
