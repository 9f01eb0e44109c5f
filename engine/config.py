"""Configuration from dataclasses: one source of truth for flags, TOML files and defaults.

Each field of each config dataclass becomes one command-line flag (``max_steps`` ->
``--max-steps``; the type from the annotation: int, float, str, bool as ``--x/--no-x``,
tuple[float, float] as two values; ``help`` and ``choices`` from the field metadata).
A TOML file (``--config FILE.toml``) supplies the same fields, either as flat keys or in
one table per config (``[model]``, ``[train]``, ...). Precedence: the dataclass default,
then the TOML file, then the command line. Unknown keys, wrong types and unknown flags
raise ``ConfigError`` with one line.
"""
import argparse
import dataclasses
import typing


class ConfigError(ValueError):
    """A configuration that cannot run (one-line message)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):                    # one line instead of usage + message, exit 2
        raise ConfigError(message)


def _kind(tp):
    """(base type, count) for a field annotation: (int, 1), (float, 2) for tuple[float, float]."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        return args[0], len(args)
    if origin is typing.Union:                   # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _kind(args[0])
    return tp, 1


def parse_bytes(s):
    """A size such as "64MB", "512KB", "1GB" or "4096" in bytes (binary units)."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    s = str(s).strip().upper()
    for u, m in units.items():
        if s.endswith(u):
            return int(float(s[:-len(u)]) * m)
    return int(float(s))


def flag(name):
    return "--" + name.replace("_", "-")


def build_parser(sections, description=None, defaults=None, helps=None):
    """An ArgumentParser with one group per (title, dataclass) of ``sections`` and a
    ``--config`` flag. ``defaults[title][field]`` overrides a dataclass default (shown in
    --help); ``helps[field]`` gives help text for fields without ``metadata['help']``.
    Unset flags are absent from the parsed namespace."""
    defaults, helps = defaults or {}, helps or {}
    p = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with any of the fields below; flags override it")
    seen = {}
    for title, cls in sections:
        group = p.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise ValueError(f"field {f.name} defined by both {seen[f.name]} and {title}")
            seen[f.name] = title
            base, n = _kind(hints[f.name])
            default = defaults.get(title, {}).get(f.name, _default(f))
            help_ = (f.metadata.get("help") or helps.get(f.name, "")) + f" (default: {default!r})"
            kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
            if base is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw.update(type=base, metavar=f.metadata.get("metavar", base.__name__.upper()))
                if n > 1:
                    kw["nargs"] = n
                if "choices" in f.metadata:
                    kw.update(choices=f.metadata["choices"], metavar=None)
            group.add_argument(flag(f.name), **kw)
    return p


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _coerce(value, tp, where):
    """value from TOML checked against a field annotation (ints accepted for floats)."""
    base, n = _kind(tp)

    def one(v):
        if base is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, base) and not (base is int and isinstance(v, bool)):
            return v
        raise ConfigError(f"{where} must be {base.__name__}, got {type(v).__name__} {v!r}")
    if n > 1:
        if not isinstance(value, list) or len(value) != n:
            raise ConfigError(f"{where} must be a list of {n} {base.__name__} values, got {value!r}")
        return tuple(one(v) for v in value)
    return one(value)


def load_toml(path, sections):
    """{title: {field: value}} from a TOML file, checked against the dataclasses."""
    try:
        import tomllib
    except ImportError:                                              # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("--config needs Python 3.11+ (tomllib) or the tomli package") from None
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    owner = {f.name: (title, cls) for title, cls in sections for f in dataclasses.fields(cls)}
    titles = dict(sections)
    out = {title: {} for title, _ in sections}

    def put(key, value, table=None):
        name = key.replace("-", "_")
        where = f"{path}: {table + '.' if table else ''}{key}"
        if name not in owner or (table and owner[name][0] != table):
            raise ConfigError(f"{where} is not a known setting" + (f" of [{table}]" if table else ""))
        title, cls = owner[name]
        out[title][name] = _coerce(value, typing.get_type_hints(cls)[name], where)

    for key, value in raw.items():
        if isinstance(value, dict) and key in titles:
            for k, v in value.items():
                put(k, v, key)
        else:
            put(key, value)
    return out


def parse_values(argv, sections, description=None, defaults=None, helps=None, given=None):
    """{title: {field: value}} for each section: defaults < --config TOML < flags
    (dataclass defaults not included; use when a config is completed later). ``given``, a
    dict, receives {title: set of the fields the user set, by TOML or by flag}."""
    parser = build_parser(sections, description, defaults, helps)
    ns = vars(parser.parse_args(argv))
    config = ns.pop("config", None)
    from_toml = load_toml(config, sections) if config else {}
    result = {}
    for title, cls in sections:
        values = dict((defaults or {}).get(title, {}))
        values.update(from_toml.get(title, {}))
        names = {f.name for f in dataclasses.fields(cls)}
        values.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in ns.items() if k in names})
        result[title] = values
        if given is not None:
            given[title] = set(from_toml.get(title, {})) | (names & set(ns))
    return result


def build(cls, values, title):
    """cls(**values), a failure as ConfigError (dataclasses may validate in __post_init__)."""
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{title} config: {e}") from None


def parse_configs(argv, sections, description=None, defaults=None, helps=None):
    """Instances of each section's dataclass: defaults < --config TOML < flags."""
    values = parse_values(argv, sections, description, defaults, helps)
    return [build(cls, values[title], title) for title, cls in sections]
