"""What a job changed in the interpreter that restoring cannot undo: the fingerprint.

A worker runs one job after another in one interpreter. `isolation.Baseline` puts back
what a script commonly changes (cwd, environment, sys.path, logging, torch settings...);
this module detects the rest: a job that patched a library (``torch.Tensor.__add__ =
...``, ``nn.Linear.forward = ...``), registered a global hook
(``register_module_forward_hook``, ``torch.library``, ``sys.meta_path``,
``gc.callbacks``, ``copyreg``, ``codecs.register``, ``sys.addaudithook``) or replaced a
module would silently change every later job's results. Such a worker is replaced.

What is covered, for every module imported when the fingerprint is taken (the
template's preloads and what the worker's start imported):

- the module's namespace,
- every class the namespace holds (its attributes, including inherited ones it shadows),
- every dict, list, set and deque the namespace holds (registries and hook tables),

and, outside any module: which module object each of those names maps to in
sys.modules, the trace and profile hooks, the codec search path and audit hooks.

How it stays cheap (it runs after every job): CPython stamps every dict with a version
that changes on each mutation (``ma_version_tag``, PEP 509) and every class with a tag
that is reassigned when its attributes change (``tp_version_tag``). Reading ~10,000 of
them costs about a millisecond; only what changed is then compared, attribute by
attribute, with a snapshot taken at the baseline, to tell a patch (dirty) from a library
adding a new name (allowed). These are CPython internals: `_self_test()` checks them on
the running interpreter and, if they do not behave, every item is compared in full
instead (slower, still correct).
"""

from __future__ import annotations

import collections
import ctypes
import gc
import itertools
import operator
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

# Where the two tags live (CPython 3.10-3.13 on 64-bit): PyDictObject is PyObject_HEAD
# (refcount, type), ma_used, then ma_version_tag; PyTypeObject has 48 pointer-sized
# fields before tp_version_tag.
_PTR = ctypes.sizeof(ctypes.c_void_p)
_DICT_VERSION_OFFSET = 3 * _PTR
_TYPE_VERSION_OFFSET = 48 * _PTR
_PROBE = "__warm_pool_integrity_probe__"
_MISSING = object()

# New names that libraries add to namespaces by themselves, and that change nothing
# for code that does not know them.
_BENIGN_NEW_DUNDERS = frozenset({"__warningregistry__", "__slotnames__"})
# Containers that change as a side effect of ordinary use and that Baseline restores or
# that change no later job's results: import machinery and its caches, line and regex
# caches, thread bookkeeping (live threads make a worker dirty on their own), the
# environment and warning filters (restored), logging's handler bookkeeping (loggers
# are restored), Popen objects awaiting their exit status, torch's cache of tensors
# shared with DataLoader workers.
_CACHES = frozenset({
    "sys.modules", "sys.path_importer_cache", "importlib._bootstrap._module_locks",
    "importlib._bootstrap._blocking_on", "_frozen_importlib._module_locks",
    "_frozen_importlib._blocking_on", "linecache.cache", "re._cache", "re._cache2",
    "typing._caches", "typing._cleanups", "warnings.onceregistry", "warnings.filters",
    "threading._active", "threading._limbo", "threading._shutdown_locks", "threading._dangling",
    "os.environ", "posix.environ", "logging._handlerList", "logging._handlers",
    "subprocess._active", "torch.multiprocessing.reductions.shared_cache",
})


def _read_version(address: int, ctype: type) -> int:
    return ctype.from_address(address).value


def _self_test() -> bool:
    """True when dict and class version tags behave as this module relies on."""
    if sys.implementation.name != "cpython" or not (3, 10) <= sys.version_info[:2] <= (3, 13):
        return False
    try:
        d: dict[str, int] = {}
        before = _read_version(id(d) + _DICT_VERSION_OFFSET, ctypes.c_uint64)
        d["x"] = 1
        after = _read_version(id(d) + _DICT_VERSION_OFFSET, ctypes.c_uint64)

        class Probe:
            pass

        getattr(Probe, _PROBE, None)
        tag = _read_version(id(Probe) + _TYPE_VERSION_OFFSET, ctypes.c_uint32)
        Probe.attr = 1
        getattr(Probe, _PROBE, None)
        retag = _read_version(id(Probe) + _TYPE_VERSION_OFFSET, ctypes.c_uint32)
        return before != after and tag != 0 and retag != tag
    except Exception:  # noqa: BLE001 - any surprise means: do not trust the tags
        return False


TAGS_WORK = _self_test()


@dataclass(eq=False)
class _Item:
    """One watched object: a module namespace, a class, or a container."""

    label: str
    kind: str          # module | class | container
    obj: Any
    snapshot: Any      # dict copy (module, class, dict) or tuple of ids (list, set, deque)
    cell: Any = None   # ctypes view of its version tag, when tags work


def _cell(kind: str, obj: Any) -> Any:
    if not TAGS_WORK:
        return None
    if kind == "class":
        getattr(obj, _PROBE, None)  # a lookup assigns the class a version tag
        return ctypes.c_uint32.from_address(id(obj) + _TYPE_VERSION_OFFSET)
    target = obj.__dict__ if kind == "module" else obj
    if isinstance(target, dict):
        return ctypes.c_uint64.from_address(id(target) + _DICT_VERSION_OFFSET)
    return None


def _snapshot(kind: str, obj: Any) -> Any:
    """A shallow copy: dicts of names for namespaces, the container's own items otherwise.

    Comparing a copy with the live object (`!=`) runs in C and checks identity before
    equality, so unchanged containers compare fast whatever their items are.
    """
    if kind in ("module", "class"):
        return dict(vars(obj))
    # The built-in storage, through the built-in type's own methods: a subclass may
    # compute its items (transformers' lazy auto mappings import every model class).
    if isinstance(obj, dict):
        return dict(dict.items(obj))
    if isinstance(obj, set):
        return set.copy(obj)
    if isinstance(obj, list):
        return list.copy(obj)
    return list(obj)


_VALUE = operator.attrgetter("value")


_FAST_TYPES = (list, set, collections.deque)


def _copy(obj: Any) -> Any:
    return type(obj)(obj)


def _changed_fully(item: _Item) -> bool:
    """Compare an item with its snapshot, without tags."""
    obj, then = item.obj, item.snapshot
    if item.kind in ("module", "class"):
        obj = vars(obj)
    elif isinstance(obj, collections.deque):
        obj = list(obj)
    if not isinstance(then, dict):
        try:
            return bool(obj != then)
        except Exception:  # noqa: BLE001 - an item whose __eq__ raises: compare identities
            return list(map(id, obj)) != list(map(id, then))
    if dict.keys(obj) != then.keys():
        return True
    if not any(map(operator.is_not, dict.values(obj), then.values())):
        return False
    # The same items in another order (a dict cleared and refilled) are no change.
    return any(dict.get(obj, key, _MISSING) is not value for key, value in then.items())


@dataclass
class Fingerprint:
    """The watched state, taken once; `changes()` lists what a job did to it."""

    items: list[_Item]
    modules: dict[str, types.ModuleType]
    module_values: list[Any] = field(default_factory=list)
    hooks: tuple[Any, ...] = ()
    codec_path: list[Any] | None = None
    codec_ids: tuple[int, ...] = ()
    tags: list[int] = field(default_factory=list)
    tagged: list[int] = field(default_factory=list)      # indexes of items with a version tag
    untagged: list[int] = field(default_factory=list)    # the others, compared in full
    audit_hooks_added: list[str] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)           # ids of the watched objects
    # The views _candidates compares (_index): the tagged items' tag cells; the untagged
    # lists, sets and deques (_fast: their indexes, _live, _copies) and the other untagged.
    _cells: list[Any] = field(default_factory=list)
    _tag_at: dict[int, int] = field(default_factory=dict)
    _fast: list[int] = field(default_factory=list)
    _fast_at: dict[int, int] = field(default_factory=dict)
    _live: list[Any] = field(default_factory=list)
    _copies: list[Any] = field(default_factory=list)
    _slow: list[int] = field(default_factory=list)

    @classmethod
    def take(cls) -> Fingerprint:
        """Walk every loaded module; tens of milliseconds, paid once per template."""
        fp = cls(items=[], modules={})
        fp._watch_new_modules()
        fp.codec_path = _codec_search_path()
        sys.addaudithook(fp._audit)
        fp.rebase()
        return fp

    def _watch_new_modules(self) -> None:
        """Add the modules loaded since the last walk (and what they hold) to the items.

        Cheap when nothing is new (a worker's start): only sys.modules' names are read.
        Everything else touched here would be copied into the worker, page by page
        (fork shares memory until it is written, and reading a Python object writes
        its reference count).
        """
        fresh = sys.modules.keys() - self.modules.keys() - {"__main__", "__mp_main__"}
        if not fresh:
            return
        seen = self.seen
        new = {name: m for name in sorted(fresh) if isinstance(m := sys.modules.get(name), types.ModuleType)}
        first = len(self.items)
        with warnings.catch_warnings():  # some modules warn when a deprecated attribute is read
            warnings.simplefilter("ignore")
            for name, module in new.items():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                self.items.append(_Item(name, "module", module, _snapshot("module", module)))
                for key, value in list(vars(module).items()):
                    kind = _kind_of(value)
                    if kind is None or id(value) in seen:
                        continue
                    seen.add(id(value))
                    self.items.append(_Item(f"{name}.{key}", kind, value, _snapshot(kind, value)))
        self.modules.update(new)
        for item in self.items[first:]:  # taken inside catch_warnings, which swaps warnings.filters
            if item.obj is warnings:
                item.snapshot = _snapshot(item.kind, item.obj)
        for index in range(first, len(self.items)):
            item = self.items[index]
            item.cell = _cell(item.kind, item.obj)
            if item.cell is None:
                self.untagged.append(index)
            else:
                self.tagged.append(index)
                self.tags.append(item.cell.value)
        self._index()

    def _audit(self, event: str, args: tuple) -> None:
        # Audit hooks cannot be removed: one added by a job would see every later job.
        if event == "sys.addaudithook":
            self.audit_hooks_added.append(event)

    def rebase(self) -> None:
        """Accept the current state as clean (in a worker, after its own start-up)."""
        for index in self._candidates():
            self._accept(index)
        self._watch_new_modules()
        self.module_values = [sys.modules.get(name) for name in self.modules]
        self.hooks = (sys.gettrace(), sys.getprofile())
        self.codec_ids = tuple(map(id, self.codec_path or ()))
        self.audit_hooks_added.clear()

    def changes(self) -> list[str]:
        """What the last job changed that makes this interpreter unfit for another job."""
        reasons: list[str] = []
        if self.audit_hooks_added:
            reasons.append("an audit hook was added (sys.addaudithook)")
        if (sys.gettrace(), sys.getprofile()) != self.hooks:
            reasons.append("a trace or profile hook is set (sys.settrace / sys.setprofile)")
        if self.codec_path is not None and tuple(map(id, self.codec_path)) != self.codec_ids:
            reasons.append("a codec search function was registered (codecs.register)")
        now = [sys.modules.get(name) for name in self.modules]
        if any(map(operator.is_not, now, self.module_values)):
            pairs = zip(self.modules, now, self.module_values, strict=True)
            replaced = [name for name, a, b in pairs if a is not b]
            reasons.append(f"modules replaced or removed in sys.modules: {', '.join(replaced[:5])}")
        for index in self._candidates():
            found = self._judge(self.items[index])
            if found:
                reasons.append(found)
            else:  # an allowed change (a new name, a cache): it becomes the baseline
                self._accept(index)
        return reasons

    def _candidates(self) -> list[int]:
        """Indexes of the items that changed: a moved tag, or a full compare without one.

        The common case (nothing changed) stays in C: the tags are read with map() and
        compared as one list; the untagged lists, sets and deques are compared with
        copies of the same type (`!=` in C, identity first, as `_changed_fully` does)
        in one map(). Other untagged items (all of them when tags do not work) are
        compared one by one.
        """
        items = self.items
        now = list(map(_VALUE, self._cells))
        moved = [] if now == self.tags else list(
            itertools.compress(self.tagged, map(operator.ne, now, self.tags)))
        try:
            differ = list(map(operator.ne, self._live, self._copies))
        except Exception:  # noqa: BLE001 - an item whose __eq__ raises: compare one by one
            differ = [True] * len(self._fast)
        changed = [i for i, d in zip(self._fast, differ, strict=True) if d and _changed_fully(items[i])]
        return moved + changed + [i for i in self._slow if _changed_fully(items[i])]

    def _index(self) -> None:
        """The views `_candidates` compares."""
        items = self.items
        self._cells = [items[i].cell for i in self.tagged]
        self._tag_at = {index: n for n, index in enumerate(self.tagged)}
        self._fast = [i for i in self.untagged if type(items[i].obj) in _FAST_TYPES]
        self._slow = [i for i in self.untagged if type(items[i].obj) not in _FAST_TYPES]
        self._live = [items[i].obj for i in self._fast]
        self._copies = [_copy(items[i].obj) for i in self._fast]
        self._fast_at = {index: n for n, index in enumerate(self._fast)}

    def _accept(self, index: int) -> None:
        item = self.items[index]
        item.snapshot = _snapshot(item.kind, item.obj)
        if item.cell is not None:
            self.tags[self._tag_at[index]] = item.cell.value
        elif index in self._fast_at:
            self._copies[self._fast_at[index]] = _copy(item.obj)

    def _judge(self, item: _Item) -> str | None:
        """Why this item's change makes the worker dirty, or None when it is allowed."""
        if item.kind == "container":
            if item.label in _CACHES:
                return None
            if not _changed_fully(item):
                return None
            return f"registry {item.label} changed"
        then, now = item.snapshot, vars(item.obj)
        replaced = [k for k, v in then.items()
                    if now.get(k, _MISSING) is not v and not _both_plain_data(v, now.get(k, _MISSING))]
        added = [k for k in now if k not in then]
        bad_added = [k for k in added if _shadows(item, k)]
        what = "class" if item.kind == "class" else "module"
        if replaced:
            return f"{what} {item.label} patched: {', '.join(sorted(replaced)[:5])}"
        if bad_added:
            return f"{what} {item.label} patched: {', '.join(sorted(bad_added)[:5])} added"
        return None

    def __len__(self) -> int:
        return len(self.items)


# Rebinding a name from one plain value to another is how libraries keep counters and
# lazy-initialisation flags (RemovableHandle.next_id, _SIGCHLD_handler_set): allowed.
# Functions, classes and objects replaced are patches.
_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def _both_plain_data(old: Any, new: Any) -> bool:
    return type(old) in _PLAIN and type(new) in _PLAIN


def _kind_of(value: Any) -> str | None:
    try:
        if isinstance(value, type):
            return "class"
        if isinstance(value, (dict, list, set, collections.deque)):
            return "container"
    except Exception:  # noqa: BLE001 - objects whose __class__ lies or raises
        return None
    return None


def _shadows(item: _Item, name: str) -> bool:
    """True when a new attribute changes behaviour: a dunder, or one hiding an inherited one."""
    if name.startswith("__") and name.endswith("__") and name not in _BENIGN_NEW_DUNDERS:
        return True
    if item.kind != "class":
        return False
    return any(name in vars(base) for base in item.obj.__mro__[1:])


def _codec_search_path() -> list[Any] | None:
    """The interpreter's list of codec search functions (not exposed; found by the GC).

    codecs.register appends to a list the interpreter holds and no module references;
    it is a tracked object whose first entry is encodings.search_function.
    """
    encodings = sys.modules.get("encodings")
    first = getattr(encodings, "search_function", None)
    if first is None:
        return None
    for obj in gc.get_objects():
        if type(obj) is list and obj and obj[0] is first:
            return obj
    return None
