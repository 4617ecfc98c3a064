"""`data clean` over worker processes: shutdown after an error never hangs, a dead worker is
reported, and temp files left by a killed run are removed by the next one (issue #18, item 9).

Every run that could hang goes through a subprocess with a timeout, so a regression fails the
test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path


from data_helpers import corpus, vicuna
from processes import signal_group

from vicuna_cli.data.pipeline import CleanConfig, clean

TIMEOUT = 120  # per run; a healthy run takes a few seconds


def python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_a_truncated_file_with_two_workers_fails_cleanly_every_time(tmp_path):
    """6 of 35 such runs never exited: the pool's terminate() waited on a dead worker."""
    full = corpus(tmp_path / "full.json", 400).read_bytes()
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(full[: len(full) * 2 // 3])  # cut inside a record, long after workers start
    out = tmp_path / "out" / "clean.jsonl"
    for attempt in range(8):
        result = vicuna("clean", str(truncated), "-o", str(out), "-j", "2", timeout=TIMEOUT)
        assert result.returncode == 1, (attempt, result.stderr[-2000:])
        assert "error:" in result.stderr and "please report" not in result.stderr
        assert list(out.parent.iterdir()) == []  # no output, no temp file


def test_a_worker_killed_mid_chunk_is_reported_not_waited_for():
    """multiprocessing.Pool loses the task of a killed worker and waits for it forever."""
    result = python("""
        import os, signal
        from vicuna_cli.core.errors import VicunaError
        from vicuna_cli.data.pipeline import OrderedPool

        def work(n):
            if n == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return n * n

        with OrderedPool(2, {}) as pool:
            got = []
            try:
                for value in pool.map(work, range(10)):
                    got.append(value)
            except VicunaError as exc:
                print("ERROR", exc.message)
            print("GOT", got)
    """)
    assert result.returncode == 0, result.stderr
    assert "was killed by SIGKILL before returning its chunk" in result.stdout
    assert "GOT [0, 1, 4]" in result.stdout  # the results before the lost one, in order


def test_an_input_error_after_the_workers_died_still_shuts_down(tmp_path):
    """The hang's mechanism: idle workers die (in a Pool one of them holds the shared task queue's
    lock while it waits), then the parent fails reading its input. Shutdown must still return."""
    result = python(f"""
        import multiprocessing, os, signal, time
        from pathlib import Path
        from vicuna_cli.core.errors import VicunaError
        from vicuna_cli.data.pipeline import OrderedPool

        DONE = Path({str(tmp_path / "done")!r})

        def work(n):
            DONE.touch()
            return n

        def tasks():
            yield 0
            deadline = time.monotonic() + 60
            while not DONE.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)  # let the workers go back to waiting for tasks
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
            raise VicunaError("invalid JSON at line 7")

        try:
            with OrderedPool(2, {{}}) as pool:
                for value in pool.map(work, tasks()):
                    pass
        except VicunaError as exc:
            print("ERROR", exc.message)
    """)
    assert result.returncode == 0, result.stderr
    assert "ERROR invalid JSON at line 7" in result.stdout


def test_a_killed_runs_temp_file_is_removed_by_the_next_run(tmp_path, capsys):
    source = corpus(tmp_path / "in.json", 20)
    out = tmp_path / "out" / "clean.jsonl"
    out.parent.mkdir()
    stale = out.parent / f".{out.name}.abc123.partial"  # what a kill -9 midway leaves
    stale.write_bytes(b'{"id": "half a record'.ljust(5000, b" "))
    other = out.parent / ".other.jsonl.xyz.partial"  # another output's: not ours to delete
    other.write_bytes(b"x")
    clean(CleanConfig(inputs=[str(source)], output=out, workers=1))
    assert not stale.exists() and other.exists() and out.is_file()
    assert f"removed {stale} (4.9 KB), left by an interrupted run" in " ".join(capsys.readouterr().err.split())


def test_a_temp_file_another_live_run_is_writing_is_kept(tmp_path):
    """A stale partial is one whose lock is free: a live run's (locked) one is left alone."""
    from vicuna_cli.core.store import AtomicFile

    source = corpus(tmp_path / "in.json", 20)
    out = tmp_path / "clean.jsonl"
    live = AtomicFile(out)  # another run, midway
    try:
        clean(CleanConfig(inputs=[str(source)], output=out, workers=1, overwrite=True))
        assert Path(live.tmp).exists()
    finally:
        live.discard()


def test_the_cleaned_records_survive_the_new_pool(tmp_path):
    """Same output for -j 1 and -j 3 with chunks spread round-robin (and more chunks than the window)."""
    source = corpus(tmp_path / "in.json", 300)
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"out{workers}.jsonl"
        clean(CleanConfig(inputs=[str(source)], output=out, workers=workers))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) > 100
    assert all(json.loads(line)["id"] for line in outs[0].splitlines())


def test_ctrl_c_while_the_workers_are_forked_leaves_no_orphan(tmp_path):
    """The flaky `data clean -j 2` Ctrl-C hang: a SIGINT landing in the parent between a worker's
    fork and the moment `Process.start` records the child left a worker nobody knew about. It
    held the command's stdout/stderr open and waited on its task queue forever, so the process
    that had printed its error never looked finished. Here the SIGINT is sent by the parent to
    itself right after each fork returns, which makes that window certain."""
    script = tmp_path / "fork_race.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from vicuna_cli.data.pipeline import OrderedPool
        real_fork = os.fork
        def fork_then_interrupt():
            pid = real_fork()
            if pid:
                os.kill(os.getpid(), signal.SIGINT)
            return pid
        os.fork = fork_then_interrupt
        try:
            OrderedPool(2, {})
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(0)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)  # EOF on the pipes: no process holds them any more
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("a forked worker outlived the interrupted pool and kept the pipes open")
    assert proc.returncode == 130, err
