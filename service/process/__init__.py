"""Processes: the worker processes of one server and what keeps them in step.

A listening socket per worker, the drain at SIGTERM, the runtime directory the
workers share, repository management applied by every worker, and the CPUs and
machine facts a process sees.
"""
