"""chatkit's own async hook dispatcher over a pluggy PluginManager.

pluggy decides *which* implementations exist and in what order; chatkit calls
them itself, because pluggy has no async support, its ``firstresult`` stops
at an un-run coroutine, and one raising implementation skips the rest. Here
each implementation is called in pluggy's order (``reversed(get_hookimpls())``,
which honours ``tryfirst``/``trylast``), awaited if it returns an awaitable,
bounded by a timeout, and isolated: an exception is logged with the plugin's
name and the next implementation runs. :class:`~chatkit.Veto` is the only
exception that escapes, and only from the veto/rewrite/first calls.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any, Final

import pluggy
import trio

from ._exceptions import Veto

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROJECT_NAME",
    "HookDispatcher",
    "hook_names",
    "hookimpl",
    "hookspec",
    "make_plugin_manager",
]

PROJECT_NAME: Final = "chatkit"

#: Marks a hook implementation: ``@chatkit.hookimpl`` or
#: ``@chatkit.hookimpl(tryfirst=True)``.
hookimpl: Final = pluggy.HookimplMarker(PROJECT_NAME)
#: Marks a hook specification (chatkit's own use).
hookspec: Final = pluggy.HookspecMarker(PROJECT_NAME)


def hook_names(spec: type) -> frozenset[str]:
    """The names of the hooks ``spec`` defines: its methods marked with
    :data:`hookspec` (pluggy's ``chatkit_spec`` attribute)."""
    marker = f"{PROJECT_NAME}_spec"
    return frozenset(
        name for name, value in vars(spec).items() if hasattr(value, marker)
    )


#: Entry-point group of server plugins.
ENTRY_POINT_GROUP: Final = "chatkit"
#: Entry-point group of client plugins (bots): a separate group, so that an
#: installed bot never breaks a server's hook validation, nor the reverse.
CLIENT_ENTRY_POINT_GROUP: Final = "chatkit.client"
#: Environment variable: comma-separated allow-list of entry-point plugins.
LOAD_PLUGINS_ENV: Final = "CHATKIT_LOAD_PLUGINS"

_FAILED: Final = object()


def make_plugin_manager(
    spec: type,
    plugins: Iterable[object],
    *,
    load_entry_points: bool,
    entry_point_group: str = ENTRY_POINT_GROUP,
    environ: Mapping[str, str] | None = None,
) -> pluggy.PluginManager:
    """Build a PluginManager for ``spec`` holding ``plugins`` (called in the
    order given) and, if asked, the plugins of ``entry_point_group``.

    ``CHATKIT_LOAD_PLUGINS`` restricts entry points (as datasette's
    ``DATASETTE_LOAD_PLUGINS`` does): unset loads every installed one, an
    empty value none, ``a,b`` only those named.

    Raises:
        pluggy.PluginValidationError: a plugin implements a hook that does
            not exist (a misspelling) or with arguments the spec lacks.
        TypeError: a plugin uses a hook wrapper, which chatkit cannot await.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(spec)
    if load_entry_points:
        _load_entry_points(
            pm, entry_point_group, os.environ if environ is None else environ
        )
        for loaded in pm.get_plugins():
            _refuse_wrappers(pm, loaded)
    # Names are chosen in the order given (so a repeated class is ``Name``,
    # then ``Name#2``), but pluggy calls the last registered first: register
    # in reverse so the order users list plugins in is the order they run in.
    plugins = list(plugins)
    names = _readable_names(pm, plugins)
    for plugin, name in reversed(list(zip(plugins, names, strict=True))):
        register_plugin(pm, plugin, name=name)
    pm.check_pending()
    return pm


def register_plugin(
    pm: pluggy.PluginManager, plugin: object, name: str | None = None
) -> None:
    """Register one plugin, refusing hook wrappers."""
    pm.register(plugin, name=name)
    _refuse_wrappers(pm, plugin)


def _refuse_wrappers(pm: pluggy.PluginManager, plugin: object) -> None:
    for caller in pm.get_hookcallers(plugin) or ():
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper):
                name = pm.get_name(plugin)
                pm.unregister(plugin)
                raise TypeError(
                    f"plugin {name!r}: {caller.name} is a hook wrapper; "
                    "chatkit hooks do not support wrappers"
                )


def _readable_names(pm: pluggy.PluginManager, plugins: list[object]) -> list[str]:
    # pluggy would name an instance by its id(); logs name plugins, so use
    # the module's or class's __name__, or the instance's class name.
    taken = {name for name, _ in pm.list_name_plugin()}
    names: list[str] = []
    for plugin in plugins:
        base = getattr(plugin, "__name__", None)
        if not isinstance(base, str):
            base = type(plugin).__qualname__
        name, count = base, 1
        while name in taken:
            count += 1
            name = f"{base}#{count}"
        taken.add(name)
        names.append(name)
    return names


def _load_entry_points(
    pm: pluggy.PluginManager, group: str, environ: Mapping[str, str]
) -> None:
    allow = environ.get(LOAD_PLUGINS_ENV)
    if allow is None:
        pm.load_setuptools_entrypoints(group)
        return
    for name in filter(None, (part.strip() for part in allow.split(","))):
        pm.load_setuptools_entrypoints(group, name=name)


class HookDispatcher:
    """Calls one PluginManager's hooks the chatkit way (see module docs).

    Args:
        pm: the plugin manager.
        timeout: seconds each awaited implementation may take.
        logger: where plugin failures are logged.
        bound: arguments every hook gets without the caller naming them
            (the server binds ``server=``).
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        *,
        timeout: float,
        logger: logging.Logger,
        bound: Mapping[str, Any] | None = None,
    ) -> None:
        self.pm = pm
        self.timeout = timeout
        self._log = logger
        self._bound = dict(bound or {})

    def has(self, name: str) -> bool:
        """True if any plugin implements hook ``name`` (cheap: lets hot paths
        skip the dispatcher entirely)."""
        caller: pluggy.HookCaller = getattr(self.pm.hook, name)
        return bool(caller.get_hookimpls())

    async def notify(self, name: str, /, **kwargs: Any) -> None:
        """Call every implementation of ``name``; results and errors are
        ignored (errors logged)."""
        for impl in self._impls(name):
            try:
                await self._call(name, impl, kwargs)
            except Veto:
                self._log.warning(
                    "plugin %r raised Veto from %s, which cannot veto; ignored",
                    impl.plugin_name,
                    name,
                )

    async def veto(
        self, name: str, /, *, fail_closed: bool = True, **kwargs: Any
    ) -> list[Any]:
        """Call every implementation of ``name`` until one raises
        :class:`~chatkit.Veto`, which propagates; if none did, what the
        implementations returned other than ``None``, in the order they
        ran (what that means is the hook's to say, as
        ``chatkit_authenticate`` does).

        Fails closed: an implementation that raises something else or times
        out counts as a refusal (a broken authenticator must not let
        everyone in). With ``fail_closed=False`` it is logged and skipped
        instead (a broken plugin must not keep everyone out of rooms).
        """
        results: list[Any] = []
        for impl in self._impls(name):
            result = await self._call(name, impl, kwargs)
            if result is _FAILED:
                if fail_closed:
                    # The log names the plugin; the peer learns nothing internal.
                    raise Veto("refused: the server could not check this request")
            elif result is not None:
                results.append(result)
        return results

    async def rewrite(self, name: str, key: str, /, **kwargs: Any) -> Any:
        """Thread ``kwargs[key]`` through every implementation of ``name``.

        Each implementation sees the value the previous one returned (``None``
        means unchanged). :class:`~chatkit.Veto` propagates. Returns the
        final value.
        """
        for impl in self._impls(name):
            result = await self._call(name, impl, kwargs)
            if result is not None and result is not _FAILED:
                expected = type(kwargs[key])
                if not isinstance(result, expected):
                    self._log.error(
                        "plugin %r returned %r from %s, expected %s or None; ignored",
                        impl.plugin_name,
                        result,
                        name,
                        expected.__name__,
                    )
                    continue
                kwargs[key] = result
        return kwargs[key]

    async def first(self, name: str, /, **kwargs: Any) -> tuple[str | None, bool]:
        """Call the implementations of ``name`` until one returns a ``str``
        (pluggy's ``firstresult``, awaited); :class:`~chatkit.Veto`
        propagates. Returns that answer (``None``: nobody answered) and
        whether an implementation failed (raised, timed out, or returned
        something other than a ``str`` or ``None``: logged and skipped).
        """
        failed = False
        for impl in self._impls(name):
            result = await self._call(name, impl, kwargs)
            if result is _FAILED:
                failed = True
            elif isinstance(result, str):
                return result, failed
            elif result is not None:
                self._log.error(
                    "plugin %r returned %r from %s, expected str or None; ignored",
                    impl.plugin_name,
                    result,
                    name,
                )
                failed = True
        return None, failed

    def _impls(self, name: str) -> list[pluggy.HookImpl]:
        caller: pluggy.HookCaller = getattr(self.pm.hook, name)
        impls = caller.get_hookimpls()
        impls.reverse()
        return impls

    async def _call(
        self, name: str, impl: pluggy.HookImpl, kwargs: Mapping[str, Any]
    ) -> Any:
        try:
            bound = self._bound
            result = impl.function(
                *[kwargs[arg] if arg in kwargs else bound[arg] for arg in impl.argnames]
            )
            if inspect.isawaitable(result):
                with trio.move_on_after(self.timeout) as scope:
                    result = await result
                if scope.cancelled_caught:
                    self._log.error(
                        "plugin %r timed out in %s after %ss; skipped",
                        impl.plugin_name,
                        name,
                        self.timeout,
                    )
                    return _FAILED
            return result
        except Veto:
            raise
        except Exception:
            # Isolation is the point: a plugin's bug must not reach the user
            # or the server. Logged with the plugin's name and traceback.
            self._log.exception("plugin %r raised in %s", impl.plugin_name, name)
            return _FAILED
