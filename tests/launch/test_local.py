"""The local launcher's hold on INT and TERM: a rank it starts gets them only once its watcher is in place."""

import subprocess
import sys
import textwrap

# In a fresh process (as launch.py is): hold the signals, start a rank-like child as the elastic launcher
# does (multiprocessing's spawn), and report which signals the child starts with blocked.
SCRIPT = textwrap.dedent(
    """
    import multiprocessing, signal
    from titan.launch.local import _Stop, _stop_signals

    def blocked(queue):
        queue.put(sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, set())))

    if __name__ == "__main__":
        with _stop_signals(_Stop(has_ranks=True), hold_for_ranks=True):
            spawn = multiprocessing.get_context("spawn")
            queue = spawn.SimpleQueue()
            child = spawn.Process(target=blocked, args=(queue,))
            child.start()
            print(queue.get())
            child.join()
        print(sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, set())))
    """
)


def test_ranks_start_with_the_stop_signals_held(tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    in_rank, after = out.splitlines()
    assert in_rank == "['SIGINT', 'SIGTERM']"  # (starting multiprocessing's resource tracker unblocks them)
    assert after == "[]"  # and this process is as it was
