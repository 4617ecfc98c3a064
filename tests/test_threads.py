"""The thread-count policy (core/threads.py): decided from injected CPU readings, no timing."""

import pytest

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.core.threads import (
    CHECK_EVERY,
    MAX_INTERVAL,
    MIN_INTERVAL,
    CpuSample,
    ThreadPolicy,
    choose_threads,
    others_between,
    requested_threads,
)


@pytest.mark.parametrize("cpus, others, expected", [
    (2, 0.0, 2),  # idle: a thread per core
    (2, 0.1, 2),  # a little background noise
    (2, 1.0, 1),  # one CPU-bound neighbour: 1 thread, not 2 fighting it
    (2, 2.0, 1),  # everything taken: still 1
    (2, 5.0, 1),  # readings beyond the CPUs are capped
    (2, -0.3, 2),  # a negative reading (clock ticks) is 0
    (8, 3.0, 5),
    (1, 0.0, 1),
    (0, 0.0, 1),
])
def test_start_count_is_one_per_free_cpu(cpus, others, expected):
    assert choose_threads(cpus, others, None) == expected


def test_a_neighbour_that_shares_cores_with_spinning_threads_still_drops_one():
    # 2 spinning threads + a CPU-bound neighbour on 2 cores: the neighbour gets ~2/3 of a core.
    assert choose_threads(2, 0.67, current=2) == 1
    # ... and with 1 thread it gets its whole core: stay at 1.
    assert choose_threads(2, 1.0, current=1) == 1


def test_hysteresis_keeps_the_count_between_the_bars():
    for others in (0.3, 0.4, 0.5):  # neither free enough to add nor busy enough to drop
        assert choose_threads(2, others, current=2) == 2
        assert choose_threads(2, others, current=1) == 1
    assert choose_threads(2, 0.2, current=1) == 2  # the neighbour left
    assert choose_threads(2, 0.55, current=2) == 1
    assert choose_threads(8, 0.0, current=3) == 8  # jumps, not one at a time


def test_others_between_subtracts_own_time():
    a = CpuSample(at=10.0, busy=100.0, own=5.0)
    b = CpuSample(at=11.0, busy=101.8, own=5.9)  # 1.8 CPU-s busy, 0.9 of them ours
    assert others_between(a, b, 2) == pytest.approx(0.9)
    assert others_between(a, CpuSample(11.0, 110.0, 5.0), 2) == 2.0  # capped at the CPUs
    assert others_between(a, CpuSample(11.0, 100.5, 6.0), 2) == 0.0  # tick rounding: not negative
    assert others_between(a, a, 2) == 0.0


class Machine:
    """Fake readings: a clock, the machine's busy time and ours, advanced by the test."""

    def __init__(self, running=1):
        self.t, self.busy, self.own = 0.0, 0.0, 0.0
        self.running = running
        self.applied = []
        self.warnings = []

    def sample(self):
        return CpuSample(self.t, self.busy, self.own)

    def run(self, seconds, ours, others):
        self.t += seconds
        self.own += ours * seconds
        self.busy += (ours + others) * seconds

    def policy(self, threads=None, env=None, cpus=2):
        return ThreadPolicy(threads, cpus=cpus, sampler=self.sample, running=lambda: self.running,
                            clock=lambda: self.t, apply=self.applied.append, warn=self.warnings.append, env=env or {})


def test_policy_adapts_while_running():
    m = Machine(running=1)  # only us at start
    policy = m.policy()
    assert policy.tick() == 2 and m.applied == [2]
    # A neighbour starts: it gets 2/3 of a core against our 2 spinning threads.
    for _ in range(CHECK_EVERY):
        m.run(0.05, ours=1.33, others=0.67)
        policy.tick()
    assert policy.threads == 1 and m.applied == [2, 1]
    # It keeps running (a whole core now): we stay at 1.
    for _ in range(3 * CHECK_EVERY):
        m.run(0.05, ours=1.0, others=1.0)
        policy.tick()
    assert policy.threads == 1 and m.applied == [2, 1]
    # It stops: back to 2.
    for _ in range(CHECK_EVERY):
        m.run(0.05, ours=1.0, others=0.0)
        policy.tick()
    assert policy.threads == 2 and m.applied == [2, 1, 2] and policy.changes == 2


def test_policy_checks_only_every_n_steps_and_min_interval():
    m = Machine(running=1)
    policy = m.policy()
    policy.tick()
    m.run(MIN_INTERVAL, ours=1.0, others=1.0)
    for _ in range(CHECK_EVERY - 2):  # not yet N steps, although the neighbour is there
        m.run(0.001, ours=1.0, others=1.0)
        policy.tick()
    assert policy.threads == 2 and MIN_INTERVAL + 0.001 * CHECK_EVERY < MAX_INTERVAL
    policy.tick()
    assert policy.threads == 1
    m2 = Machine(running=1)
    fast = m2.policy()
    for _ in range(4 * CHECK_EVERY):  # N steps, but too quickly for a reading
        m2.run(MIN_INTERVAL / (8 * CHECK_EVERY), ours=1.0, others=1.0)
        fast.tick()
    assert fast.threads == 2
    m2.run(MIN_INTERVAL, ours=1.0, others=1.0)
    fast.tick()
    assert fast.threads == 1


def test_a_long_pause_rechecks_at_the_next_step():
    """A chat turn after the user typed for a while: the first step decides from that interval."""
    m = Machine(running=1)
    policy = m.policy()
    policy.tick()
    m.run(30.0, ours=0.0, others=1.0)  # a neighbour ran while we waited
    assert MAX_INTERVAL < 30.0
    policy.tick()
    assert policy.threads == 1


def test_start_guess_uses_the_threads_running_now():
    m = Machine(running=2)  # us + a neighbour
    assert m.policy().threads == 1
    m = Machine(running=None)  # unknown: one per CPU; the first check corrects it
    assert m.policy().threads == 2


def test_fixed_threads_never_change_and_are_clamped_with_a_warning():
    m = Machine(running=1)
    policy = m.policy(threads=1)
    for _ in range(4 * CHECK_EVERY):
        m.run(0.1, ours=1.0, others=0.0)
        policy.tick()
    assert not policy.adaptive and policy.threads == 1 and m.applied == [1] and m.warnings == []
    clamped = m.policy(threads=64)
    assert clamped.threads == 2
    assert m.warnings == ["--threads 64 is more than the 2 CPU(s) this process may use: using 2"]


def test_env_sets_the_count_and_the_option_beats_it():
    assert requested_threads(None, {"VICUNA_THREADS": "1"}) == (1, "VICUNA_THREADS")
    assert requested_threads(2, {"VICUNA_THREADS": "1"}) == (2, "--threads")
    assert requested_threads(None, {"VICUNA_THREADS": " "}) == (None, "")
    # a torch user's OMP_NUM_THREADS is a fixed count too; VICUNA_THREADS and --threads beat it
    assert requested_threads(None, {"OMP_NUM_THREADS": "1"}) == (1, "OMP_NUM_THREADS")
    assert requested_threads(None, {"OMP_NUM_THREADS": "1", "VICUNA_THREADS": "2"}) == (2, "VICUNA_THREADS")
    assert requested_threads(2, {"OMP_NUM_THREADS": "1"}) == (2, "--threads")
    assert requested_threads(None, {"OMP_NUM_THREADS": "4,2"}) == (4, "OMP_NUM_THREADS")  # OpenMP's nested form
    m = Machine()
    m.policy(env={"VICUNA_THREADS": "9"})
    assert m.warnings == ["VICUNA_THREADS 9 is more than the 2 CPU(s) this process may use: using 2"]


@pytest.mark.parametrize("threads, env, message", [
    (0, {}, "--threads must be 1 or more, got 0"),
    (-2, {}, "--threads must be 1 or more, got -2"),
    (None, {"VICUNA_THREADS": "0"}, "VICUNA_THREADS must be 1 or more, got 0"),
    (None, {"VICUNA_THREADS": "two"}, "VICUNA_THREADS='two' is not a whole number"),
    (None, {"OMP_NUM_THREADS": "many"}, "OMP_NUM_THREADS='many' is not a whole number"),
])
def test_bad_counts_are_errors(threads, env, message):
    with pytest.raises(VicunaError) as info:
        requested_threads(threads, env)
    assert info.value.message == message and info.value.hint


def test_policy_reapplies_in_a_new_computing_thread():
    """torch's OpenMP count is per OS thread: a step run from another thread sets it there too."""
    import threading

    m = Machine(running=1)
    policy = m.policy(threads=1)
    policy.tick()
    policy.tick()
    worker = threading.Thread(target=policy.tick)
    worker.start()
    worker.join()
    assert m.applied == [1, 1]


def test_the_engine_sets_the_count_in_its_computing_thread(sp_native):
    """BatchEngine ticks the policy in the thread that runs the model (OpenMP's count is per OS
    thread): the daemon thread of a started engine, the caller's thread for Engine.generate."""
    import threading

    from vicuna_cli.core.batch import BatchEngine
    from vicuna_cli.core.generate import Engine, SamplingParams

    seen = []

    def recorder(n):
        seen.append((n, threading.current_thread().name))

    engine = BatchEngine(sp_native.model, sp_native.tokenizer, 256, max_batch_size=2, threads=1, max_queue=256)
    engine.threads = ThreadPolicy(1, cpus=2, apply=recorder, env={})
    engine.start()
    try:
        request = engine.submit([1, 5, 6, 7], SamplingParams(temperature=0, max_new_tokens=4))
        assert list(request.events(timeout=60))[-1].finish_reason in ("stop", "length")
    finally:
        engine.stop()
    assert seen and {name for _, name in seen} == {"vicuna-batch-engine"} and {n for n, _ in seen} == {1}

    seen.clear()
    chat = Engine(sp_native.model, sp_native.tokenizer, 256, threads=1)
    chat.batch.threads = ThreadPolicy(1, cpus=2, apply=recorder, env={})
    list(chat.generate([1, 5, 6, 7], SamplingParams(temperature=0, max_new_tokens=4)))
    assert seen == [(1, threading.current_thread().name)]


def test_threads_option_is_declared_once_for_every_command_that_runs_a_model():
    from vicuna_cli.chat.runner import ChatConfig
    from vicuna_cli.core.config import build_config
    from vicuna_cli.serve.config import ServeConfig, WorkerConfig
    from vicuna_cli.serve.launcher import plan
    from vicuna_cli.train.config import TrainConfig

    train = {"model": "m", "data": ["d.json"], "output": "o"}
    for cls, base in ((ChatConfig, {}), (ServeConfig, {}), (WorkerConfig, {"model": ["m"]}), (TrainConfig, train)):
        assert build_config(cls, base).threads is None  # adapt
        assert build_config(cls, {**base, "threads": 3}).threads == 3
        with pytest.raises(VicunaError, match=r"^--threads: must be 1 or more, got 0"):
            build_config(cls, {**base, "threads": 0})
    workers = [args for role, args in plan(build_config(ServeConfig, {"threads": 1})) if role.startswith("worker")]
    assert workers and all(args[args.index("--threads") + 1] == "1" for args in workers)
    workers = [args for role, args in plan(build_config(ServeConfig, {})) if role.startswith("worker")]
    assert all("--threads" not in args for args in workers)
