"""Test support for the flyte-checkpoint monorepo; not published, never imported by a library.

A package of its own rather than ``checkpoint_io.testing``: what lives here starts emulator
processes, provisions Azurite with npm and holds the cross-package end-to-end stores (which
need ``flyte_checkpoint``), none of which belongs in a wheel that users install; and the
suites of ``tests/`` reach it the same way as checkpoint-io's own suite, as an installed
distribution instead of through ``sys.path`` inserts.

- :mod:`checkpoint_testing.emulators`: local storage emulators and the fault proxy.
- :mod:`checkpoint_testing.shaper`: the shaping proxy of the transfer tests and benchmarks.
- :mod:`checkpoint_testing.stores`: the stores of the cross-package end-to-end tests.

This module imports nothing: each submodule brings only its own dependencies.
"""
