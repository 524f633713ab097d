"""conflayers.scheduler: requests submitted at any time from any thread, decoded in shared lanes."""

import threading

import pytest

from conflayers import Engine, GenerationConfig, NoDrafter, SamplingParams
from conflayers.drafts.ngram import NgramDrafter
from conflayers.scheduler import Scheduler
from tests.conftest import tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23], [1], [30, 31, 32, 30, 31], [7, 7, 7]]
BUDGETS = [9, 4, 12, 7, 15, 6]


@pytest.fixture(scope="module")
def engine(one_thread):
    return Engine(tiny_model("llama", vocab=61), kernels="native")


def offline(engine, prompt, budget):
    return engine.generate([prompt], GenerationConfig(max_new_tokens=budget), NoDrafter())[0].token_ids


class Collect:
    def __init__(self):
        self.done = threading.Event()
        self.result = None
        self.streamed = []

    def on_tokens(self, toks):
        self.streamed += toks
        return None

    def on_done(self, result):
        self.result = result
        self.done.set()


def wait(c: Collect):
    assert c.done.wait(60), "request did not finish"
    return c.result


@pytest.mark.parametrize("drafter", ["none", "ngram"])
def test_requests_from_many_threads_equal_offline_greedy(engine, drafter):
    make = {"none": NoDrafter, "ngram": lambda: NgramDrafter(3, 1, 4)}[drafter]
    sched = Scheduler(engine, lambda group: make(), max_batch=3)
    got = [Collect() for _ in PROMPTS]
    threads = [threading.Thread(target=sched.submit, args=(p, b), kwargs=dict(on_tokens=c.on_tokens, on_done=c.on_done))
               for p, b, c in zip(PROMPTS, BUDGETS, got)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, b, c in zip(PROMPTS, BUDGETS, got):
        r = wait(c)
        assert r.token_ids == offline(engine, p, b)
        assert c.streamed == r.token_ids  # every committed token reached on_tokens, in order
        assert r.finish_reason == "length"
    assert sched.lanes() == 1  # all greedy: one lane
    sched.close()


def test_on_tokens_can_end_a_request_and_cancel_frees_its_slot(engine):
    full = offline(engine, PROMPTS[0], 20)
    sched = Scheduler(engine, lambda g: NoDrafter(), max_batch=2)
    stopper = Collect()
    stopper.on_tokens = lambda toks: (stopper.streamed.extend(toks), "stop" if len(stopper.streamed) >= 5 else None)[1]
    sched.submit(PROMPTS[0], 20, on_tokens=stopper.on_tokens, on_done=stopper.on_done)
    r = wait(stopper)
    assert r.finish_reason == "stop" and 5 <= len(r.token_ids) < 20 and r.token_ids == full[: len(r.token_ids)]

    gate = threading.Event()
    slow = Collect()

    def hold(toks):  # the first step blocks until the test has cancelled the request
        slow.streamed += toks
        gate.wait(10)

    ticket = sched.submit(PROMPTS[1], 200, on_tokens=hold, on_done=slow.on_done)
    other = Collect()
    sched.submit(PROMPTS[2], 6, on_tokens=other.on_tokens, on_done=other.on_done)
    sched.cancel(ticket)
    gate.set()
    r = wait(slow)
    assert r.finish_reason == "abort" and len(r.token_ids) < 200
    assert wait(other).token_ids == offline(engine, PROMPTS[2], 6)
    # a request cancelled before it starts never runs
    queued = Collect()
    t = sched.submit(PROMPTS[3], 5, on_done=queued.on_done)
    sched.cancel(t)
    assert wait(queued).finish_reason == "abort" and queued.result.token_ids == []
    sched.close()
    assert sched.in_flight() == 0


def test_sampled_requests_get_their_own_lanes_and_a_seed_reproduces(engine):
    sched = Scheduler(engine, lambda g: NoDrafter(), max_batch=4)
    hot = SamplingParams(temperature=1.0, top_k=20)
    seeded = [Collect() for _ in range(3)]
    for c in seeded[:2]:
        sched.submit(PROMPTS[4], 12, hot, seed=7, on_done=c.on_done)
    sched.submit(PROMPTS[4], 12, hot, seed=8, on_done=seeded[2].on_done)
    greedy = Collect()
    sched.submit(PROMPTS[2], 10, on_done=greedy.on_done)
    unseeded = [Collect() for _ in range(2)]
    for c in unseeded:
        sched.submit(PROMPTS[0], 10, hot, on_done=c.on_done)
    a, b, c = (wait(x).token_ids for x in seeded)
    assert a == b and len(a) == 12  # same seed, same tokens, though they ran side by side
    assert a != c
    assert wait(greedy).token_ids == offline(engine, PROMPTS[2], 10)
    assert all(len(wait(x).token_ids) == 10 for x in unseeded)
    sched.close()


def test_a_failing_lane_fails_its_requests_and_the_scheduler_goes_on(engine):
    class Broken(NoDrafter):
        def propose(self, ctx):
            raise RuntimeError("kernel fault")

    drafters = {"bad": Broken(), "good": NoDrafter()}
    sched = Scheduler(engine, lambda g: drafters[g] if g in drafters else NoDrafter(), max_batch=2)
    bad = Collect()
    sched.submit(PROMPTS[0], 5, group="bad", on_done=bad.on_done)
    r = wait(bad)
    assert r.finish_reason == "error" and "kernel fault" in r.error
    good = Collect()
    sched.submit(PROMPTS[0], 5, group="good", on_done=good.on_done)
    assert wait(good).token_ids == offline(engine, PROMPTS[0], 5)
    sched.close()
    with pytest.raises(RuntimeError, match="closed"):
        sched.submit(PROMPTS[0], 5)


def test_bad_width_is_refused(engine):
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(engine, lambda g: NoDrafter(), max_batch=0)


def test_with_one_lane_other_settings_wait_for_it_and_all_finish(engine):
    sched = Scheduler(engine, lambda g: NoDrafter(), max_batch=2, max_lanes=1)
    hot, warm = SamplingParams(temperature=1.0), SamplingParams(temperature=0.5)
    runs = [(PROMPTS[0], 8, SamplingParams()), (PROMPTS[1], 6, hot), (PROMPTS[2], 7, warm), (PROMPTS[3], 5, SamplingParams())]
    got = [Collect() for _ in runs]
    for (p, b, sp), c in zip(runs, got):
        sched.submit(p, b, sp, on_done=c.on_done)
    assert [len(wait(c).token_ids) for c in got] == [8, 6, 7, 5]
    assert got[0].result.token_ids == offline(engine, PROMPTS[0], 8)
    assert got[3].result.token_ids == offline(engine, PROMPTS[3], 5)
    assert sched.lanes() <= 1
    sched.close()
