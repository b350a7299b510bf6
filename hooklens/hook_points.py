"""Hook points: named identity modules where user functions can read or replace activations.

Semantics follow TransformerLens 3.9 (`fn(activation, hook)`; a returned tensor replaces the activation, `None`
keeps it; temporary hooks vanish at the end of `run_with_hooks` / `hooks()` even when something raises), with
differences that only remove surprises:

* a HookPoint with no hooks costs one attribute check (no `nn.Module.__call__` machinery), so `LensHandle.hook`
  is the function itself, not a PyTorch `RemovableHandle` (`LensHandle.user_hook` is the same callable, as in TL);
* a hook that returns a tensor of the wrong shape raises an error naming the hook and the expected shape;
* an unknown hook name raises with the closest valid names instead of silently doing nothing (also in
  `list_hooks`, where TL answers `{}` for a typo as for a hook point without hooks);
* a switched-off hook point (`hook_result` without `use_attn_result`, ...) named in `run_with_hooks` / `hooks()`
  raises as `add_hook` does (TL attaches a hook that never runs); a filter there still matches it, as in TL;
* `add_hook(filter, ...)` checks every matched point before adding any, so a refusal leaves no hooks behind;
* temporary hooks (`run_with_hooks`, `hooks()`, `run_with_cache`'s caching hooks) run only in the thread (or
  asyncio task) whose `hooks()` block added them: a forward in another thread does not see them, and contexts
  entered and left in any order remove only their own hooks (TL's hooks are model-wide, so concurrent runs see
  and remove each other's). Permanent hooks, hooks added with `add_hook` and hooks a block leaves behind with
  `reset_hooks_end=False` stay model-wide, as in TL. `list_hooks` and `repr` show every attached hook;
  `has_hooks`, `remove_hooks`, `reset_hooks` act on the hooks this thread would run. Worker threads a forward
  starts itself (`nn.DataParallel`) do not inherit the block, so temporary hooks do not run there;
* a hook that returns a tensor of another dtype or on another device (a meta tensor included) raises naming the
  hook, the hook point and what was expected, instead of failing later inside the model;
* an activation that `run_with_cache` has stored is not rewritten by a later hook that edits it in place (TL's
  cache would show the edited values): before a hook that may edit runs on a cached tensor, the cache entry is
  replaced by a copy (no copy when no such hook runs);
* `run_with_cache(pos_slice=...)` cuts each activation's position axis as `hooklens.activation_layout` lists it;
  TL's rule ("second from last, third for q/k/v/z/result") agrees on every default hook point but cuts the head
  axis of `hook_q_input` / `hook_k_input` / `hook_v_input` / `hook_attn_in` (and of `ln1`'s hooks when the
  inputs are split per head) and the batch axis of `hook_tokens`.
"""
from __future__ import annotations

import contextlib
import difflib
import itertools
import logging
import os
import sys
import threading
import warnings
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from hooklens.activation_layout import find_layout
from hooklens.errors import InvalidInputError
from hooklens.utils import Slice

HookFunction = Callable[..., Optional[Tensor]]
NamesFilter = Optional[Union[str, Sequence[str], Callable[[str], bool]]]
Direction = Literal["fwd", "bwd"]

logger = logging.getLogger(__name__)


READ_ONLY_ATTR = "hooklens_read_only"
# Set on an activation a caching hook stored without a copy: [(cache dict, key, stored alias)]. A hook that may
# edit the activation in place first swaps those cache entries for copies (see `_protect_cached`).
CACHED_ALIASES_ATTR = "_hooklens_cached_aliases"


class _ContextToken:
    """Identifies one open `hooks()` block of one model; its temporary hooks carry it."""

    __slots__ = ("owner", "serial")

    def __init__(self, owner: object) -> None:
        self.owner = id(owner)
        self.serial = next(_SERIALS)  # itertools.count's next() is atomic under the GIL

    def __repr__(self) -> str:
        return f"<hooks() block {self.serial}>"

    def __deepcopy__(self, memo: dict) -> None:
        # A model copied inside the block keeps the block's hooks, as TL's copy does, but no block of the copy
        # will remove them: there they become model-wide hooks (None), which reset_hooks() removes.
        return None


_SERIALS = itertools.count(1)
# The `hooks()` blocks open in the running thread / asyncio task. A new thread starts with none, so it runs no
# other thread's temporary hooks; a ContextVar, like the attention backend's switch.
_OPEN_BLOCKS: ContextVar[FrozenSet[_ContextToken]] = ContextVar("hooklens_open_hook_blocks", default=frozenset())
# Activations tagged with CACHED_ALIASES_ATTR (weak references) while the outermost `hooks()` block of this thread
# is open; it removes the tags on exit, so none outlives the block (a tag would travel with the tensor into a
# pickle or a deepcopy). Outside any block (caching hooks from `add_caching_hooks`) nothing is tagged: TL's aliasing.
_TAGGED: ContextVar[Optional[List[weakref.ref]]] = ContextVar("hooklens_tagged_activations", default=None)
# Registration replaces a HookPoint's handle list (copy on write), so a forward iterating the old list in another
# thread never sees it half-updated; the lock keeps two threads' read-modify-write from losing a hook.
_REGISTRATION_LOCK = threading.RLock()


def _caller_stacklevel() -> int:
    """`warnings.warn`'s stacklevel of the first frame outside hooklens and contextlib: the user's line."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(package_dir)
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    return level


def read_only_hook(fn: HookFunction) -> HookFunction:
    """Mark `fn` as a hook that never changes the activation (hooklens's caching hooks), so code that detects edits
    need not compare values around it. Returns `fn`."""
    setattr(fn, READ_ONLY_ATTR, True)
    return fn


@dataclass
class LensHandle:
    """A hook function registered on a HookPoint, with TL's bookkeeping (permanence and context level).

    `user_hook` is the callable the user passed (TL 3.9's field); `hook` is the function the HookPoint calls,
    the same callable here (TL keeps a PyTorch `RemovableHandle` there). `context_token` is the `hooks()` block
    that added a temporary hook (it runs only where that block is open); None for a model-wide hook."""

    hook: HookFunction
    is_permanent: bool = False
    context_level: Optional[int] = None
    user_hook: Optional[HookFunction] = None
    context_token: Optional[_ContextToken] = None

    def __post_init__(self) -> None:
        if self.user_hook is None:
            self.user_hook = self.hook

    def visible(self, open_blocks: Optional[FrozenSet[_ContextToken]] = None) -> bool:
        """Whether a forward in the running thread runs this hook: model-wide, or its `hooks()` block is open."""
        if self.context_token is None:
            return True
        return self.context_token in (_OPEN_BLOCKS.get() if open_blocks is None else open_blocks)

    def _matches(self, including_permanent: bool, level: Optional[int], open_blocks: FrozenSet) -> bool:
        if self.is_permanent and not including_permanent:
            return False
        return (level is None or self.context_level == level) and self.visible(open_blocks)


def _visible(handles: List[LensHandle]) -> List[LensHandle]:
    """The handles a forward in the running thread runs."""
    open_blocks = _OPEN_BLOCKS.get()
    return [h for h in handles if h.context_token is None or h.context_token in open_blocks]


def _protect_cached(activation: Tensor) -> None:
    """Before a hook that may edit `activation` in place runs: replace the cache entries that alias it by copies, so
    the cache keeps the values it stored (TL's cache shows the edit). Costs nothing for an uncached activation."""
    aliases = activation.__dict__.pop(CACHED_ALIASES_ATTR, None)
    for cache, key, stored in aliases or ():
        if cache.get(key) is stored:
            cache[key] = stored.clone()


def _tag_cached(activation: Tensor, cache: dict, key: str, stored: Tensor) -> None:
    """Note on `activation` that `cache[key]` is `stored`, an alias of it (see `_protect_cached`)."""
    tagged = _TAGGED.get()
    if tagged is None:
        return
    aliases = activation.__dict__.get(CACHED_ALIASES_ATTR)
    if aliases is None:
        aliases = activation.__dict__[CACHED_ALIASES_ATTR] = []
        tagged.append(weakref.ref(activation))
    aliases.append((cache, key, stored))


@contextmanager
def _tagging_scope() -> Iterator[None]:
    """Open in the outermost `hooks()` block of a thread: caching hooks tag activations inside it, untagged on exit."""
    if _TAGGED.get() is not None:
        yield
        return
    tagged: List[weakref.ref] = []
    _TAGGED.set(tagged)
    try:
        yield
    finally:
        _TAGGED.set(None)  # not ContextVar.reset: the block may close in another context than it opened in
        for ref in tagged:
            activation = ref()
            if activation is not None:
                activation.__dict__.pop(CACHED_ALIASES_ATTR, None)


class HookPoint(nn.Module):
    """An identity module that gives an activation a name and lets hooks read or replace it."""

    def __init__(self) -> None:
        super().__init__()
        self.name: Optional[str] = None
        self.ctx: Dict[Any, Any] = {}
        self.fwd_hooks: List[LensHandle] = []
        self.bwd_hooks: List[LensHandle] = []

    def __repr__(self) -> str:  # TL's format: HookPoint(), HookPoint(name='hook_embed', 2 fwd, 1 bwd)
        bits = [f"name={self.name!r}"] if self.name is not None else []
        if self.fwd_hooks:
            bits.append(f"{len(self.fwd_hooks)} fwd")
        if self.bwd_hooks:
            bits.append(f"{len(self.bwd_hooks)} bwd")
        return f"HookPoint({', '.join(bits)})"

    # -- registration -------------------------------------------------------------------------------------------
    def add_hook(
        self,
        hook: HookFunction,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: Optional[int] = None,
        prepend: bool = False,
        context_token: Optional[_ContextToken] = None,
    ) -> None:
        """Register `hook(activation, hook=self)`; `dir="bwd"` receives the gradient of the activation.
        `context_token` (set by `hooks()`) makes the hook run only where that block is open."""
        if not callable(hook):
            raise TypeError(f"Hook for {self.name!r} must be callable as fn(activation, hook), "
                            f"got {type(hook).__name__}.")
        handles = self._handles(dir)  # also checks `dir`
        handle = LensHandle(hook, is_permanent, level, hook, context_token)
        with _REGISTRATION_LOCK:
            handles = self._handles(dir)
            self._set_handles(dir, [handle, *handles] if prepend else handles + [handle])

    def add_perma_hook(self, hook: HookFunction, dir: Direction = "fwd") -> None:
        self.add_hook(hook, dir=dir, is_permanent=True)

    def remove_hooks(
        self, dir: Literal["fwd", "bwd", "both"] = "fwd", including_permanent: bool = False, level: Optional[int] = None
    ) -> None:
        """Remove the hooks this thread would run (another thread's temporary hooks are that thread's to remove)."""
        open_blocks = _OPEN_BLOCKS.get()
        with _REGISTRATION_LOCK:
            for d in ("fwd", "bwd") if dir == "both" else (dir,):
                self._set_handles(d, [h for h in self._handles(d)
                                      if not h._matches(including_permanent, level, open_blocks)])

    def _remove_block_hooks(self, token: _ContextToken, keep: bool) -> None:
        """At the end of `token`'s `hooks()` block: remove its hooks, or with `keep` make them model-wide (TL's
        `reset_hooks_end=False`: they run in later forwards until `reset_hooks()`). The caller holds
        `_REGISTRATION_LOCK`."""
        for d, handles in (("fwd", self.fwd_hooks), ("bwd", self.bwd_hooks)):
            if not handles:
                continue
            if keep:
                for h in handles:
                    h.context_token = None if h.context_token is token else h.context_token
                continue
            kept = [h for h in handles if h.context_token is not token]
            if len(kept) != len(handles):
                self._set_handles(d, kept)

    def has_hooks(
        self, dir: Literal["fwd", "bwd", "both"] = "both", including_permanent: bool = True, level: Optional[int] = None
    ) -> bool:
        """Whether hooks that a forward in this thread runs are attached (another thread's temporary ones are not
        counted)."""
        if not self.fwd_hooks and not self.bwd_hooks:
            return False
        open_blocks = _OPEN_BLOCKS.get()
        dirs = ("fwd", "bwd") if dir == "both" else (dir,)
        return any(h._matches(including_permanent, level, open_blocks) for d in dirs for h in self._handles(d))

    def may_edit(self) -> bool:
        """Whether a forward hook that may change the activation's values runs in this thread: any hook except those
        marked `read_only_hook` (hooklens's caching hooks); PyTorch's own module hooks count too."""
        if self._forward_hooks or self._forward_pre_hooks:
            return True
        return any(not getattr(h.hook, READ_ONLY_ATTR, False) for h in _visible(self.fwd_hooks))

    def clear_context(self) -> None:
        self.ctx = {}

    def layer(self) -> int:
        """Layer index parsed from the hook name (`blocks.5.attn.hook_z` -> 5)."""
        if self.name is None:
            raise ValueError("This HookPoint has no name; it must belong to a HookedRootModule that called setup().")
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ValueError(f"Hook {self.name!r} is not inside a block, so it has no layer.")
        return int(parts[1])

    def _handles(self, dir: str) -> List[LensHandle]:
        if dir == "fwd":
            return self.fwd_hooks
        if dir == "bwd":
            return self.bwd_hooks
        raise ValueError(f"Hook direction must be 'fwd' or 'bwd', got {dir!r}.")

    def _set_handles(self, dir: str, handles: List[LensHandle]) -> None:
        # straight into __dict__ (where __init__ put the lists): nn.Module.__setattr__ would cost more than the
        # rest of registering a hook
        self.__dict__["fwd_hooks" if dir == "fwd" else "bwd_hooks"] = handles

    # -- running ------------------------------------------------------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:  # bypasses nn.Module.__call__: a hook point without hooks is free
        if self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks:
            return super().__call__(x)  # PyTorch's own module hooks (register_forward_hook, ...) run as on TL's
        if not self.fwd_hooks and not self.bwd_hooks:
            return x
        return self.forward(x)

    def forward(self, x: Tensor) -> Tensor:
        open_blocks = _OPEN_BLOCKS.get()
        for handle in self.fwd_hooks:  # registration replaces the list, so this one stays as it is
            if handle.context_token is not None and handle.context_token not in open_blocks:
                continue  # a temporary hook of another thread's hooks() block
            if not getattr(handle.hook, READ_ONLY_ATTR, False):
                _protect_cached(x)
            result = handle.hook(x, hook=self)
            if result is not None:
                x = self._checked_replacement(result, x, handle.hook, "activation")
        if self.bwd_hooks and x.requires_grad:
            # Which backward hooks run is decided now, in the forward's thread: backward may run in another one.
            visible = _visible(self.bwd_hooks)
            if visible:
                x.register_hook(partial(self._run_bwd_hooks, visible))
        return x

    def _run_bwd_hooks(self, visible: List[LensHandle], grad: Tensor) -> Tensor:
        for handle in self.bwd_hooks:  # those still attached (a block's exit removes its hooks) that were visible
            if not any(handle is v for v in visible):
                continue
            if not getattr(handle.hook, READ_ONLY_ATTR, False):
                _protect_cached(grad)
            result = handle.hook(grad, hook=self)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 1:
                    result = result[0]
                grad = self._checked_replacement(result, grad, handle.hook, "gradient")
        return grad

    def _checked_replacement(self, result: Any, original: Tensor, fn: HookFunction, what: str) -> Tensor:
        """`result` if it can stand in for `original`: a tensor of the same shape, dtype and device."""
        where = f"Hook {_fn_name(fn)} on {self.name!r}"
        if not isinstance(result, Tensor):
            raise TypeError(f"{where} returned {type(result).__name__}; a hook must return None (keep the {what}) "
                            f"or a tensor of shape {tuple(original.shape)}.")
        if result.shape != original.shape:
            raise InvalidInputError(
                f"{where} returned a tensor of shape {tuple(result.shape)}, but the {what} there has shape "
                f"{tuple(original.shape)}; return a tensor of exactly that shape (or None).")
        if result.device != original.device:
            data = " (a meta tensor has no values)" if result.is_meta else ""
            raise InvalidInputError(
                f"{where} returned a tensor on device {result.device}{data}, but the {what} there is on "
                f"{original.device}; return a tensor on {original.device} (e.g. `result.to({what}.device)`).")
        if result.dtype != original.dtype and not _interchangeable_dtypes(result, original):
            raise InvalidInputError(
                f"{where} returned a {result.dtype} tensor, but the {what} there is {original.dtype}, the dtype the "
                f"model's next operations expect; return a {original.dtype} tensor (e.g. `result.to({what}.dtype)`).")
        return result


def _interchangeable_dtypes(result: Tensor, original: Tensor) -> bool:
    """Dtypes the model takes in place of each other: any floating types under autocast (which casts the next op's
    inputs), and integer token ids of any width (uint8 and bool index as masks, so they are not ids)."""
    if result.is_floating_point() and original.is_floating_point():
        return torch.is_autocast_enabled(original.device.type)
    not_ids = (torch.bool, torch.uint8)
    return (not result.is_floating_point() and not result.is_complex() and result.dtype not in not_ids
            and not original.is_floating_point() and not original.is_complex() and original.dtype not in not_ids)


def _fn_name(fn: Callable) -> str:
    if isinstance(fn, partial):
        fn = fn.func
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


class NotAHookPointError(KeyError, InvalidInputError, TypeError):
    """A hook name that names a module, not a HookPoint. TL 3.9 raises AssertionError for it in `add_hook` and
    TypeError in `run_with_hooks`; hooklens's other bad hook names raise KeyError. This is all three."""

    __str__ = Exception.__str__  # the message as written, not KeyError's quoted repr


def _names_matcher(hook_dict: Dict[str, HookPoint], name_filter: NamesFilter) -> Callable[[str], bool]:
    """`name_filter` (None, a name, a list of names or a predicate) as a predicate; listed names must exist."""
    if name_filter is None:
        return lambda name: True
    if callable(name_filter):
        return name_filter
    wanted = {name_filter} if isinstance(name_filter, str) else set(name_filter)
    for name in wanted:
        if name not in hook_dict:  # a typo would otherwise read as "no hooks attached"
            close = difflib.get_close_matches(name, list(hook_dict), n=5, cutoff=0.5)
            raise KeyError(f"Unknown hook name {name!r}." + (f" Closest valid names: {close}." if close else ""))
    return lambda name: name in wanted


class HookIntrospectionMixin:
    """`list_hooks()` for any class with a `hook_dict` (an attribute or a property, read with getattr)."""

    def list_hooks(
        self, name_filter: NamesFilter = None, dir: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = True,
    ) -> Dict[str, List[LensHandle]]:
        """The attached hooks by hook point name, forward before backward; hook points without hooks are left out.

        `name_filter`: a hook name, a list of names, or a predicate on names (None: all). `dir`: "fwd", "bwd" or
        "both". `including_permanent=False` leaves out permanent hooks. Lists every attached hook, as TL does,
        including the temporary hooks of `hooks()` blocks open in other threads (which this thread does not run)."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}.")
        hook_dict: Dict[str, HookPoint] = getattr(self, "hook_dict")
        matches = _names_matcher(hook_dict, name_filter)
        found: Dict[str, List[LensHandle]] = {}
        for name, hook_point in hook_dict.items():
            if not matches(name):
                continue
            handles = (hook_point.fwd_hooks if dir != "bwd" else []) + (hook_point.bwd_hooks if dir != "fwd" else [])
            if not including_permanent:
                handles = [h for h in handles if not h.is_permanent]
            if handles:
                found[name] = handles
        return found


class HookedRootModule(HookIntrospectionMixin, nn.Module):
    """Base class for models with HookPoints. Call `self.setup()` at the end of `__init__` to name the hooks.

    A subclass may define `hook_dict` (and `mod_dict`) as a property instead of calling `setup()`."""

    mod_dict: Dict[str, nn.Module]
    hook_dict: Dict[str, HookPoint]

    def __init__(self, *args: Any) -> None:
        super().__init__()
        self.is_caching = False
        for registry in ("mod_dict", "hook_dict"):
            if not hasattr(type(self), registry):  # a subclass's property or class attribute stays in charge
                setattr(self, registry, {})

    def setup(self) -> None:
        """Index every submodule and name every HookPoint by its attribute path."""
        self.mod_dict = {}
        self.hook_dict = {}
        for name, module in self.named_modules():
            if name == "":
                continue
            module.name = name  # type: ignore[assignment]  # TL sets .name on every submodule
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    def hook_points(self) -> Iterable[HookPoint]:
        return self.hook_dict.values()

    # -- registration -------------------------------------------------------------------------------------------
    def check_hooks_to_add(
        self, hook_point: HookPoint, hook_point_name: str, hook: HookFunction, dir: Direction = "fwd",
        is_permanent: bool = False, prepend: bool = False,
    ) -> None:
        """Override to refuse hooks on disabled hook points."""

    def get_hook_point(self, name: str) -> HookPoint:
        """The HookPoint named `name`; an unknown name raises KeyError listing the closest valid names."""
        hook_point = self.hook_dict.get(name)
        if hook_point is None and isinstance(getattr(self, "mod_dict", {}).get(name), nn.Module):
            raise NotAHookPointError(
                f"{name!r} names a module ({type(self.mod_dict[name]).__name__}), not a HookPoint (TL: assert "
                f"isinstance(hook_point, HookPoint)); hook one of its hook points, e.g. "
                f"{[n for n in self.hook_dict if n.startswith(name + '.')][:5]}."
            )
        if hook_point is None:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=5, cutoff=0.5)
            hint = f" Closest valid names: {close}." if close else ""
            raise KeyError(
                f"Unknown hook name {name!r}.{hint} See model.hook_dict.keys() for all {len(self.hook_dict)} hook "
                "points (utils.get_act_name builds names such as get_act_name('pattern', 0))."
            )
        return hook_point

    def check_and_add_hook(
        self, hook_point: HookPoint, hook_point_name: str, hook: HookFunction, dir: Direction = "fwd",
        is_permanent: bool = False, level: Optional[int] = None, prepend: bool = False,
    ) -> None:
        self.check_hooks_to_add(hook_point, hook_point_name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)
        hook_point.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_hook(
        self,
        name: Union[str, Callable[[str], bool]],
        hook: HookFunction,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: Optional[int] = None,
        prepend: bool = False,
    ) -> None:
        """Add `hook` to the hook point `name`, or to every hook point whose name passes the filter `name`.

        As in TL, every hook point goes through `check_hooks_to_add` (a filter matching a switched-off point
        raises); unlike TL, nothing is added when one of the matched points is refused."""
        if isinstance(name, str):
            hook_point = self.get_hook_point(name)
            self.check_and_add_hook(hook_point, name, hook, dir, is_permanent, level, prepend)
        elif callable(name):
            matched = [(hook_name, point) for hook_name, point in self.hook_dict.items() if name(hook_name)]
            for hook_name, point in matched:
                self.check_hooks_to_add(point, hook_name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)
            for _, point in matched:
                point.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)
        else:
            raise TypeError(f"Hook name must be a string or a filter function of the name, got {type(name).__name__}.")

    def add_perma_hook(self, name: Union[str, Callable[[str], bool]], hook: HookFunction,
                       dir: Direction = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(
        self, direction: Literal["fwd", "bwd", "both"] = "both", including_permanent: bool = False,
        level: Optional[int] = None,
    ) -> None:
        for hook_point in self.hook_dict.values():
            hook_point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        for hook_point in self.hook_dict.values():
            hook_point.clear_context()

    def reset_hooks(
        self, clear_contexts: bool = True, direction: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = False, level: Optional[int] = None,
    ) -> None:
        """Remove hooks (permanent ones only with `including_permanent=True`; with `level`, only the hooks of the
        `hooks()` blocks at that nesting level). Only the hooks a forward in this thread runs are removed: the
        temporary hooks of another thread's open `hooks()` block are that block's to remove."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level=level)
        self.is_caching = False

    # -- running ------------------------------------------------------------------------------------------------
    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[Tuple[Union[str, Callable], HookFunction]] = (),
        bwd_hooks: Sequence[Tuple[Union[str, Callable], HookFunction]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        _check: bool = True,
    ) -> Iterator["HookedRootModule"]:
        """Context manager: the hooks are attached inside the block and removed on exit, even on error.

        They run only in this thread (or asyncio task), inside the block: a forward in another thread does not see
        them, and blocks entered and left in any order remove only their own hooks. With `reset_hooks_end=False`
        they outlive the block as model-wide hooks (TL's behaviour), until `reset_hooks()`."""
        token = _ContextToken(self)
        level = self.context_level + 1  # TL's level: how deeply this model's blocks are nested, here per thread
        with _tagging_scope():
            _OPEN_BLOCKS.set(_OPEN_BLOCKS.get() | {token})
            hooked: Dict[int, HookPoint] = {}  # the points this block added hooks to, filled as it goes
            try:
                self._add_block_hooks(fwd_hooks, bwd_hooks, level, token, _check, hooked)
                yield self
            finally:
                try:
                    if reset_hooks_end and clear_contexts:
                        self.clear_contexts()
                    with _REGISTRATION_LOCK:
                        for hook_point in hooked.values():
                            hook_point._remove_block_hooks(token, keep=not reset_hooks_end)
                finally:  # not ContextVar.reset: blocks may close in any order (an ExitStack, a generator)
                    _OPEN_BLOCKS.set(_OPEN_BLOCKS.get() - {token})

    def _add_block_hooks(self, fwd_hooks: Sequence, bwd_hooks: Sequence, level: int, token: _ContextToken,
                         check: bool, hooked: Dict[int, HookPoint]) -> None:
        for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
            for name, fn in pairs:
                if isinstance(name, str) and check:  # a switched-off point named outright raises (TL: no check)
                    point = self.get_hook_point(name)
                    self.check_hooks_to_add(point, name, fn, dir=direction)
                    hooked[id(point)] = point
                    point.add_hook(fn, dir=direction, level=level, context_token=token)
                else:  # filters and caching hooks go on every selected point, switched off or not (as in TL)
                    matched = self._add_unchecked(name, fn, direction, level, token, hooked)
                    if check and callable(name):
                        self._warn_if_filter_never_fires(matched)

    @property
    def context_level(self) -> int:
        """How many of this model's `hooks()` blocks are open in the running thread (TL's counter, which is shared
        by all threads there; here each thread counts its own). The level `hooks()` gives its hooks is one more."""
        owner = id(self)
        return sum(1 for token in _OPEN_BLOCKS.get() if token.owner == owner)

    @context_level.setter
    def context_level(self, value: int) -> None:
        if value == self.context_level:  # TL-era code that initialises the counter (to 0) keeps working
            return
        raise AttributeError(f"context_level is the number of hooks() blocks open in this thread (now "
                             f"{self.context_level}); it changes by entering or leaving `with model.hooks(...)`, "
                             f"not by assignment (got {value!r}).")

    def _add_unchecked(self, name: Union[str, Callable[[str], bool]], fn: HookFunction, direction: Direction,
                       level: Optional[int], token: Optional[_ContextToken] = None,
                       hooked: Optional[Dict[int, HookPoint]] = None) -> List[str]:
        """Attach `fn` to the named point or every point the filter selects (noting them in `hooked`); returns the
        names it went on."""
        if isinstance(name, str):
            matched = [name]
            self.get_hook_point(name)  # an unknown name raises with the closest valid names
        elif callable(name):
            matched = [hook_name for hook_name in self.hook_dict if name(hook_name)]
        else:
            raise TypeError(f"Hook name must be a string or a filter function of the name, got {type(name).__name__}.")
        for hook_name in matched:
            point = self.hook_dict[hook_name]
            if hooked is not None:
                hooked[id(point)] = point
            point.add_hook(fn, dir=direction, level=level, context_token=token)
        return matched

    def _warn_if_filter_never_fires(self, matched: List[str]) -> None:
        """A filter whose hook can never run — it selects no hook point, or only switched-off ones — is almost
        always a mistake (TL attaches it silently): warn, naming what it selected and the switch to turn on."""
        reasons = []
        for hook_name in matched:
            try:
                self.check_hooks_to_add(self.hook_dict[hook_name], hook_name, None)
            except AssertionError as error:
                reasons.append(str(error))
            else:
                return  # at least one selected point is active
        if not matched:
            message = "A hook filter selected no hook point, so its hook never runs; check the filter against " \
                      "model.hook_dict."
        else:
            message = (f"A hook filter selected only switched-off hook points ({', '.join(matched[:4])}"
                       f"{', ...' if len(matched) > 4 else ''}), so its hook never runs. {reasons[0]}")
        warnings.warn(message, UserWarning, stacklevel=_caller_stacklevel())

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: Sequence[Tuple[Union[str, Callable], HookFunction]] = (),
        bwd_hooks: Sequence[Tuple[Union[str, Callable], HookFunction]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """Run the model with temporary hooks. `fwd_hooks` is a list of `(name_or_filter, fn)` pairs."""
        if len(bwd_hooks) > 0 and reset_hooks_end:
            logger.warning(
                "run_with_hooks removes backward hooks before you can call backward(); pass reset_hooks_end=False "
                "or use `with model.hooks(bwd_hooks=...)` and call backward inside the block."
            )
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)

    def get_caching_hooks(
        self,
        names_filter: NamesFilter = None,
        incl_bwd: bool = False,
        device: Any = None,
        remove_batch_dim: bool = False,
        cache: Optional[dict] = None,
        pos_slice: Any = None,
    ) -> Tuple[dict, list, list]:
        """Hooks that store `activation.detach()` (and `<name>_grad` with `incl_bwd`) into `cache`.

        The stored tensor shares memory with the activation (no copy), as in TL. Unlike TL, a hook that runs later
        in the same forward and may edit that activation in place (any hook not marked `read_only_hook`, here or at
        a hook point that receives the same tensor, such as the next block's `hook_resid_pre`) does not rewrite
        the cache: the entry is replaced by a copy just before that hook runs."""
        cache = {} if cache is None else cache
        name_filter_fn = self._names_filter_fn(names_filter)
        # TL's Slice.unwrap: a bare int becomes [int] so the position dim is kept; a Slice is used as is.
        position_slice = None if pos_slice is None else Slice.unwrap(pos_slice)

        def save_hook(tensor: Tensor, hook: HookPoint, is_backward: bool = False, pos_axis: int = -2) -> None:
            key = hook.name + "_grad" if is_backward else hook.name
            detached = tensor.detach()
            stored = detached if device is None else detached.to(device)
            aliased = stored is detached  # `.to` returns its input when nothing moves
            if remove_batch_dim:
                if stored.shape[0] != 1:
                    raise ValueError(
                        f"remove_batch_dim=True needs a batch of 1, but {hook.name!r} has batch {stored.shape[0]}; "
                        "run one prompt at a time or keep the batch dimension."
                    )
                stored = stored[0]
            if position_slice is not None and -stored.dim() <= pos_axis < stored.dim():
                stored = position_slice.apply(stored, dim=pos_axis)
            cache[key] = stored
            if aliased:  # a later hook that may edit `tensor` in place copies the entry first (_protect_cached)
                _tag_cached(tensor, cache, key, stored)

        fwd_hooks, bwd_hooks = [], []
        for name in self.hook_dict:
            if name_filter_fn(name):
                pos_axis = self._cached_pos_axis(name, remove_batch_dim)
                fwd_hooks.append((name, read_only_hook(partial(save_hook, is_backward=False, pos_axis=pos_axis))))
                if incl_bwd:
                    bwd_hooks.append((name, read_only_hook(partial(save_hook, is_backward=True, pos_axis=pos_axis))))
        return cache, fwd_hooks, bwd_hooks

    def _cached_pos_axis(self, name: str, remove_batch_dim: bool) -> int:
        """The axis a caching `pos_slice` cuts in the stored activation at `name` (non-negative, or -2 for a hook
        point outside the layout table: there TL's rule, position second from last, applies)."""
        layout = find_layout(name, getattr(self, "cfg", None))
        if layout is None:
            return -2
        return layout.axis("pos", batch_dim=not remove_batch_dim)

    def _names_filter_fn(self, names_filter: NamesFilter) -> Callable[[str], bool]:
        if names_filter is None:
            return lambda name: True
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, (list, tuple, set)):
            for name in names_filter:
                self.get_hook_point(name)  # unknown names raise with suggestions
            wanted = set(names_filter)
            return lambda name: name in wanted
        if callable(names_filter):
            return names_filter
        raise TypeError("names_filter must be None, a hook name, a list of hook names, or a function name -> bool.")

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NamesFilter = None,
        device: Any = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: Any = None,
        **model_kwargs: Any,
    ) -> Tuple[Any, dict]:
        """Run the model and return `(output, {hook_name: activation})`."""
        cache, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, pos_slice=pos_slice
        )
        self.is_caching = True
        try:
            with self.hooks(fwd, bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts, _check=False):
                model_out = self(*model_args, **model_kwargs)
                if incl_bwd:
                    if not isinstance(model_out, Tensor) or model_out.numel() != 1:
                        raise ValueError("incl_bwd=True calls backward() on the output, which must be a scalar "
                                         "(use return_type='loss').")
                    model_out.backward()
        finally:
            self.is_caching = False
        return model_out, cache

    def add_caching_hooks(
        self, names_filter: NamesFilter = None, incl_bwd: bool = False, device: Any = None,
        remove_batch_dim: bool = False, cache: Optional[dict] = None,
    ) -> dict:
        """Attach caching hooks (until `reset_hooks()`) and return the dict the next forwards write into."""
        cache = {} if cache is None else cache
        self.cache_some(cache, names_filter, incl_bwd, device, remove_batch_dim)
        self.is_caching = True
        return cache

    def cache_all(self, cache: dict, incl_bwd: bool = False, device: Any = None,
                  remove_batch_dim: bool = False) -> None:
        """Permanently-until-reset attach caching hooks for every hook point, writing into `cache`."""
        self.cache_some(cache, lambda name: True, incl_bwd, device, remove_batch_dim)

    def cache_some(
        self, cache: dict, names: NamesFilter, incl_bwd: bool = False, device: Any = None,
        remove_batch_dim: bool = False,
    ) -> None:
        _, fwd, bwd = self.get_caching_hooks(names, incl_bwd, device, remove_batch_dim=remove_batch_dim, cache=cache)
        for direction, pairs in (("fwd", fwd), ("bwd", bwd)):
            for name, fn in pairs:
                self.hook_dict[name].add_hook(fn, dir=direction)
