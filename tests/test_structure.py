"""The engineering rules of STYLE.md and issues 2 and 17, enforced on the
source tree.

No threads (except chatkit.sqlite's awaited worker threads), no
module-level mutable state, a protocol layer that never touches trio or
sockets, no module over 600 lines, and a public API that is complete and
documented.
"""

from __future__ import annotations

import ast
import importlib
import importlib.resources
import inspect
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest

import chatkit

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "chatkit"
MODULES = sorted(SRC.rglob("*.py"))
SANS_IO = (
    "_event_base.py",
    "_events.py",
    "_exceptions.py",
    "_framing.py",
    "_moderation_events.py",
    "protocol.py",
)


def module_id(path: Path) -> str:
    """``path`` relative to ``src/chatkit``: ``_server.py``, ``client/_client.py``."""
    return path.relative_to(SRC).as_posix()


def module_name(module: str) -> str:
    """The dotted name of a module id: ``client/_client.py`` is
    ``chatkit.client._client``, ``client/__init__.py`` ``chatkit.client``."""
    parts = ["chatkit", *module.removesuffix(".py").split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every absolute module an ``import`` anywhere in ``tree`` names.

    ``from x import y`` yields both ``x`` and ``x.y`` (``y`` may be a
    submodule, as in ``from concurrent import futures``). Relative imports
    are reported with their leading dots.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.append((node.lineno, base))
            for alias in node.names:
                sep = "" if base.endswith(".") else "."
                found.append((node.lineno, f"{base}{sep}{alias.name}"))
    return found


def test_the_source_tree_is_where_we_look() -> None:
    # Guards the scans below against silently scanning nothing.
    names = {module_id(path) for path in MODULES}
    client = {"client/__init__.py", "client/__main__.py", "client/_client.py"}
    server = {"server/__init__.py", "server/__main__.py", "server/_server.py"}
    assert {"__init__.py", *SANS_IO, *server, *client} <= names
    assert Path(chatkit.__file__).resolve().parent == SRC


# --- no threads -------------------------------------------------------------

THREAD_MODULES = ("threading", "_thread", "concurrent.futures", "multiprocessing")


@pytest.mark.parametrize("path", MODULES, ids=module_id)
def test_no_module_imports_threading(path: Path) -> None:
    offending = [
        (line, name)
        for line, name in imported_modules(parse(path))
        if any(name == bad or name.startswith(bad + ".") for bad in THREAD_MODULES)
    ]
    assert offending == []


def test_no_module_starts_a_thread_through_trio() -> None:
    for path in MODULES:
        uses = [
            node.attr
            for node in ast.walk(parse(path))
            if isinstance(node, ast.Attribute) and node.attr == "start_thread_soon"
        ]
        assert uses == [], module_id(path)


# The one exception: sqlite3 has no non-blocking interface, so chatkit.sqlite
# runs its calls in trio's worker threads (trio.to_thread.run_sync, awaited,
# one thread per connection at a time) to keep the disk off the event loop.
# Even there, a thread never calls back into trio: what runs in those
# threads is chatkit._sqlite_file's, which does not import trio at all.
MAY_USE_WORKER_THREADS = frozenset({"sqlite.py"})
RUN_IN_WORKER_THREADS = ("_sqlite_file.py",)


@pytest.mark.parametrize("path", MODULES, ids=module_id)
def test_no_module_hands_work_to_threads(path: Path) -> None:
    # trio.to_thread / trio.from_thread would bring threads in through trio.
    banned = ("to_thread", "from_thread")
    if module_id(path) in MAY_USE_WORKER_THREADS:
        banned = ("from_thread",)
    tree = parse(path)
    offending = [
        (node.lineno, node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in banned
    ]
    offending += [
        (line, name)
        for line, name in imported_modules(tree)
        if name.startswith(tuple(f"trio.{module}" for module in banned))
    ]
    assert offending == []


def test_worker_threads_stay_in_their_module() -> None:
    uses = [
        module_id(path)
        for path in MODULES
        if any(
            isinstance(node, ast.Attribute) and node.attr == "to_thread"
            for node in ast.walk(parse(path))
        )
    ]
    assert uses == sorted(MAY_USE_WORKER_THREADS)


@pytest.mark.parametrize("name", RUN_IN_WORKER_THREADS)
def test_code_run_in_worker_threads_imports_no_trio(name: str) -> None:
    imports = imported_modules(parse(SRC / name))
    assert imports  # the scan sees something
    async_io = ("trio", "anyio", "asyncio")
    assert [(line, mod) for line, mod in imports if mod.split(".")[0] in async_io] == []


def test_thread_import_detection_works() -> None:
    # The scanner itself must be able to fail.
    tree = ast.parse(
        "import threading\n"
        "from concurrent import futures\n"
        "def f():\n"
        "    import _thread\n"
    )
    names = [name for _, name in imported_modules(tree)]
    assert "threading" in names
    assert "concurrent.futures" in names
    assert "_thread" in names


# --- no module-level mutable state ------------------------------------------

# Calls whose result is immutable (or, for loggers and pluggy markers,
# stateless from the module's point of view). Anything else fails closed.
IMMUTABLE_FACTORIES = frozenset(
    {
        "MappingProxyType",
        "types.MappingProxyType",
        "frozenset",
        "tuple",
        "str",
        "bytes",
        "int",
        "float",
        "object",
        "re.compile",
        "msgspec.json.Decoder",
        "msgspec.json.Encoder",
        "msgspec.msgpack.Decoder",
        "msgspec.msgpack.Encoder",
        "msgspec.Meta",
        "msgspec.field",
        "logging.getLogger",
        "attrgetter",  # operator.attrgetter objects are immutable
        "operator.attrgetter",
        "pluggy.HookimplMarker",
        "pluggy.HookspecMarker",
        "TypeVar",
        # chatkit.protocol's wire formats: NamedTuples (immutable).
        "WireFormat",
        "typing.TypeVar",
        "ParamSpec",
        "NewType",
    }
)


def dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def mutable_reason(value: ast.expr) -> str | None:
    """Why ``value`` (a module- or class-level value) may be mutable, or None."""
    if isinstance(value, (ast.List, ast.Dict, ast.Set)):
        return f"{type(value).__name__.lower()} literal"
    if isinstance(value, (ast.ListComp, ast.DictComp, ast.SetComp)):
        return "comprehension"
    if isinstance(value, ast.GeneratorExp):
        return "generator (single-use iterator)"
    if isinstance(value, ast.Call):
        name = dotted(value.func)
        if name not in IMMUTABLE_FACTORIES:
            return f"call to {name or ast.unparse(value.func)}()"
        if name in ("MappingProxyType", "types.MappingProxyType"):
            return None  # a read-only view of the dict literal it wraps
        args = [*value.args, *(kw.value for kw in value.keywords)]
        for arg in args:
            reason = mutable_reason(arg)
            if reason is not None and name in ("frozenset", "tuple"):
                continue  # frozenset([...]) / tuple([...]) copy into immutables
            if reason is not None:
                return reason
        return None
    if isinstance(value, ast.Tuple):
        for element in value.elts:
            reason = mutable_reason(element)
            if reason is not None:
                return f"tuple holding a {reason}"
        return None
    if isinstance(value, (ast.Constant, ast.Name, ast.Attribute, ast.Subscript)):
        return None  # constants, aliases, typing forms
    if isinstance(value, ast.BinOp):
        # Type unions (``str | None``) and constant arithmetic.
        return mutable_reason(value.left) or mutable_reason(value.right)
    if isinstance(value, ast.UnaryOp):
        return mutable_reason(value.operand)
    return f"unrecognised expression {type(value).__name__}"


def top_level_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import time, looking into if/try/with blocks."""
    statements: list[ast.stmt] = []
    for node in body:
        statements.append(node)
        if isinstance(node, ast.If):
            statements += top_level_statements(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            handlers = [stmt for h in node.handlers for stmt in h.body]
            statements += top_level_statements(
                node.body + handlers + node.orelse + node.finalbody
            )
        elif isinstance(node, ast.With):
            statements += top_level_statements(node.body)
    return statements


def mutable_state(tree: ast.Module) -> list[str]:
    problems: list[str] = []

    def scan(body: list[ast.stmt], where: str) -> None:
        for node in top_level_statements(body):
            if isinstance(node, ast.ClassDef):
                scan(node.body, f"{where}{node.name}.")
                continue
            if isinstance(node, (ast.AugAssign, ast.For, ast.While)):
                problems.append(f"line {node.lineno}: {where} import-time mutation")
                continue
            if isinstance(node, ast.Assign):
                targets = node.targets
                value: ast.expr | None = node.value
            elif isinstance(node, ast.AnnAssign):
                targets, value = [node.target], node.value
            else:
                continue
            names = [ast.unparse(t) for t in targets]
            # __all__ and __slots__ are declarations, read by tools and the
            # interpreter, never mutated.
            if value is None or names in (["__all__"], ["__slots__"]):
                continue
            reason = mutable_reason(value)
            if reason is not None:
                problems.append(f"line {node.lineno}: {where}{names[0]} = {reason}")

    scan(tree.body, "")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            problems.append(f"line {node.lineno}: global {', '.join(node.names)}")
    return problems


@pytest.mark.parametrize("path", MODULES, ids=module_id)
def test_no_module_level_mutable_state(path: Path) -> None:
    assert mutable_state(parse(path)) == []


@pytest.mark.parametrize(
    "source",
    [
        "clients = []",
        "clients: list[str] = []",
        "rooms = {}",
        "seen = set()",
        "seen = {1, 2}",
        "by_name = {n: n for n in 'ab'}",
        "names = [n for n in 'ab']",
        "queue = collections.deque()",
        "counts = collections.Counter()",
        "cache = dict()",
        "pm = pluggy.PluginManager('chatkit')",
        "pair = (1, [])",
        "BAD = frozenset() | set()",
        "if True:\n    registry = {}",
        "class C:\n    instances = []",
        "x = 0\ndef bump():\n    global x\n    x += 1",
        "total = 0\ntotal += 1",
    ],
)
def test_mutable_state_detection_works(source: str) -> None:
    assert mutable_state(ast.parse(source)) != []


@pytest.mark.parametrize(
    "source",
    [
        "__all__ = ['a', 'b']",
        "LIMIT: Final = 64 * 1024",
        "NAME = 'x'",
        "PAIR = ('a', 'b')",
        "KINDS = frozenset({'a', 'b'})",
        "TABLE = MappingProxyType({'a': 1})",
        "PATTERN: Final = re.compile('[a-z]+')",
        "DECODER = msgspec.json.Decoder(Event)",
        "log = logging.getLogger('chatkit.server')",
        "hookimpl = pluggy.HookimplMarker('chatkit')",
        "SENTINEL = object()",
        "Ref: TypeAlias = str | int | None",
        "NonNegative = Annotated[int, msgspec.Meta(ge=0)]",
        "_T = TypeVar('_T')",
        "class C:\n    __slots__ = ('a', 'b')\n    kind = 'c'",
    ],
)
def test_immutable_module_state_is_allowed(source: str) -> None:
    assert mutable_state(ast.parse(source)) == []


# --- the protocol layer is sans-IO ------------------------------------------

IO_MODULES = (
    "trio",
    "anyio",
    "asyncio",
    "socket",
    "ssl",
    "select",
    "selectors",
    "socketserver",
    "subprocess",
    "threading",
    "_thread",
    "concurrent",
    "multiprocessing",
)


@pytest.mark.parametrize("name", SANS_IO)
def test_protocol_modules_import_no_io(name: str) -> None:
    imports = imported_modules(parse(SRC / name))
    assert imports  # the scan sees something
    io = [(line, mod) for line, mod in imports if mod.split(".")[0] in IO_MODULES]
    assert io == []
    # Relative imports stay inside the sans-IO layer (no ._server, .client,
    # ._hooks, or the package itself, whose __init__ imports trio).
    local = {
        mod.lstrip(".").split(".")[0]
        for _, mod in imports
        if mod.startswith(".") and mod.count(".") == 1
    }
    assert local <= {name.removesuffix(".py") for name in SANS_IO}


BLOCKER = textwrap.dedent(
    """
    import importlib, importlib.abc, sys, types

    BLOCKED = {blocked!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"sans-IO module imported {{name}}")
            return None

    assert not BLOCKED & set(sys.modules), BLOCKED & set(sys.modules)
    sys.meta_path.insert(0, Blocker())

    # A bare package object: the real chatkit/__init__.py imports trio.
    package = types.ModuleType("chatkit")
    package.__path__ = [{src!r}]
    sys.modules["chatkit"] = package

    protocol = importlib.import_module("chatkit.protocol")
    importlib.import_module("chatkit._events")
    importlib.import_module("chatkit._exceptions")

    conn = protocol.ServerConnection()
    conn.receive_data(b'{{"type":"hello","name":"alice","protocol":1}}\\n')
    print(type(conn.next_event()).__name__, conn.mode.value)
    loaded = BLOCKED & {{m.split(".")[0] for m in sys.modules}}
    assert not loaded, loaded
    """
)


def test_protocol_modules_load_with_trio_and_socket_blocked() -> None:
    blocked = {"trio", "socket", "ssl", "select", "selectors", "asyncio", "anyio"}
    script = BLOCKER.format(blocked=blocked, src=str(SRC))
    result = subprocess.run(
        [sys.executable, "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello json\n"


# --- no import circles ----------------------------------------------------------


def import_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    """Which of chatkit's modules each one imports, by module id.

    ``sources`` maps module ids (paths under ``src/chatkit``, as
    :func:`module_id` gives them) to their source. Every ``import``
    counts, wherever it is: in a function, or under ``if TYPE_CHECKING:``
    (a type-only import is still a dependency). Relative and absolute
    imports of ``chatkit`` resolve to a module when they name one (``from
    . import protocol``), else to the package whose ``__init__.py`` they
    import from (``from .client import ChatClient``). Importing a submodule
    also runs its packages' ``__init__.py``, but that is not an edge: every
    module would otherwise be in a circle with ``chatkit/__init__.py``,
    which imports them all to build the public API.
    """
    ids = {module_name(module): module for module in sources}
    graph: dict[str, set[str]] = {module: set() for module in sources}
    for module, source in sources.items():
        package = module_name(module).split(".")
        if not module.endswith("__init__.py"):
            package.pop()
        for node in ast.walk(ast.parse(source)):
            targets: list[tuple[str, list[str]]] = []
            if isinstance(node, ast.Import):
                targets = [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    name = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    name = node.module or ""
                targets = [(name, [alias.name for alias in node.names])]
            for name, members in targets:
                submodules = [ids.get(f"{name}.{member}") for member in members]
                graph[module].update(sub for sub in submodules if sub is not None)
                if name in ids and (not members or None in submodules):
                    graph[module].add(ids[name])  # where the names come from
    return graph


def import_circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The circles in ``graph``: each group of modules that import each
    other, directly or not (strongly connected components of two or more
    modules, or a module importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1 or module in graph[module]:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(circles)


CHATKIT_GRAPH = import_graph({module_id(path): path.read_text() for path in MODULES})


def test_the_import_graph_is_what_we_think() -> None:
    # Guards the circle test against a scan that resolves nothing.
    graph = CHATKIT_GRAPH
    assert graph["__init__.py"] >= {"client/__init__.py", "_events.py"}
    assert graph["client/__init__.py"] == {
        "client/_client.py",
        "client/_connection.py",
        "client/_reconnect.py",
    }
    assert "client/_client.py" in graph["hookspecs.py"]
    assert "server/_server.py" in graph["hookspecs.py"]
    assert "hookspecs.py" not in graph["_hooks.py"]
    assert graph["server/_rules.py"] >= {"server/_session.py", "backplane.py"}


def test_no_import_circle_among_chatkit_modules() -> None:
    assert import_circles(CHATKIT_GRAPH) == []


@pytest.mark.parametrize(
    ("sources", "circles"),
    [
        pytest.param(
            {
                "a.py": "from . import b",
                "b.py": "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from .a import A\n",
            },
            [["a.py", "b.py"]],
            id="type-only",
        ),
        pytest.param(
            {
                "pkg/__init__.py": "from ._impl import F",
                "pkg/_impl.py": "def f():\n    from ..util import g",
                "util.py": "from .pkg import F",
            },
            [["pkg/__init__.py", "pkg/_impl.py", "util.py"]],
            id="package-init",
        ),
        pytest.param(
            {"a.py": "import chatkit.b", "b.py": "from chatkit.a import x"},
            [["a.py", "b.py"]],
            id="absolute",
        ),
        pytest.param(
            {"a.py": "from . import a"},
            [["a.py"]],
            id="itself",
        ),
        pytest.param(
            {
                "__init__.py": "from .pkg import F\nfrom .a import A",
                "pkg/__init__.py": "from .mod import F",
                "pkg/mod.py": "from .. import a\nfrom ..a import A",
                "a.py": "import trio\nfrom .b import B",
                "b.py": "from typing import TYPE_CHECKING",
            },
            [],
            id="layers",
        ),
    ],
)
def test_import_circle_detection_works(
    sources: dict[str, str], circles: list[list[str]]
) -> None:
    # The scanner itself must be able to fail, and not cry wolf.
    assert import_circles(import_graph(sources)) == circles


def test_relative_imports_resolve_to_modules_or_packages() -> None:
    graph = import_graph(
        {
            "__init__.py": "from .client import Client\nfrom . import protocol",
            "protocol.py": "",
            "client/__init__.py": "from ._impl import Client",
            "client/_impl.py": "from .. import protocol\nfrom ..protocol import X",
            "client/__main__.py": "from . import Client\nfrom ._impl import main",
        }
    )
    assert graph == {
        "__init__.py": {"client/__init__.py", "protocol.py"},
        "protocol.py": set(),
        "client/__init__.py": {"client/_impl.py"},
        "client/_impl.py": {"protocol.py"},
        "client/__main__.py": {"client/__init__.py", "client/_impl.py"},
    }


# --- module size ----------------------------------------------------------------

# A module longer than this is split along its seams (a generated or data
# module would be the exception; there is none).
MAX_MODULE_LINES = 600


@pytest.mark.parametrize("path", MODULES, ids=module_id)
def test_no_module_is_over_the_line_limit(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, (
        f"src/chatkit/{module_id(path)} has {lines} lines, over the limit of "
        f"{MAX_MODULE_LINES}: split it along a seam"
    )


# --- the public API -----------------------------------------------------------


@pytest.mark.parametrize("name", chatkit.__all__)
def test_every_public_name_exists(name: str) -> None:
    assert hasattr(chatkit, name)


def test_all_has_no_duplicates() -> None:
    assert len(chatkit.__all__) == len(set(chatkit.__all__))


def test_all_lists_every_public_name() -> None:
    public = {
        name
        for name, value in vars(chatkit).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(chatkit.__all__)


@pytest.mark.parametrize(
    "name",
    [
        name
        for name in chatkit.__all__
        if inspect.isclass(getattr(chatkit, name))
        or inspect.isfunction(getattr(chatkit, name))
    ],
)
def test_every_public_class_and_function_has_a_docstring(name: str) -> None:
    obj = getattr(chatkit, name)
    # obj.__doc__, not inspect.getdoc: a class must not borrow its base's doc.
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert isinstance(doc, str)
    assert doc.strip()


@pytest.mark.parametrize("path", MODULES, ids=module_id)
def test_every_module_has_a_docstring_and_valid_all(path: Path) -> None:
    tree = parse(path)
    assert ast.get_docstring(tree)
    if module_id(path) == "__init__.py":
        return  # the public API, checked name by name above
    module = importlib.import_module(module_name(module_id(path)))
    exported = getattr(module, "__all__", [])
    assert [name for name in exported if not hasattr(module, name)] == []


def test_py_typed_ships() -> None:
    assert (SRC / "py.typed").is_file()
    assert importlib.resources.files("chatkit").joinpath("py.typed").is_file()
    # The wheel packages the whole src/chatkit directory, py.typed included.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = config["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["packages"] == ["src/chatkit"]
    assert "exclude" not in wheel
    assert "Typing :: Typed" in config["project"]["classifiers"]
