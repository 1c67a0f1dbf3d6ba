"""Rules about where code lives, checked on the source: each test is one rule, and fails naming
the places that break it."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import mmlens
from mmlens.model import HookedMLLM

SRC = Path(mmlens.__file__).parent
DOCS = [*sorted((SRC.parents[1] / "docs").rglob("*.md")), SRC.parents[1] / "README.md"]

# Modules allowed to take hook names apart: the grammar itself (paths relative to src/mmlens,
# without ".py"; a folder's modules match its prefix).
NAME_PARSERS = ("model/hook_names",)
# a variable or attribute holding a hook name, as the package spells them
NAME_HOLDERS = re.compile(r"(?:hook_)?name|n|hook")
DOT_SPLITS = ("split", "rsplit", "partition", "rpartition")
REGEX_CALLS = ("match", "fullmatch", "search", "findall", "finditer", "compile", "sub", "split")


def _modules() -> list[tuple[str, ast.Module]]:
    return [(path.relative_to(SRC).with_suffix("").as_posix(), ast.parse(path.read_text()))
            for path in sorted(SRC.rglob("*.py"))]


def _holds_a_name(node: ast.expr) -> bool:
    if isinstance(node, ast.BoolOp):  # (hook.name or "")
        return any(_holds_a_name(value) for value in node.values)
    if isinstance(node, ast.Name):
        return bool(NAME_HOLDERS.fullmatch(node.id))
    if isinstance(node, ast.Attribute):
        return node.attr == "name"
    if isinstance(node, ast.Call):  # model.resolve_hook_name(n).split(".")
        return isinstance(node.func, ast.Attribute) and node.func.attr.endswith("hook_name")
    return False


def _name_parsing(tree: ast.Module) -> list[str]:
    """Calls that cut a hook name apart: a dot split of something holding a name, or a regular
    expression that reads block numbers or hook points out of a string."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute) or not node.args:
            continue
        first = node.args[0]
        literal = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
        if literal is None:
            continue
        call = node.func
        if call.attr in DOT_SPLITS and literal.startswith(".") and _holds_a_name(call.value):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif (isinstance(call.value, ast.Name) and call.value.id == "re" and call.attr in REGEX_CALLS
              and "\\d" in literal and ("blocks" in literal or "hook" in literal)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_hook_names_are_parsed_only_by_the_grammar():
    """Block numbers, stages and sites are read out of hook names by `mmlens.model.hook_names`
    only (`parse_hook_name`), never by splitting on dots or by a regular expression elsewhere."""
    offenders = {module: found for module, tree in _modules()
                 if not module.startswith(NAME_PARSERS) and (found := _name_parsing(tree))}
    assert not offenders, ("parse hook names with mmlens.model.hook_names.parse_hook_name instead of: "
                           + "; ".join(f"{m}.py {', '.join(f)}" for m, f in offenders.items()))


def test_the_name_parsing_rule_sees_the_old_ways():
    """The rule above is not vacuous: it flags the forms the package used before the grammar."""
    old = ast.parse('import re\n'
                    're.match(r"blocks\\.(\\d+)\\.", hook)\n'
                    'int(hook.name.split(".")[-3])\n'
                    '(self.name or "").split(".")\n'
                    'n.split(".", 2)[2]\n'
                    'hook.split(".hook_")[-1]\n')
    assert len(_name_parsing(old)) == 5
    fine = ast.parse('key.split(".")\nnames[id(m)].split(".")\nfilename.rsplit(".", 1)\nre.compile(r"<img\\d+>")\n')
    assert _name_parsing(fine) == []


def _public_methods() -> dict[str, str]:
    """Public attributes HookedMLLM defines itself or takes from mmlens mixins, by defining module."""
    own: dict[str, str] = {}
    for klass in HookedMLLM.__mro__:
        if klass.__module__.startswith("mmlens."):
            for name, value in vars(klass).items():
                if not name.startswith("_") and (callable(value) or isinstance(value, (property, classmethod, staticmethod))):
                    own.setdefault(name, klass.__module__)
    return own


def _subpackage(module: str) -> str:
    return module.split("/", 1)[0]


def _callers(names: set[str]) -> dict[str, set[str]]:
    """For each name, the subpackages of src/mmlens that read an attribute of that name; a module
    that defines a function or method of the same name is taken to use its own."""
    callers: dict[str, set[str]] = {name: set() for name in names}
    for module, tree in _modules():
        defined = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in names and node.attr not in defined:
                callers[node.attr].add(_subpackage(module))
    return callers


def _documented(name: str, docs: str) -> bool:
    return re.search(rf"\b(?:model|HookedMLLM)\.{re.escape(name)}\b", docs) is not None


def test_no_model_method_serves_a_single_subpackage():
    """A public HookedMLLM method used, outside model/, by one subpackage only belongs to that
    subpackage (as patching's schedule does), unless the docs present it as user API
    (`model.<method>` or `HookedMLLM.<method>` in docs/ or the README)."""
    methods = _public_methods()
    home = _subpackage(inspect.getmodule(HookedMLLM).__name__.removeprefix("mmlens.").replace(".", "/"))
    docs = "\n".join(path.read_text() for path in DOCS if path.exists())
    callers = _callers(set(methods))
    single = {name: sorted(users - {home}) for name, users in callers.items() if len(users - {home}) == 1}
    offenders = {name: users for name, users in single.items() if not _documented(name, docs)}
    assert not offenders, (f"HookedMLLM methods only one subpackage calls, undocumented as user API: {offenders}; move "
                           "each into that subpackage (or document it as user API)")


def test_no_module_outside_architectures_names_a_family():
    """Only `model/architectures/` (and the tiny builders in `testing/families/`) know a family:
    no identifier, import or string literal elsewhere contains a registered family's folder, class
    or Hugging Face class name (compared without case, underscores or dashes; docstrings and
    comments are prose and not read; the embedded model's name `tiny-shapes-llava` is a name, not a
    family branch). Error messages that list supported families read the registry, so name none."""
    from mmlens.model.architectures import FAMILIES, family_folder

    allowed = {  # (module or folder, family folder or "*"): why that module must name the family
        ("zoo/", "llava"): "the embedded models are LLaVAs: the zoo builds, trains and names them",
        ("testing/__init__.py", "llava"): "`mmlens.testing.tiny_llava` is the documented tiny model, the zoo's recipe",
        ("model/images/preprocess.py", "llava"): "ImageGeometry replays transformers' LLaVA image processor (pad to "
                                          "square), which the public `ImageGeometry.from_processor` takes directly",
        ("testing_families.py", "*"): "the documented old path of the tiny builders and image-only processors, "
                                      "a shim re-exporting them from their families' modules",
    }

    def squash(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    def code_words(tree: ast.AST):
        prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                yield node.lineno, node.id
            elif isinstance(node, ast.Attribute):
                yield node.lineno, node.attr
            elif isinstance(node, ast.alias):
                yield node.lineno, node.name
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield node.lineno, node.module
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield node.lineno, node.name
            elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
                yield node.lineno, node.arg
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
                yield node.lineno, node.value

    keys: dict[str, set[str]] = {family_folder(f): set() for f in FAMILIES}
    for f in FAMILIES:
        keys[family_folder(f)] |= {squash(k) for k in (family_folder(f), f.__name__, *f.hf_class_names)}
    found = []
    for path in sorted(SRC.rglob("*.py")):
        module = path.relative_to(SRC).as_posix()
        if module.startswith(("model/architectures/", "testing/families/")):
            continue
        for line, text in code_words(ast.parse(path.read_text(encoding="utf-8"))):
            word = squash(text.replace("tiny-shapes-llava", ""))
            named = {family for family, family_keys in keys.items() if any(k in word for k in family_keys)}
            # a longer family name holds a shorter one (llava_next holds llava): report the longest
            named = {f for f in named if not any(f != g and squash(f) in squash(g) for g in named)}
            found += [f"{module}:{line} names {family!r} in {text!r}" for family in sorted(named)
                      if not any(module.startswith(where) and fam in (family, "*") for where, fam in allowed)]
    assert not found, "family names outside model/architectures/:\n" + "\n".join(found)


def test_the_map_of_the_house_names_every_room_that_exists():
    """docs/architecture.md's tree names every subpackage of mmlens and every path it names exists."""
    page = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    tree = page.split("```text", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"([a-z_]+(?:/|\.py))", tree))
    folders = {p.name + "/" for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    folders |= {p.name + "/" for p in (SRC / "model").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= named, f"rooms missing from docs/architecture.md: {sorted(folders - named)}"
    for entry in named - {"mmlens/", "src/", "<family>/"}:
        hits = list(SRC.rglob(entry.rstrip("/")))
        assert hits, f"docs/architecture.md names {entry}, which is not in src/mmlens"
