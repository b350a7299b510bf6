"""Temporary hooks stay in the thread that added them.

`run_with_hooks`, `hooks()` and `run_with_cache`'s caching hooks run only in the thread (asyncio task) whose
`hooks()` block added them; permanent hooks and hooks added with `add_hook` stay model-wide, as in TransformerLens.
Each concurrent test compares every thread's outputs with a single-threaded run of the same call, bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import threading
from functools import partial

import pytest
import torch
from conftest import make_tiny_model, zero_head_0

pytestmark = pytest.mark.usefixtures("single_thread")

ROUNDS = 15
TIMEOUT_S = 60  # a thread blocked on a barrier or event fails the test instead of hanging it


@pytest.fixture(scope="module")
def model():
    return make_tiny_model().eval()


@pytest.fixture(autouse=True)
def _no_hooks_left(model):
    yield
    model.reset_hooks(including_permanent=True)
    assert not model.list_hooks()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def add_offset(resid, hook):
    return resid + 1.0


def run_threads(*targets):
    """Run each target in its own thread; re-raise the first exception a thread raised."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - reported in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
        assert not thread.is_alive(), "a thread did not finish"
    if errors:
        raise errors[0]


@torch.no_grad()
def test_two_threads_with_different_temporary_hooks_match_single_threaded_runs(model, tokens):
    cached = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post"]

    def offset_run():
        return model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", add_offset)])

    def zero_head_cached_run():
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", zero_head_0)]):
            return model.run_with_cache(tokens, names_filter=cached)

    plain = model(tokens)
    offset_ref = offset_run()
    zero_ref, zero_cache_ref = zero_head_cached_run()
    assert not torch.equal(offset_ref, plain) and not torch.equal(zero_ref, plain)  # both hooks change the output
    barrier = threading.Barrier(3, timeout=TIMEOUT_S)
    results = {"offset": [], "zero": [], "plain": []}

    def loop(kind, call):
        for _ in range(ROUNDS):
            barrier.wait()
            results[kind].append(call())

    run_threads(partial(loop, "offset", offset_run), partial(loop, "zero", zero_head_cached_run),
                partial(loop, "plain", lambda: model(tokens)))
    assert all(torch.equal(out, offset_ref) for out in results["offset"])
    assert all(torch.equal(out, plain) for out in results["plain"])
    for out, cache in results["zero"]:
        assert torch.equal(out, zero_ref)
        assert sorted(cache.keys()) == sorted(cached)
        assert all(torch.equal(cache[name], zero_cache_ref[name]) for name in cached)


@torch.no_grad()
def test_plain_forward_in_another_thread_during_run_with_hooks_is_unhooked(model, tokens):
    plain = model(tokens)
    calls = {"hooked": 0, "other": 0}
    inside, other_done = threading.Event(), threading.Event()
    hooked_thread = {}

    def blocking_hook(resid, hook):
        calls["hooked" if threading.get_ident() == hooked_thread["id"] else "other"] += 1
        if hook.name == "blocks.0.hook_resid_post":
            inside.set()  # the other thread's forward runs while this hook is attached and running
            assert other_done.wait(TIMEOUT_S)
            other_done.clear()
        return torch.zeros_like(resid)

    def hooked():
        hooked_thread["id"] = threading.get_ident()
        for _ in range(ROUNDS):
            out = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_resid_post"), blocking_hook)])
            assert not torch.equal(out, plain)

    def other():
        for _ in range(ROUNDS):
            assert inside.wait(TIMEOUT_S)
            inside.clear()
            assert torch.equal(model(tokens), plain)
            other_done.set()

    run_threads(hooked, other)
    assert calls == {"hooked": 2 * ROUNDS, "other": 0}


def test_blocks_in_two_threads_closed_in_crossing_order_keep_each_others_hooks(model, tokens):
    """A enters, B enters, A exits, then B's hooks must still run (TL's shared level makes A's exit remove them)."""
    seen = {"A": [], "B": []}
    a_entered, b_entered, a_exited = threading.Event(), threading.Event(), threading.Event()

    def record(who, resid, hook):
        seen[who].append(hook.name)

    def thread_a():
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", partial(record, "A"))]):
            a_entered.set()
            assert b_entered.wait(TIMEOUT_S)
            model(tokens)
        a_exited.set()

    def thread_b():
        assert a_entered.wait(TIMEOUT_S)
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", partial(record, "B"))]):
            assert model.context_level == 1  # per thread: A's open block is not counted here
            b_entered.set()
            assert a_exited.wait(TIMEOUT_S)
            model(tokens)
            assert model.hook_dict["blocks.1.hook_resid_pre"].has_hooks()

    run_threads(thread_a, thread_b)
    assert seen == {"A": ["blocks.0.hook_resid_pre"], "B": ["blocks.1.hook_resid_pre"]}
    assert not model.list_hooks()


def test_blocks_closed_in_crossing_order_in_one_thread(model, tokens):
    seen = []
    first = model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: seen.append("first"))])
    second = model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: seen.append("second"))])
    first.__enter__()
    second.__enter__()
    assert model.context_level == 2
    assert [h.context_level for h in model.hook_dict["blocks.1.hook_resid_pre"].fwd_hooks] == [2]
    first.__exit__(None, None, None)
    model(tokens)
    assert seen == ["second"]
    assert model.context_level == 1
    second.__exit__(None, None, None)
    assert not model.list_hooks() and model.context_level == 0


def test_nested_levels_and_reset_by_level_as_in_tl(model, tokens):
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: None)]):
        assert model.context_level == 1
        with model.hooks(fwd_hooks=[("hook_pos_embed", lambda x, hook: None)]):
            assert model.context_level == 2
            model.reset_hooks(level=2)
            assert list(model.list_hooks()) == ["hook_embed"]
        assert model.context_level == 1
    assert model.context_level == 0
    model.context_level = 0  # TL-era code that initialises the counter keeps working
    with pytest.raises(AttributeError, match="hooks\\(\\) blocks open"):
        model.context_level = 3


def test_permanent_and_add_hook_hooks_are_seen_by_every_thread(model, tokens):
    threads_seen = set()

    def record(resid, hook):
        threads_seen.add((hook.name, threading.get_ident()))

    model.add_perma_hook("blocks.0.hook_resid_pre", record)
    model.add_hook("blocks.1.hook_resid_pre", record)
    idents = []

    def forward():
        idents.append(threading.get_ident())
        model(tokens)

    run_threads(forward, forward)
    assert threads_seen == {(name, ident) for ident in idents
                            for name in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre")}


def test_reset_hooks_in_one_thread_leaves_another_threads_temporary_hooks(model, tokens):
    seen = []
    entered, reset_done = threading.Event(), threading.Event()

    def holder():
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: seen.append(hook.name))]):
            entered.set()
            assert reset_done.wait(TIMEOUT_S)
            model(tokens)

    def resetter():
        assert entered.wait(TIMEOUT_S)
        assert not model.hook_dict["blocks.0.hook_resid_pre"].has_hooks()  # not visible here...
        assert "blocks.0.hook_resid_pre" in model.list_hooks()  # ...but listed, as TL lists every hook
        model.reset_hooks()
        reset_done.set()

    run_threads(holder, resetter)
    assert seen == ["blocks.0.hook_resid_pre"]


def test_hooks_left_by_reset_hooks_end_false_become_model_wide(model, tokens):
    seen = []
    model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: seen.append(threading.get_ident()))],
                         reset_hooks_end=False)
    run_threads(lambda: model(tokens))
    model(tokens)
    assert len(seen) == 3 and len(set(seen)) == 2  # the block's run, the other thread's, this thread's again
    model.reset_hooks()
    model(tokens)
    assert len(seen) == 3


def test_backward_hooks_with_reset_hooks_end_false_still_run(model, tokens):
    grads = {}

    def save(grad, hook):
        grads[hook.name] = grad.clone()

    loss = model.run_with_hooks(tokens, return_type="loss", bwd_hooks=[("blocks.0.hook_resid_post", save)],
                                reset_hooks_end=False)
    run_threads(loss.backward)  # backward from another thread: the hook was chosen in the forward's thread
    assert grads["blocks.0.hook_resid_post"].shape == (2, 12, 32)
    model.zero_grad(set_to_none=True)
    reference = {}
    with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", lambda g, hook: reference.setdefault("g", g.clone()))]):
        model(tokens, return_type="loss").backward()
    assert torch.equal(grads["blocks.0.hook_resid_post"], reference["g"])
    model.zero_grad(set_to_none=True)


def test_another_threads_backward_hooks_do_not_run_in_this_threads_backward(model, tokens):
    calls = []
    entered, done = threading.Event(), threading.Event()

    def holder():
        with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", lambda g, hook: calls.append("holder"))]):
            entered.set()
            assert done.wait(TIMEOUT_S)

    def other():
        assert entered.wait(TIMEOUT_S)
        model(tokens, return_type="loss").backward()
        done.set()

    run_threads(holder, other)
    assert calls == []
    model.zero_grad(set_to_none=True)


def test_concurrent_registration_loses_no_hook(model):
    point = model.hook_dict["blocks.0.hook_mlp_out"]
    barrier = threading.Barrier(8, timeout=TIMEOUT_S)
    functions = [partial(lambda i, x, hook: None, i) for i in range(8)]

    def register(fn):
        barrier.wait()
        for _ in range(50):
            model.add_hook("blocks.0.hook_mlp_out", fn)

    run_threads(*[partial(register, fn) for fn in functions])
    assert len(point.fwd_hooks) == 8 * 50
    assert {id(h.user_hook) for h in point.fwd_hooks} == {id(fn) for fn in functions}


def test_exit_stack_and_exception_leave_no_hooks(model, tokens):
    with pytest.raises(RuntimeError, match="boom"):
        with contextlib.ExitStack() as stack:
            stack.enter_context(model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: None)]))
            stack.enter_context(model.hooks(fwd_hooks=[("hook_pos_embed", lambda x, hook: None)]))
            raise RuntimeError("boom")
    assert not model.list_hooks() and model.context_level == 0


def test_model_copied_inside_a_block_keeps_its_hooks_model_wide(model, tokens):
    seen = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: seen.append(hook.name))]):
        twin = copy.deepcopy(model)
    twin(tokens)
    run_threads(lambda: twin(tokens))
    assert seen == ["hook_embed", "hook_embed"]
    twin.reset_hooks()
    assert not twin.list_hooks()
