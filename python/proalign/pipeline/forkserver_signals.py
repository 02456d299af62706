"""Imported by the worker forkserver only (its preload list, see executors.ProcessExecutor): the
forkserver ignores SIGTERM. A SIGTERM to the whole process group (SLURM's, or `kill -- -PGID`)
must reach only the writer, which finishes the slides in flight; a forkserver killed by it makes
every worker it started look dead (exit code 255) and their slides fail. (It ignores SIGINT
itself.) Never import this module anywhere else: it changes the importing process's signals."""
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
